"""The embedded default: a SoftHSM2 token kept in blockcrypt's state directory.

With no ``[kms]`` section in the config, blockcrypt keeps its CMKs on a
SoftHSM2 token of its own. Layout under the state directory (mode 0700)::

    lock                     serialises setup and opening between processes
    pin                      user PIN, 32 random URL-safe characters, mode 0600
    so-pin                   security officer PIN, same form, mode 0600
    softhsm/softhsm2.conf    absolute tokendir, file backend, log level ERROR
    softhsm/tokens/          SoftHSM2's token directory

The token is created on first use only. ``softhsm2-util`` has no option or
environment variable for PINs other than ``--pin``/``--so-pin`` on the command
line, where any local user could read them from ``/proc``; instead we leave
those options out and answer its interactive prompts through a pseudo-terminal,
so the PINs never appear in any process's argv.

SoftHSM2 reads ``SOFTHSM2_CONF`` once per process, when the module is
initialised, so one process can use one embedded token (or one SoftHSM2
configuration) at a time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import select
import shutil
import stat
import subprocess
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blockcrypt.config import PKCS11Config, default_state_dir, read_secret_file
from blockcrypt.errors import ConfigError, HSMUnavailable
from blockcrypt.kms.pkcs11 import PKCS11CMKStore, use_softhsm2_conf

log = logging.getLogger("blockcrypt.kms")

__all__ = [
    "EMBEDDED_TOKEN_LABEL",
    "ensure_embedded_token",
    "open_embedded_store",
    "softhsm2_module",
]

EMBEDDED_TOKEN_LABEL = "blockcrypt"

# Where distributions install the SoftHSM2 module; Debian's path first.
_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_INIT_TIMEOUT = 30.0


def softhsm2_module() -> Path:
    """Return the path of the installed SoftHSM2 module (Debian's if none is found)."""
    for candidate in _MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return Path(candidate)
    return Path(_MODULE_CANDIDATES[0])


def ensure_embedded_token(state_dir: Path | None = None) -> PKCS11Config:
    """Create the embedded SoftHSM2 token if needed and return its configuration.

    Idempotent, and safe to run from several processes at once. It also sets
    ``SOFTHSM2_CONF`` in this process's environment.

    Args:
        state_dir: blockcrypt's state directory; default ``$BLOCKCRYPT_STATE_DIR``,
            else :func:`~blockcrypt.config.default_state_dir`.

    Raises:
        HSMUnavailable: ``softhsm2-util`` is missing or fails, or this process
            already loaded SoftHSM2 with another configuration.
        ConfigError: the state directory or a PIN file is unusable.
    """
    state_dir = _resolve_state_dir(state_dir)
    _make_private_dir(state_dir)
    with _locked(state_dir / "lock"):
        return _ensure(state_dir)


def open_embedded_store(state_dir: Path | None = None) -> PKCS11CMKStore:
    """Create the embedded token if needed, then open a store on it.

    Opening happens under the state directory's lock: SoftHSM 2.6.1 rewrites
    ``token.object`` when a process logs in, and another process initialising
    the module at that moment can read a token with an empty label.

    Raises:
        As :func:`ensure_embedded_token` and :meth:`PKCS11CMKStore.open`.
    """
    state_dir = _resolve_state_dir(state_dir)
    _make_private_dir(state_dir)
    with _locked(state_dir / "lock"):
        return PKCS11CMKStore.open(_ensure(state_dir))


def _resolve_state_dir(state_dir: Path | None) -> Path:
    if state_dir is None:
        env = os.environ.get("BLOCKCRYPT_STATE_DIR")
        state_dir = Path(env) if env else default_state_dir()
    return state_dir.absolute()


def _ensure(state_dir: Path) -> PKCS11Config:
    softhsm = state_dir / "softhsm"
    conf = softhsm / "softhsm2.conf"
    pin_file = state_dir / "pin"

    _make_private_dir(softhsm)
    _make_private_dir(softhsm / "tokens")
    _write_conf(conf, softhsm / "tokens")
    if not _token_exists(softhsm / "tokens"):
        user_pin = _read_or_create_pin(pin_file)
        so_pin = _read_or_create_pin(state_dir / "so-pin")
        _init_token(conf, so_pin, user_pin)
    elif not pin_file.exists():
        raise ConfigError(
            f"the embedded token in {str(softhsm)!r} exists but its PIN file "
            f"{str(pin_file)!r} is missing; restore the file from a backup "
            "(without it the keys on the token cannot be used)"
        )

    module = softhsm2_module()
    use_softhsm2_conf(module, conf)
    return PKCS11Config(
        module=module,
        token_label=EMBEDDED_TOKEN_LABEL,
        pin_file=pin_file,
        softhsm2_conf=conf,
    )


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{str(path)!r} exists but is not a directory")
        if info.st_uid != os.geteuid():
            raise ConfigError(
                f"{str(path)!r} belongs to uid {info.st_uid}, not to uid "
                f"{os.geteuid()} running blockcrypt; the embedded token's keys are "
                "only as safe as this directory, so it must be ours alone "
                f"(chown {os.geteuid()} it, or pick another --state-dir)"
            )
        if info.st_mode & 0o077:
            log.warning(
                "state directory was open to other users; made it private",
                extra={"path": str(path), "mode": oct(info.st_mode & 0o777)},
            )
            os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the state directory {str(path)!r}: {exc.strerror}; "
            "choose another with BLOCKCRYPT_STATE_DIR or --state-dir"
        ) from exc


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_conf(conf: Path, tokendir: Path) -> None:
    # Rewritten when it differs, so a moved state directory keeps working.
    text = (
        "# Written by blockcrypt for its embedded token; changes are overwritten.\n"
        f"directories.tokendir = {tokendir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    try:
        if conf.is_file() and conf.read_text() == text:
            return
        _write_private(conf, text)
    except OSError as exc:
        raise ConfigError(f"cannot write {str(conf)!r}: {exc.strerror}") from exc


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _token_exists(tokendir: Path) -> bool:
    # The token directory is ours alone, so any initialised token in it is ours.
    return any((d / "token.object").is_file() for d in tokendir.iterdir())


def _read_or_create_pin(path: Path) -> str:
    if not path.exists():
        try:
            _write_private(path, secrets.token_urlsafe(24) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write {str(path)!r}: {exc.strerror}") from exc
    return read_secret_file(path).get_secret_value()


def _init_token(conf: Path, so_pin: str, user_pin: str) -> None:
    tool = shutil.which("softhsm2-util")
    if tool is None:
        raise HSMUnavailable(
            "softhsm2-util is not installed (not found on PATH); the embedded "
            "key store needs it: `apt-get install softhsm2`, or configure an HSM "
            "in the [kms] section of the config"
        )
    argv = [tool, "--init-token", "--free", "--label", EMBEDDED_TOKEN_LABEL]
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    answers = [so_pin, so_pin, user_pin, user_pin]
    returncode, output = _run_with_prompts(argv, env, answers)
    if returncode != 0:
        for pin in (so_pin, user_pin):
            output = output.replace(pin, "***")
        raise HSMUnavailable(
            f"`softhsm2-util --init-token` failed with exit status {returncode} "
            f"for the embedded token in {str(conf.parent)!r}: {output.strip()!r}"
        )


def _run_with_prompts(
    argv: list[str], env: dict[str, str], answers: list[str]
) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal, typing one answer per PIN prompt."""
    master, slave = os.openpty()
    try:
        # No echo, so the answers never show up in the captured output.
        mode = termios.tcgetattr(slave)
        mode[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, mode)
        proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)

    output = b""
    pending = list(answers)
    deadline = time.monotonic() + _INIT_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            # Answer each "...PIN: " prompt as it appears.
            while pending and output.count(b"PIN: ") > len(answers) - len(pending):
                os.write(master, pending.pop(0).encode("utf-8") + b"\n")
            if proc.poll() is not None and not ready:
                break
        else:
            proc.kill()
    finally:
        os.close(master)
        returncode = proc.wait()
    return returncode, output.decode("utf-8", "replace")
