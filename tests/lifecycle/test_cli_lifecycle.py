"""Key lifecycle, purge and audit through the real CLI against SoftHSM2."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path

import pytest

from tests.conftest import CLI, start_server
from tests.interop.rawclient import RawClient

pytestmark = pytest.mark.interop


def new_alias() -> str:
    return "life-" + uuid.uuid4().hex[:10]


def run_json(cli: CLI, *args: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(cli.run(*args, "--json").stdout)
    return out


def fail(cli: CLI, *args: str, code: int = 1) -> str:
    proc = cli.run(*args, check=False)
    assert proc.returncode == code, proc.stderr
    # One error line; log lines (e.g. a purge at start) may come before it.
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("blockcrypt: error: ")]
    assert errors == lines[-1:], lines
    return lines[-1]


def audit(cli: CLI, *args: str) -> list[dict[str, object]]:
    doc = run_json(cli, "kms", "audit", *args)
    records: list[dict[str, object]] = doc["records"]  # type: ignore[assignment]
    return records


def expire_deletion(cli: CLI, key_id: str) -> None:
    """Move the key's deletion date into the past (a waiting period of days)."""
    db = sqlite3.connect(cli.state_dir / "keys.sqlite")
    with db:
        db.execute(
            "UPDATE keys SET deletion_date = '2000-01-01T00:00:00Z' WHERE key_id = ?",
            (key_id,),
        )
    db.close()


def test_lifecycle_commands_round_trip(cli: CLI) -> None:
    alias = new_alias()
    key = run_json(cli, "kms", "create-key", "--alias", alias)
    key_id = str(key["key_id"])

    assert run_json(cli, "kms", "add-alias", alias, alias + "-b")["aliases"] == [
        alias,
        alias + "-b",
    ]
    renamed = run_json(cli, "kms", "rename-alias", alias + "-b", alias + "-c")
    assert renamed["aliases"] == [alias, alias + "-c"]
    assert run_json(cli, "kms", "remove-alias", alias)["aliases"] == [alias + "-c"]
    assert run_json(cli, "kms", "describe-key", alias + "-c")["key_id"] == key_id
    assert "no alias" in fail(cli, "kms", "remove-alias", alias)

    assert run_json(cli, "kms", "disable-key", key_id)["state"] == "Disabled"
    assert run_json(cli, "kms", "enable-key", key_id)["state"] == "Enabled"
    assert run_json(cli, "kms", "rotate-key", key_id)["current_version"] == 2

    pending = run_json(cli, "kms", "schedule-key-deletion", key_id)
    assert pending["state"] == "PendingDeletion"
    assert pending["deletion_date"]
    assert "7 to 1096" in fail(
        cli,
        "kms",
        "schedule-key-deletion",
        key_id,
        "--pending-window-days",
        "1097",
        code=2,
    )
    assert "cannot be rotated" in fail(cli, "kms", "rotate-key", key_id)
    back = run_json(cli, "kms", "cancel-key-deletion", key_id)
    assert (back["state"], back["deletion_date"]) == ("Disabled", None)

    operations = [r["operation"] for r in audit(cli, "--key", key_id)]
    expected = {
        "CreateKey", "AddAlias", "RenameAlias", "RemoveAlias", "DisableKey",
        "EnableKey", "RotateKey", "ScheduleKeyDeletion", "CancelKeyDeletion",
    }  # fmt: skip
    assert expected <= set(operations)


def test_disabled_key_blocks_next_attach_but_not_a_running_one(
    cli: CLI, tmp_path: Path
) -> None:
    alias = new_alias()
    cli.run("kms", "create-key", "--alias", alias)
    image = tmp_path / "v.img"
    created = run_json(cli, "create", str(image), "--size", "16M", "--key", alias)
    srv = start_server(cli, image, tmp_path / "a.sock")
    try:
        client = RawClient(str(srv.socket))
        assert client.write(0, b"before") == 0

        cli.run("kms", "disable-key", alias)

        assert client.write(4096, b"after") == 0
        assert client.read(0, 6) == b"before"
        client.close()
    finally:
        assert srv.stop() == 0

    message = fail(cli, "serve", str(image), "--socket", str(tmp_path / "b.sock"))
    assert "state Disabled" in message and alias in message

    records = audit(cli, "--volume", str(created["uuid"]))
    ops = [(r["operation"], r["outcome"]) for r in records]
    assert ("Attach", "success") in ops and ("Detach", "success") in ops
    assert ("Attach", "failure") in ops
    failed = [r for r in records if r["operation"] == "DecryptDataKey"][-1]
    assert failed["error"] == "KeyDisabled"


def test_purge_destroys_expired_key_at_serve_start_and_audits_it(
    cli: CLI, tmp_path: Path
) -> None:
    alias = new_alias()
    key_id = str(run_json(cli, "kms", "create-key", "--alias", alias)["key_id"])
    image = tmp_path / "v.img"
    cli.run("create", str(image), "--size", "16M", "--key", alias)
    cli.run("kms", "schedule-key-deletion", alias, "--pending-window-days", "7")

    assert "PendingDeletion" in fail(cli, "serve", str(image), "--socket",
                                     str(tmp_path / "a.sock"))  # fmt: skip
    assert run_json(cli, "kms", "purge")["purged"] == []

    expire_deletion(cli, key_id)
    message = fail(cli, "serve", str(image), "--socket", str(tmp_path / "b.sock"))

    assert "destroyed" in message
    assert run_json(cli, "kms", "describe-key", key_id)["state"] == "Destroyed"
    purges = [r for r in audit(cli, "--key", key_id) if r["operation"] == "PurgeKey"]
    assert len(purges) == 1 and purges[0]["outcome"] == "success"
    # The material is gone from the token, not only marked.
    listed = run_json(cli, "kms", "list-keys")["keys"]
    states = {k["key_id"]: k["state"] for k in listed}  # type: ignore[union-attr]
    assert states[key_id] == "Destroyed"


def test_audit_filters_and_never_holds_secrets(cli: CLI, tmp_path: Path) -> None:
    alias = new_alias()
    cli.run("kms", "create-key", "--alias", alias)
    dek_file = tmp_path / "dek"
    wrapped = cli.run("kms", "create-datakey", alias, "--plaintext-file",
                      str(dek_file)).stdout  # fmt: skip

    since = audit(cli)[-1]["time"]
    assert all(str(r["time"]) >= str(since) for r in audit(cli, "--since", str(since)))
    assert audit(cli, "--key", alias)[0]["operation"] == "CreateKey"
    assert "ISO 8601" in fail(cli, "kms", "audit", "--since", "soon", code=2)
    assert "not a UUID" in fail(cli, "kms", "audit", "--volume", "x", code=2)

    log = (cli.state_dir / "audit.log").read_text()
    pin = (cli.state_dir / "pin").read_text().strip()
    dek = dek_file.read_bytes()
    blob = json.loads(wrapped)["ciphertext"]
    for secret in (pin, dek.hex(), blob):
        assert secret not in log
    assert os.stat(cli.state_dir / "audit.log").st_mode & 0o777 == 0o600
    text = cli.run("kms", "audit", "--key", alias).stdout
    assert "CreateDataKey" in text


def run_parallel(cli: CLI, commands: list[list[str]]) -> list[tuple[int, str, str]]:
    import subprocess

    procs = [
        subprocess.Popen(
            cli.argv(*c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for c in commands
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert "Traceback" not in err, err
        results.append((p.returncode, out, err))
    return results


def test_parallel_create_and_rotate_leave_every_key_usable(cli: CLI) -> None:
    aliases = [new_alias() for _ in range(6)]
    results = run_parallel(cli, [["kms", "create-key", "--alias", a] for a in aliases])
    assert [r[0] for r in results] == [0] * 6
    base = aliases[0]
    rotations = run_parallel(cli, [["kms", "rotate-key", base] for _ in range(5)])
    done = sum(1 for r in rotations if r[0] == 0)
    info = run_json(cli, "kms", "describe-key", base)
    assert info["current_version"] == 1 + done
    # Every key, and every version of the rotated one, still wraps and unwraps.
    for alias in aliases:
        cli.run("kms", "create-datakey", alias)
    doc = json.loads(cli.run("kms", "create-datakey", base).stdout)
    assert doc["key_version"] == 1 + done


def test_cancelled_deletion_survives_a_concurrent_purge(cli: CLI) -> None:
    aliases = [new_alias() for _ in range(5)]
    for a in aliases:
        cli.run("kms", "create-key", "--alias", a)
        cli.run("kms", "schedule-key-deletion", a, "--pending-window-days", "7")
    db = sqlite3.connect(cli.state_dir / "keys.sqlite")
    db.execute("UPDATE keys SET deletion_date = '2020-01-01T00:00:00Z' "
               "WHERE state = 'PendingDeletion'")  # fmt: skip
    db.commit()
    db.close()
    commands = [["kms", "cancel-key-deletion", a] for a in aliases]
    commands += [["kms", "purge"]] * 3
    results = run_parallel(cli, commands)
    for alias, (code, _, _) in zip(aliases, results[:5], strict=True):
        if code == 0:  # told the deletion was cancelled: the key must be there
            info = run_json(cli, "kms", "describe-key", alias)
            assert info["state"] == "Disabled", info
    assert all(code == 0 for code, _, _ in results[5:])
