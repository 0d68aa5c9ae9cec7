"""Expected failures give one clear line, the right exit status and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from blockcrypt.volume import luks2
from tests.conftest import CLI, Server, need_tools, start_server

pytestmark = pytest.mark.interop


def fails(cli: CLI, *args: str, code: int = 1) -> str:
    proc = cli.run(*args, check=False)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("blockcrypt: error: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    return proc.stderr


def test_wrong_pin_says_which_token_and_file(
    cli: CLI, cmk: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(cli.state_dir, state)
    real_pin = (state / "pin").read_text().strip()
    (state / "pin").write_text("wrong-pin-1234\n")
    other = CLI(state)
    err = fails(other, "kms", "list-keys", code=78)
    assert "PIN" in err or "pin" in err
    assert str(state / "pin") in err
    assert real_pin not in err and "wrong-pin-1234" not in err


def test_unknown_key(cli: CLI, tmp_path: Path) -> None:
    err = fails(cli, "create", str(tmp_path / "x.img"), "--size", "8M", "--key", "nope")
    assert "'nope'" in err and "list-keys" in err
    assert not (tmp_path / "x.img").exists()
    err = fails(cli, "kms", "describe-key", "cmk-0000000000000000")
    assert "cmk-0000000000000000" in err


def test_dek_wrapped_for_another_volume_fails_to_unwrap(
    cli: CLI, cmk: str, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    cli.run("create", str(a), "--size", "8M", "--key", cmk)
    cli.run("create", str(b), "--size", "8M", "--key", cmk)
    # Copy A's token (wrapped DEK and all) into B's header.
    with open(a, "rb") as f:
        token_a = luks2.read_header(f.fileno()).metadata["tokens"]["0"]
    fd = os.open(b, os.O_RDWR)
    try:
        header_b = luks2.read_header(fd)
        meta = dict(header_b.metadata)
        meta["tokens"] = {"0": token_a}
        luks2.write_metadata(fd, header_b, meta)
    finally:
        os.close(fd)
    proc = subprocess.Popen(
        cli.argv("serve", str(b), "--socket", str(tmp_path / "b.sock")),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert "unwrap" in err.lower() and "another volume" in err.lower(), err


def test_corrupt_primary_header_falls_back_to_secondary(
    cli: CLI, volume: Path, tmp_path: Path
) -> None:
    with open(volume, "r+b") as f:
        f.seek(4096 + 20)  # inside the primary JSON area
        f.write(b"\xff\xff")
    info = cli.run("info", str(volume)).stdout
    assert "damaged header copy: primary" in info
    srv = start_server(cli, volume, tmp_path / "fb.sock")
    try:
        need_tools("nbdinfo")
        out = subprocess.run(["nbdinfo", "--size", srv.uri], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.stdout.strip() == str(64 * 1024 * 1024)
    finally:
        assert srv.stop() == 0


def test_both_header_copies_corrupt(cli: CLI, volume: Path) -> None:
    with open(volume, "r+b") as f:
        for offset in (4096 + 20, 16384 + 4096 + 20):
            f.seek(offset)
            f.write(b"\xff\xff")
    err = fails(cli, "info", str(volume))
    assert "primary" in err and "secondary" in err
    err = fails(cli, "serve", str(volume), "--socket", str(volume.with_suffix(".sock")))
    assert "primary" in err and "secondary" in err


def test_volume_already_served(cli: CLI, server: Server, volume: Path) -> None:
    err = fails(cli, "serve", str(volume), "--socket", str(volume.with_suffix(".s2")))
    assert "already served" in err


def test_not_a_volume(cli: CLI, tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    err = fails(cli, "info", str(junk))
    assert "not a LUKS2 volume" in err
    err = fails(cli, "serve", str(junk), "--socket", str(tmp_path / "j.sock"))
    assert "not a LUKS2 volume" in err
    err = fails(cli, "serve", str(tmp_path / "missing.img"), "--socket",
                str(tmp_path / "m.sock"))  # fmt: skip
    assert "no such file" in err


def test_luks2_without_blockcrypt_token(cli: CLI, tmp_path: Path) -> None:
    need_tools("cryptsetup")
    image = tmp_path / "plain-luks.img"
    image.write_bytes(bytes(32 << 20))
    keyfile = tmp_path / "pass"
    keyfile.write_text("passphrase")
    subprocess.run(
        ["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf",
         "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", str(keyfile),
         str(image)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    err = fails(cli, "serve", str(image), "--socket", str(tmp_path / "p.sock"))
    assert "no 'blockcrypt-kms' token" in err


def test_bad_sizes_and_existing_target(cli: CLI, cmk: str, volume: Path) -> None:
    err = fails(cli, "create", str(volume.with_suffix(".n")), "--size", "1000",
                "--key", cmk, code=2)  # fmt: skip
    assert "multiple" in err
    err = fails(cli, "create", str(volume.with_suffix(".n")), "--size", "ten",
                "--key", cmk, code=2)  # fmt: skip
    assert "not understood" in err
    before = volume.read_bytes()[:32768]
    err = fails(cli, "create", str(volume), "--size", "8M", "--key", cmk, code=2)
    assert "exists" in err
    assert volume.read_bytes()[:32768] == before


def test_socket_path_that_is_a_regular_file(
    cli: CLI, volume: Path, tmp_path: Path
) -> None:
    target = tmp_path / "not-a-socket"
    target.write_text("keep me")
    err = fails(cli, "serve", str(volume), "--socket", str(target), code=2)
    assert "not a socket" in err
    assert target.read_text() == "keep me"


def test_tcp_listen_warns_about_plaintext(cli: CLI, volume: Path) -> None:
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(cli.argv("serve", str(volume), "--listen", f"127.0.0.1:{port}"),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(1.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "WARNING" in err and "plaintext over TCP" in err and "without TLS" in err


def test_fifo_is_refused_without_hanging(cli: CLI, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    err = fails(cli, "serve", str(fifo), "--socket", str(tmp_path / "f.sock"))
    assert "not a regular file" in err


def test_truncated_volume_is_refused(cli: CLI, volume: Path, tmp_path: Path) -> None:
    os.truncate(volume, 16 * 1024 * 1024)
    err = fails(cli, "serve", str(volume), "--socket", str(tmp_path / "t.sock"))
    assert "truncated" in err


def test_serving_with_a_damaged_copy_warns(
    cli: CLI, volume: Path, tmp_path: Path
) -> None:
    with open(volume, "r+b") as f:
        f.seek(0)
        f.write(b"\x00\x00\x00\x00")
    srv = start_server(cli, volume, tmp_path / "d.sock", verbose="-v")
    assert srv.stop() == 0
    log = srv.log.read_text()
    assert "damaged LUKS2 header copy" in log and "cryptsetup repair" in log


def test_missing_c_cipher_is_said_loudly(
    cli: CLI, volume: Path, tmp_path: Path
) -> None:
    import sys

    block = "import sys; sys.modules['blockcrypt.crypto._xts_ext'] = None; "
    run_cli = "from blockcrypt.cli import main; sys.exit(main(sys.argv[1:]))"
    base = [sys.executable, "-c", block + run_cli, "--state-dir", str(cli.state_dir)]
    version = subprocess.run([*base, "--version"], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert "python-reference (SLOW:" in version.stdout
    sock = tmp_path / "slow.sock"
    proc = subprocess.Popen([*base, "serve", str(volume), "--socket", str(sock)],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        import time

        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "WARNING" in err and "C sector cipher is not available" in err
