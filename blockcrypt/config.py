"""blockcrypt configuration: where state lives and which HSM holds the CMKs.

The file is TOML. Every problem with it (bad syntax, unknown key, wrong type,
unusable PIN file) is reported as one :class:`ConfigError` naming the file and
the key, before anything else starts. Secrets never appear inline: the PIN is
read from a file when the store opens and held as a ``SecretStr``.

Example::

    state_dir = "/var/lib/blockcrypt"

    [kms]
    module = "/usr/lib/softhsm/libsofthsm2.so"
    token_label = "blockcrypt"
    pin_file = "/etc/blockcrypt/pin"
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from blockcrypt.errors import ConfigError

if TYPE_CHECKING:
    from blockcrypt.kms import CMKStore

__all__ = [
    "Config",
    "PKCS11Config",
    "default_state_dir",
    "load_config",
    "open_store",
    "read_secret_file",
]

_MAX_PIN_FILE = 4096


class PKCS11Config(BaseModel):
    """Where to find the PKCS#11 token that holds the CMKs.

    Attributes:
        module: path of the vendor's PKCS#11 library.
        token_label: label of the token; tokens are never picked by slot number.
        pin_file: file holding the user PIN (mode 0600 or stricter).
        softhsm2_conf: for SoftHSM2 only, the ``softhsm2.conf`` to load.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    module: Path
    token_label: str = Field(min_length=1, max_length=32)
    pin_file: Path
    softhsm2_conf: Path | None = None

    def read_pin(self) -> SecretStr:
        """Read the user PIN from ``pin_file`` (see :func:`read_secret_file`).

        Raises:
            ConfigError: the PIN file is unusable.
        """
        return read_secret_file(self.pin_file)


def read_secret_file(path: Path, what: str = "PIN") -> SecretStr:
    """Read a PIN or other short secret from a private file.

    One trailing newline is dropped. ``what`` names the secret in messages.

    Raises:
        ConfigError: the file is missing, not a regular file, readable or
            writable by group or others, empty, too long, or not UTF-8.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        hint = "the token's user PIN" if what == "PIN" else f"the {what}"
        raise ConfigError(
            f"cannot open {what} file {str(path)!r}: {exc.strerror}; create it "
            f"with {hint} and mode 0600"
        ) from exc
    try:
        _check_pin_file(path, os.fstat(fd), what)
        raw = os.read(fd, _MAX_PIN_FILE + 1)
    finally:
        os.close(fd)
    return _decode_pin(path, raw, what)


def _check_pin_file(path: Path, info: os.stat_result, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(
            f"{what} file {str(path)!r} is not a regular file; give a file that "
            f"holds only the {what}"
        )
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{what} file {str(path)!r} has mode {stat.S_IMODE(info.st_mode):04o}; "
            f"group and others must have no access: run `chmod 600 {path}`"
        )


def _decode_pin(path: Path, raw: bytes, what: str) -> SecretStr:
    if len(raw) > _MAX_PIN_FILE:
        raise ConfigError(
            f"{what} file {str(path)!r} is longer than {_MAX_PIN_FILE} bytes; it "
            f"must hold only the {what}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {str(path)!r} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise ConfigError(
            f"{what} file {str(path)!r} is empty; write the {what} into it"
        )
    return SecretStr(text)


class Config(BaseModel):
    """Top-level configuration.

    Attributes:
        state_dir: directory for blockcrypt's own state (embedded token, locks).
        kms: the PKCS#11 token to use; ``None`` selects the embedded SoftHSM2
            token kept under ``state_dir``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path
    kms: PKCS11Config | None = None


def default_state_dir() -> Path:
    """Return the state directory used when neither argument nor environment names one.

    ``/var/lib/blockcrypt`` for root; otherwise ``$XDG_DATA_HOME/blockcrypt``,
    with ``XDG_DATA_HOME`` defaulting to ``~/.local/share``.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/blockcrypt")
    data_home = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local/share"
    return base / "blockcrypt"


def load_config(path: Path | None = None, state_dir: Path | None = None) -> Config:
    """Build the configuration from a TOML file, the environment and defaults.

    The file is ``path`` if given, else ``$BLOCKCRYPT_CONFIG``, else
    ``<state_dir>/config.toml`` if that exists; without a file the defaults
    apply. The state directory is ``state_dir`` if given, else
    ``$BLOCKCRYPT_STATE_DIR``, else the file's ``state_dir`` key, else
    :func:`default_state_dir`. Relative paths in the file are taken relative
    to the file's directory.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    override = state_dir or _env_path("BLOCKCRYPT_STATE_DIR")
    explicit = path or _env_path("BLOCKCRYPT_CONFIG")
    if explicit is None:
        candidate = (override or default_state_dir()) / "config.toml"
        explicit = candidate if candidate.is_file() else None

    data: dict[str, Any] = {}
    if explicit is not None:
        data = _read_toml(explicit)
        _resolve_relative(data, explicit)
    if override is not None:
        data["state_dir"] = override
    data.setdefault("state_dir", default_state_dir())

    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = repr(str(explicit)) if explicit else "(defaults and environment)"
        raise ConfigError(_describe_validation(exc, where)) from None


def open_store(config: Config) -> CMKStore:
    """Open the CMK store the configuration names.

    With no ``[kms]`` section this first creates, if needed, the embedded
    SoftHSM2 token under ``config.state_dir``.

    Raises:
        ConfigError: the PIN file is unusable.
        HSMUnavailable, TokenLoginFailed: the token cannot be opened.
    """
    from blockcrypt.kms.embedded import open_embedded_store
    from blockcrypt.kms.pkcs11 import PKCS11CMKStore

    if config.kms is None:
        return open_embedded_store(config.state_dir)
    return PKCS11CMKStore.open(config.kms)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {str(path)!r}: {exc.strerror}"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid TOML: {exc}"
        ) from None


def _resolve_relative(data: dict[str, Any], path: Path) -> None:
    base = path.parent
    if isinstance(data.get("state_dir"), str):
        data["state_dir"] = base / data["state_dir"]
    kms = data.get("kms")
    if isinstance(kms, dict):
        if "pin" in kms:
            # Refuse an inline PIN with a precise hint instead of "unknown key".
            raise ConfigError(
                f"config file {str(path)!r}: key 'kms.pin' is not accepted; PINs "
                "are never stored in the config: write the PIN to a file with mode "
                "0600 and set kms.pin_file to its path"
            )
        for key in ("pin_file", "softhsm2_conf"):
            if isinstance(kms.get(key), str):
                kms[key] = base / kms[key]
        # A bare library name is left to the dynamic loader's search path.
        module = kms.get("module")
        if isinstance(module, str) and "/" in module:
            kms["module"] = base / module


def _describe_validation(exc: ValidationError, where: str) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        name = ".".join(str(part) for part in error["loc"]) or "(top level)"
        kind = error["type"]
        if kind == "extra_forbidden":
            problems.append(f"unknown key {name!r}")
        elif kind == "missing":
            problems.append(f"missing key {name!r}")
        else:
            problems.append(f"key {name!r}: {error['msg']}")
    return f"config file {where}: " + "; ".join(problems)
