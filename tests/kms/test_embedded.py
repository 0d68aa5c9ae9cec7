"""The embedded SoftHSM2 token under the state directory.

Each test runs blockcrypt in child processes: SoftHSM2 keeps the first
configuration a process loads, and this pytest process already uses another.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt.errors import HSMUnavailable
from blockcrypt.kms.embedded import ensure_embedded_token
from blockcrypt.kms.pkcs11 import PKCS11CMKStore
from tests.kms.conftest import REPO, requires_softhsm, run_python

pytestmark = requires_softhsm

_ENSURE = """
import json, os
from pathlib import Path
from blockcrypt.kms.embedded import ensure_embedded_token
config = ensure_embedded_token({arg})
print(json.dumps({{"config": json.loads(config.model_dump_json()),
                  "env": os.environ.get("SOFTHSM2_CONF")}}))
"""

_CREATE_KEY = """
import json
from pathlib import Path
from blockcrypt.config import load_config, open_store
store = open_store(load_config(None, Path({state!r})))
info = store.create_key({alias!r})
print(json.dumps(info.to_json()))
"""

_LIST_KEYS = """
import json
from pathlib import Path
from blockcrypt.config import load_config, open_store
store = open_store(load_config(None, Path({state!r})))
print(json.dumps({{"keys": [k.to_json() for k in store.list_keys()]}}))
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def token_dirs(state: Path) -> list[Path]:
    return list((state / "softhsm" / "tokens").iterdir())


def test_ensure_creates_private_layout(tmp_path: Path) -> None:
    state = tmp_path / "state"

    result = run_python(_ENSURE.format(arg=f"Path({str(state)!r})"))

    assert mode(state) == 0o700
    assert mode(state / "softhsm") == 0o700
    assert mode(state / "softhsm" / "tokens") == 0o700
    assert mode(state / "pin") == 0o600 and mode(state / "so-pin") == 0o600
    assert len((state / "pin").read_text().strip()) == 32
    conf = (state / "softhsm" / "softhsm2.conf").read_text()
    assert f"directories.tokendir = {state / 'softhsm' / 'tokens'}\n" in conf
    assert "objectstore.backend = file\n" in conf and "log.level = ERROR\n" in conf
    assert len(token_dirs(state)) == 1
    assert result["env"] == str(state / "softhsm" / "softhsm2.conf")
    assert result["config"]["token_label"] == "blockcrypt"
    assert result["config"]["pin_file"] == str(state / "pin")


def test_ensure_is_idempotent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run_python(_ENSURE.format(arg=f"Path({str(state)!r})"))
    pin = (state / "pin").read_text()

    run_python(_ENSURE.format(arg=f"Path({str(state)!r})"))

    assert (state / "pin").read_text() == pin
    assert len(token_dirs(state)) == 1


def test_ensure_reads_state_dir_from_environment(tmp_path: Path) -> None:
    state = tmp_path / "from-env"

    result = run_python(
        _ENSURE.format(arg=""), env={"BLOCKCRYPT_STATE_DIR": str(state)}
    )

    assert result["config"]["pin_file"] == str(state / "pin")


def test_concurrent_first_use_makes_one_token(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = _LIST_KEYS.format(state=str(state))
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = str(REPO)

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]

    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert len(token_dirs(state)) == 1


def test_key_created_in_one_process_is_listed_by_another(tmp_path: Path) -> None:
    state = tmp_path / "state"

    created = run_python(_CREATE_KEY.format(state=str(state), alias="shared-key"))
    listed = run_python(_LIST_KEYS.format(state=str(state)))

    del created["_stderr"]
    assert listed["keys"] == [created]


def test_pins_never_reach_argv(tmp_path: Path) -> None:
    # A wrapper named softhsm2-util records its arguments, then runs the tool.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_log = tmp_path / "argv.log"
    wrapper = bin_dir / "softhsm2-util"
    real = subprocess.run(
        ["sh", "-c", "command -v softhsm2-util"], capture_output=True, text=True
    ).stdout.strip()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {argv_log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    state = tmp_path / "state"

    run_python(
        _ENSURE.format(arg=f"Path({str(state)!r})"),
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )

    logged = argv_log.read_text()
    assert "--init-token" in logged
    assert (state / "pin").read_text().strip() not in logged
    assert (state / "so-pin").read_text().strip() not in logged


def test_missing_softhsm2_util_is_hsm_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))

    with pytest.raises(HSMUnavailable, match="apt-get install softhsm2"):
        ensure_embedded_token(tmp_path / "state")


def test_ensure_after_other_softhsm_conf_is_refused(
    pkcs11_store: PKCS11CMKStore, tmp_path: Path
) -> None:
    before = os.environ.get("SOFTHSM2_CONF")

    with pytest.raises(HSMUnavailable, match="already loaded in this process"):
        ensure_embedded_token(tmp_path / "state")
    assert os.environ.get("SOFTHSM2_CONF") == before
