"""Tests for the C sector-cipher backend and the interface both backends share.

The reference ``SectorCipher`` is the oracle: it is checked against IEEE 1619
and NIST vectors and against cryptsetup in test_xts.py, so here the C backend
must give the same bytes, and refuse the same requests with the same errors.

Tests that need the extension skip when it is not built, and fail instead
when BLOCKCRYPT_REQUIRE_ALL=1 (CI), where a missing build is a bug.
"""

from __future__ import annotations

import array
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockcrypt.crypto as crypto
from blockcrypt.crypto import (
    FAST_BACKEND_ERROR,
    SECTOR_SIZES,
    SectorCipher,
    XTSKey,
    backend_name,
    make_cipher,
)
from tests.crypto.test_xts import IEEE, case_id, keys, xts_direct

FastSectorCipher: Any = getattr(crypto, "FastSectorCipher", None)
REQUIRE_ALL = os.environ.get("BLOCKCRYPT_REQUIRE_ALL") == "1"
TWEAK_LIMIT = 1 << 128
FIXED_KEY = XTSKey(bytes(range(64)))


@pytest.fixture(scope="module")
def require_fast() -> None:
    if FAST_BACKEND_ERROR is None:
        return
    if REQUIRE_ALL:
        pytest.fail(f"C backend missing where it must be built: {FAST_BACKEND_ERROR}")
    pytest.skip(f"C backend not built: {FAST_BACKEND_ERROR}")


needs_fast = pytest.mark.usefixtures("require_fast")
examples = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def both(key: XTSKey, size: int, iv_tweak: int = 0) -> tuple[Any, SectorCipher]:
    return FastSectorCipher(key, size, iv_tweak), SectorCipher(key, size, iv_tweak)


# ---------------------------------------------------------------------------
# Strategies

iv_tweaks = st.one_of(
    st.just(0),
    st.integers(0, 2**64),
    st.integers(2**64 - 64, 2**64 + 64),
    st.integers(0, 2**127),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(sector_size, iv_tweak, first_sector, sector_count) near edge cases.

    Besides small numbers, first sectors cluster where the tweak crosses
    2**32, where its low 64-bit half carries into the high half (inside one
    request, to exercise the C carry), and just below the 128-bit limit.
    """
    size = draw(st.sampled_from(SECTOR_SIZES))
    units = size // 512
    iv_tweak = draw(iv_tweaks)
    count = draw(st.integers(1, 6))
    last_ok = (TWEAK_LIMIT - 1 - iv_tweak) // units - (count - 1)
    carry = max(0, (2**64 - iv_tweak) // units)
    first = draw(
        st.one_of(
            st.integers(0, 2**16),
            st.integers(2**32 - 8, 2**32 + 8),
            st.integers(max(0, carry - count), carry + 2),
            st.integers(max(0, last_ok - 8), last_ok),
            st.integers(0, last_ok),
        )
    )
    return size, iv_tweak, min(first, last_ok), count


# ---------------------------------------------------------------------------
# Same bytes as the reference


@needs_fast
@examples
@given(key=keys, request=requests(), data=st.data())
def test_fast_cipher_matches_reference(
    key: bytes, request: tuple[int, int, int, int], data: st.DataObject
) -> None:
    size, iv_tweak, first, count = request
    plaintext = data.draw(st.binary(min_size=size * count, max_size=size * count))
    fast, ref = both(XTSKey(key), size, iv_tweak)

    ciphertext = fast.encrypt(first, plaintext)

    assert ciphertext == ref.encrypt(first, plaintext)
    assert fast.decrypt(first, ciphertext) == plaintext
    assert fast.decrypt(first, plaintext) == ref.decrypt(first, plaintext)
    assert fast.tweak(first) == ref.tweak(first)


@needs_fast
@examples
@given(key=keys, size=st.sampled_from(SECTOR_SIZES), data=st.data())
def test_fast_cipher_carries_tweak_into_high_half(
    key: bytes, size: int, data: st.DataObject
) -> None:
    # The last sector below the 64-bit carry and the first above it, in one
    # call; each sector checked against OpenSSL through cryptography.
    units = size // 512
    first = 2**64 // units - 1
    plaintext = data.draw(st.binary(min_size=2 * size, max_size=2 * size))
    fast = FastSectorCipher(XTSKey(key), size)

    ciphertext = fast.encrypt(first, plaintext)

    for i in range(2):
        tweak = ((first + i) * units).to_bytes(16, "little")
        chunk = slice(i * size, (i + 1) * size)
        assert ciphertext[chunk] == xts_direct(
            key, tweak, plaintext[chunk], encrypt=True
        )


@needs_fast
@pytest.mark.parametrize("case", IEEE, ids=case_id)
def test_fast_cipher_matches_ieee1619_vectors(case: dict[str, str]) -> None:
    key = XTSKey(bytes.fromhex(case["Key"]))
    seqno = int(case["DataUnitSeqNumber"])
    pt, ct = bytes.fromhex(case["PT"]), bytes.fromhex(case["CT"])
    cipher = FastSectorCipher(key, 512)
    out = bytearray(len(pt))

    assert cipher.encrypt(seqno, pt) == ct
    assert cipher.decrypt(seqno, ct) == pt
    assert FastSectorCipher(key, 512, iv_tweak=seqno).encrypt(0, pt) == ct
    cipher.encrypt_into(seqno, pt, out)
    assert out == ct
    cipher.decrypt_into(seqno, out, out)
    assert out == pt


@needs_fast
@pytest.mark.parametrize("size", SECTOR_SIZES)
def test_fast_cipher_matches_reference_on_a_large_request(size: int) -> None:
    data = os.urandom(256 * 1024)
    fast, ref = both(FIXED_KEY, size, iv_tweak=5)

    assert fast.encrypt(2**40, data) == ref.encrypt(2**40, data)


# ---------------------------------------------------------------------------
# The *_into interface, on both backends


@pytest.fixture(params=["fast", "reference"])
def backend(request: pytest.FixtureRequest) -> type:
    if request.param == "fast":
        request.getfixturevalue("require_fast")
        return FastSectorCipher  # type: ignore[no-any-return]
    return SectorCipher


@examples
@given(key=keys, request=requests(), data=st.data())
def test_in_place_equals_out_of_place(
    backend: type, key: bytes, request: tuple[int, int, int, int], data: st.DataObject
) -> None:
    size, iv_tweak, first, count = request
    src = data.draw(st.binary(min_size=size * count, max_size=size * count))
    cipher = backend(XTSKey(key), size, iv_tweak)
    out = bytearray(len(src))
    buf = bytearray(src)

    cipher.encrypt_into(first, src, out)
    cipher.encrypt_into(first, buf, memoryview(buf))

    assert out == buf == cipher.encrypt(first, src)
    cipher.decrypt_into(first, memoryview(buf), buf)
    assert buf == src


@examples
@given(count=st.integers(2, 6), shift=st.integers(1, 5), data=st.data())
def test_into_handles_overlapping_buffers(
    backend: type, count: int, shift: int, data: st.DataObject
) -> None:
    size = 512
    shift = min(shift, count - 1) * size
    buf = bytearray(data.draw(st.binary(min_size=size * count, max_size=size * count)))
    length = len(buf) - shift
    cipher = backend(FIXED_KEY, size)
    expected = cipher.encrypt(3, bytes(buf[:length]))

    view = memoryview(buf)
    cipher.encrypt_into(3, view[:length], view[shift:])

    assert buf[shift:] == expected


@examples
@given(key=keys, size=st.sampled_from(SECTOR_SIZES), data=st.data())
def test_zero_is_hole_gives_zero_sectors(
    backend: type, key: bytes, size: int, data: st.DataObject
) -> None:
    holes = data.draw(st.lists(st.booleans(), min_size=1, max_size=6))
    plaintext = os.urandom(size * len(holes))
    cipher = backend(XTSKey(key), size)
    stored = bytearray(cipher.encrypt(9, plaintext))
    for i, hole in enumerate(holes):
        if hole:
            stored[i * size : (i + 1) * size] = bytes(size)
    out = bytearray(len(stored))

    cipher.decrypt_into(9, stored, out, zero_is_hole=True)

    for i, hole in enumerate(holes):
        chunk = slice(i * size, (i + 1) * size)
        assert out[chunk] == (bytes(size) if hole else plaintext[chunk])
    # Without the flag a hole decrypts like any sector: to noise, not zeros.
    cipher.decrypt_into(9, stored, out)
    assert out == cipher.decrypt(9, stored)
    assert all(out[i * size : (i + 1) * size] != bytes(size) for i in range(len(holes)))


def test_zero_is_hole_in_place_keeps_zero_sectors(backend: type) -> None:
    cipher = backend(FIXED_KEY, 4096)
    buf = bytearray(4096) + bytearray(cipher.encrypt(1, b"\x07" * 4096))

    cipher.decrypt_into(0, buf, buf, zero_is_hole=True)

    assert buf == bytes(4096) + b"\x07" * 4096


def test_zero_is_hole_sees_a_single_nonzero_byte(backend: type) -> None:
    # A sector that is zero except for its last byte is data, not a hole.
    cipher = backend(FIXED_KEY, 512)
    src = bytearray(512)
    src[-1] = 1

    out = bytearray(512)
    cipher.decrypt_into(0, src, out, zero_is_hole=True)

    assert out == cipher.decrypt(0, src) != bytes(512)


def test_into_accepts_any_contiguous_buffer(backend: type) -> None:
    cipher = backend(FIXED_KEY, 512)
    words = array.array("I", range(256))  # 1024 bytes
    out = array.array("I", bytes(1024))

    cipher.encrypt_into(4, words, out)

    assert out.tobytes() == cipher.encrypt(4, words.tobytes())


def test_empty_request_leaves_dst_alone(backend: type) -> None:
    cipher = backend(FIXED_KEY, 4096)

    cipher.encrypt_into(0, b"", bytearray())
    cipher.decrypt_into(2**200 // 4096, b"", bytearray(), zero_is_hole=True)


# ---------------------------------------------------------------------------
# Fuzzing the Python/C boundary: only ValueError or TypeError, and the same
# outcome from both backends.

BUFFER_KINDS = [
    "bytes",
    "bytearray",
    "memoryview",
    "readonly",
    "strided",
    "array",
    "str",
    "none",
    "int",
    "list",
]


def make_buffer(kind: str, length: int, fill: int) -> object:
    raw = bytes([fill]) * length
    if kind == "bytes":
        return raw
    if kind == "bytearray":
        return bytearray(raw)
    if kind == "memoryview":
        return memoryview(bytearray(raw))
    if kind == "readonly":
        return memoryview(raw)
    if kind == "strided":
        return memoryview(bytearray(raw * 2))[::2]
    if kind == "array":
        return array.array("B", raw)
    return {"str": "x" * length, "none": None, "int": length, "list": list(raw)}[kind]


sector_args = st.one_of(
    st.integers(-(2**130), 2**130),
    st.integers(-2, 2**20),
    st.sampled_from([2**64 - 1, 2**64, 2**125, 2**128, None, 1.5, "0", b"", True]),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 511, 512, 513, 1024, 4095, 4096, 8192]),
    st.integers(0, 9000),
)


def outcome(call: Callable[[], object], dst: object) -> tuple[object, ...]:
    try:
        result = call()
    except (ValueError, TypeError) as exc:
        return (type(exc), str(exc))
    written = (
        bytes(dst) if isinstance(dst, bytearray | memoryview | array.array) else None
    )
    return ("ok", result, written)


@needs_fast
@settings(max_examples=600, deadline=None)
@given(
    method=st.sampled_from(["encrypt", "decrypt", "encrypt_into", "decrypt_into"]),
    size=st.sampled_from([512, 4096]),
    iv_tweak=st.sampled_from([0, 2**64 - 1, 2**127]),
    first=sector_args,
    src_spec=st.tuples(st.sampled_from(BUFFER_KINDS), lengths),
    dst_spec=st.one_of(st.none(), st.tuples(st.sampled_from(BUFFER_KINDS), lengths)),
    zero_is_hole=st.booleans(),
)
def test_boundary_raises_only_value_or_type_errors(
    method: str,
    size: int,
    iv_tweak: int,
    first: object,
    src_spec: tuple[str, int],
    dst_spec: tuple[str, int] | None,
    zero_is_hole: bool,
) -> None:
    results = []
    for cipher in both(FIXED_KEY, size, iv_tweak):
        src = make_buffer(*src_spec, fill=0 if zero_is_hole else 0x5A)
        # dst_spec None: a bytearray of src's length, the common good case.
        dst_kind, dst_len = dst_spec or ("bytearray", src_spec[1])
        dst = make_buffer(dst_kind, dst_len, fill=0xEE)
        func = getattr(cipher, method)
        if method == "decrypt_into":
            call = lambda: func(first, src, dst, zero_is_hole=zero_is_hole)  # noqa: E731, B023
        elif method == "encrypt_into":
            call = lambda: func(first, src, dst)  # noqa: E731, B023
        else:
            call = lambda: func(first, src)  # noqa: E731, B023
        results.append(outcome(call, dst))

    assert results[0] == results[1]


@needs_fast
@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, bytes(512), bytes(512)), TypeError, "dst is read-only"),
        (
            (0, bytes(512), bytearray(1024)),
            ValueError,
            "src is 512 bytes but dst is 1024",
        ),
        (
            (0, bytes(100), bytearray(100)),
            ValueError,
            "src is 100 bytes.*512-byte sector",
        ),
        ((-1, bytes(512), bytearray(512)), ValueError, "sector number is -1"),
        (
            (2**128, bytes(512), bytearray(512)),
            ValueError,
            "overflows the 128-bit tweak",
        ),
        ((0.0, bytes(512), bytearray(512)), TypeError, "float"),
        ((0, "text", bytearray(4)), TypeError, "src is a str; it must support"),
        ((0, bytes(512), None), TypeError, "dst is a NoneType"),
        ((0, memoryview(bytes(1024))[::2], bytearray(512)), TypeError, "C-contiguous"),
    ],
)
def test_fast_into_error_messages(
    args: tuple[object, object, object], error: type[Exception], match: str
) -> None:
    cipher = FastSectorCipher(FIXED_KEY, 512)

    with pytest.raises(error, match=match):
        cipher.encrypt_into(*args)


@needs_fast
def test_fast_sector_just_below_the_tweak_limit_works() -> None:
    cipher = FastSectorCipher(FIXED_KEY, 4096, iv_tweak=7)
    last = (TWEAK_LIMIT - 1 - 7) // 8
    data = os.urandom(8192)

    assert cipher.decrypt(last - 1, cipher.encrypt(last - 1, data)) == data
    with pytest.raises(ValueError, match=f"sector number {last + 1} overflows"):
        cipher.encrypt(last, data)


# ---------------------------------------------------------------------------
# Construction, lifetime, threads


@needs_fast
@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((FIXED_KEY, 520), ValueError, "sector size is 520"),
        ((FIXED_KEY, 4096, -8), ValueError, "iv_tweak is -8"),
        ((bytes(range(64)), 4096), TypeError, "key is a bytes; it must be an XTSKey"),
        ((FIXED_KEY, 4096, 1.0), TypeError, "float"),
    ],
)
def test_fast_cipher_refuses_bad_arguments(
    args: tuple[object, ...], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        FastSectorCipher(*args)


@needs_fast
def test_fast_cipher_refuses_a_wiped_key() -> None:
    key = XTSKey(os.urandom(64))
    key.wipe()

    with pytest.raises(ValueError, match="wiped"):
        FastSectorCipher(key, 512)


@needs_fast
def test_fast_cipher_keeps_working_after_the_key_is_wiped() -> None:
    # OpenSSL holds its own key schedule; the XTSKey may be wiped at once.
    key = XTSKey(os.urandom(64))
    expected = SectorCipher(key, 512).encrypt(1, bytes(512))
    cipher = FastSectorCipher(key, 512)
    key.wipe()

    assert cipher.encrypt(1, bytes(512)) == expected


@needs_fast
def test_fast_cipher_refuses_work_after_close() -> None:
    with FastSectorCipher(FIXED_KEY, 512) as cipher:
        cipher.encrypt(0, bytes(512))

    with pytest.raises(ValueError, match="cipher is closed"):
        cipher.encrypt(0, bytes(512))
    with pytest.raises(ValueError, match="cipher is closed"):
        cipher.decrypt_into(0, bytes(512), bytearray(512))
    cipher.close()  # a second close is harmless


@needs_fast
def test_fast_cipher_shared_by_threads_gives_each_the_right_bytes() -> None:
    cipher = FastSectorCipher(FIXED_KEY, 4096)
    ref = SectorCipher(FIXED_KEY, 4096)
    jobs = [(n * 1000, os.urandom(64 * 4096)) for n in range(8)]
    results: dict[int, bytes] = {}

    def work(first: int, data: bytes) -> None:
        for _ in range(20):
            results[first] = cipher.encrypt(first, data)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    for first, data in jobs:
        assert results[first] == ref.encrypt(first, data)


@pytest.fixture
def gil_probe() -> Iterator[Callable[[Callable[[], object]], int]]:
    """Count how often another thread runs while a call is in progress.

    The switch interval is raised so that the calling thread never hands
    over the GIL on its own; the counting thread can then only run while the
    call has released the GIL. The counter yields the GIL after each step.
    """
    stop = threading.Event()
    counter = [0]

    def count() -> None:
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    thread = threading.Thread(target=count)
    thread.start()
    while counter[0] == 0:
        time.sleep(0.001)

    def probe(call: Callable[[], object]) -> int:
        before = counter[0]
        call()
        return counter[0] - before

    try:
        yield probe
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)


@needs_fast
def test_fast_cipher_releases_the_gil(
    gil_probe: Callable[[Callable[[], object]], int],
) -> None:
    cipher = FastSectorCipher(FIXED_KEY, 4096)
    buf = bytearray(64 << 20)
    hold = bytearray(64 << 20)

    # Control: a C-level copy that keeps the GIL lets the counter stand still.
    assert gil_probe(lambda: bytes(hold)) == 0
    assert gil_probe(lambda: cipher.encrypt_into(0, buf, buf)) > 0


# ---------------------------------------------------------------------------
# Backend selection


def test_make_cipher_uses_the_fast_backend_when_built() -> None:
    cipher = make_cipher(FIXED_KEY, 4096, 8)

    if FAST_BACKEND_ERROR is None:
        assert backend_name() == "openssl-c"
        assert isinstance(cipher, FastSectorCipher)
    else:
        assert not REQUIRE_ALL, FAST_BACKEND_ERROR
        assert backend_name() == "python-reference"
        assert isinstance(cipher, SectorCipher)
    assert cipher.encrypt(1, bytes(4096)) == SectorCipher(FIXED_KEY, 4096, 8).encrypt(
        1, bytes(4096)
    )


def test_make_cipher_falls_back_when_the_extension_is_missing() -> None:
    script = (
        "import sys\n"
        "sys.modules['blockcrypt.crypto._xts_ext'] = None\n"
        "import blockcrypt.crypto as c\n"
        "key = c.XTSKey(bytes(range(64)))\n"
        "assert type(c.make_cipher(key, 512)) is c.SectorCipher\n"
        "assert c.FAST_BACKEND_ERROR and 'libssl-dev' in c.FAST_BACKEND_ERROR\n"
        "print(c.backend_name())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "python-reference"
