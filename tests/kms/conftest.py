"""Fixtures for the CMK store tests.

SoftHSM2 reads ``SOFTHSM2_CONF`` once per process, so this pytest process uses
one token for every PKCS#11 test (``softhsm_token``); each test makes keys
under its own alias. Tests that need another token, another configuration or
a fresh process run Python in a subprocess (``run_python``).

The module path comes from ``$PKCS11_MODULE`` (default: Debian's SoftHSM2).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockcrypt.config import PKCS11Config
from blockcrypt.kms import MemoryCMKStore, PKCS11CMKStore
from blockcrypt.kms._base import CMKStore

REPO = Path(__file__).resolve().parents[2]
MODULE = Path(os.environ.get("PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))
TOKEN_LABEL = "blockcrypt-test"
USER_PIN = "test-user-pin-7f3a9c"
SO_PIN = "test-so-pin-51be02"


def softhsm_missing() -> str | None:
    """Return why the SoftHSM2 tests cannot run, or None if they can."""
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util not found on PATH (apt-get install softhsm2)"
    if not MODULE.exists():
        return f"SoftHSM2 module {MODULE} (libsofthsm2.so) not found; set PKCS11_MODULE"
    return None


requires_softhsm = pytest.mark.skipif(
    softhsm_missing() is not None, reason=str(softhsm_missing())
)


def write_pin_file(path: Path, pin: str, mode: int = 0o600) -> Path:
    path.write_text(pin + "\n")
    path.chmod(mode)
    return path


def init_token(conf: Path, label: str, so_pin: str, user_pin: str) -> None:
    """Initialise a SoftHSM2 token; test PINs may go on the command line."""
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label]
        + ["--so-pin", so_pin, "--pin", user_pin],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        capture_output=True,
        timeout=30,
    )


def write_softhsm_conf(directory: Path) -> Path:
    (directory / "tokens").mkdir(mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\n"
        "objectstore.backend = file\nlog.level = ERROR\n"
    )
    return conf


@dataclass(frozen=True)
class SoftHSMToken:
    conf: Path
    config: PKCS11Config
    directory: Path


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMToken:
    """The one SoftHSM2 token of this pytest process."""
    reason = softhsm_missing()
    if reason is not None:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("softhsm")
    conf = write_softhsm_conf(directory)
    init_token(conf, TOKEN_LABEL, SO_PIN, USER_PIN)
    config = PKCS11Config(
        module=MODULE,
        token_label=TOKEN_LABEL,
        pin_file=write_pin_file(directory / "pin", USER_PIN),
        softhsm2_conf=conf,
    )
    return SoftHSMToken(conf, config, directory)


@pytest.fixture(scope="session")
def pkcs11_store(softhsm_token: SoftHSMToken) -> Iterator[PKCS11CMKStore]:
    store = PKCS11CMKStore.open(softhsm_token.config)
    yield store
    store.close()


@pytest.fixture(params=["memory", "pkcs11"], ids=["memory", "pkcs11"])
def store(request: pytest.FixtureRequest) -> Iterator[CMKStore]:
    """Each contract test runs once per backend."""
    if request.param == "memory":
        memory = MemoryCMKStore()
        yield memory
        memory.close()
    else:
        yield request.getfixturevalue("pkcs11_store")


@pytest.fixture
def alias() -> str:
    """A fresh alias: keys on the shared token outlive a test."""
    return "test-" + uuid.uuid4().hex[:12]


@pytest.fixture(autouse=True)
def no_pin_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test: capture blockcrypt.kms at DEBUG and check no PIN got there."""
    caplog.set_level(logging.DEBUG, logger="blockcrypt.kms")
    yield
    for pin in (USER_PIN, SO_PIN):
        assert pin not in caplog.text


def run_python(
    code: str, env: dict[str, str] | None = None, timeout: float = 60
) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter and return the JSON it prints last.

    The child gets this environment minus ``SOFTHSM2_CONF`` plus ``env``.
    """
    child_env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    child_env["PYTHONPATH"] = str(REPO)
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["_stderr"] = proc.stderr
    return result
