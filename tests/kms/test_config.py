"""blockcrypt.config: TOML loading, precedence, PIN files, open_store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockcrypt import config as config_module
from blockcrypt.config import (
    Config,
    PKCS11Config,
    default_state_dir,
    load_config,
    open_store,
)
from blockcrypt.errors import ConfigError
from blockcrypt.kms import PKCS11CMKStore
from tests.kms.conftest import SoftHSMToken, write_pin_file


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BLOCKCRYPT_CONFIG", raising=False)
    monkeypatch.delenv("BLOCKCRYPT_STATE_DIR", raising=False)
    # Keep default_state_dir() away from the real /var/lib/blockcrypt.
    monkeypatch.setattr(config_module, "default_state_dir", lambda: tmp_path / "dflt")


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_config_reads_kms_section(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "blockcrypt.toml",
        'state_dir = "/srv/bc"\n[kms]\nmodule = "/usr/lib/x.so"\n'
        'token_label = "prod"\npin_file = "secrets/pin"\n',
    )

    config = load_config(path, None)

    assert config.state_dir == Path("/srv/bc")
    assert config.kms == PKCS11Config(
        module=Path("/usr/lib/x.so"),
        token_label="prod",
        pin_file=tmp_path / "secrets" / "pin",
    )


def test_load_config_without_file_uses_embedded_default(tmp_path: Path) -> None:
    config = load_config(None, None)

    assert config == Config(state_dir=tmp_path / "dflt", kms=None)


def test_load_config_state_dir_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path / "c.toml", 'state_dir = "/from/file"\n')

    assert load_config(path, None).state_dir == Path("/from/file")
    monkeypatch.setenv("BLOCKCRYPT_STATE_DIR", "/from/env")
    assert load_config(path, None).state_dir == Path("/from/env")
    assert load_config(path, Path("/from/arg")).state_dir == Path("/from/arg")


def test_load_config_file_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    kms = '[kms]\nmodule = "/m.so"\npin_file = "/p"\ntoken_label = '
    write_toml(state / "config.toml", kms + '"in-state-dir"\n')
    env_file = write_toml(tmp_path / "env.toml", kms + '"from-env"\n')
    arg_file = write_toml(tmp_path / "arg.toml", kms + '"from-arg"\n')

    def label(path: Path | None) -> str:
        kms_config = load_config(path, state).kms
        assert kms_config is not None
        return kms_config.token_label

    assert label(None) == "in-state-dir"
    monkeypatch.setenv("BLOCKCRYPT_CONFIG", str(env_file))
    assert label(None) == "from-env"
    assert label(arg_file) == "from-arg"


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("colour = 1\n", "'colour'"),
        (
            '[kms]\nmodule = "/m"\ntoken_label = "t"\npin_file = "/p"\nslot = 0\n',
            "'kms.slot'",
        ),
    ],
)
def test_load_config_rejects_unknown_key(tmp_path: Path, text: str, name: str) -> None:
    path = write_toml(tmp_path / "c.toml", text)

    with pytest.raises(ConfigError, match=f"unknown key {name}") as caught:
        load_config(path, None)
    assert str(path) in str(caught.value)


def test_load_config_names_missing_and_mistyped_keys(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", '[kms]\nmodule = "/m"\ntoken_label = 5\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path, None)

    message = str(caught.value)
    assert "missing key 'kms.pin_file'" in message
    assert "key 'kms.token_label'" in message
    assert "pydantic" not in message and "http" not in message


def test_load_config_refuses_inline_pin(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "c.toml",
        '[kms]\nmodule = "/m"\ntoken_label = "t"\npin = "hunter2-secret"\n',
    )

    with pytest.raises(ConfigError, match="pin_file") as caught:
        load_config(path, None)
    assert "hunter2-secret" not in str(caught.value)


def test_load_config_reports_bad_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", "[kms\n")

    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path, None)


def test_load_config_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", None)


def pkcs11_config(pin_file: Path) -> PKCS11Config:
    return PKCS11Config(module=Path("/m.so"), token_label="t", pin_file=pin_file)


@pytest.mark.parametrize(
    ("content", "pin"),
    [
        ("1234\n", "1234"),
        ("1234", "1234"),
        ("1234\r\n", "1234"),
        ("12 34\n\n", "12 34\n"),
    ],
)
def test_read_pin_strips_one_newline(tmp_path: Path, content: str, pin: str) -> None:
    path = tmp_path / "pin"
    path.write_text(content)
    path.chmod(0o600)

    secret = pkcs11_config(path).read_pin()

    assert secret.get_secret_value() == pin
    assert pin.strip() not in repr(secret)


def test_read_pin_refuses_group_readable_file(tmp_path: Path) -> None:
    path = write_pin_file(tmp_path / "pin", "1234", mode=0o644)

    with pytest.raises(ConfigError, match="mode 0644.*chmod 600") as caught:
        pkcs11_config(path).read_pin()
    assert "1234" not in str(caught.value)


def test_read_pin_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open PIN file"):
        pkcs11_config(tmp_path / "absent").read_pin()


def test_read_pin_refuses_directory(tmp_path: Path) -> None:
    directory = tmp_path / "pin.d"
    directory.mkdir(mode=0o700)

    with pytest.raises(ConfigError, match="not a regular file"):
        pkcs11_config(directory).read_pin()


def test_read_pin_refuses_empty_file(tmp_path: Path) -> None:
    path = write_pin_file(tmp_path / "pin", "")

    with pytest.raises(ConfigError, match="is empty"):
        pkcs11_config(path).read_pin()


def test_default_state_dir_for_root_and_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir() == Path("/var/lib/blockcrypt")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/data/home")
    assert default_state_dir() == Path("/data/home/blockcrypt")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_state_dir() == Path.home() / ".local/share/blockcrypt"


def test_open_store_uses_kms_section(
    pkcs11_store: PKCS11CMKStore, softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    config = Config(state_dir=tmp_path, kms=softhsm_token.config)

    store = open_store(config)
    try:
        assert isinstance(store, PKCS11CMKStore)
        store.list_keys()
    finally:
        store.close()
