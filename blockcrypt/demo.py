"""``blockcrypt demo``: the main job end to end, on the embedded SoftHSM2 default.

Each step runs the real ``blockcrypt`` command (printed as it goes), so the
output doubles as a tutorial. The PKCS#11 module is loaded only in those
child processes, never in this one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from blockcrypt.errors import BlockcryptError, ConfigError

_TOOLS = {
    "nbdfuse": "nbdfuse",
    "fusermount3": "fuse3",
    "losetup": "mount",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mount": "mount",
    "umount": "mount",
}
_MARKER = b"blockcrypt-demo-plaintext-marker"


class DemoError(BlockcryptError):
    """A demo step failed."""


def _blockcrypt(args: argparse.Namespace) -> list[str]:
    # -P: never import a "blockcrypt" directory that happens to be in the cwd.
    cmd = [sys.executable, "-P", "-m", "blockcrypt.cli"]
    if args.state_dir:
        cmd += ["--state-dir", args.state_dir]
    if args.config:
        cmd += ["--config", args.config]
    return cmd


def _show(cmd: list[str]) -> None:
    prefix = ["-P", "-m", "blockcrypt.cli"]
    shown = ["blockcrypt", *cmd[4:]] if cmd[1:4] == prefix else cmd
    print(f"$ {shlex.join(shown)}", flush=True)


def _run(cmd: list[str], quiet: bool = False) -> str:
    _show(cmd)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoError(
            f"step failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
            f"{proc.stderr.strip()}"
        )
    if proc.stdout.strip() and not quiet:
        print("  " + proc.stdout.strip().replace("\n", "\n  "), flush=True)
    return proc.stdout


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not become ready within 30 s")
        time.sleep(0.05)


@contextlib.contextmanager
def _served(args: argparse.Namespace, image: Path, sock: Path) -> Iterator[None]:
    cmd = [*_blockcrypt(args), "serve", str(image), "--socket", str(sock)]
    _show(cmd)
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        _wait_for(sock, server, "blockcrypt serve")
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        if server.wait(timeout=60) != 0:
            raise DemoError(f"blockcrypt serve exited with status {server.returncode}")
        print(f"  (server stopped, exit status {server.returncode})", flush=True)


@contextlib.contextmanager
def _mounted(sock: Path, work: Path, fresh: bool) -> Iterator[Path]:
    fuse_dir, mnt = work / "fuse", work / "mnt"
    fuse_dir.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    pidfile = work / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    cmd = ["nbdfuse", "-P", str(pidfile), str(fuse_dir / "disk"), "--unix", str(sock)]
    _show(cmd)
    fuse = subprocess.Popen(cmd)
    loop = None
    try:
        _wait_for(pidfile, fuse, "nbdfuse")
        loop = _run(["losetup", "--find", "--show", str(fuse_dir / "disk")]).strip()
        if fresh:
            _run(["mkfs.ext4", "-q", "-L", "blockcrypt-demo", loop])
        else:
            _run(["e2fsck", "-n", "-f", loop], quiet=True)
            print("  file system is clean", flush=True)
        _run(["mount", loop, str(mnt)])
        try:
            yield mnt
        finally:
            _run(["umount", str(mnt)])
    finally:
        if loop:
            _run(["losetup", "--detach", loop])
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
        fuse.wait(timeout=30)


def run_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise ConfigError("the demo mounts a file system, so it needs root (sudo)")
    missing = [f"{t} (package {p})" for t, p in _TOOLS.items() if not shutil.which(t)]
    if missing:
        raise ConfigError(f"the demo needs: {', '.join(missing)}; install them first")

    work = Path(tempfile.mkdtemp(prefix="blockcrypt-demo-"))
    image, sock = work / "demo.img", work / "nbd.sock"
    print(
        f"# working in {work}\n# 1. a customer master key inside SoftHSM2", flush=True
    )
    bc = _blockcrypt(args)
    try:
        found = subprocess.run(
            [*bc, "kms", "describe-key", "demo"], capture_output=True
        )
        if found.returncode == 0:
            _run([*bc, "kms", "describe-key", "demo"])
        else:
            _run([*bc, "kms", "create-key", "--alias", "demo"])

        print("# 2. a 256 MiB volume whose data key is wrapped by that CMK", flush=True)
        _run([*bc, "create", str(image), "--size", "256M", "--key", "demo"])

        print("# 3. serve it, mount ext4 through nbdfuse, write files", flush=True)
        payload = os.urandom(4 << 20)
        with _served(args, image, sock), _mounted(sock, work, fresh=True) as mnt:
            (mnt / "hello.txt").write_bytes(_MARKER + b"\n")
            (mnt / "random.bin").write_bytes(payload)
            os.sync()
            print("  wrote hello.txt and random.bin (4 MiB)", flush=True)

        print("# 4. the backing file holds only ciphertext", flush=True)
        if _MARKER in image.read_bytes():
            raise DemoError(f"plaintext marker found in {image}")
        print(f"  marker not found in {image}", flush=True)

        print("# 5. restart the server, mount again, check the files", flush=True)
        with _served(args, image, sock), _mounted(sock, work, fresh=False) as mnt:
            same = (mnt / "random.bin").read_bytes() == payload
            text = (mnt / "hello.txt").read_bytes()
        if not same or text != _MARKER + b"\n":
            raise DemoError("files read back after the restart differ")
        digest = hashlib.sha256(payload).hexdigest()[:16]
        print(f"  random.bin sha256 {digest}... matches; hello.txt matches", flush=True)
        print("# demo finished: OK", flush=True)
        return 0
    finally:
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
