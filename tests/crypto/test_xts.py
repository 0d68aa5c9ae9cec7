"""Tests for the AES-256-XTS sector cipher.

Known answers come from tests/vectors (see its README for the sources):
IEEE 1619-2007 Annex B vectors 10-14 run through SectorCipher with 512-byte
sectors; NIST CAVP XTSGenAES256 cases (32- and 48-byte data units, too short
for a sector) run through ``xts_direct`` with the tweak SectorCipher computes.
The cryptsetup cross-check proves the on-disk tweak rule against dm-crypt's
userspace implementation (reference/luks2.md, section 5).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import assume, given
from hypothesis import strategies as st

from blockcrypt.crypto.xts import KEY_SIZE, SECTOR_SIZES, SectorCipher, XTSKey

VECTORS = Path(__file__).parent.parent / "vectors"
CRYPTSETUP = shutil.which("cryptsetup")


# ---------------------------------------------------------------------------
# Helpers


def load_vectors(name: str) -> list[dict[str, str]]:
    """Parse a tests/vectors file: '[section]' headers, 'Key = value' lines."""
    cases: list[dict[str, str]] = []
    for line in (VECTORS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            cases.append({"section": line.strip("[]")})
        else:
            field, _, value = line.partition(" = ")
            cases[-1][field] = value
    return cases


def case_id(case: dict[str, str]) -> str:
    return f"{case['section']}-{case.get('COUNT', '')}".rstrip("-")


def xts_direct(key: bytes, tweak: bytes, data: bytes, *, encrypt: bool) -> bytes:
    """AES-XTS on one data unit of any length, straight through cryptography."""
    cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


IEEE = load_vectors("ieee1619_xts_aes256.txt")
NIST_SEQNO = load_vectors("nist_xts_aes256_dataunitseqno.txt")
NIST_TWEAK = load_vectors("nist_xts_aes256_tweak128.txt")

keys = st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE).filter(
    lambda k: k[:32] != k[32:]
)
sector_sizes = st.sampled_from(SECTOR_SIZES)
sector_numbers = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def sector_data(draw: st.DrawFn, size: int, max_sectors: int = 4) -> bytes:
    count = draw(st.integers(min_value=1, max_value=max_sectors))
    return bytes(draw(st.binary(min_size=size * count, max_size=size * count)))


# ---------------------------------------------------------------------------
# Known-answer tests


def test_vector_files_are_complete() -> None:
    assert [c["section"] for c in IEEE] == [f"vector {n}" for n in range(10, 15)]
    assert len(NIST_SEQNO) == 16 and len(NIST_TWEAK) == 8


@pytest.mark.parametrize("case", IEEE, ids=case_id)
def test_sector_cipher_matches_ieee1619_vectors(case: dict[str, str]) -> None:
    key = XTSKey(bytes.fromhex(case["Key"]))
    seqno = int(case["DataUnitSeqNumber"])
    pt, ct = bytes.fromhex(case["PT"]), bytes.fromhex(case["CT"])
    cipher = SectorCipher(key, 512)

    assert cipher.encrypt(seqno, pt) == ct
    assert cipher.decrypt(seqno, ct) == pt
    # The same tweak reached through the segment's iv_tweak instead.
    assert SectorCipher(key, 512, iv_tweak=seqno).encrypt(0, pt) == ct


@pytest.mark.parametrize("case", NIST_SEQNO, ids=case_id)
def test_tweak_rule_matches_nist_dataunitseqno(case: dict[str, str]) -> None:
    raw = bytes.fromhex(case["Key"])
    seqno = int(case["DataUnitSeqNumber"])
    pt, ct = bytes.fromhex(case["PT"]), bytes.fromhex(case["CT"])
    tweak = SectorCipher(XTSKey(raw), 512).tweak(seqno)

    assert tweak == seqno.to_bytes(16, "little")
    if case["section"] == "ENCRYPT":
        assert xts_direct(raw, tweak, pt, encrypt=True) == ct
    else:
        assert xts_direct(raw, tweak, ct, encrypt=False) == pt


@pytest.mark.parametrize("case", NIST_TWEAK, ids=case_id)
def test_direct_helper_matches_nist_tweak128(case: dict[str, str]) -> None:
    raw, tweak = bytes.fromhex(case["Key"]), bytes.fromhex(case["i"])
    pt, ct = bytes.fromhex(case["PT"]), bytes.fromhex(case["CT"])

    if case["section"] == "ENCRYPT":
        assert xts_direct(raw, tweak, pt, encrypt=True) == ct
    else:
        assert xts_direct(raw, tweak, ct, encrypt=False) == pt


# ---------------------------------------------------------------------------
# Properties


@given(key=keys, size=sector_sizes, first=sector_numbers, data=st.data())
def test_sector_cipher_round_trip(
    key: bytes, size: int, first: int, data: st.DataObject
) -> None:
    plaintext = data.draw(sector_data(size))
    cipher = SectorCipher(XTSKey(key), size)

    ciphertext = cipher.encrypt(first, plaintext)

    assert len(ciphertext) == len(plaintext)
    assert ciphertext != plaintext
    assert cipher.decrypt(first, ciphertext) == plaintext


@given(key=keys, size=sector_sizes, a=sector_numbers, b=sector_numbers, data=st.data())
def test_sector_cipher_same_data_other_sector_differs(
    key: bytes, size: int, a: int, b: int, data: st.DataObject
) -> None:
    assume(a != b)
    plaintext = data.draw(sector_data(size, max_sectors=1))
    cipher = SectorCipher(XTSKey(key), size)

    assert cipher.encrypt(a, plaintext) != cipher.encrypt(b, plaintext)


@given(key=keys, size=sector_sizes, first=sector_numbers, data=st.data())
def test_sector_cipher_split_at_any_sector_boundary(
    key: bytes, size: int, first: int, data: st.DataObject
) -> None:
    plaintext = data.draw(sector_data(size, max_sectors=6))
    cut = data.draw(st.integers(0, len(plaintext) // size)) * size
    cipher = SectorCipher(XTSKey(key), size)

    head = cipher.encrypt(first, plaintext[:cut])
    tail = cipher.encrypt(first + cut // size, plaintext[cut:])

    assert head + tail == cipher.encrypt(first, plaintext)
    assert cipher.decrypt(first, head + tail) == plaintext


@given(key=keys, size=sector_sizes, sector=sector_numbers, iv_tweak=sector_numbers)
def test_tweak_counts_512_byte_units(
    key: bytes, size: int, sector: int, iv_tweak: int
) -> None:
    cipher = SectorCipher(XTSKey(key), size, iv_tweak=iv_tweak)
    expected = sector * (size // 512) + iv_tweak

    assert cipher.tweak(sector) == expected.to_bytes(16, "little")


def test_tweak_of_4096_byte_sector_is_sector_times_8() -> None:
    cipher = SectorCipher(XTSKey(bytes(range(64))), 4096)

    assert cipher.tweak(0) == bytes(16)
    assert cipher.tweak(1) == (8).to_bytes(16, "little")
    assert cipher.tweak(3) == (24).to_bytes(16, "little")


@given(key=keys, size=sector_sizes, high=st.integers(2**32, 2**120), data=st.data())
def test_sector_numbers_above_2_to_the_32(
    key: bytes, size: int, high: int, data: st.DataObject
) -> None:
    plaintext = data.draw(sector_data(size, max_sectors=2))
    cipher = SectorCipher(XTSKey(key), size)
    units = size // 512

    ciphertext = cipher.encrypt(high, plaintext)

    for i in range(len(plaintext) // size):
        tweak = ((high + i) * units).to_bytes(16, "little")
        chunk = plaintext[i * size : (i + 1) * size]
        assert ciphertext[i * size : (i + 1) * size] == xts_direct(
            key, tweak, chunk, encrypt=True
        )
    # A 32-bit truncation of the sector number would collide with this one.
    low = SectorCipher(XTSKey(key), size).encrypt(high % 2**32, plaintext)
    assert ciphertext != low


def test_empty_data_gives_empty_output() -> None:
    cipher = SectorCipher(XTSKey(bytes(range(64))), 4096)

    assert cipher.encrypt(0, b"") == b"" == cipher.decrypt(7, b"")


# ---------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize("length", [0, 16, 32, 63, 65, 128])
def test_xts_key_refuses_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match=f"is {length} bytes; it must be 64"):
        XTSKey(bytes(range(length)))


def test_xts_key_refuses_equal_halves() -> None:
    with pytest.raises(ValueError, match="halves are identical"):
        XTSKey(bytes(range(32)) * 2)


@pytest.mark.parametrize(("size", "length"), [(512, 100), (4096, 512), (4096, 4097)])
def test_sector_cipher_refuses_partial_sectors(size: int, length: int) -> None:
    cipher = SectorCipher(XTSKey(bytes(range(64))), size)

    with pytest.raises(ValueError, match=f"is {length} bytes.*{size}-byte sector"):
        cipher.encrypt(0, bytes(length))
    with pytest.raises(ValueError, match=f"is {length} bytes"):
        cipher.decrypt(0, bytes(length))


@pytest.mark.parametrize("size", [0, 256, 520, 8192])
def test_sector_cipher_refuses_bad_sector_size(size: int) -> None:
    with pytest.raises(ValueError, match=f"sector size is {size}"):
        SectorCipher(XTSKey(bytes(range(64))), size)


def test_sector_cipher_refuses_bad_sector_numbers() -> None:
    cipher = SectorCipher(XTSKey(bytes(range(64))), 4096)

    with pytest.raises(ValueError, match="sector number is -1"):
        cipher.encrypt(-1, bytes(4096))
    with pytest.raises(ValueError, match="overflows the 128-bit tweak"):
        cipher.encrypt(2**125, bytes(4096))
    with pytest.raises(ValueError, match="iv_tweak is -8"):
        SectorCipher(XTSKey(bytes(range(64))), 4096, iv_tweak=-8)


@given(key=keys)
def test_xts_key_repr_hides_the_key(key: bytes) -> None:
    text = repr(XTSKey(key)) + str(XTSKey(key))

    assert key.hex() not in text and key.hex().upper() not in text
    assert key[:32].hex() not in text and key[32:].hex() not in text
    assert repr(key) not in text
    assert text.startswith("XTSKey(fingerprint=")


def test_xts_key_wipe() -> None:
    key = XTSKey(bytes(range(64)))
    key.wipe()

    with pytest.raises(ValueError, match="wiped"):
        bytes(key)


# ---------------------------------------------------------------------------
# Cross-check with cryptsetup's userspace reencryption (root only)

skip_without_cryptsetup = pytest.mark.skipif(
    CRYPTSETUP is None, reason="needs cryptsetup (not on PATH)"
)
skip_unless_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
FAST_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
PASSPHRASE = b"cross-check passphrase"


def cryptsetup(*args: str | Path) -> None:
    assert CRYPTSETUP is not None
    subprocess.run(
        [CRYPTSETUP, *map(str, args)], check=True, capture_output=True, timeout=120
    )


def secret_file(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def detached_header(
    tmp_path: Path, key: bytes, sector_size: int, data_size: int
) -> tuple[Path, Path]:
    """Make a detached LUKS2 header (data offset 0) for ``key``.

    luksFormat runs against a sparse dummy device so that it cannot touch the
    real data file; a detached header with a dynamic segment size is not tied
    to the device it was formatted on. Returns the header and passphrase file.
    """
    vk = secret_file(tmp_path / f"vk{sector_size}", key)
    passphrase = tmp_path / "pass"
    if not passphrase.exists():
        secret_file(passphrase, PASSPHRASE)
    dummy = tmp_path / f"dummy{sector_size}"
    with open(dummy, "wb") as f:
        f.truncate(data_size)
    header = tmp_path / f"hdr{sector_size}"
    cryptsetup(
        "luksFormat", "--type", "luks2", "--batch-mode", "--header", header,
        "--cipher", "aes-xts-plain64", "--volume-key-file", vk, "--key-size", "512",
        "--sector-size", str(sector_size), *FAST_PBKDF, "--key-file", passphrase,
        dummy,
    )  # fmt: skip
    return header, passphrase


def cryptsetup_decrypt(header: Path, passphrase: Path, data: Path) -> None:
    cryptsetup(
        "reencrypt", "--decrypt", "--batch-mode", "--force-offline-reencrypt",
        "--key-file", passphrase, "--header", header, data,
    )  # fmt: skip


@pytest.mark.interop
@pytest.mark.root
@skip_without_cryptsetup
@skip_unless_root
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_cryptsetup_decrypts_sector_cipher_output(
    tmp_path: Path, sector_size: int
) -> None:
    key = os.urandom(64)
    plaintext = os.urandom(8 << 20)
    data = tmp_path / "data"
    data.write_bytes(SectorCipher(XTSKey(key), sector_size).encrypt(0, plaintext))
    header, passphrase = detached_header(tmp_path, key, sector_size, len(plaintext))

    cryptsetup_decrypt(header, passphrase, data)

    assert data.read_bytes() == plaintext


@pytest.mark.interop
@pytest.mark.root
@skip_without_cryptsetup
@skip_unless_root
def test_cryptsetup_rejects_tweak_counted_in_4096_byte_units(tmp_path: Path) -> None:
    # Negative control: the wrong rule agrees with the right one at sector 0
    # only, so cryptsetup must recover exactly one sector of the plaintext.
    key, size = os.urandom(64), 4096
    plaintext = os.urandom(1 << 20)
    sectors = len(plaintext) // size
    wrong = b"".join(
        xts_direct(
            key,
            n.to_bytes(16, "little"),
            plaintext[n * size : (n + 1) * size],
            encrypt=True,
        )
        for n in range(sectors)
    )
    data = tmp_path / "data"
    data.write_bytes(wrong)
    header, passphrase = detached_header(tmp_path, key, size, len(plaintext))

    cryptsetup_decrypt(header, passphrase, data)

    result = data.read_bytes()
    matches = [
        n
        for n in range(sectors)
        if result[n * size : (n + 1) * size] == plaintext[n * size : (n + 1) * size]
    ]
    assert matches == [0]


@pytest.mark.interop
@pytest.mark.root
@skip_without_cryptsetup
@skip_unless_root
def test_sector_cipher_decrypts_cryptsetup_output(tmp_path: Path) -> None:
    plaintext = os.urandom(8 << 20)
    data = tmp_path / "data"
    data.write_bytes(plaintext)
    passphrase = secret_file(tmp_path / "pass", PASSPHRASE)
    header = tmp_path / "hdr"
    cryptsetup(
        "reencrypt", "--encrypt", "--type", "luks2", "--batch-mode",
        "--force-offline-reencrypt", "--header", header, "--cipher",
        "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096",
        *FAST_PBKDF, "--key-file", passphrase, data,
    )  # fmt: skip
    vk = tmp_path / "vk"
    cryptsetup(
        "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", passphrase,
        "--volume-key-file", vk, header,
    )  # fmt: skip

    ciphertext = data.read_bytes()
    assert ciphertext != plaintext
    cipher = SectorCipher(XTSKey(vk.read_bytes()), 4096)
    assert cipher.decrypt(0, ciphertext) == plaintext
