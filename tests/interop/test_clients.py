"""Real NBD clients against a real server, volume and SoftHSM2 token."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CLI, Server, need_tools, start_server
from tests.interop.rawclient import RawClient

pytestmark = pytest.mark.interop

SIZE = 64 * 1024 * 1024


def run(*cmd: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def test_nbdinfo_shows_size_and_flags(server: Server) -> None:
    need_tools("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", server.uri).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn",
                 "can_fast_zero"):  # fmt: skip
        assert export[flag] is True, flag
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * 1024 * 1024


def test_nbdcopy_round_trip_is_bit_exact(server: Server, tmp_path: Path) -> None:
    need_tools("nbdcopy")
    src, out = tmp_path / "random.bin", tmp_path / "out.bin"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", "--flush", str(src), server.uri)
    run("nbdcopy", server.uri, str(out))
    assert (
        hashlib.sha256(out.read_bytes()).digest()
        == hashlib.sha256(src.read_bytes()).digest()
    )


def test_backing_file_holds_no_plaintext(server: Server, volume: Path) -> None:
    marker = b"BLOCKCRYPT-PLAINTEXT-MARKER-0123456789"
    payload = (marker * (65536 // len(marker) + 1))[:65536]
    client = RawClient(str(server.socket))
    try:
        assert client.write(1 << 20, payload, flags=1) == 0  # FUA
        assert client.read(1 << 20, len(payload)) == payload
    finally:
        client.close()
    raw = volume.read_bytes()
    assert marker not in raw
    assert marker[:12] not in raw


def test_qemu_io_write_read_patterns_and_zero_discard(server: Server) -> None:
    need_tools("qemu-io")
    out = run(
        "qemu-io", "-f", "raw", server.uri,
        "-c", "write -P 0xab 0 64k",
        "-c", "read -P 0xab 0 64k",
        "-c", "write -P 0xcd 4095 3",  # unaligned, crosses a sector boundary
        "-c", "read -P 0xcd 4095 3",
        "-c", "read -P 0xab 0 4095",
        "-c", "read -P 0xab 4098 61438",
        "-c", "write -z 8192 16k",
        "-c", "read -P 0 8192 16k",
        "-c", "discard 1M 1M",
        "-c", "flush",
    ).stdout  # fmt: skip
    assert "verification failed" not in out.lower()
    assert "error" not in out.lower(), out


def test_qemu_img_info_and_convert(server: Server, tmp_path: Path) -> None:
    need_tools("qemu-img")
    info = json.loads(run("qemu-img", "info", "--output=json", server.uri).stdout)
    assert info["virtual-size"] == SIZE
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), server.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri)


def test_fio_nbd_engine_random_write_with_verify(server: Server) -> None:
    need_tools("fio")
    proc = run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri}",
        "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16M",
        "--verify=crc32c", "--do_verify=1", "--output-format=json",
        "--verify_state_save=0",
    )  # fmt: skip
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    job = result["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * 1024 * 1024


def test_fresh_volume_reads_as_zeros(server: Server) -> None:
    need_tools("qemu-io")
    out = run("qemu-io", "-f", "raw", server.uri, "-c", "read -P 0 0 64M").stdout
    assert "verification failed" not in out.lower()


def test_read_only_serve_refuses_writes(cli: CLI, volume: Path, tmp_path: Path) -> None:
    need_tools("nbdinfo", "qemu-io")
    srv = start_server(cli, volume, tmp_path / "ro.sock", "--read-only")
    try:
        uri = srv.uri
        info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
        assert info["is_read_only"] is True
        proc = subprocess.run(
            ["qemu-io", "-f", "raw", uri, "-c", "write -P 1 0 4k"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode != 0 or "failed" in (proc.stdout + proc.stderr).lower()
    finally:
        assert srv.stop() == 0


def test_export_name_is_listed_and_required_name_works(
    cli: CLI, volume: Path, tmp_path: Path
) -> None:
    need_tools("nbdinfo")
    srv = start_server(cli, volume, tmp_path / "named.sock", "--export-name", "disk0")
    try:
        listed = json.loads(
            run(
                "nbdinfo", "--json", "--list", f"nbd+unix://?socket={srv.socket}"
            ).stdout
        )
        assert [e["export-name"] for e in listed["exports"]] == ["disk0"]
        info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)["exports"][0]
        assert info["export-size"] == SIZE
        bad = subprocess.run(
            ["nbdinfo", f"nbd+unix:///nope?socket={srv.socket}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode != 0
    finally:
        assert srv.stop() == 0


def test_socket_is_owner_only(server: Server) -> None:
    assert server.socket.stat().st_mode & 0o777 == 0o600


def test_socket_activation_by_libnbd(cli: CLI, volume: Path, tmp_path: Path) -> None:
    need_tools("nbdcopy", "nbdinfo")
    serve = ["[", *cli.argv("serve", str(volume)), "]"]
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", "--", str(src), *serve)
    run("nbdcopy", "--", *serve, str(out))
    assert out.read_bytes() == src.read_bytes()
    assert run("nbdinfo", "--size", "--", *serve).stdout.strip() == str(SIZE)


def test_block_status_map_matches_contents(server: Server, tmp_path: Path) -> None:
    need_tools("nbdinfo", "qemu-io", "qemu-img", "nbdcopy")
    fresh = json.loads(run("nbdinfo", "--map", "--json", server.uri).stdout)
    assert fresh == [
        {"offset": 0, "length": SIZE, "type": 3, "description": "hole,zero"}
    ]

    run("qemu-io", "-f", "raw", server.uri, "-c", "write -P 0x5a 1M 64k",
        "-c", "write -P 0x33 40M 4k")  # fmt: skip
    mapped = json.loads(run("nbdinfo", "--map", "--json", server.uri).stdout)
    data = [(e["offset"], e["length"]) for e in mapped if e["type"] == 0]
    assert data == [(1 << 20, 65536), (40 << 20, 4096)]
    qmap = json.loads(
        run("qemu-img", "map", "--output=json", "-f", "raw", server.uri).stdout
    )
    assert [(e["start"], e["length"]) for e in qmap if e["data"]] == data

    # A sparse-aware copy out (it skips what BLOCK_STATUS calls zero) is exact.
    out = tmp_path / "out.bin"
    run("nbdcopy", server.uri, str(out))
    raw = out.read_bytes()
    assert raw[1 << 20 : (1 << 20) + 65536] == b"\x5a" * 65536
    assert raw[40 << 20 : (40 << 20) + 4096] == b"\x33" * 4096
    assert raw.count(0) == SIZE - 65536 - 4096
