"""PKCS#11 backend against a SoftHSM2 token: key attributes, errors, threads."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11

from blockcrypt.config import PKCS11Config
from blockcrypt.errors import HSMUnavailable, TokenLoginFailed
from blockcrypt.kms import PKCS11CMKStore
from blockcrypt.kms import pkcs11 as backend
from tests.kms.conftest import (
    MODULE,
    SO_PIN,
    TOKEN_LABEL,
    USER_PIN,
    SoftHSMToken,
    init_token,
    run_python,
    write_pin_file,
    write_softhsm_conf,
)

VOLUME = "6f1c0a8e-5b9d-4c2a-9e3f-0a1b2c3d4e5f"

# Child process: open the token from a JSON config and report what it sees.
_OPEN_CHILD = """
import io, json, logging
from pathlib import Path
from blockcrypt.config import PKCS11Config
from blockcrypt.kms import PKCS11CMKStore
log = io.StringIO()
handler = logging.StreamHandler(log)
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.DEBUG)
config = PKCS11Config.model_validate_json({cfg!r})
result = {{}}
try:
    store = PKCS11CMKStore.open(config)
    result["keys"] = [k.to_json() for k in store.list_keys()]
    store.close()
except Exception as exc:
    result["error"] = type(exc).__name__
    result["message"] = str(exc)
    result["repr"] = repr(exc)
    result["cause"] = repr(exc.__cause__)
result["log"] = log.getvalue()
print(json.dumps(result))
"""


def open_in_child(config: PKCS11Config) -> dict[str, Any]:
    return run_python(_OPEN_CHILD.format(cfg=config.model_dump_json()))


def raw_key(store: PKCS11CMKStore, key_id: str) -> pkcs11.SecretKey:
    session = backend._SHARED[store._shared_key].session
    with backend._LOCK:
        key = session.get_key(ObjectClass.SECRET_KEY, label=f"blockcrypt:{key_id}")
    return cast(pkcs11.SecretKey, key)


def test_cmk_attributes_on_token(pkcs11_store: PKCS11CMKStore, alias: str) -> None:
    info = pkcs11_store.create_key(alias)
    key = raw_key(pkcs11_store, info.key_id)

    with backend._LOCK:
        attrs = {a: key[a] for a in _EXPECTED_ATTRIBUTES}
        key_id = bytes(key[Attribute.ID])

    assert attrs == _EXPECTED_ATTRIBUTES
    assert key_id == info.key_id.encode()


_EXPECTED_ATTRIBUTES = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.ALWAYS_SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.NEVER_EXTRACTABLE: True,
    Attribute.LOCAL: True,
    Attribute.MODIFIABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.VALUE_LEN: 32,
}


def test_cmk_value_cannot_be_read(pkcs11_store: PKCS11CMKStore, alias: str) -> None:
    info = pkcs11_store.create_key(alias)
    key = raw_key(pkcs11_store, info.key_id)

    with backend._LOCK, pytest.raises(p11.AttributeSensitive):
        key[Attribute.VALUE]


def test_metadata_is_a_private_data_object(
    pkcs11_store: PKCS11CMKStore, alias: str
) -> None:
    info = pkcs11_store.create_key(alias)
    session = backend._SHARED[pkcs11_store._shared_key].session

    with backend._LOCK:
        (obj,) = list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.LABEL: f"blockcrypt:{info.key_id}",
                }
            )
        )
        private, value = obj[Attribute.PRIVATE], bytes(obj[Attribute.VALUE])

    assert private is True
    record = json.loads(value)
    assert record["alias"] == alias and record["created"] == info.created


def test_keys_visible_from_second_process(
    pkcs11_store: PKCS11CMKStore, softhsm_token: SoftHSMToken, alias: str
) -> None:
    info = pkcs11_store.create_key(alias)

    result = open_in_child(softhsm_token.config)

    assert info.to_json() in result["keys"]


def test_key_created_in_second_process_is_visible_here(
    pkcs11_store: PKCS11CMKStore, softhsm_token: SoftHSMToken, alias: str
) -> None:
    cfg = softhsm_token.config.model_dump_json()
    code = f"""
import json
from blockcrypt.config import PKCS11Config
from blockcrypt.kms import PKCS11CMKStore
store = PKCS11CMKStore.open(PKCS11Config.model_validate_json({cfg!r}))
print(json.dumps(store.create_key({alias!r}).to_json()))
"""
    created = run_python(code)

    assert pkcs11_store.describe_key(alias).key_id == created["key_id"]


def test_wrong_pin_in_fresh_process_is_token_login_failed(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    wrong_pin = "wrong-pin-c0ffee-1234"
    pin_file = write_pin_file(tmp_path / "pin", wrong_pin)
    config = softhsm_token.config.model_copy(update={"pin_file": pin_file})

    result = open_in_child(config)

    assert result["error"] == "TokenLoginFailed"
    assert f"token '{TOKEN_LABEL}'" in result["message"]
    assert str(pin_file) in result["message"]
    for text in (result["message"], result["repr"], result["cause"], result["log"]):
        assert wrong_pin not in text and USER_PIN not in text


def test_wrong_pin_in_same_process_is_token_login_failed(
    pkcs11_store: PKCS11CMKStore,
    softhsm_token: SoftHSMToken,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong_pin = "wrong-pin-beef-5678"
    pin_file = write_pin_file(tmp_path / "pin", wrong_pin)
    config = softhsm_token.config.model_copy(update={"pin_file": pin_file})

    with pytest.raises(TokenLoginFailed) as caught:
        PKCS11CMKStore.open(config)

    text = f"{caught.value} {caught.value!r} {caplog.text}"
    assert TOKEN_LABEL in str(caught.value)
    assert wrong_pin not in text and USER_PIN not in text


def test_second_store_shares_the_login(
    pkcs11_store: PKCS11CMKStore, softhsm_token: SoftHSMToken, alias: str
) -> None:
    info = pkcs11_store.create_key(alias)

    second = PKCS11CMKStore.open(softhsm_token.config)
    assert second.describe_key(alias) == info
    second.close()

    # Closing the second store must not log the first one out.
    assert pkcs11_store.describe_key(alias) == info


def test_open_logs_token_and_module_only(
    pkcs11_store: PKCS11CMKStore,
    softhsm_token: SoftHSMToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="blockcrypt.kms"):
        PKCS11CMKStore.open(softhsm_token.config).close()

    (record,) = [r for r in caplog.records if r.getMessage().startswith("token opened")]
    assert record.args == (TOKEN_LABEL, softhsm_token.config.module)


def test_missing_token_label_is_hsm_unavailable(
    pkcs11_store: PKCS11CMKStore, softhsm_token: SoftHSMToken
) -> None:
    config = softhsm_token.config.model_copy(update={"token_label": "no-such-token"})

    with pytest.raises(HSMUnavailable, match="no token labelled 'no-such-token'"):
        PKCS11CMKStore.open(config)


@pytest.mark.parametrize("module", ["/nonexistent/libpkcs11.so", "/etc/hostname"])
def test_bad_module_is_hsm_unavailable(
    softhsm_token: SoftHSMToken, module: str
) -> None:
    config = softhsm_token.config.model_copy(update={"module": Path(module)})

    with pytest.raises(HSMUnavailable, match=f"PKCS#11 module '{module}'"):
        PKCS11CMKStore.open(config)


def test_bad_softhsm2_conf_is_hsm_unavailable(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    config = softhsm_token.config.model_copy(
        update={"softhsm2_conf": tmp_path / "missing.conf"}
    )

    result = open_in_child(config)

    # A configuration problem: the subclass whose exit status (78) stops
    # systemd restart loops.
    assert result["error"] == "HSMMisconfigured"
    assert "SOFTHSM2_CONF" in result["message"]


def test_other_softhsm2_conf_in_same_process_is_refused(
    pkcs11_store: PKCS11CMKStore, softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    config = softhsm_token.config.model_copy(
        update={"softhsm2_conf": tmp_path / "other.conf"}
    )

    with pytest.raises(HSMUnavailable, match="already loaded in this process"):
        PKCS11CMKStore.open(config)


def test_second_token_in_fresh_process(
    tmp_path: Path, softhsm_token: SoftHSMToken
) -> None:
    conf = write_softhsm_conf(tmp_path)
    init_token(conf, "second", SO_PIN, USER_PIN)
    config = PKCS11Config(
        module=MODULE,
        token_label="second",
        pin_file=write_pin_file(tmp_path / "pin", USER_PIN),
        softhsm2_conf=conf,
    )

    result = open_in_child(config)

    assert result["keys"] == []


def test_forked_child_may_not_use_the_module(softhsm_token: SoftHSMToken) -> None:
    cfg = softhsm_token.config.model_dump_json()
    code = f"""
import json, os
from blockcrypt.config import PKCS11Config
from blockcrypt.errors import HSMUnavailable
from blockcrypt.kms import PKCS11CMKStore
store = PKCS11CMKStore.open(PKCS11Config.model_validate_json({cfg!r}))
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        store.list_keys()
        os.write(write, b"used")
    except HSMUnavailable as exc:
        os.write(write, b"refused" if "forked" in str(exc) else b"other")
    os._exit(0)
os.waitpid(pid, 0)
child = os.read(read, 100).decode()
print(json.dumps({{"child": child, "parent": len(store.list_keys())}}))
"""
    result = run_python(code)

    assert result["child"] == "refused"
    assert isinstance(result["parent"], int)


_THREADS_CHILD = """
import json, threading
from blockcrypt.config import PKCS11Config
from blockcrypt.kms import PKCS11CMKStore, encryption_context
store = PKCS11CMKStore.open(PKCS11Config.model_validate_json({cfg!r}))
info = store.create_key({alias!r})
context = encryption_context({volume!r}, 1, info.key_id)
data_key = store.create_datakey(info.key_id, context)
expected = bytes(data_key.plaintext)
failures, results = [], []

def worker():
    ok = 0
    try:
        for i in range(200):
            if i % 50 == 0:
                store.list_keys()  # mix lookups and attribute reads in
            if bytes(store.decrypt_datakey(data_key.wrapped, context)) == expected:
                ok += 1
    except Exception as exc:
        failures.append(repr(exc))
    results.append(ok)

threads = [threading.Thread(target=worker) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({{"failures": failures, "results": results}}))
"""


def test_threads_share_the_store_safely(
    softhsm_token: SoftHSMToken, alias: str
) -> None:
    # In a child: without the lock SoftHSM crashes the interpreter, and a
    # crash should fail this test, not end the whole pytest run.
    code = _THREADS_CHILD.format(
        cfg=softhsm_token.config.model_dump_json(), alias=alias, volume=VOLUME
    )

    result = run_python(code, timeout=120)

    assert result["failures"] == []
    assert result["results"] == [200] * 8
