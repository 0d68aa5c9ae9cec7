"""In-memory CMK store for unit tests.

The CMKs are plain software AES-256 keys held in process memory and lost when
the store is dropped; nothing here is fit for production. The wrap format is
the same AES-256-GCM layout the PKCS#11 backend produces, so a test can swap
one backend for the other.

This module imports ``cryptography.hazmat`` for AES-GCM, an exception to the
rule that only ``blockcrypt.crypto.xts`` does: a test double needs a software
implementation of what the HSM does.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blockcrypt.crypto.xts import XTSKey
from blockcrypt.errors import KeyNotFound, KMSError, UnwrapFailed
from blockcrypt.kms._base import (
    GCM_IV_SIZE,
    KEY_ID_PATTERN,
    KEY_SPEC,
    WRAP_KEY_VERSION,
    WRAP_MECHANISM,
    DataKey,
    KeyInfo,
    WrappedKey,
    alias_matches,
    check_alias,
    check_context,
    draw_dek,
    key_not_found_message,
    unwrap_failed_message,
    unwrapped_key,
    version_not_found_message,
)

__all__ = ["MemoryCMKStore"]

_WHERE = "in the memory store"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class MemoryCMKStore:
    """A :class:`~blockcrypt.kms.KeyMaterialStore` that keeps its CMKs in a dict.

    Args:
        random_bytes: source of key ids, CMKs, DEKs and IVs (``os.urandom`` by
            default); tests pass a scripted one to make runs repeatable.
        clock: returns the current time for ``KeyInfo.created``.
    """

    def __init__(
        self,
        random_bytes: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._random = random_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # key id -> (KeyInfo, {version: AES-GCM key})
        self._keys: dict[str, tuple[KeyInfo, dict[int, AESGCM]]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryCMKStore(keys={len(self._keys)})"

    def create_key(self, alias: str) -> KeyInfo:
        try:
            check_alias(alias)
        except ValueError as exc:
            raise KMSError(str(exc)) from exc
        with self._lock:
            self._check_open()
            if any(info.alias == alias for info, _ in self._keys.values()):
                raise KMSError(
                    f"alias {alias!r} is already used by another customer master "
                    "key in the memory store; choose another alias"
                )
            key_id = "cmk-" + self._random(8).hex()
            created = self._clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            info = KeyInfo(key_id, alias, created, KEY_SPEC, "Enabled", "memory", None)
            self._keys[key_id] = (info, {WRAP_KEY_VERSION: AESGCM(self._random(32))})
            return info

    def list_keys(self) -> list[KeyInfo]:
        with self._lock:
            self._check_open()
            infos = [info for info, _ in self._keys.values()]
        return sorted(infos, key=lambda i: (i.created, i.alias))

    def describe_key(self, key: str) -> KeyInfo:
        with self._lock:
            return self._find(key)[0]

    def create_datakey(
        self, key: str, context: bytes, version: int | None = None
    ) -> DataKey:
        check_context(context)
        with self._lock:
            self._find(key)  # an unknown key fails before any randomness is drawn
        dek = draw_dek(self._random, "the memory store")
        try:
            return DataKey(dek, self.encrypt_datakey(key, dek, context, version))
        except BaseException:
            dek.wipe()
            raise

    def encrypt_datakey(
        self, key: str, plaintext: XTSKey, context: bytes, version: int | None = None
    ) -> WrappedKey:
        check_context(context)
        with self._lock:
            info, versions = self._find(key)
            number, cmk = self._version(info, versions, version)
            iv = self._random(GCM_IV_SIZE)
            ciphertext = cmk.encrypt(iv, bytes(plaintext), bytes(context))
        return WrappedKey(info.key_id, number, WRAP_MECHANISM, iv, ciphertext)

    def decrypt_datakey(self, wrapped: WrappedKey, context: bytes) -> XTSKey:
        check_context(context)
        with self._lock:
            info, versions = self._find(wrapped.key_id)
            problem = wrapped.format_problem()
            if problem is not None:
                raise UnwrapFailed(
                    unwrap_failed_message(info.key_id, info.alias, problem)
                )
            _, cmk = self._version(info, versions, wrapped.key_version)
            try:
                plaintext = bytearray(
                    cmk.decrypt(wrapped.iv, wrapped.ciphertext, bytes(context))
                )
            except InvalidTag as exc:
                raise UnwrapFailed(
                    unwrap_failed_message(
                        info.key_id, info.alias, "the authentication tag does not match"
                    )
                ) from exc
        return unwrapped_key(plaintext, info)

    # -- KeyMaterialStore ----------------------------------------------------

    def key_versions(self, key_id: str) -> list[int]:
        with self._lock:
            return sorted(self._find(key_id)[1])

    def create_key_version(self, key_id: str, version: int) -> None:
        with self._lock:
            versions = self._find(key_id)[1]
            if version not in versions:
                versions[version] = AESGCM(self._random(32))

    def set_primary_alias(self, key_id: str, alias: str) -> None:
        with self._lock:
            info, versions = self._find(key_id)
            self._keys[key_id] = (dataclasses.replace(info, alias=alias), versions)

    def destroy_key(self, key_id: str) -> None:
        with self._lock:
            self._check_open()
            self._keys.pop(key_id, None)

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise KMSError("the memory CMK store is closed")

    def _find(self, key: str) -> tuple[KeyInfo, dict[int, AESGCM]]:
        self._check_open()
        if KEY_ID_PATTERN.fullmatch(key):
            entry = self._keys.get(key)
        else:
            entry = next(
                (e for e in self._keys.values() if alias_matches(e[0], key)), None
            )
        if entry is None:
            raise KeyNotFound(key_not_found_message(key, _WHERE))
        return entry

    @staticmethod
    def _version(
        info: KeyInfo, versions: dict[int, AESGCM], version: int | None
    ) -> tuple[int, AESGCM]:
        number = max(versions) if version is None else version
        if number not in versions:
            raise KeyNotFound(version_not_found_message(info.key_id, number, _WHERE))
        return number, versions[number]
