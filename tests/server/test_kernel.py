"""Kernel attach: the exact netlink messages, module detection, nbd-client, registry.

There is no nbd module on the development machines, so the messages are
checked byte for byte against the kernel's layout (include/uapi/linux/
nbd-netlink.h); the real attach runs only where the module is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blockcrypt.errors import KernelNBDError
from blockcrypt.nbd import TransmissionFlag
from blockcrypt.server import kernel
from blockcrypt.server.daemon import export_for
from blockcrypt.volume.device import Volume
from tests.conftest import CLI, need_tools, start_server
from tests.nbd.wire import request
from tests.server.test_serve_inprocess import recv_exact


def module_loaded() -> bool:
    try:
        kernel.check_module()
    except KernelNBDError:
        return False
    return True


NO_MODULE = not module_loaded()
needs_module = pytest.mark.skipif(
    NO_MODULE, reason="needs the kernel nbd module (modprobe nbd)"
)


def parse_attrs(data: bytes) -> list[tuple[int, bytes]]:
    """Split netlink attributes into (type, payload), as the kernel reads them."""
    attrs = []
    while data:
        length, kind = struct.unpack_from("<HH", data)
        assert length >= 4
        attrs.append((kind, data[4:length]))
        data = data[(length + 3) & ~3 :]
    return attrs


def encode(msg: kernel.NBDMessage) -> tuple[int, int, list[tuple[int, bytes]]]:
    """Return (genl cmd, genl version, attributes) of an encoded message."""
    msg.encode()
    raw = bytes(msg.data)
    length = struct.unpack_from("<I", raw)[0]
    assert length == len(raw)
    cmd, version = raw[16], raw[17]
    return cmd, version, parse_attrs(raw[20:])  # 16 nlmsghdr + 4 genlmsghdr


def u64(value: bytes) -> int:
    return int(struct.unpack("<Q", value)[0])


def u32(value: bytes) -> int:
    return int(struct.unpack("<I", value)[0])


def test_connect_message_matches_the_kernel_layout() -> None:
    flags = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.CAN_MULTI_CONN)
    msg = kernel.connect_message([7, 9, 11], 1 << 30, 4096, flags, 30, 60, index=2)

    cmd, version, attrs = encode(msg)

    assert (cmd, version) == (1, 1)  # NBD_CMD_CONNECT, family version 1
    by_type = dict(attrs)
    assert u32(by_type[1]) == 2  # NBD_ATTR_INDEX
    assert u64(by_type[2]) == 1 << 30  # NBD_ATTR_SIZE_BYTES
    assert u64(by_type[3]) == 4096  # NBD_ATTR_BLOCK_SIZE_BYTES
    assert u64(by_type[4]) == 30  # NBD_ATTR_TIMEOUT
    assert u64(by_type[5]) == flags  # NBD_ATTR_SERVER_FLAGS
    assert u64(by_type[8]) == 60  # NBD_ATTR_DEAD_CONN_TIMEOUT
    assert 6 not in by_type  # no client flags: no DISCONNECT_ON_CLOSE
    # NBD_ATTR_SOCKETS (7): every element is NBD_SOCK_ITEM (1) holding
    # NBD_SOCK_FD (1, u32). The kernel refuses elements of any other type.
    items = parse_attrs(by_type[7])
    assert [kind for kind, _ in items] == [1, 1, 1]
    fds = []
    for _, payload in items:
        inner = parse_attrs(payload)
        assert [kind for kind, _ in inner] == [1]
        fds.append(u32(inner[0][1]))
    assert fds == [7, 9, 11]


def test_connect_without_index_lets_the_kernel_choose() -> None:
    _, _, attrs = encode(kernel.connect_message([3], 4096, 512, 1))
    assert 1 not in dict(attrs)


@pytest.mark.parametrize(
    ("fds", "size", "block", "flags", "message"),
    [
        ([], 4096, 4096, 0x101, "at least one socket"),
        ([3], 4096, 8192, 0x101, "block size is 8192"),
        ([3], 5000, 4096, 0x101, "multiple of 4096"),
        ([3, 4], 4096, 4096, 0x1, "CAN_MULTI_CONN"),
    ],
)
def test_connect_message_refuses_what_the_kernel_would(
    fds: list[int], size: int, block: int, flags: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        kernel.connect_message(fds, size, block, flags)


def test_disconnect_and_status_messages() -> None:
    cmd, version, attrs = encode(kernel.disconnect_message(5))
    assert (cmd, version, [(k, u32(v)) for k, v in attrs]) == (2, 1, [(1, 5)])
    cmd, _, attrs = encode(kernel.status_message())
    assert (cmd, attrs) == (5, [])


def test_status_reply_decodes_device_list() -> None:
    # A reply as the kernel builds it: DEVICE_LIST (9) of DEVICE_ITEMs (1).
    def nla(kind: int, payload: bytes) -> bytes:
        raw = struct.pack("<HH", 4 + len(payload), kind) + payload
        return raw + bytes(-len(raw) % 4)

    item = nla(1, nla(1, struct.pack("<I", 3)) + nla(2, b"\x01"))
    body = bytes([5, 1, 0, 0]) + nla(9, item)
    raw = struct.pack("<IHHII", 16 + len(body), 30, 0, 0, 0) + body
    msg = kernel.NBDMessage(raw)
    msg.decode()

    items = msg.get_attr("NBD_ATTR_DEVICE_LIST")
    assert [(i.get_attr("NBD_DEVICE_INDEX"), i.get_attr("NBD_DEVICE_CONNECTED"))
            for i in items] == [(3, 1)]  # fmt: skip


def test_server_flags_equal_what_the_export_advertises(attached: Volume) -> None:
    export = export_for(attached, "")
    flags = TransmissionFlag(export.flags)
    needed = (
        TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_TRIM
        | TransmissionFlag.CAN_MULTI_CONN
    )
    assert flags & needed == needed

    msg = kernel.connect_message(
        [3, 4], attached.size, attached.sector_size, int(export.flags)
    )
    by_type = dict(encode(msg)[2])

    assert u64(by_type[5]) == int(export.flags)
    assert u64(by_type[3]) == attached.sector_size
    assert u64(by_type[2]) == attached.size


@pytest.mark.parametrize("name", ["/dev/nbd0", "nbd12"])
def test_device_index(name: str) -> None:
    assert kernel.device_index(name) == int(name.rsplit("nbd", 1)[1])


def test_device_index_refuses_other_devices() -> None:
    with pytest.raises(KernelNBDError, match="expected /dev/nbdN"):
        kernel.device_index("/dev/sda")


@pytest.mark.skipif(not NO_MODULE, reason="the nbd module is loaded here")
def test_missing_module_says_modprobe() -> None:
    with pytest.raises(KernelNBDError, match="modprobe nbd"):
        kernel.NBDNetlink()


def test_registry_add_list_remove_and_prune(tmp_path: Path) -> None:
    registry = kernel.AttachmentRegistry(tmp_path)
    registry.add("/dev/nbd0", {"device": "/dev/nbd0", "pid": os.getpid()})
    registry.add("/dev/nbd1", {"device": "/dev/nbd1", "pid": 2**22 + 12345})

    assert list(registry.list()) == ["/dev/nbd0"]  # the dead pid is dropped
    registry.remove("/dev/nbd0", pid=1)  # another process's entry: kept
    assert registry.get("/dev/nbd0") is not None
    registry.remove("/dev/nbd0", pid=os.getpid())
    assert registry.list() == {}
    assert (tmp_path / "attachments.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(not NO_MODULE, reason="the nbd module is loaded here")
def test_cli_attach_without_module_fails_before_unwrapping(
    cli: CLI, cmk: str, tmp_path: Path
) -> None:
    image = tmp_path / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", cmk)
    before = (cli.state_dir / "audit.log").read_text()

    proc = cli.run("attach", str(image), check=False)

    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "modprobe nbd" in proc.stderr
    assert (cli.state_dir / "audit.log").read_text() == before  # no unwrap
    assert json.loads(cli.run("list", "--json").stdout)["attachments"] == []
    detach = cli.run("detach", "/dev/nbd0", check=False)
    assert detach.returncode == 1 and "not attached by blockcrypt" in detach.stderr


@pytest.mark.interop
def test_documented_nbd_client_command_line_parses(
    cli: CLI, cmk: str, tmp_path: Path
) -> None:
    need_tools("nbd-client")
    image = tmp_path / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", cmk)
    srv = start_server(cli, image, tmp_path / "k.sock", "--export-name", "vol")
    try:
        argv = kernel.nbd_client_argv(str(srv.socket), "/dev/nbd15", 4096,
                                      connections=2, export_name="vol")  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        assert srv.stop() == 0
    output = proc.stdout + proc.stderr
    # It parsed the options and negotiated with blockcrypt; only handing the
    # sockets to the kernel can fail (no nbd module, or no /dev/nbd15).
    assert "Negotiation: .." in output and "size = 16MB" in output, output
    assert "Usage" not in output and "E: " not in output, output
    if NO_MODULE:
        assert proc.returncode != 0
        assert "netlink" in output or "Cannot open NBD" in output, output


@pytest.mark.kernel
@needs_module
def test_kernel_attach_serves_a_block_device(
    cli: CLI, cmk: str, tmp_path: Path
) -> None:  # pragma: no cover - needs the module
    image = tmp_path / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", cmk)
    proc = subprocess.Popen(cli.argv("attach", str(image)), stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = json.loads(cli.run("list", "--json").stdout)["attachments"]
            if rows:
                break
            time.sleep(0.2)
        device = rows[0]["device"]
        with open(device, "r+b") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            assert f.read(4096) == b"x" * 4096
        cli.run("detach", device)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


class FakeNetlink:
    """Plays the kernel: takes its own copies of the socket fds, then does I/O."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.disconnected: list[int] = []
        self.seen: dict[str, object] = {}
        self.thread: threading.Thread | None = None

    def connect(self, msg: kernel.NBDMessage) -> int:
        by_type = dict(encode(msg)[2])
        fds = [u32(parse_attrs(p)[0][1]) for _, p in parse_attrs(by_type[7])]
        socks = [socket.socket(fileno=os.dup(fd)) for fd in fds]
        self.seen["flags"] = u64(by_type[5])
        self.thread = threading.Thread(target=self._io, args=(socks,))
        self.thread.start()
        return 6

    def _io(self, socks: list[socket.socket]) -> None:
        try:
            for i, sock in enumerate(socks):
                sock.sendall(request(1, 4096 * i, 5, cookie=i + 1, data=b"hello"))
                self.seen[f"write{i}"] = recv_exact(sock, 16)
            # attach records the device once CONNECT has returned.
            registry = kernel.AttachmentRegistry(self.state_dir)
            deadline = time.monotonic() + 10
            while registry.get("/dev/nbd6") is None and time.monotonic() < deadline:
                time.sleep(0.01)
            self.seen["registered"] = registry.get("/dev/nbd6")
        finally:
            for sock in socks:
                sock.close()
            os.kill(os.getpid(), signal.SIGTERM)  # what `detach` sends

    def disconnect(self, index: int) -> None:
        self.disconnected.append(index)


def test_attach_hands_socketpairs_to_the_kernel_and_cleans_up(
    attached: Volume, tmp_path: Path
) -> None:
    from blockcrypt import cli as cli_module
    from blockcrypt.config import Config

    fake = FakeNetlink(tmp_path)
    args = argparse.Namespace(connections=2, timeout=30, dead_conn_timeout=60)

    device = cli_module._run_attached(
        args, Config(state_dir=tmp_path), attached, fake, None
    )
    assert fake.thread is not None
    fake.thread.join(10)

    assert device == "/dev/nbd6"
    assert fake.seen["flags"] == int(export_for(attached, "").flags)
    for i in range(2):
        assert struct.unpack(">IIQ", fake.seen[f"write{i}"]) == (0x67446698, 0, i + 1)
    entry = fake.seen["registered"]
    assert isinstance(entry, dict) and entry["volume_uuid"] == attached.header.uuid
    assert "key" not in json.dumps(entry).replace("key_id", "").replace(
        "key_version", ""
    )
    assert fake.disconnected == [6]
    assert kernel.AttachmentRegistry(tmp_path).list() == {}
    assert attached.pread(0, 5) == b"hello"


def test_registry_entry_names_one_process_not_a_reusable_pid() -> None:
    import os

    from blockcrypt.server import kernel as k

    me = {"pid": os.getpid(), "pid_start": k.process_start(os.getpid())}
    assert k.same_process(me)
    assert not k.same_process({**me, "pid_start": me["pid_start"] + 1})  # type: ignore[operator]
    assert not k.same_process({"pid": 2**22 + 12345})
    assert k.same_process({"pid": os.getpid()})  # entries from before the field
