"""The protocol and crypto cores stay free of I/O layers (STYLE: sans-IO)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "blockcrypt"
FORBIDDEN = ("blockcrypt.server", "blockcrypt.kms", "blockcrypt.volume",
             "blockcrypt.log", "blockcrypt.cli", "asyncio", "socket", "logging")  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "nbd").glob("*.py")) + sorted((ROOT / "crypto").glob("*.py")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_core_imports_no_io_layer(path: Path) -> None:
    bad = {
        name
        for name in imported_modules(path)
        for forbidden in FORBIDDEN
        if name == forbidden or name.startswith(forbidden + ".")
    }
    assert not bad, f"{path} imports {sorted(bad)}"
