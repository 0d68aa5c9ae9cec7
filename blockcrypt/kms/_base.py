"""Types shared by every CMK store backend, and the wrapped-DEK wire format.

Rules of this module:

* A volume's data encryption key (DEK) is 64 random bytes (AES-256-XTS) that
  leave the store only inside a :class:`DataKey` or as an :class:`XTSKey`.
* On disk the DEK exists only wrapped: AES-256-GCM under a customer master key
  (CMK) with a 12-byte IV, the 16-byte tag appended to the ciphertext, and the
  bytes of :func:`encryption_context` as additional authenticated data (AAD).
  Any AES-GCM implementation can check this format, so the in-memory backend
  and the PKCS#11 backend produce interchangeable blobs.
* The AAD binds a wrapped DEK to one volume, one header format version and one
  CMK: a blob copied into another volume's header does not unwrap.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from blockcrypt.crypto.xts import KEY_SIZE, XTSKey
from blockcrypt.errors import KMSError, UnwrapFailed

__all__ = [
    "ALIAS_PATTERN",
    "CMKStore",
    "DataKey",
    "GCM_IV_SIZE",
    "GCM_TAG_SIZE",
    "KEY_ID_PATTERN",
    "KEY_SPEC",
    "KeyInfo",
    "KeyMaterialStore",
    "WRAP_MECHANISM",
    "WrappedKey",
    "check_alias",
    "check_context",
    "context_volume",
    "encryption_context",
]

KEY_SPEC = "AES_256"
WRAP_MECHANISM = "AES-256-GCM"
WRAP_KEY_VERSION = 1
GCM_IV_SIZE = 12
GCM_TAG_SIZE = 16
WRAPPED_SIZE = KEY_SIZE + GCM_TAG_SIZE

#: A key id is "cmk-" and 16 lowercase hex digits (64 random bits).
KEY_ID_PATTERN = re.compile(r"cmk-[0-9a-f]{16}")
#: An alias is 1 to 64 characters out of letters, digits and ``_ . / -``.
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_./-]{1,64}")

# Versioned prefix of the AAD; the NUL keeps it apart from any JSON text.
_CONTEXT_PREFIX = b"blockcrypt-dek-v1\0"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Public description of one customer master key; it holds no key bytes."""

    key_id: str
    alias: str
    created: str
    key_spec: str
    state: str
    backend: str
    token_label: str | None
    #: Every alias of the key, primary (``alias``) first.
    aliases: tuple[str, ...] = ()
    #: The version new data keys are wrapped with; older versions still unwrap.
    current_version: int = 1
    #: For a key in state PendingDeletion: when ``kms purge`` may destroy it.
    deletion_date: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        doc = asdict(self)
        doc["aliases"] = list(self.aliases)
        return doc


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A DEK encrypted under a CMK, as stored in a volume header.

    ``ciphertext`` is the GCM ciphertext followed by the 16-byte tag. The IV
    and the ciphertext stay out of ``repr`` so that a logged object does not
    leak the blob.
    """

    key_id: str
    key_version: int
    mechanism: str
    iv: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict; the byte fields are standard base64."""
        return {
            "key_id": self.key_id,
            "key_version": self.key_version,
            "mechanism": self.mechanism,
            "iv": base64.b64encode(self.iv).decode("ascii"),
            "ciphertext": base64.b64encode(self.ciphertext).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WrappedKey:
        """Parse the output of :meth:`to_json`.

        Raises:
            ValueError: a field is missing, has the wrong type or is not base64.
        """
        try:
            key_id, version, mechanism = (
                data["key_id"],
                data["key_version"],
                data["mechanism"],
            )
            iv = base64.b64decode(data["iv"], validate=True)
            ciphertext = base64.b64decode(data["ciphertext"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"wrapped key record is malformed: {exc}") from exc
        if not isinstance(key_id, str) or not isinstance(mechanism, str):
            raise ValueError("wrapped key record: key_id and mechanism must be text")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("wrapped key record: key_version must be an integer")
        return cls(key_id, version, mechanism, iv, ciphertext)

    def format_problem(self) -> str | None:
        """Say what is wrong with the record's shape, or return None if nothing is."""
        if self.mechanism != WRAP_MECHANISM:
            return f"mechanism is {self.mechanism!r}; expected {WRAP_MECHANISM!r}"
        if self.key_version < WRAP_KEY_VERSION:
            return f"key version is {self.key_version}; expected 1 or more"
        if len(self.iv) != GCM_IV_SIZE:
            return f"IV is {len(self.iv)} bytes; expected {GCM_IV_SIZE}"
        if len(self.ciphertext) != WRAPPED_SIZE:
            return (
                f"ciphertext is {len(self.ciphertext)} bytes; expected "
                f"{WRAPPED_SIZE} (a {KEY_SIZE}-byte DEK and a {GCM_TAG_SIZE}-byte tag)"
            )
        return None


@dataclass(slots=True)
class DataKey:
    """A fresh DEK: the plaintext for the volume, the wrapped form for its header."""

    plaintext: XTSKey
    wrapped: WrappedKey


def encryption_context(volume_uuid: str, format_version: int, key_id: str) -> bytes:
    """Return the canonical AAD that binds a wrapped DEK to its volume.

    The encoding is ``b"blockcrypt-dek-v1\\0"`` followed by compact JSON with
    sorted keys and ASCII escapes, so equal inputs always give equal bytes and
    no two different inputs collide.

    Args:
        volume_uuid: the volume's UUID; any spelling ``uuid.UUID`` accepts is
            normalised to lowercase with hyphens.
        format_version: the volume header format version (an integer >= 0).
        key_id: the id of the CMK that wraps the DEK.

    Raises:
        ValueError: an argument has the wrong type or form.
    """
    try:
        canonical_uuid = str(uuid.UUID(volume_uuid))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"volume UUID {volume_uuid!r} is not a UUID; expected the form "
            "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
        ) from exc
    if not isinstance(format_version, int) or isinstance(format_version, bool):
        raise ValueError(
            f"format version is {format_version!r}; expected an integer >= 0"
        )
    if format_version < 0:
        raise ValueError(f"format version is {format_version}; expected >= 0")
    if not isinstance(key_id, str) or not key_id:
        raise ValueError(f"key id is {key_id!r}; expected a non-empty string")
    body = {
        "format_version": format_version,
        "key_id": key_id,
        "volume_uuid": canonical_uuid,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _CONTEXT_PREFIX + text.encode("ascii")


def context_volume(context: bytes) -> str | None:
    """Return the volume UUID inside an :func:`encryption_context`, or None.

    Used to name the volume in audit records; a context in another form
    yields None rather than an error.
    """
    if not bytes(context).startswith(_CONTEXT_PREFIX):
        return None
    try:
        body = json.loads(bytes(context)[len(_CONTEXT_PREFIX) :])
    except ValueError:
        return None
    value = body.get("volume_uuid") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


def check_alias(alias: object) -> str:
    """Return ``alias`` if it is a valid alias, else raise ``ValueError``.

    A valid alias matches :data:`ALIAS_PATTERN` and does not look like a key
    id, so that a lookup string always means one thing.
    """
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
        raise ValueError(
            f"alias {alias!r} is invalid; use 1 to 64 characters out of "
            "A-Z a-z 0-9 _ . / -"
        )
    if KEY_ID_PATTERN.fullmatch(alias):
        raise ValueError(
            f"alias {alias!r} has the form of a key id (cmk-<16 hex digits>); "
            "choose a name that cannot be mistaken for one"
        )
    return alias


def draw_dek(random_bytes: Callable[[int], bytes], where: str) -> XTSKey:
    """Return a new DEK from ``random_bytes(64)``, redrawn if its halves are equal.

    Equal halves happen with probability 2**-256 from a working generator, so
    a second equal draw means the generator is broken.
    """
    for _ in range(3):
        candidate = bytearray(random_bytes(KEY_SIZE))
        if len(candidate) != KEY_SIZE:
            raise KMSError(
                f"random generator of {where} returned {len(candidate)} bytes; "
                f"asked for {KEY_SIZE}"
            )
        try:
            if candidate[:32] != candidate[32:]:
                return XTSKey(candidate)
        finally:
            candidate[:] = bytes(len(candidate))
    raise KMSError(
        f"random generator of {where} returned a DEK with equal halves three "
        "times in a row; the generator is broken, do not use this store"
    )


def check_context(context: object) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``context`` is non-empty bytes.

    An empty AAD would leave a wrapped DEK unbound to any volume.
    """
    if not isinstance(context, bytes | bytearray):
        raise TypeError(
            f"context is {type(context).__name__}; expected bytes from "
            "encryption_context()"
        )
    if not context:
        raise ValueError("context is empty; build it with encryption_context()")


def key_not_found_message(key: str, where: str) -> str:
    """Return the KeyNotFound text for a lookup of ``key`` in ``where``."""
    return (
        f"no customer master key {key!r} {where}; "
        "run `blockcrypt kms list-keys` to see the keys"
    )


def version_not_found_message(key_id: str, version: int, where: str) -> str:
    """Return the KeyNotFound text for a key version whose material is gone."""
    return (
        f"customer master key {key_id} has no version {version} {where}; the "
        "data key was wrapped by a version that does not exist here (restored "
        "from another token, or its material was destroyed)"
    )


def alias_matches(info: KeyInfo, alias: str) -> bool:
    """Return whether a backend's key record answers to ``alias``.

    An empty stored alias (the key's aliases were all removed) matches nothing.
    """
    return bool(info.alias) and info.alias == alias


def unwrap_failed_message(key_id: str, alias: str | None, detail: str) -> str:
    """Return the UnwrapFailed text for a blob that CMK ``key_id`` refused."""
    name = f"{key_id} ({alias!r})" if alias else key_id
    return (
        f"the wrapped DEK cannot be unwrapped with CMK {name}: {detail}. It was "
        "wrapped for another volume, by another key, or the volume header is "
        "corrupt; check that the header belongs to this volume and names the "
        "right key, and restore the header from a backup if it was damaged"
    )


def unwrapped_key(plaintext: bytearray, info: KeyInfo) -> XTSKey:
    """Turn an unwrapped DEK buffer into an ``XTSKey``, then zero the buffer.

    Raises:
        UnwrapFailed: the plaintext is not a usable AES-256-XTS key.
    """
    try:
        return XTSKey(plaintext)
    except ValueError as exc:
        raise UnwrapFailed(
            unwrap_failed_message(info.key_id, info.alias, str(exc))
        ) from exc
    finally:
        plaintext[:] = bytes(len(plaintext))


class CMKStore(Protocol):
    """A store of customer master keys that wraps and unwraps volume DEKs.

    Implementations are safe to call from several threads. Every method that
    takes ``key`` accepts a key id or an alias.
    """

    def create_key(self, alias: str) -> KeyInfo:
        """Create a new AES-256 CMK named ``alias``.

        Raises:
            KMSError: the alias is invalid or already taken.
        """
        ...

    def list_keys(self) -> list[KeyInfo]:
        """Return every CMK of this store, oldest first."""
        ...

    def describe_key(self, key: str) -> KeyInfo:
        """Return the CMK with this id or alias.

        Raises:
            KeyNotFound: no CMK matches.
        """
        ...

    def create_datakey(
        self, key: str, context: bytes, version: int | None = None
    ) -> DataKey:
        """Draw a new 64-byte DEK and wrap it under the CMK with ``context`` as AAD.

        ``version`` picks the key version that wraps; None means the newest.

        Raises:
            KeyNotFound: no CMK (or no such version) matches ``key``.
        """
        ...

    def encrypt_datakey(
        self, key: str, plaintext: XTSKey, context: bytes, version: int | None = None
    ) -> WrappedKey:
        """Wrap an existing DEK under the CMK (for rewrap); see create_datakey."""
        ...

    def decrypt_datakey(self, wrapped: WrappedKey, context: bytes) -> XTSKey:
        """Unwrap a DEK with the CMK named in ``wrapped.key_id``.

        Raises:
            KeyNotFound: that CMK is not in this store.
            UnwrapFailed: the blob is malformed, was made for another context
                or by another key, or was altered.
        """
        ...

    def close(self) -> None:
        """Release the store's resources; later calls fail."""
        ...


class KeyMaterialStore(CMKStore, Protocol):
    """What a backend offers beyond :class:`CMKStore`: the key material itself.

    The lifecycle layer (:mod:`blockcrypt.kms.lifecycle`) keeps states,
    aliases and deletion dates; a backend only makes, lists and destroys the
    material of each key version, which never leaves it.
    """

    def key_versions(self, key_id: str) -> list[int]:
        """Return the versions whose material exists for ``key_id``, ascending."""
        ...

    def create_key_version(self, key_id: str, version: int) -> None:
        """Generate the material of ``version`` inside the backend.

        Idempotent: material that already exists for that version (left by a
        crash before the catalog recorded it, so never used) is kept.
        """
        ...

    def set_primary_alias(self, key_id: str, alias: str) -> None:
        """Record ``alias`` (or "" for none) as the name stored with the key."""
        ...

    def destroy_key(self, key_id: str) -> None:
        """Destroy every version of the key, for good; a missing key is fine."""
        ...
