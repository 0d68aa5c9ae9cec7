"""Fixtures shared by the integration tests: a private state directory with the
embedded SoftHSM2 token, the real ``blockcrypt`` command, volumes and servers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def need_tools(*tools: str) -> None:
    """Skip the test unless every tool is on PATH; the reason names the missing ones."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def need_softhsm() -> None:
    need_tools("softhsm2-util")
    if not Path(SOFTHSM_MODULE).exists():
        pytest.skip(f"needs the SoftHSM2 module {SOFTHSM_MODULE} (package libsofthsm2)")


@dataclass
class CLI:
    """Runs ``python -m blockcrypt.cli`` with a private state directory."""

    state_dir: Path

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "blockcrypt.cli",
            "--state-dir",
            str(self.state_dir),
            *args,
        ]

    def run(
        self, *args: str, check: bool = True, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=120, **kw
        )  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            raise AssertionError(
                f"blockcrypt {' '.join(args)} exited {proc.returncode}\n{proc.stderr}"
            )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory) -> CLI:
    need_softhsm()
    return CLI(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="session")
def cmk(cli: CLI) -> str:
    """Alias of a CMK created in the session's embedded token."""
    cli.run("kms", "create-key", "--alias", "test-cmk")
    return "test-cmk"


@pytest.fixture
def volume(cli: CLI, cmk: str, tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    cli.run("create", str(path), "--size", "64M", "--key", cmk)
    return path


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    export: str = ""

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def start_server(
    cli: CLI, image: Path, sock: Path, *extra: str, verbose: str = "-vv"
) -> Server:
    log = sock.with_suffix(".log")
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [*cli.argv(verbose, "serve", str(image), "--socket", str(sock)), *extra],
            stdout=f,
            stderr=f,
        )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {log.read_text()}")
        time.sleep(0.02)
    name = extra[extra.index("--export-name") + 1] if "--export-name" in extra else ""
    return Server(proc, sock, log, name)


@pytest.fixture
def server(cli: CLI, volume: Path, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(cli, volume, tmp_path / "nbd.sock")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()
    assert "Traceback" not in srv.log.read_text()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """With BLOCKCRYPT_REQUIRE_ALL=1 (set by CI), a skipped interop test fails."""
    outcome = yield
    report = outcome.get_result()
    strict = os.environ.get("BLOCKCRYPT_REQUIRE_ALL") == "1"
    marked = item.get_closest_marker("interop") or item.get_closest_marker("root")
    if strict and report.skipped and marked and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"interop test skipped where every tool must exist: {report.longrepr}"
        )
