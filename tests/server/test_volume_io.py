"""The volume layer against a reference bytearray, with the memory KMS backend."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from blockcrypt.errors import VolumeBusy
from blockcrypt.kms import MemoryCMKStore
from blockcrypt.volume.device import StorageIOError, Volume


def test_fresh_volume_reads_zeros(attached: Volume) -> None:
    assert attached.pread(0, attached.size) == bytes(attached.size)


def test_random_unaligned_io_matches_reference(attached: Volume) -> None:
    rng = random.Random(1234)
    ref = bytearray(attached.size)
    for _ in range(300):
        off = rng.randrange(attached.size - 1)
        n = rng.randrange(1, min(70000, attached.size - off) + 1)
        op = rng.random()
        if op < 0.6:
            data = rng.randbytes(n)
            attached.pwrite(off, data, fua=rng.random() < 0.1)
            ref[off : off + n] = data
        elif op < 0.8:
            attached.write_zeroes(
                off, n, no_hole=rng.random() < 0.5, fast=False, fua=False
            )
            ref[off : off + n] = bytes(n)
        else:
            assert attached.pread(off, n) == ref[off : off + n]
    assert attached.pread(0, attached.size) == ref


def test_trim_whole_sectors_read_as_zeros_partial_untouched(attached: Volume) -> None:
    ss = attached.sector_size
    attached.pwrite(0, b"\xaa" * (4 * ss), fua=False)
    attached.trim(ss // 2, 3 * ss, fua=True)  # covers sectors 1 and 2 entirely
    got = attached.pread(0, 4 * ss)
    assert got[:ss] == b"\xaa" * ss
    assert got[ss : 3 * ss] == bytes(2 * ss)
    assert got[3 * ss :] == b"\xaa" * ss


def test_fast_zero_with_no_hole_is_refused(attached: Volume) -> None:
    with pytest.raises(StorageIOError) as info:
        attached.write_zeroes(0, 1 << 20, no_hole=True, fast=True, fua=False)
    assert info.value.nbd_errno == 95


def test_out_of_range_is_einval(attached: Volume) -> None:
    with pytest.raises(StorageIOError) as info:
        attached.pread(attached.size, 1)
    assert info.value.nbd_errno == 22


def test_concurrent_single_byte_writes_in_one_sector(attached: Volume) -> None:
    def worker(n: int) -> None:
        for k in range(n, 512, 8):
            attached.pwrite(100 + k, bytes([k % 255 + 1]), fua=False)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert attached.pread(100, 512) == bytes(k % 255 + 1 for k in range(512))


def test_second_attach_is_refused_until_close(
    store: MemoryCMKStore, tmp_path: Path
) -> None:
    from tests.server.conftest import make_volume

    path = tmp_path / "busy.img"
    make_volume(store, path, 1 << 20)
    first = Volume.attach(str(path), store)
    with pytest.raises(VolumeBusy):
        Volume.attach(str(path), store)
    ro = None
    with pytest.raises(VolumeBusy):
        ro = Volume.attach(str(path), store, read_only=True)
    assert ro is None
    first.close()
    Volume.attach(str(path), store).close()


def test_ciphertext_differs_from_plaintext(
    store: MemoryCMKStore, tmp_path: Path
) -> None:
    from tests.server.conftest import make_volume

    path = tmp_path / "ct.img"
    make_volume(store, path, 1 << 20)
    vol = Volume.attach(str(path), store)
    secret = os.urandom(16) * 256
    vol.pwrite(8192, secret, fua=True)
    vol.close()
    raw = path.read_bytes()
    assert secret[:16] not in raw


def test_extents_zero_only_where_reads_are_zero(attached: Volume) -> None:
    ss = attached.sector_size
    size = attached.size
    assert attached.extents(0, size) == [(size, 3)]
    attached.pwrite(5 * 65536 + 7, b"x" * 10, fua=False)
    attached.pwrite(size - 1, b"y", fua=False)
    ext = attached.extents(0, size)
    assert sum(n for n, _ in ext) == size
    pos = 0
    for n, flags in ext:
        if flags == 3:
            assert attached.pread(pos, n) == bytes(n), (pos, n)
        pos += n
    assert any(f == 0 for _, f in ext) and ext[0][1] == 3
    # the written bytes are never inside a zero extent
    pos = 0
    for n, flags in ext:
        for written in (5 * 65536 + 7, size - 1):
            if pos <= written < pos + n:
                assert flags == 0
        pos += n
    # unaligned start and a single-extent request
    one = attached.extents(3, ss * 2, limit=1)
    assert len(one) == 1 and one[0][0] <= ss * 2


def test_extents_after_trim_and_zeroes(attached: Volume) -> None:
    attached.pwrite(0, b"z" * (1 << 20), fua=False)
    assert attached.extents(0, 1 << 20) == [(1 << 20, 0)]
    attached.trim(0, 1 << 20, fua=False)
    assert attached.extents(0, 1 << 20) == [(1 << 20, 3)]
    attached.pwrite(0, b"z" * (1 << 20), fua=False)
    attached.write_zeroes(0, 1 << 20, no_hole=True, fast=False, fua=False)
    assert attached.extents(0, 1 << 20) == [(1 << 20, 0)]  # zeros, but allocated
    assert attached.pread(0, 1 << 20) == bytes(1 << 20)
