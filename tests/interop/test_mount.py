"""The main job: ext4 on the served volume through nbdfuse and a loop device,
surviving a server restart, with only ciphertext in the backing file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, need_root, need_tools, start_server

pytestmark = [pytest.mark.interop, pytest.mark.root]

MARKER = b"blockcrypt-mount-test-marker-7f3a9c"


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@contextlib.contextmanager
def fuse_loop(sock: Path, work: Path) -> Iterator[str]:
    fuse_dir = work / "fuse"
    fuse_dir.mkdir(exist_ok=True)
    pidfile = work / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    proc = subprocess.Popen(
        ["nbdfuse", "-P", str(pidfile), str(fuse_dir / "disk"), "--unix", str(sock)]
    )
    deadline = time.monotonic() + 30
    while not pidfile.exists():
        assert proc.poll() is None, "nbdfuse exited"
        assert time.monotonic() < deadline, "nbdfuse did not start"
        time.sleep(0.05)
    loop = sh("losetup", "--find", "--show", str(fuse_dir / "disk")).strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "--detach", loop], timeout=60)
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], timeout=60)
        proc.wait(timeout=60)


def checksums(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.is_file()
    }


def test_ext4_survives_restart_and_backing_file_is_ciphertext(
    cli: CLI, cmk: str, tmp_path: Path
) -> None:
    need_root()
    need_tools("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount")
    image = tmp_path / "fs.img"
    cli.run("create", str(image), "--size", "128M", "--key", cmk)
    sock, mnt = tmp_path / "fs.sock", tmp_path / "mnt"
    mnt.mkdir()

    srv = start_server(cli, image, sock)
    try:
        with fuse_loop(sock, tmp_path) as loop:
            sh("mkfs.ext4", "-q", loop)
            sh("mount", loop, str(mnt))
            try:
                (mnt / "marker.txt").write_bytes(MARKER * 100)
                for i in range(4):
                    (mnt / f"data{i}.bin").write_bytes(os.urandom((i + 1) << 20))
                before = checksums(mnt)
            finally:
                sh("umount", str(mnt))
    finally:
        assert srv.stop() == 0, srv.log.read_text()

    assert MARKER not in image.read_bytes()

    srv = start_server(cli, image, sock)
    try:
        with fuse_loop(sock, tmp_path) as loop:
            fsck = subprocess.run(["e2fsck", "-n", "-f", loop], capture_output=True,
                                  text=True, timeout=120)  # fmt: skip
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            sh("mount", loop, str(mnt))
            try:
                assert checksums(mnt) == before
            finally:
                sh("umount", str(mnt))
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log.read_text()
