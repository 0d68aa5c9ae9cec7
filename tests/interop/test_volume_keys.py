"""The volume key as cryptsetup sees it, and proof that it never reaches a log."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from blockcrypt.volume import luks2
from tests.conftest import CLI, need_tools, start_server
from tests.interop.rawclient import RawClient

pytestmark = pytest.mark.interop


def unwrap_dek(cli: CLI, image: Path, out: Path) -> bytes:
    """Unwrap the volume's DEK through ``blockcrypt kms decrypt-datakey``."""
    with open(image, "rb") as f:
        header = luks2.read_header(f.fileno())
    token = header.token
    assert token is not None
    doc = {
        "key_id": token.key_id,
        "key_version": token.key_version,
        "mechanism": token.mechanism,
        "iv": base64.b64encode(token.iv).decode(),
        "ciphertext": base64.b64encode(token.wrapped_dek).decode(),
        "volume_uuid": header.uuid,
    }
    cli.run("kms", "decrypt-datakey", token.key_id, "--plaintext-file", str(out),
            input=json.dumps(doc))  # fmt: skip
    assert out.stat().st_mode & 0o777 == 0o600
    return out.read_bytes()


def cryptsetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cryptsetup", *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize("sector_size", ["4096", "512"])
def test_cryptsetup_accepts_volume_and_checks_the_unwrapped_dek(
    cli: CLI, cmk: str, tmp_path: Path, sector_size: str
) -> None:
    need_tools("cryptsetup")
    image = tmp_path / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", cmk,
            "--sector-size", sector_size)  # fmt: skip
    dump = cryptsetup("luksDump", str(image))
    assert dump.returncode == 0, dump.stderr
    assert f"sector: {sector_size} [bytes]" in dump.stdout
    assert "blockcrypt-kms" in dump.stdout

    dek = tmp_path / "dek"
    assert len(unwrap_dek(cli, image, dek)) == 64
    ok = cryptsetup("open", "--test-passphrase", "--volume-key-file", str(dek),
                    "--key-size", "512", str(image))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(64))
    bad = cryptsetup("open", "--test-passphrase", "--volume-key-file", str(wrong),
                     "--key-size", "512", str(image))  # fmt: skip
    assert bad.returncode == 2


def test_still_served_after_cryptsetup_edits_the_header(
    cli: CLI, cmk: str, tmp_path: Path
) -> None:
    need_tools("cryptsetup")
    image = tmp_path / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", cmk)
    srv = start_server(cli, image, tmp_path / "a.sock")
    c = RawClient(str(srv.socket))
    payload = os.urandom(12345)
    assert c.write(777, payload) == 0
    c.close()
    assert srv.stop() == 0

    dek = tmp_path / "dek"
    unwrap_dek(cli, image, dek)
    passfile = tmp_path / "pass"
    passfile.write_text("recovery passphrase")
    edits = [
        ("config", "--label", "edited", str(image)),
        ("luksAddKey", "--batch-mode", "--volume-key-file", str(dek), "--key-size",
         "512", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(image),
         str(passfile)),
    ]  # fmt: skip
    for edit in edits:
        proc = cryptsetup(*edit)
        assert proc.returncode == 0, (edit, proc.stderr)

    info = json.loads(cli.run("info", "--json", str(image)).stdout)
    assert info["label"] == "edited" and info["epoch"] >= 3
    srv = start_server(cli, image, tmp_path / "b.sock")
    try:
        c = RawClient(str(srv.socket))
        assert c.read(777, len(payload)) == payload
        c.close()
    finally:
        assert srv.stop() == 0


def test_no_secret_reaches_logs_or_output(cli: CLI, cmk: str, tmp_path: Path) -> None:
    image = tmp_path / "s.img"
    created = cli.run("-vv", "create", str(image), "--size", "16M", "--key", cmk,
                      "--json")  # fmt: skip
    info = cli.run("-vv", "info", str(image), "--json")
    srv = start_server(cli, image, tmp_path / "s.sock")  # -vv: every request logged
    secret_data = b"TOP-SECRET-SECTOR-CONTENT-" + os.urandom(8).hex().encode()
    try:
        c = RawClient(str(srv.socket))
        assert c.write(4096, secret_data * 10) == 0
        assert c.read(4096, len(secret_data)) == secret_data
        c.send(0, 1 << 40, 1, cookie=9)  # a rejected request is logged too
        assert c.reply()[0] == 22
        c.close()
    finally:
        assert srv.stop() == 0

    dek = unwrap_dek(cli, image, tmp_path / "dek")
    pin = (cli.state_dir / "pin").read_text().strip()
    so_pin = (cli.state_dir / "so-pin").read_text().strip()
    texts = [
        srv.log.read_text(),
        created.stdout,
        created.stderr,
        info.stdout,
        info.stderr,
    ]
    forbidden = [
        dek.hex(), dek.hex().upper(), base64.b64encode(dek).decode(),
        dek[:32].hex(), dek[32:].hex(), pin, so_pin, secret_data.decode(),
    ]  # fmt: skip
    log = srv.log.read_text()
    assert "request" in log and "WRITE" in log  # the log really is verbose
    for text in texts:
        for secret in forbidden:
            assert secret not in text
    assert dek not in srv.log.read_bytes()


def test_decrypt_datakey_from_the_volume_itself(cli: CLI, cmk: str, tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", cmk)
    via_json = unwrap_dek(cli, image, tmp_path / "a.key")
    out = tmp_path / "b.key"
    cli.run("kms", "decrypt-datakey", cmk, "--volume", str(image), "--plaintext-file", str(out))
    assert out.read_bytes() == via_json and out.stat().st_mode & 0o777 == 0o600
    other = json.loads(cli.run("kms", "create-key", "--alias", "other-" + out.name, "--json").stdout)
    proc = cli.run("kms", "decrypt-datakey", other["key_id"], "--volume", str(image),
                   "--plaintext-file", str(tmp_path / "c.key"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "wrapped by" in proc.stderr
    assert not (tmp_path / "c.key").exists()
