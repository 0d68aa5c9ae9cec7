"""`blockcrypt rewrap`: header-only, atomic, crash-safe at every write step."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from blockcrypt.volume import luks2
from tests.conftest import CLI, start_server
from tests.interop.rawclient import RawClient

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
DATA = os.urandom(8192)
STEPS = [f"{copy}-{step}" for copy in ("primary", "secondary")
         for step in ("binary", "json", "csum")]  # fmt: skip

# Child: rewrap, dying abruptly (no cleanup, like SIGKILL) before one step.
_CRASH = """
import os, sys
from pathlib import Path
from blockcrypt.config import load_config
from blockcrypt.kms import open_managed_store
from blockcrypt.volume.rewrap import rewrap_volume
store = open_managed_store(load_config(state_dir=Path(sys.argv[1])))
def fault(step):
    if step == sys.argv[3]:
        os._exit(9)
rewrap_volume(sys.argv[2], store, sys.argv[4] or None, _fault=fault)
"""
# Child: attach the volume (unwrap + digest check) and read the data back.
_OPEN = """
import hashlib, json, sys
from pathlib import Path
from blockcrypt.config import load_config
from blockcrypt.kms import open_managed_store
from blockcrypt.volume.device import Volume
store = open_managed_store(load_config(state_dir=Path(sys.argv[1])))
vol = Volume.attach(sys.argv[2], store, read_only=True)
token = vol.header.token
print(json.dumps({"key_id": token.key_id, "key_version": token.key_version,
                  "data": hashlib.sha256(vol.pread(0, 8192)).hexdigest()}))
vol.close()
"""


def child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SOFTHSM2_CONF", None)
    return subprocess.run([sys.executable, "-c", code, *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def data_area_hash(image: Path) -> str:
    digest = hashlib.sha256()
    with open(image, "rb") as f:
        f.seek(luks2.DEFAULT_DATA_OFFSET)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def token_of(image: Path) -> tuple[str, int]:
    with open(image, "rb") as f:
        token = luks2.read_header(f.fileno()).token
    assert token is not None
    return token.key_id, token.key_version


@pytest.fixture(scope="module")
def written(cli: CLI, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A volume with known data, wrapped by version 1 of a key now at version 2."""
    alias = "rewrap-" + uuid.uuid4().hex[:8]
    cli.run("kms", "create-key", "--alias", alias)
    tmp = tmp_path_factory.mktemp("rewrap")
    image = tmp / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", alias)
    srv = start_server(cli, image, tmp / "s.sock")
    client = RawClient(str(srv.socket))
    assert client.write(0, DATA) == 0
    client.close()
    assert srv.stop() == 0
    cli.run("kms", "rotate-key", alias)
    return image, alias


def test_rewrap_moves_to_newest_version_without_touching_data(
    cli: CLI, written: tuple[Path, str], tmp_path: Path
) -> None:
    image = tmp_path / "v.img"
    shutil.copy(written[0], image)
    before = data_area_hash(image)

    doc = json.loads(cli.run("rewrap", str(image), "--json").stdout)

    assert (doc["old"]["key_version"], doc["new"]["key_version"]) == (1, 2)
    assert doc["changed"] is True
    assert token_of(image)[1] == 2
    assert data_area_hash(image) == before
    opened = json.loads(child(_OPEN, str(cli.state_dir), str(image)).stdout)
    assert opened["data"] == hashlib.sha256(DATA).hexdigest()
    again = json.loads(cli.run("rewrap", str(image), "--json").stdout)
    assert again["changed"] is False
    check = subprocess.run(["cryptsetup", "repair", "--batch-mode", str(image)],
                           capture_output=True)  # fmt: skip
    assert check.returncode == 0


def test_rewrap_to_another_key(
    cli: CLI, written: tuple[Path, str], tmp_path: Path
) -> None:
    image = tmp_path / "v.img"
    shutil.copy(written[0], image)
    other = "rewrap-other-" + uuid.uuid4().hex[:8]
    other_id = json.loads(
        cli.run("kms", "create-key", "--alias", other, "--json").stdout
    )["key_id"]

    cli.run("rewrap", str(image), "--key", other)

    assert token_of(image) == (other_id, 1)
    opened = json.loads(child(_OPEN, str(cli.state_dir), str(image)).stdout)
    assert opened["key_id"] == other_id


def test_rewrap_refuses_attached_volume(
    cli: CLI, written: tuple[Path, str], tmp_path: Path
) -> None:
    image = tmp_path / "v.img"
    shutil.copy(written[0], image)
    srv = start_server(cli, image, tmp_path / "s.sock")
    try:
        proc = cli.run("rewrap", str(image), check=False)
    finally:
        assert srv.stop() == 0
    assert proc.returncode == 1
    assert "is attached" in proc.stderr


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_any_write_step_leaves_old_or_new_wrap(
    cli: CLI, written: tuple[Path, str], tmp_path: Path, step: str
) -> None:
    image = tmp_path / "v.img"
    shutil.copy(written[0], image)
    before = data_area_hash(image)

    crashed = child(_CRASH, str(cli.state_dir), str(image), step, "")
    assert crashed.returncode == 9, crashed.stderr

    proc = child(_OPEN, str(cli.state_dir), str(image))
    assert proc.returncode == 0, proc.stderr
    opened = json.loads(proc.stdout)
    assert opened["data"] == hashlib.sha256(DATA).hexdigest()
    # Until the primary copy is complete the old wrap wins; after, the new one.
    expected = 1 if step.startswith("primary") else 2
    assert opened["key_version"] == expected
    assert data_area_hash(image) == before
