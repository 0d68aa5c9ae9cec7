"""CMK store on a PKCS#11 token (SoftHSM2 by default, any HSM in principle).

Rules of this module, from measurements on SoftHSM 2.6.1 with python-pkcs11
0.10.1 (``docs/kms.md``):

* **One lock around every PKCS#11 call.** python-pkcs11 calls
  ``C_Initialize(NULL)``, which tells SoftHSM that no two threads will call in
  at once, and then releases the GIL around each call. Concurrent calls crash
  the interpreter. ``_LOCK`` is taken around every call without exception:
  open, login, find, attribute reads, create, destroy, encrypt, decrypt.
* **One logged-in session per token and process.** Login state belongs to the
  process, not the session, so stores opened on the same token share one
  session (``_SHARED``) and the last one to close it logs out.
* **No fork after loading.** A child inherits the parent's module state, which
  is not portable; calls from a forked child are refused. Use ``spawn``.
* **Tokens by label, never by slot:** SoftHSM renumbers slots on init.
* **Errors are coarse:** SoftHSM 2.6.1 answers a bad tag, wrong AAD and wrong
  CMK with ``CKR_GENERAL_ERROR``, so every failed C_Decrypt of a blob is one
  :class:`UnwrapFailed`; the code does not tell tampering from other causes.

CMK layout on the token, per key id ``cmk-<16 hex>``:

* a secret key: AES-256 from C_GenerateKey, token object, private, sensitive,
  not extractable, not modifiable, ENCRYPT and DECRYPT only;
  ``CKA_LABEL = "blockcrypt:<key id>"``, ``CKA_ID = <key id as ASCII>``;
* a data object (CKO_DATA): token object, private, same label,
  ``CKA_APPLICATION = "blockcrypt-cmk-metadata"``, ``CKA_VALUE`` = JSON with
  the primary alias and the creation time. The metadata object is written
  before the key, so a key never exists without its alias.
* for each later key version N >= 2 (``kms rotate-key``), another AES-256 key
  with the same template, ``CKA_LABEL = "blockcrypt:<key id>/v<N>"`` and
  ``CKA_ID`` the same text. Version 1 is the first key above.

States, aliases and deletion dates live in the lifecycle catalog
(:mod:`blockcrypt.kms.lifecycle`), not on the token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from blockcrypt.config import PKCS11Config
from blockcrypt.crypto.xts import XTSKey
from blockcrypt.errors import (
    HSMMisconfigured,
    HSMUnavailable,
    KeyDisabled,
    KeyNotFound,
    KMSError,
    TokenLoginFailed,
    UnwrapFailed,
)
from blockcrypt.kms._base import (
    GCM_IV_SIZE,
    KEY_ID_PATTERN,
    KEY_SPEC,
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

__all__ = ["PKCS11CMKStore", "use_softhsm2_conf"]

logger = logging.getLogger("blockcrypt.kms")

LABEL_PREFIX = "blockcrypt:"
METADATA_APPLICATION = "blockcrypt-cmk-metadata"
_METADATA_FORMAT = 1
_TAG_BITS = 128
_RETRY_DELAY = 0.05

# Return codes python-pkcs11 0.10.1 does not map to a class (docs/kms.md A11).
_CKR_KEY_FUNCTION_NOT_PERMITTED = "0x68"

# Failures of C_Decrypt that mean "this blob does not open with this key".
_UNWRAP_ERRORS = (
    p11.GeneralError,
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataLenRange,
    p11.WrappedKeyInvalid,
)
# Failures that mean the token or our session to it is gone. GeneralError
# lands here too: outside C_Decrypt it means the HSM itself is unhealthy.
_UNAVAILABLE_ERRORS = (
    p11.GeneralError,
    p11.DeviceError,
    p11.DeviceMemory,
    p11.DeviceRemoved,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.UserNotLoggedIn,
)

_LOCK = threading.Lock()
# Keyed by the resolved module path: the python-pkcs11 library object, the
# SOFTHSM2_CONF it was loaded with and the pid that loaded it.
_LIBRARIES: dict[str, _Library] = {}
# Keyed by (resolved module path, token label): the shared logged-in session.
_SHARED: dict[tuple[str, str], _SharedSession] = {}
# Compares PINs of stores sharing a login without keeping the PIN itself.
_PIN_MAC_KEY = os.urandom(32)


@dataclass(slots=True)
class _Library:
    lib: Any
    softhsm2_conf: str | None
    pid: int


@dataclass(slots=True)
class _SharedSession:
    session: Any
    pin_mac: bytes
    users: int


def _reset_lock_in_child() -> None:
    # A thread of the parent may have held the lock at fork time; the child
    # must not deadlock before it can report that it may not use the module.
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


def use_softhsm2_conf(module: Path, conf: Path) -> None:
    """Point ``SOFTHSM2_CONF`` at ``conf`` before ``module`` is loaded.

    SoftHSM2 reads the variable once, when the module is initialised, so it
    cannot change afterwards in this process.

    Raises:
        HSMUnavailable: the module was already loaded with another file.
    """
    with _LOCK:
        _set_softhsm2_conf(module, conf)


def _set_softhsm2_conf(module: Path, conf: Path) -> None:
    wanted = str(conf)
    loaded = _LIBRARIES.get(_module_key(module))
    if loaded is not None and loaded.softhsm2_conf != wanted:
        raise HSMUnavailable(
            f"PKCS#11 module {str(module)!r} was already loaded in this process "
            f"with SOFTHSM2_CONF={loaded.softhsm2_conf!r}; it cannot switch to "
            f"{wanted!r}. Use one SoftHSM2 configuration per process, or run the "
            "second one in a separate process"
        )
    os.environ["SOFTHSM2_CONF"] = wanted


def _module_key(module: Path) -> str:
    return str(module.resolve()) if "/" in str(module) else str(module)


def _load_library(module: Path) -> Any:
    key = _module_key(module)
    loaded = _LIBRARIES.get(key)
    if loaded is not None:
        if loaded.pid != os.getpid():
            raise HSMUnavailable(
                f"PKCS#11 module {str(module)!r} was loaded by process {loaded.pid} "
                "before it forked; a forked child cannot use it. Start workers "
                "with the 'spawn' method and open the store in the child"
            )
        return loaded.lib

    if "/" in str(module) and not module.exists():
        raise HSMMisconfigured(
            f"PKCS#11 module {str(module)!r} does not exist; check kms.module in "
            "the config (for SoftHSM2: `apt-get install softhsm2`)"
        )
    conf = os.environ.get("SOFTHSM2_CONF")
    try:
        lib = pkcs11.lib(key)
    except p11.PKCS11Error as exc:
        raise HSMMisconfigured(
            f"cannot load or initialise PKCS#11 module {str(module)!r} "
            f"({type(exc).__name__}: {exc}); check that it is a PKCS#11 library "
            "for this architecture, and for SoftHSM2 that SOFTHSM2_CONF "
            f"({conf or 'unset'}) names a readable file whose tokendir exists"
        ) from exc
    _LIBRARIES[key] = _Library(lib, conf, os.getpid())
    return lib


def _find_token(lib: Any, config: PKCS11Config) -> Any:
    label = config.token_label
    try:
        try:
            return lib.get_token(token_label=label)
        except p11.NoSuchToken:
            if any(key[0] == _module_key(config.module) for key in _SHARED):
                raise
        # The token may be younger than our C_Initialize, or (SoftHSM 2.6.1)
        # another process's login was rewriting token.object while we read
        # it. Nothing of ours is open on the module, so reload it once.
        time.sleep(_RETRY_DELAY)
        lib.reinitialize()
        return lib.get_token(token_label=label)
    except p11.NoSuchToken as exc:
        try:
            seen = sorted({t.label for t in lib.get_tokens()})
        except p11.PKCS11Error:
            seen = []
        raise HSMMisconfigured(
            f"no token labelled {label!r} in PKCS#11 module {str(config.module)!r} "
            f"(tokens seen: {', '.join(map(repr, seen)) or 'none'}); check "
            "kms.token_label, and for SoftHSM2 the SOFTHSM2_CONF file "
            f"({os.environ.get('SOFTHSM2_CONF', 'unset')}) and its tokendir"
        ) from exc
    except p11.MultipleTokensReturned as exc:
        raise HSMMisconfigured(
            f"more than one token is labelled {label!r} in PKCS#11 module "
            f"{str(config.module)!r}; relabel or remove the extra token"
        ) from exc
    except p11.PKCS11Error as exc:
        raise HSMUnavailable(
            f"cannot list the tokens of PKCS#11 module {str(config.module)!r} "
            f"({type(exc).__name__}); check that the HSM is reachable"
        ) from exc


def _login(token: Any, config: PKCS11Config, pin: str) -> Any:
    label, pin_file = config.token_label, str(config.pin_file)
    try:
        return token.open(rw=True, user_pin=pin)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange) as exc:
        raise TokenLoginFailed(
            f"token {label!r} refused the user PIN read from {pin_file!r}; put "
            "the right PIN in that file (do not retry in a loop: real HSMs lock "
            "the token after a few wrong PINs)"
        ) from exc
    except (p11.PinLocked, p11.PinExpired) as exc:
        raise TokenLoginFailed(
            f"the user PIN of token {label!r} is locked or expired "
            f"({type(exc).__name__}); the token's security officer must reset it, "
            f"then update {pin_file!r}"
        ) from exc
    except p11.UserAlreadyLoggedIn as exc:
        raise KMSError(
            f"another part of this process is already logged in to token {label!r} "
            "outside blockcrypt; blockcrypt must own the token's login"
        ) from exc
    except p11.PKCS11Error as exc:
        raise HSMUnavailable(
            f"cannot open a session on token {label!r} of PKCS#11 module "
            f"{str(config.module)!r} ({type(exc).__name__}); check that the HSM "
            "is reachable and the token initialised"
        ) from exc


def _pin_mac(pin: str) -> bytes:
    return hmac.new(_PIN_MAC_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


class PKCS11CMKStore:
    """A :class:`~blockcrypt.kms.CMKStore` whose CMKs live on a PKCS#11 token.

    Create it with :meth:`open`. The CMKs never leave the token; wrapping and
    unwrapping run inside it with C_Encrypt and C_Decrypt (AES-GCM).
    """

    def __init__(self, config: PKCS11Config, shared_key: tuple[str, str]) -> None:
        self._config = config
        self._shared_key = shared_key
        self._closed = False
        # key id -> (KeyInfo, key object); touched only under _LOCK.
        self._cache: dict[str, tuple[KeyInfo, Any]] = {}
        # (key id, version >= 2) -> key object; touched only under _LOCK.
        self._versions: dict[tuple[str, int], Any] = {}

    @classmethod
    def open(cls, config: PKCS11Config) -> PKCS11CMKStore:
        """Load the module, find the token by label and log in.

        Raises:
            ConfigError: the PIN file is unusable.
            HSMUnavailable: module, SoftHSM2 configuration or token not found.
            TokenLoginFailed: the token refused the PIN.
        """
        pin = config.read_pin().get_secret_value()
        with _LOCK:
            if config.softhsm2_conf is not None:
                _set_softhsm2_conf(config.module, config.softhsm2_conf)
            lib = _load_library(config.module)
            shared_key = (_module_key(config.module), config.token_label)
            shared = _SHARED.get(shared_key)
            if shared is None:
                session = _login(_find_token(lib, config), config, pin)
                _SHARED[shared_key] = _SharedSession(session, _pin_mac(pin), 1)
            elif hmac.compare_digest(shared.pin_mac, _pin_mac(pin)):
                shared.users += 1
            else:
                raise TokenLoginFailed(
                    f"token {config.token_label!r} is already open in this process "
                    f"with another PIN than the one in {str(config.pin_file)!r}; "
                    "put the right PIN in that file"
                )
        del pin
        logger.info(
            "token opened: token %s, module %s", config.token_label, config.module
        )
        return cls(config, shared_key)

    def __repr__(self) -> str:
        return (
            f"PKCS11CMKStore(token={self._config.token_label!r}, "
            f"module={str(self._config.module)!r})"
        )

    # -- CMKStore --------------------------------------------------------

    def create_key(self, alias: str) -> KeyInfo:
        try:
            check_alias(alias)
        except ValueError as exc:
            raise KMSError(str(exc)) from exc
        with _LOCK:
            session = self._session()
            try:
                info = self._create_key(session, alias)
            except p11.PKCS11Error as exc:
                raise self._translate(exc, "create a key") from exc
        logger.info("key created: key_id %s, alias %s", info.key_id, info.alias)
        return info

    def list_keys(self) -> list[KeyInfo]:
        with _LOCK:
            session = self._session()
            try:
                return [info for info, _ in self._scan(session)]
            except p11.PKCS11Error as exc:
                raise self._translate(exc, "list the keys") from exc

    def describe_key(self, key: str) -> KeyInfo:
        with _LOCK:
            session = self._session()
            try:
                return self._resolve(session, key)[0]
            except p11.PKCS11Error as exc:
                raise self._translate(exc, f"look up key {key!r}") from exc

    def create_datakey(
        self, key: str, context: bytes, version: int | None = None
    ) -> DataKey:
        check_context(context)
        with _LOCK:
            session = self._session()

            def random_bytes(n: int) -> bytes:
                return bytes(session.generate_random(n * 8))

            try:
                dek = draw_dek(random_bytes, f"token {self._config.token_label!r}")
            except p11.PKCS11Error as exc:
                raise self._translate(exc, f"draw a DEK for key {key!r}") from exc
        try:
            return DataKey(dek, self.encrypt_datakey(key, dek, context, version))
        except BaseException:
            dek.wipe()
            raise

    def encrypt_datakey(
        self, key: str, plaintext: XTSKey, context: bytes, version: int | None = None
    ) -> WrappedKey:
        check_context(context)
        with _LOCK:
            session = self._session()
            try:
                info, first = self._resolve(session, key)
                number, cmk = self._version_object(session, info, first, version)
                self._check_capability(info, cmk, "encrypt")
                iv = bytes(session.generate_random(GCM_IV_SIZE * 8))
                params = GCMParams(iv, bytes(context), _TAG_BITS)
                ciphertext = cmk.encrypt(
                    bytes(plaintext),
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=params,
                )
            except p11.PKCS11Error as exc:
                raise self._translate(exc, f"wrap a DEK with key {key!r}") from exc
        return WrappedKey(info.key_id, number, WRAP_MECHANISM, iv, bytes(ciphertext))

    def decrypt_datakey(self, wrapped: WrappedKey, context: bytes) -> XTSKey:
        check_context(context)
        with _LOCK:
            session = self._session()
            try:
                info, first = self._resolve(session, wrapped.key_id)
                problem = wrapped.format_problem()
                if problem is not None:
                    raise UnwrapFailed(
                        unwrap_failed_message(info.key_id, info.alias, problem)
                    )
                _, cmk = self._version_object(session, info, first, wrapped.key_version)
            except p11.PKCS11Error as exc:
                raise self._translate(exc, f"look up key {wrapped.key_id!r}") from exc
            self._check_capability(info, cmk, "decrypt")
            params = GCMParams(wrapped.iv, bytes(context), _TAG_BITS)
            try:
                plaintext = bytearray(
                    cmk.decrypt(
                        wrapped.ciphertext,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=params,
                    )
                )
            except _UNWRAP_ERRORS as exc:
                detail = f"the HSM refused it ({type(exc).__name__})"
                raise UnwrapFailed(
                    unwrap_failed_message(info.key_id, info.alias, detail)
                ) from exc
            except p11.PKCS11Error as exc:
                raise self._translate(exc, f"unwrap a DEK with {info.key_id}") from exc
        return unwrapped_key(plaintext, info)

    # -- KeyMaterialStore ----------------------------------------------------

    def key_versions(self, key_id: str) -> list[int]:
        with _LOCK:
            session = self._session()
            try:
                return sorted(self._version_objects(session, key_id))
            except p11.PKCS11Error as exc:
                raise self._translate(exc, f"list the versions of {key_id}") from exc

    def create_key_version(self, key_id: str, version: int) -> None:
        with _LOCK:
            session = self._session()
            try:
                if version in self._version_objects(session, key_id):
                    return
                if version < 2:
                    raise KMSError(f"key version {version} cannot be created again")
                self._generate_cmk(session, _version_label(key_id, version))
            except p11.PKCS11Error as exc:
                raise self._translate(
                    exc, f"create version {version} of {key_id}"
                ) from exc
        logger.info("key version created: key_id %s, version %d", key_id, version)

    def set_primary_alias(self, key_id: str, alias: str) -> None:
        with _LOCK:
            session = self._session()
            try:
                self._write_alias(session, key_id, alias)
            except p11.PKCS11Error as exc:
                raise self._translate(exc, f"rename key {key_id}") from exc
            self._cache.pop(key_id, None)

    def destroy_key(self, key_id: str) -> None:
        with _LOCK:
            session = self._session()
            try:
                # Material first, then the metadata: never a key without its name.
                for obj in self._version_objects(session, key_id).values():
                    obj.destroy()
                query = {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.APPLICATION: METADATA_APPLICATION,
                    Attribute.LABEL: LABEL_PREFIX + key_id,
                }
                for obj in list(session.get_objects(query)):
                    obj.destroy()
            except p11.PKCS11Error as exc:
                raise self._translate(exc, f"destroy key {key_id}") from exc
            finally:
                self._cache.pop(key_id, None)
                self._versions = {
                    k: v for k, v in self._versions.items() if k[0] != key_id
                }
        logger.info("key destroyed: key_id %s", key_id)

    def close(self) -> None:
        with _LOCK:
            if self._closed:
                return
            self._closed = True
            self._cache.clear()
            shared = _SHARED.get(self._shared_key)
            if shared is None:
                return
            shared.users -= 1
            if shared.users == 0:
                del _SHARED[self._shared_key]
                try:
                    shared.session.close()
                except p11.PKCS11Error:
                    # The session is gone either way; closing must not fail.
                    logger.warning(
                        "closing the session on token %s failed",
                        self._config.token_label,
                    )

    # -- helpers; all run with _LOCK held ------------------------------

    def _session(self) -> Any:
        if self._closed:
            raise KMSError(
                f"the CMK store for token {self._config.token_label!r} is closed"
            )
        _load_library(self._config.module)  # refuses use from a forked child
        return _SHARED[self._shared_key].session

    def _where(self) -> str:
        return (
            f"on token {self._config.token_label!r} (module {str(self._config.module)})"
        )

    def _info(self, key_id: str, metadata: dict[str, Any] | None) -> KeyInfo:
        metadata = metadata or {}
        return KeyInfo(
            key_id=key_id,
            alias=str(metadata.get("alias", "")),
            created=str(metadata.get("created", "")),
            key_spec=KEY_SPEC,
            state="Enabled",
            backend="pkcs11",
            token_label=self._config.token_label,
        )

    def _read_metadata(self, session: Any, key_id: str | None) -> dict[str, Any]:
        """Return {key id: metadata} for one key id or for all of them."""
        query: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: METADATA_APPLICATION,
        }
        if key_id is not None:
            query[Attribute.LABEL] = LABEL_PREFIX + key_id
        found: dict[str, Any] = {}
        for obj in list(session.get_objects(query)):
            try:
                record = json.loads(bytes(obj[Attribute.VALUE]))
                record_id = record["key_id"]
            except (ValueError, KeyError, TypeError):
                logger.warning(
                    "ignoring an unreadable key metadata object on token %s",
                    self._config.token_label,
                )
                continue
            if obj[Attribute.LABEL] != LABEL_PREFIX + record_id:
                continue
            kept = found.get(record_id)
            if kept is None or kept.get("revision", 0) < record.get("revision", 0):
                found[record_id] = record
        return found

    def _find_key_objects(self, session: Any, key_id: str | None) -> dict[str, Any]:
        """Return {key id: key object} for one key id or for all of them."""
        query: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
        }
        if key_id is not None:
            query[Attribute.LABEL] = LABEL_PREFIX + key_id
            query[Attribute.ID] = key_id.encode("ascii")
        found: dict[str, Any] = {}
        for obj in list(session.get_objects(query)):
            label = obj[Attribute.LABEL]
            if not label.startswith(LABEL_PREFIX):
                continue
            found_id = label[len(LABEL_PREFIX) :]
            if not KEY_ID_PATTERN.fullmatch(found_id):
                continue
            if bytes(obj[Attribute.ID]) != found_id.encode("ascii"):
                continue
            if found_id in found:
                raise KMSError(
                    f"two key objects on token {self._config.token_label!r} carry "
                    f"key id {found_id}; remove the copy that was not made by "
                    "blockcrypt"
                )
            found[found_id] = obj
        return found

    def _scan(self, session: Any) -> list[tuple[KeyInfo, Any]]:
        keys = self._find_key_objects(session, None)
        metadata = self._read_metadata(session, None)
        entries = [
            (self._info(kid, metadata.get(kid)), obj) for kid, obj in keys.items()
        ]
        return sorted(entries, key=lambda e: (e[0].created, e[0].key_id))

    def _resolve(self, session: Any, key: str) -> tuple[KeyInfo, Any]:
        if KEY_ID_PATTERN.fullmatch(key):
            cached = self._cache.get(key)
            if cached is not None and self._still_there(cached[1]):
                return cached
            objs = self._find_key_objects(session, key)
            if key in objs:
                entry = (
                    self._info(key, self._read_metadata(session, key).get(key)),
                    objs[key],
                )
                self._cache[key] = entry
                return entry
        else:
            matches = [e for e in self._scan(session) if alias_matches(e[0], key)]
            if len(matches) > 1:
                ids = ", ".join(e[0].key_id for e in matches)
                raise KMSError(
                    f"alias {key!r} names several keys on token "
                    f"{self._config.token_label!r} ({ids}); use a key id"
                )
            if matches:
                self._cache[matches[0][0].key_id] = matches[0]
                return matches[0]
        raise KeyNotFound(key_not_found_message(key, self._where()))

    def _still_there(self, obj: Any) -> bool:
        # Another process may have destroyed the key since we cached its handle.
        try:
            obj[Attribute.CLASS]
        except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
            return False
        return True

    def _check_capability(self, info: KeyInfo, cmk: Any, action: str) -> None:
        # python-pkcs11 builds a key's methods from CKA_ENCRYPT/CKA_DECRYPT.
        if not hasattr(cmk, action):
            raise KeyDisabled(
                f"customer master key {info.key_id} ({info.alias!r}) "
                f"{self._where()} is not allowed to {action}; it was not created "
                "by blockcrypt or was changed on the token"
            )

    def _create_key(self, session: Any, alias: str) -> KeyInfo:
        if any(alias_matches(info, alias) for info, _ in self._scan(session)):
            raise KMSError(self._duplicate_message(alias))

        key_id = "cmk-" + bytes(session.generate_random(64)).hex()
        label = LABEL_PREFIX + key_id
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        record = {
            "format": _METADATA_FORMAT,
            "key_id": key_id,
            "alias": alias,
            "created": created,
            "key_spec": KEY_SPEC,
        }
        metadata = self._create_metadata(session, key_id, record)
        try:
            cmk = self._generate_cmk(session, label)
        except BaseException:
            _destroy_quietly(metadata)
            raise

        # Aliases are unique across processes too: if another process created
        # the same alias at the same moment, both may see it here and both
        # back out, which is safe; neither can miss the other.
        rivals = [i for i, _ in self._scan(session) if alias_matches(i, alias)]
        if len(rivals) > 1:
            _destroy_quietly(cmk)
            _destroy_quietly(metadata)
            raise KMSError(self._duplicate_message(alias))
        return self._info(key_id, record)

    @staticmethod
    def _generate_cmk(session: Any, label: str) -> Any:
        # CKA_ID is the label without the prefix: the key id, or "<id>/v<N>".
        return session.generate_key(
            KeyType.AES,
            256,
            id=label[len(LABEL_PREFIX) :].encode("ascii"),
            label=label,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.MODIFIABLE: False,
            },
        )

    def _version_objects(self, session: Any, key_id: str) -> dict[int, Any]:
        """Return {version: key object} for every version of ``key_id``."""
        found: dict[int, Any] = {}
        first = self._find_key_objects(session, key_id).get(key_id)
        if first is not None:
            found[1] = first
        query = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
        }
        prefix = _version_label(key_id, 2)[:-1]
        for obj in list(session.get_objects(query)):
            label = obj[Attribute.LABEL]
            suffix = label[len(prefix) :] if label.startswith(prefix) else ""
            if suffix.isdigit() and int(suffix) >= 2:
                if bytes(obj[Attribute.ID]) == label[len(LABEL_PREFIX) :].encode():
                    found[int(suffix)] = obj
        return found

    def _version_object(
        self, session: Any, info: KeyInfo, first: Any, version: int | None
    ) -> tuple[int, Any]:
        if version is None:
            version = max(self._version_objects(session, info.key_id))
        if version == 1:
            return 1, first
        cached = self._versions.get((info.key_id, version))
        if cached is not None and self._still_there(cached):
            return version, cached
        label = _version_label(info.key_id, version)
        query = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.LABEL: label,
            Attribute.ID: label[len(LABEL_PREFIX) :].encode("ascii"),
        }
        objs = list(session.get_objects(query))
        if len(objs) != 1:
            raise KeyNotFound(
                version_not_found_message(info.key_id, version, self._where())
            )
        self._versions[(info.key_id, version)] = objs[0]
        return version, objs[0]

    def _write_alias(self, session: Any, key_id: str, alias: str) -> None:
        # SoftHSM refuses C_SetAttributeValue on CKA_VALUE (AttributeReadOnly),
        # so write a new record with a higher revision, then drop the old
        # ones; after a crash in between, the reader keeps the newest.
        query = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: METADATA_APPLICATION,
            Attribute.LABEL: LABEL_PREFIX + key_id,
        }
        old = list(session.get_objects(query))
        record = self._read_metadata(session, key_id).get(key_id)
        if record is None:
            raise KeyNotFound(key_not_found_message(key_id, self._where()))
        record = {**record, "alias": alias, "revision": record.get("revision", 0) + 1}
        self._create_metadata(session, key_id, record)
        for obj in old:
            obj.destroy()

    @staticmethod
    def _create_metadata(session: Any, key_id: str, record: dict[str, Any]) -> Any:
        return session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: True,
                Attribute.LABEL: LABEL_PREFIX + key_id,
                Attribute.APPLICATION: METADATA_APPLICATION,
                Attribute.VALUE: json.dumps(record, sort_keys=True).encode("utf-8"),
            }
        )

    def _duplicate_message(self, alias: str) -> str:
        return (
            f"alias {alias!r} is already used by a customer master key "
            f"{self._where()}; choose another alias, or use the existing key"
        )

    def _translate(self, exc: p11.PKCS11Error, action: str) -> KMSError:
        where = self._where()
        if isinstance(exc, _UNAVAILABLE_ERRORS):
            return HSMUnavailable(
                f"cannot {action} {where}: the token failed or its session is "
                f"gone ({type(exc).__name__}); check the HSM, then restart blockcrypt"
            )
        if _CKR_KEY_FUNCTION_NOT_PERMITTED in str(exc):
            return KeyDisabled(
                f"cannot {action} {where}: the token does not allow this key to "
                "be used this way (CKR_KEY_FUNCTION_NOT_PERMITTED)"
            )
        return KMSError(
            f"cannot {action} {where}: the PKCS#11 call failed "
            f"({type(exc).__name__}: {exc})"
        )


def _version_label(key_id: str, version: int) -> str:
    if version == 1:
        return LABEL_PREFIX + key_id
    return f"{LABEL_PREFIX}{key_id}/v{version}"


def _destroy_quietly(obj: Any) -> None:
    try:
        obj.destroy()
    except p11.PKCS11Error:
        logger.warning("could not remove a half-created key object")
