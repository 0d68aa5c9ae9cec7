"""Recovery passphrase keyslots and header backup/restore, against cryptsetup."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from blockcrypt.recovery import PBKDFOptions, add_passphrase_argv
from tests.conftest import CLI, need_tools

pytestmark = pytest.mark.interop

PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def cryptsetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cryptsetup", *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def make_volume(cli: CLI, tmp_path: Path) -> tuple[Path, str]:
    alias = "rec-" + uuid.uuid4().hex[:8]
    cli.run("kms", "create-key", "--alias", alias)
    image = tmp_path / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", alias)
    return image, alias


def test_add_passphrase_argv_names_only_descriptors() -> None:
    argv = add_passphrase_argv(
        "cryptsetup", "/v.img", 7, 8, PBKDFOptions("pbkdf2", 1000)
    )

    assert argv[argv.index("--volume-key-file") + 1] == "/proc/self/fd/7"
    assert argv[-1] == "/proc/self/fd/8"
    assert argv[-2] == "/v.img"
    assert ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"] == argv[7:11]


def test_passphrase_opens_volume_without_the_hsm(cli: CLI, tmp_path: Path) -> None:
    need_tools("cryptsetup")
    image, alias = make_volume(cli, tmp_path)
    secret = tmp_path / "pass"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)

    added = cli.run("recovery", "add-passphrase", str(image),
                    "--passphrase-file", str(secret), *PBKDF, "--json")  # fmt: skip
    doc = json.loads(added.stdout)
    assert doc["keyslot"] == "0"

    # The HSM key becomes unusable; the passphrase still opens the volume.
    cli.run("kms", "disable-key", alias)
    typed = tmp_path / "typed"
    typed.write_bytes(b"correct horse battery staple")  # as typed: no newline
    ok = cryptsetup("open", "--test-passphrase", "--key-file", str(typed), str(image))
    assert ok.returncode == 0, ok.stderr
    typed.write_bytes(b"wrong")
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(typed),
                      str(image)).returncode == 2  # fmt: skip
    assert "blockcrypt-kms" in cryptsetup("luksDump", str(image)).stdout

    refused = cli.run("recovery", "add-passphrase", str(image), "--passphrase-file",
                      str(secret), *PBKDF, check=False)  # fmt: skip
    assert refused.returncode == 1 and "state Disabled" in refused.stderr


def test_add_passphrase_without_terminal_or_file_is_refused(
    cli: CLI, tmp_path: Path
) -> None:
    image, _ = make_volume(cli, tmp_path)
    proc = cli.run("recovery", "add-passphrase", str(image), check=False, input="")
    assert proc.returncode == 2
    assert "--passphrase-file" in proc.stderr


def test_backup_and_restore_header(cli: CLI, tmp_path: Path) -> None:
    need_tools("cryptsetup")
    image, _ = make_volume(cli, tmp_path)
    backup = tmp_path / "hdr.bak"
    doc = json.loads(cli.run("backup-header", str(image), str(backup), "--json").stdout)
    assert backup.stat().st_mode & 0o777 == 0o600
    again = cli.run("backup-header", str(image), str(backup), check=False)
    assert again.returncode == 2 and "exists" in again.stderr

    # Wipe both header copies, then restore.
    pristine = image.read_bytes()[:32768]
    with open(image, "r+b") as f:
        f.write(bytes(32768))
    assert cli.run("info", str(image), check=False).returncode == 1
    cli.run("restore-header", str(image), str(backup), "--force")
    assert image.read_bytes()[:32768] == pristine
    info = json.loads(cli.run("info", str(image), "--json").stdout)
    assert info["uuid"] == doc["uuid"]


def test_restore_refuses_a_backup_of_another_volume(cli: CLI, tmp_path: Path) -> None:
    need_tools("cryptsetup")
    first, _ = make_volume(cli, tmp_path)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second, _ = make_volume(cli, other_dir)
    backup = tmp_path / "first.bak"
    cli.run("backup-header", str(first), str(backup))
    before = second.read_bytes()[:32768]

    proc = cli.run("restore-header", str(second), str(backup), check=False)

    assert proc.returncode == 2
    assert "belongs to volume" in proc.stderr and "--force" in proc.stderr
    assert second.read_bytes()[:32768] == before
    shutil.rmtree(other_dir)


def test_restore_guards_against_other_volumes_and_old_backups(
    cli: CLI, tmp_path: Path
) -> None:
    need_tools("cryptsetup")
    image, _ = make_volume(cli, tmp_path)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other, _ = make_volume(cli, other_dir)
    foreign = tmp_path / "foreign.bak"
    cli.run("backup-header", str(other), str(foreign))
    before = image.read_bytes()[:32768]

    # Another volume's backup: refused even with --force while the header is intact.
    proc = cli.run("restore-header", str(image), str(foreign), "--force", check=False)
    assert proc.returncode == 2 and "intact" in proc.stderr
    assert image.read_bytes()[:32768] == before

    # An older backup of the same volume: refused unless --force.
    old = tmp_path / "old.bak"
    cli.run("backup-header", str(image), str(old))
    subprocess.run(["cryptsetup", "config", "--label", "newer", str(image)], check=True)
    proc = cli.run("restore-header", str(image), str(old), check=False)
    assert proc.returncode == 2 and "older" in proc.stderr
    cli.run("restore-header", str(image), str(old), "--force")
    assert json.loads(cli.run("info", "--json", str(image)).stdout)["label"] == ""
