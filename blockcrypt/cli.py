"""The ``blockcrypt`` command line.

Exit status: 0 on success, 78 (EX_CONFIG) for configuration problems so that
systemd's ``RestartPreventExitStatus=`` stops restart loops, 1 for any other
failure, 2 for usage errors. Expected failures print one line, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import json
import logging
import os
import re
import resource
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blockcrypt import __version__
from blockcrypt.config import Config, load_config, open_store
from blockcrypt.errors import BlockcryptError, ConfigError, StorageError
from blockcrypt.kms import CMKStore, KeyInfo, WrappedKey, encryption_context
from blockcrypt.log import setup_logging

log = logging.getLogger("blockcrypt.server")

_PR_SET_DUMPABLE = 4
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Parse ``4096``, ``512K``, ``256M``, ``10G``, ``1GiB`` (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"size {text!r} is not understood; use e.g. 256M or 10G")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


# -- output helpers ------------------------------------------------------------


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(text)


def _key_text(info: KeyInfo) -> str:
    return (
        f"key id:     {info.key_id}\nalias:      {info.alias}\n"
        f"state:      {info.state}\nkey spec:   {info.key_spec}\n"
        f"created:    {info.created}\nbackend:    {info.backend}"
        + (f" (token {info.token_label})" if info.token_label else "")
    )


def _write_secret_file(path: str, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; refuse to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _wrapped_to_json(w: WrappedKey, volume_uuid: str) -> dict[str, Any]:
    return {
        "key_id": w.key_id,
        "key_version": w.key_version,
        "mechanism": w.mechanism,
        "iv": base64.b64encode(w.iv).decode(),
        "ciphertext": base64.b64encode(w.ciphertext).decode(),
        "volume_uuid": volume_uuid,
    }


def _wrapped_from_json(doc: Any, source: str) -> tuple[WrappedKey, str]:
    try:
        wrapped = WrappedKey(
            key_id=str(doc["key_id"]),
            key_version=int(doc.get("key_version", 1)),
            mechanism=str(doc["mechanism"]),
            iv=base64.b64decode(doc["iv"], validate=True),
            ciphertext=base64.b64decode(doc["ciphertext"], validate=True),
        )
        return wrapped, str(doc["volume_uuid"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{source} is not the JSON printed by `blockcrypt kms create-datakey` "
            f"({exc.__class__.__name__}: {exc})"
        ) from None


# -- commands ------------------------------------------------------------------


def _with_store(args: argparse.Namespace, body: Callable[[CMKStore], int]) -> int:
    config = _config(args)
    store = open_store(config)
    try:
        return body(store)
    finally:
        store.close()


def _config(args: argparse.Namespace) -> Config:
    state_dir = Path(args.state_dir) if args.state_dir else None
    config_path = Path(args.config) if args.config else None
    return load_config(config_path, state_dir)


def cmd_create_key(args: argparse.Namespace) -> int:
    def body(store: CMKStore) -> int:
        info = store.create_key(args.alias)
        _emit(args, info.to_json(), _key_text(info))
        return 0

    return _with_store(args, body)


def cmd_list_keys(args: argparse.Namespace) -> int:
    def body(store: CMKStore) -> int:
        keys = store.list_keys()
        lines = [f"{k.key_id}  {k.state:<8}  {k.alias}" for k in keys]
        _emit(args, {"keys": [k.to_json() for k in keys]}, "\n".join(lines) or "no keys")
        return 0

    return _with_store(args, body)


def cmd_describe_key(args: argparse.Namespace) -> int:
    def body(store: CMKStore) -> int:
        info = store.describe_key(args.key)
        _emit(args, info.to_json(), _key_text(info))
        return 0

    return _with_store(args, body)


def cmd_create_datakey(args: argparse.Namespace) -> int:
    volume_uuid = args.volume_uuid or str(uuid.uuid4())

    def body(store: CMKStore) -> int:
        from blockcrypt.volume.device import FORMAT_VERSION

        info = store.describe_key(args.key)
        context = encryption_context(volume_uuid, FORMAT_VERSION, info.key_id)
        datakey = store.create_datakey(info.key_id, context)
        try:
            if args.plaintext_file:
                _write_secret_file(args.plaintext_file, bytes(datakey.plaintext))
        finally:
            datakey.plaintext.wipe()
        doc = _wrapped_to_json(datakey.wrapped, volume_uuid)
        print(json.dumps(doc, indent=2 if args.json else None, sort_keys=True))
        return 0

    return _with_store(args, body)


def cmd_decrypt_datakey(args: argparse.Namespace) -> int:
    source = args.input or "standard input"
    try:
        text = Path(args.input).read_text() if args.input else sys.stdin.read()
        doc = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the wrapped data key from {source}: {exc}") from None
    wrapped, volume_uuid = _wrapped_from_json(doc, source)

    def body(store: CMKStore) -> int:
        from blockcrypt.volume.device import FORMAT_VERSION

        info = store.describe_key(args.key)
        if info.key_id != wrapped.key_id:
            raise ConfigError(
                f"the data key was wrapped by {wrapped.key_id}, not by {args.key} "
                f"({info.key_id}); pass the right key"
            )
        context = encryption_context(volume_uuid, FORMAT_VERSION, wrapped.key_id)
        key = store.decrypt_datakey(wrapped, context)
        try:
            _write_secret_file(args.plaintext_file, bytes(key))
        finally:
            key.wipe()
        doc = {"key_id": wrapped.key_id, "plaintext_file": args.plaintext_file}
        _emit(args, doc, f"data key unwrapped into {args.plaintext_file} (mode 0600)")
        return 0

    return _with_store(args, body)


def cmd_create(args: argparse.Namespace) -> int:
    from blockcrypt.volume import luks2
    from blockcrypt.volume.device import FORMAT_VERSION

    size = parse_size(args.size)
    if size <= 0 or size % args.sector_size:
        raise ConfigError(
            f"--size {args.size} is {size} bytes; it must be a positive multiple "
            f"of the {args.sector_size}-byte sector size"
        )

    def body(store: CMKStore) -> int:
        info = store.describe_key(args.key)
        volume_uuid = str(uuid.uuid4())
        context = encryption_context(volume_uuid, FORMAT_VERSION, info.key_id)
        datakey = store.create_datakey(info.key_id, context)
        try:
            token = luks2.KMSToken(
                key_id=info.key_id,
                key_version=datakey.wrapped.key_version,
                mechanism=datakey.wrapped.mechanism,
                iv=datakey.wrapped.iv,
                wrapped_dek=datakey.wrapped.ciphertext,
                context={
                    "volume_uuid": volume_uuid,
                    "format_version": FORMAT_VERSION,
                    "key_id": info.key_id,
                },
                backend=info.backend,
            )
            header = luks2.format_volume(
                args.path,
                size=size,
                sector_size=args.sector_size,
                volume_uuid=volume_uuid,
                dek=datakey.plaintext,
                token=token,
                label=args.label or "",
            )
        finally:
            datakey.plaintext.wipe()
        doc = _header_doc(args.path, header)
        _emit(args, doc, f"created {args.path}\n" + _header_text(doc))
        return 0

    return _with_store(args, body)


def _header_doc(path: str, header: Any) -> dict[str, Any]:
    size = max(os.stat(path).st_size - header.data_offset, 0)
    if header.data_size is not None:
        size = min(size, header.data_size)
    token = header.token
    return {
        "path": path,
        "uuid": header.uuid,
        "label": header.label,
        "epoch": header.seqid,
        "cipher": header.cipher,
        "sector_size": header.sector_size,
        "data_offset": header.data_offset,
        "size": size - size % header.sector_size,
        "metadata_size": header.hdr_size,
        "header_copy_used": header.copy_used,
        "damaged_header_copies": list(header.damaged_copies),
        "token": None
        if token is None
        else {
            "id": header.token_id,
            "key_id": token.key_id,
            "key_version": token.key_version,
            "backend": token.backend,
            "mechanism": token.mechanism,
            "wrapped_dek_bytes": len(token.wrapped_dek),
        },
    }


def _header_text(doc: dict[str, Any]) -> str:
    lines = [
        f"uuid:         {doc['uuid']}",
        f"label:        {doc['label'] or '(none)'}",
        f"size:         {doc['size']} bytes",
        f"cipher:       {doc['cipher']}, {doc['sector_size']}-byte sectors",
        f"data offset:  {doc['data_offset']}",
        f"epoch:        {doc['epoch']}",
    ]
    token = doc["token"]
    if token:
        lines.append(
            f"wrapped by:   {token['key_id']} (version {token['key_version']}, "
            f"{token['mechanism']}, {token['backend']})"
        )
    else:
        lines.append("wrapped by:   (no blockcrypt-kms token)")
    if doc["damaged_header_copies"]:
        lines.append(
            f"WARNING: damaged header copy: {', '.join(doc['damaged_header_copies'])}; "
            f"using the {doc['header_copy_used']} copy"
        )
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from blockcrypt.volume import luks2

    try:
        fd = os.open(args.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StorageError(f"{args.path}: no such file") from None
    except OSError as exc:
        raise StorageError(f"cannot open {args.path}: {exc.strerror}") from exc
    try:
        header = luks2.read_header(fd)
    finally:
        os.close(fd)
    doc = _header_doc(args.path, header)
    _emit(args, doc, f"{args.path}\n" + _header_text(doc))
    return 0


def default_socket_path(volume_path: str) -> str:
    base = Path("/run/blockcrypt") if os.geteuid() == 0 else Path(
        os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/blockcrypt-{os.getuid()}"
    ) / "blockcrypt"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(base / (Path(volume_path).name + ".sock"))


def _no_core_dumps() -> None:
    """Keep the plaintext DEK out of core dumps: no core file, not dumpable."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def cmd_serve(args: argparse.Namespace) -> int:
    from blockcrypt.server.daemon import ListenSpec, serve
    from blockcrypt.volume.device import Volume

    _no_core_dumps()

    listen = ListenSpec.from_systemd()
    if listen is None:
        if args.listen:
            listen = ListenSpec.parse_tcp(args.listen)
        else:
            listen = ListenSpec(unix_path=args.socket or default_socket_path(args.path))

    config = _config(args)
    store = open_store(config)
    try:
        volume = Volume.attach(args.path, store, read_only=args.read_only)
    finally:
        store.close()
    log.info(
        "volume attached",
        extra={"path": args.path, "uuid": volume.header.uuid, "size": volume.size},
    )
    try:
        def announce(uri: str) -> None:
            print(f"serving {args.path} at {uri}", file=sys.stderr, flush=True)

        asyncio.run(serve(volume, listen, args.export_name, on_ready=announce))
    finally:
        volume.close()
        log.info("volume detached", extra={"path": args.path})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from blockcrypt.demo import run_demo

    return run_demo(args)


# -- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockcrypt",
        description="KMS-wrapped LUKS2 volumes served over NBD.",
    )
    p.add_argument("--version", action="version", version=f"blockcrypt {__version__}")
    p.add_argument("--state-dir", help="state directory (default: /var/lib/blockcrypt "
                   "for root, else $XDG_DATA_HOME/blockcrypt; env BLOCKCRYPT_STATE_DIR)")
    p.add_argument("--config", help="TOML config file (env BLOCKCRYPT_CONFIG)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v for lifecycle logs, -vv for every request")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parser: Any, name: str, func: Callable[..., int], help: str, json_opt: bool = True) -> Any:
        sp = parser.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        if json_opt:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    kms = sub.add_parser("kms", help="customer master keys and data keys")
    ksub = kms.add_subparsers(dest="kms_command", required=True, metavar="OPERATION")
    sp = add(ksub, "create-key", cmd_create_key, "create an AES-256 CMK inside the HSM")
    sp.add_argument("--alias", required=True, help="unique name for the key")
    add(ksub, "list-keys", cmd_list_keys, "list the CMKs")
    sp = add(ksub, "describe-key", cmd_describe_key, "show one CMK")
    sp.add_argument("key", help="key id or alias")
    sp = add(ksub, "create-datakey", cmd_create_datakey,
             "generate a 64-byte data key and wrap it with a CMK")
    sp.add_argument("key", help="key id or alias")
    sp.add_argument("--volume-uuid", help="volume UUID bound into the wrap (default: new)")
    sp.add_argument("--plaintext-file", help="also write the plaintext key to this new "
                    "file (mode 0600); without it only the wrapped key is printed")
    sp = add(ksub, "decrypt-datakey", cmd_decrypt_datakey,
             "unwrap a data key printed by create-datakey")
    sp.add_argument("key", help="key id or alias that wrapped it")
    sp.add_argument("--in", dest="input", help="file with the wrapped key JSON "
                    "(default: standard input)")
    sp.add_argument("--plaintext-file", required=True,
                    help="new file (mode 0600) for the plaintext key")

    sp = add(sub, "create", cmd_create, "create a new encrypted volume file")
    sp.add_argument("path")
    sp.add_argument("--size", required=True, help="plaintext size, e.g. 10G")
    sp.add_argument("--key", required=True, help="CMK id or alias that wraps the DEK")
    sp.add_argument("--sector-size", type=int, choices=(512, 4096), default=4096)
    sp.add_argument("--label", help="LUKS2 label")

    sp = add(sub, "info", cmd_info, "show a volume's header (never a key)")
    sp.add_argument("path")

    sp = add(sub, "serve", cmd_serve, "serve a volume's plaintext over NBD", json_opt=False)
    sp.add_argument("path")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--socket", help="Unix socket path, mode 0600 (default: "
                       "/run/blockcrypt/NAME.sock for root)")
    where.add_argument("--listen", help="TCP HOST:PORT (a bare PORT means 127.0.0.1); "
                       "plaintext travels unencrypted")
    sp.add_argument("--export-name", default="", help="NBD export name (default: '')")
    sp.add_argument("--read-only", action="store_true")

    sp = add(sub, "demo", cmd_demo, "create a key and a volume, serve it, mount an "
             "ext4 file system on it through nbdfuse, then clean up (needs root)",
             json_opt=False)
    sp.add_argument("--keep", action="store_true", help="keep the demo directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_format)
    try:
        result: int = args.func(args)
        return result
    except BlockcryptError as exc:
        print(f"blockcrypt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
