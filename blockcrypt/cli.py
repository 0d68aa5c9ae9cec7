"""The ``blockcrypt`` command line.

Exit status: 0 on success, 78 (EX_CONFIG) for configuration problems so that
systemd's ``RestartPreventExitStatus=`` stops restart loops, 1 for any other
failure, 2 for usage errors. Expected failures print one line, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import json
import logging
import os
import re
import resource
import stat
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockcrypt import __version__
from blockcrypt.audit import AuditLog, parse_time
from blockcrypt.config import Config, load_config
from blockcrypt.crypto import XTSKey
from blockcrypt.errors import (
    BlockcryptError,
    ConfigError,
    KernelNBDError,
    KMSError,
    StorageError,
    UsageError,
)
from blockcrypt.kms import (
    KeyCatalog,
    KeyInfo,
    ManagedCMKStore,
    WrappedKey,
    encryption_context,
    open_managed_store,
)
from blockcrypt.kms.lifecycle import CATALOG_FILE, DEFAULT_PENDING_DAYS
from blockcrypt.log import setup_logging

if TYPE_CHECKING:
    from blockcrypt.volume.device import Volume

log = logging.getLogger("blockcrypt.server")

_PR_SET_DUMPABLE = 4
# A file offset is a signed 64-bit number; the header area comes first.
_MAX_VOLUME_SIZE = (1 << 63) - (1 << 30)
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Parse ``4096``, ``512K``, ``256M``, ``10G``, ``1GiB`` (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"size {text!r} is not understood; use e.g. 256M or 10G")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


# -- output helpers ------------------------------------------------------------


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(text)


def _key_text(info: KeyInfo) -> str:
    text = (
        f"key id:     {info.key_id}\nalias:      {info.alias}\n"
        f"aliases:    {', '.join(info.aliases) or '(none)'}\n"
        f"state:      {info.state}\nversion:    {info.current_version}\n"
        f"key spec:   {info.key_spec}\n"
        f"created:    {info.created}\nbackend:    {info.backend}"
        + (f" (token {info.token_label})" if info.token_label else "")
    )
    if info.deletion_date:
        text += f"\ndeletion:   {info.deletion_date} (run `blockcrypt kms purge` after)"
    return text


def _write_secret_file(path: str, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; refuse to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from exc
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
        raise UsageError(
            f"{source} is not the JSON printed by `blockcrypt kms create-datakey` "
            f"({exc.__class__.__name__}: {exc})"
        ) from None


# -- commands ------------------------------------------------------------------


def _with_store(
    args: argparse.Namespace, body: Callable[[ManagedCMKStore], int]
) -> int:
    config = _config(args)
    store = open_managed_store(config)
    try:
        return body(store)
    finally:
        store.close()


def _config(args: argparse.Namespace) -> Config:
    state_dir = Path(args.state_dir) if args.state_dir else None
    config_path = Path(args.config) if args.config else None
    return load_config(config_path, state_dir)


def _valid_alias(alias: str) -> str:
    from blockcrypt.kms._base import check_alias

    try:
        return check_alias(alias)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_create_key(args: argparse.Namespace) -> int:
    _valid_alias(args.alias)

    def body(store: ManagedCMKStore) -> int:
        info = store.create_key(args.alias)
        _emit(args, info.to_json(), _key_text(info))
        return 0

    return _with_store(args, body)


def cmd_list_keys(args: argparse.Namespace) -> int:
    def body(store: ManagedCMKStore) -> int:
        keys = store.list_keys()
        lines = [
            f"{k.key_id}  {k.state:<15}  v{k.current_version}  {','.join(k.aliases)}"
            for k in keys
        ]
        _emit(
            args, {"keys": [k.to_json() for k in keys]}, "\n".join(lines) or "no keys"
        )
        return 0

    return _with_store(args, body)


def cmd_describe_key(args: argparse.Namespace) -> int:
    def body(store: ManagedCMKStore) -> int:
        info = store.describe_key(args.key)
        _emit(args, info.to_json(), _key_text(info))
        return 0

    return _with_store(args, body)


def cmd_create_datakey(args: argparse.Namespace) -> int:
    volume_uuid = args.volume_uuid or str(uuid.uuid4())
    try:
        uuid.UUID(volume_uuid)
    except ValueError:
        raise UsageError(f"--volume-uuid {volume_uuid!r} is not a UUID") from None

    def body(store: ManagedCMKStore) -> int:
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
    if args.volume:
        if args.input:
            raise UsageError("pass either --volume or --in, not both")
        return _decrypt_volume_key(args)
    source = args.input or "standard input"
    try:
        text = Path(args.input).read_text() if args.input else sys.stdin.read()
        doc = json.loads(text)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot read the wrapped data key from {source}: {exc}"
        ) from None
    wrapped, volume_uuid = _wrapped_from_json(doc, source)

    def body(store: ManagedCMKStore) -> int:
        from blockcrypt.volume.device import FORMAT_VERSION

        info = store.describe_key(args.key)
        if info.key_id != wrapped.key_id:
            raise UsageError(
                f"the data key was wrapped by {wrapped.key_id}, not by {args.key} "
                f"({info.key_id}); pass the right key"
            )
        context = encryption_context(volume_uuid, FORMAT_VERSION, wrapped.key_id)
        key = store.decrypt_datakey(wrapped, context)
        return _save_plaintext_key(args, key, wrapped.key_id)

    return _with_store(args, body)


def _decrypt_volume_key(args: argparse.Namespace) -> int:
    """Unwrap a volume's own DEK, checked against its header digest."""
    from blockcrypt.volume import luks2
    from blockcrypt.volume.device import unwrap_key

    fd = _open_volume_file(args.volume)
    try:
        header = luks2.read_header(fd)
    finally:
        os.close(fd)

    def body(store: ManagedCMKStore) -> int:
        info = store.describe_key(args.key)
        token = header.token
        if token is not None and token.key_id != info.key_id:
            raise UsageError(
                f"{args.volume} is wrapped by {token.key_id}, not by {args.key} "
                f"({info.key_id}); pass the right key"
            )
        key = unwrap_key(args.volume, header, store)
        return _save_plaintext_key(args, key, info.key_id)

    return _with_store(args, body)


def _save_plaintext_key(args: argparse.Namespace, key: XTSKey, key_id: str) -> int:
    try:
        _write_secret_file(args.plaintext_file, bytes(key))
    finally:
        key.wipe()
    doc = {"key_id": key_id, "plaintext_file": args.plaintext_file}
    _emit(args, doc, f"data key unwrapped into {args.plaintext_file} (mode 0600)")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from blockcrypt.volume import luks2
    from blockcrypt.volume.device import FORMAT_VERSION

    if os.path.lexists(args.path):
        raise UsageError(
            f"{args.path} already exists; refusing to format over it (pick a new path)"
        )
    if args.label and not args.label.isprintable():
        raise UsageError("--label must be printable text (no newlines or tabs)")
    size = parse_size(args.size)
    if size <= 0 or size % args.sector_size:
        raise UsageError(
            f"--size {args.size} is {size} bytes; it must be a positive multiple "
            f"of the {args.sector_size}-byte sector size"
        )
    if size > _MAX_VOLUME_SIZE:
        raise UsageError(
            f"--size {args.size} is {size} bytes; files cannot exceed "
            f"{_MAX_VOLUME_SIZE} bytes of data here"
        )

    def body(store: ManagedCMKStore) -> int:
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

    fd = _open_volume_file(args.path)
    try:
        header = luks2.read_header(fd)
    finally:
        os.close(fd)
    doc = _header_doc(args.path, header)
    _emit(args, doc, f"{args.path}\n" + _header_text(doc))
    return 0


def default_socket_path(volume_path: str) -> str:
    base = (
        Path("/run/blockcrypt")
        if os.geteuid() == 0
        else Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/blockcrypt-{os.getuid()}")
        / "blockcrypt"
    )
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(base / (Path(volume_path).name + ".sock"))


def _no_core_dumps() -> None:
    """Keep the plaintext DEK out of core dumps: no core file, not dumpable."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def cmd_serve(args: argparse.Namespace) -> int:
    from blockcrypt.server.daemon import ListenSpec, serve

    _no_core_dumps()
    if len(args.export_name.encode()) > 4096:
        raise UsageError("--export-name is longer than the 4096 bytes NBD allows")
    if args.socket == "":
        raise UsageError("--socket needs a path")

    listen = ListenSpec.from_systemd()
    if listen is None:
        if args.listen:
            listen = ListenSpec.parse_tcp(args.listen)
        else:
            listen = ListenSpec(unix_path=args.socket or default_socket_path(args.path))

    config = _config(args)
    audit = AuditLog.in_state_dir(config.state_dir)
    volume = _attach_volume(args.path, config, audit, args.read_only, "serve")
    try:

        def announce(uri: str) -> None:
            print(f"serving {args.path} at {uri}", file=sys.stderr, flush=True)

        asyncio.run(serve(volume, listen, args.export_name, on_ready=announce))
    finally:
        _detach_volume(volume, audit, "serve")
    return 0


def _attach_volume(
    path: str, config: Config, audit: AuditLog, read_only: bool, mode: str
) -> Volume:
    """Purge expired keys, unwrap the DEK, open the volume, audit the attach."""
    from blockcrypt.volume.device import Volume

    store = open_managed_store(config)
    try:
        _purge_at_start(store)
        try:
            volume = Volume.attach(path, store, read_only=read_only)
        except BlockcryptError as exc:
            audit.record(
                "Attach",
                outcome="failure",
                volume_uuid=_volume_uuid(path),
                error=exc,
                details={"path": path, "mode": mode},
            )
            raise
    finally:
        store.close()
    token = volume.header.token
    try:
        audit.record(
            "Attach",
            key_id=token.key_id if token else None,
            key_version=token.key_version if token else None,
            volume_uuid=volume.header.uuid,
            details={"path": path, "mode": mode, "read_only": int(read_only)},
        )
    except BaseException:
        volume.close()
        raise
    log.info(
        "volume attached",
        extra={"path": path, "uuid": volume.header.uuid, "size": volume.size},
    )
    return volume


def _open_volume_file(path: str) -> int:
    """Open a volume file for reading; refuse what cannot be a volume (a FIFO
    would block the open forever without O_NONBLOCK)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise StorageError(f"{path}: no such file") from None
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise StorageError(
            f"{path} is not a regular file or a block device, so it cannot be a volume"
        )
    return fd


def _volume_uuid(path: str) -> str | None:
    """Return the volume's UUID for an audit record, or None if unreadable."""
    from blockcrypt.volume import luks2

    try:
        fd = _open_volume_file(path)
    except BlockcryptError:
        return None
    try:
        return luks2.read_header(fd).uuid
    except BlockcryptError:
        return None
    finally:
        os.close(fd)


def _detach_volume(
    volume: Volume, audit: AuditLog, mode: str, device: str | None = None
) -> None:
    token = volume.header.token
    try:
        volume.close()
    finally:
        details: dict[str, str | int | None] = {"path": volume.path, "mode": mode}
        if device:
            details["device"] = device
        audit.record(
            "Detach",
            key_id=token.key_id if token else None,
            key_version=token.key_version if token else None,
            volume_uuid=volume.header.uuid,
            details=details,
        )
        log.info("volume detached", extra={"path": volume.path})


def _purge_at_start(store: ManagedCMKStore) -> None:
    # A failed purge must not keep a volume from being served; it is retried
    # at the next start and by `kms purge`.
    try:
        for info in store.purge():
            log.warning("key material destroyed", extra={"key_id": info.key_id})
    except KMSError as exc:
        log.warning("purge of expired keys failed", extra={"error": str(exc)})


# -- key lifecycle ---------------------------------------------------------------


def _lifecycle(
    args: argparse.Namespace,
    action: Callable[[ManagedCMKStore], KeyInfo],
    verb: str,
) -> int:
    def body(store: ManagedCMKStore) -> int:
        info = action(store)
        _emit(args, info.to_json(), f"{verb}\n" + _key_text(info))
        return 0

    return _with_store(args, body)


def cmd_enable_key(args: argparse.Namespace) -> int:
    return _lifecycle(args, lambda s: s.enable_key(args.key), "key enabled")


def cmd_disable_key(args: argparse.Namespace) -> int:
    return _lifecycle(args, lambda s: s.disable_key(args.key), "key disabled")


def cmd_schedule_key_deletion(args: argparse.Namespace) -> int:
    from blockcrypt.kms.lifecycle import MAX_PENDING_DAYS, MIN_PENDING_DAYS

    if not MIN_PENDING_DAYS <= args.pending_window_days <= MAX_PENDING_DAYS:
        raise UsageError(
            f"--pending-window-days {args.pending_window_days}: the waiting period "
            f"must be {MIN_PENDING_DAYS} to {MAX_PENDING_DAYS} days"
        )
    return _lifecycle(
        args,
        lambda s: s.schedule_key_deletion(args.key, args.pending_window_days),
        "key scheduled for deletion",
    )


def cmd_cancel_key_deletion(args: argparse.Namespace) -> int:
    return _lifecycle(
        args,
        lambda s: s.cancel_key_deletion(args.key),
        "deletion cancelled; the key is Disabled until `kms enable-key`",
    )


def cmd_rotate_key(args: argparse.Namespace) -> int:
    return _lifecycle(args, lambda s: s.rotate_key(args.key), "key rotated")


def cmd_add_alias(args: argparse.Namespace) -> int:
    _valid_alias(args.alias)
    return _lifecycle(args, lambda s: s.add_alias(args.key, args.alias), "alias added")


def cmd_remove_alias(args: argparse.Namespace) -> int:
    return _lifecycle(args, lambda s: s.remove_alias(args.alias), "alias removed")


def cmd_rename_alias(args: argparse.Namespace) -> int:
    _valid_alias(args.new_alias)
    return _lifecycle(
        args, lambda s: s.rename_alias(args.alias, args.new_alias), "alias renamed"
    )


def cmd_purge(args: argparse.Namespace) -> int:
    def body(store: ManagedCMKStore) -> int:
        purged = store.purge()
        lines = [
            f"destroyed {k.key_id} (deletion date {k.deletion_date})" for k in purged
        ]
        _emit(
            args,
            {"purged": [k.to_json() for k in purged]},
            "\n".join(lines) or "no key is due for destruction",
        )
        return 0

    return _with_store(args, body)


def cmd_audit(args: argparse.Namespace) -> int:
    # Reads only the state directory: no HSM login is needed to audit.
    config = _config(args)
    log_file = AuditLog.in_state_dir(config.state_dir)
    key_ids = None
    if args.key:
        catalog_path = config.state_dir / CATALOG_FILE
        if catalog_path.exists():
            catalog = KeyCatalog(catalog_path)
            try:
                key_ids = catalog.resolve_ids(args.key)
            finally:
                catalog.close()
        else:
            key_ids = {args.key}
        if not key_ids:
            raise UsageError(
                f"--key {args.key!r} is neither a key id nor a current alias; "
                "pass the key id (cmk-...)"
            )
    if args.volume:
        try:
            uuid.UUID(args.volume)
        except ValueError:
            raise UsageError(f"--volume {args.volume!r} is not a UUID") from None
    since = parse_time(args.since) if args.since else None
    records = log_file.read(key_ids, args.volume, since)
    if args.json:
        print(json.dumps({"records": records}, indent=2, sort_keys=True))
        return 0
    for r in records:
        key = r.get("key_id") or "-"
        if r.get("key_version") is not None:
            key += f" v{r['key_version']}"
        outcome = r.get("outcome", "?")
        if r.get("error"):
            outcome += f" ({r['error']})"
        print(
            f"{r.get('time')}  {r.get('operation', '?'):<20} {key:<24} "
            f"{r.get('volume_uuid') or '-':<36}  {outcome}"
        )
    return 0


# -- rewrap and recovery ---------------------------------------------------------


def cmd_rewrap(args: argparse.Namespace) -> int:
    from blockcrypt.volume.rewrap import rewrap_volume

    config = _config(args)
    audit = AuditLog.in_state_dir(config.state_dir)

    def body(store: ManagedCMKStore) -> int:
        try:
            result = rewrap_volume(args.path, store, args.key)
        except BlockcryptError as exc:
            audit.record(
                "Rewrap", outcome="failure", error=exc, details={"path": args.path}
            )
            raise
        audit.record(
            "Rewrap",
            key_id=result.new_key_id,
            key_version=result.new_key_version,
            volume_uuid=result.volume_uuid,
            details={
                "path": args.path,
                "old_key_id": result.old_key_id,
                "old_key_version": result.old_key_version,
                "changed": int(result.changed),
            },
        )
        doc = {
            "path": args.path,
            "uuid": result.volume_uuid,
            "old": {"key_id": result.old_key_id, "key_version": result.old_key_version},
            "new": {"key_id": result.new_key_id, "key_version": result.new_key_version},
            "changed": result.changed,
            "epoch": result.epoch,
        }
        if result.changed:
            text = (
                f"rewrapped {args.path}: {result.old_key_id} v{result.old_key_version}"
                f" -> {result.new_key_id} v{result.new_key_version} (epoch "
                f"{result.epoch}); data area untouched"
            )
        else:
            text = (
                f"{args.path} is already wrapped by {result.new_key_id} "
                f"v{result.new_key_version}; nothing to do"
            )
        _emit(args, doc, text)
        return 0

    return _with_store(args, body)


def _read_new_passphrase(args: argparse.Namespace) -> bytes:
    from blockcrypt.config import read_secret_file

    if args.passphrase_file:
        try:
            secret = read_secret_file(Path(args.passphrase_file), "passphrase")
        except ConfigError as exc:  # a command-line value, not configuration
            raise UsageError(str(exc)) from None
        return secret.get_secret_value().encode()
    if not sys.stdin.isatty():
        raise UsageError(
            "no terminal to read the new passphrase from; pass "
            "--passphrase-file FILE (mode 0600) in scripts"
        )
    import getpass

    first = getpass.getpass("New recovery passphrase: ")
    if first != getpass.getpass("Repeat the passphrase: "):
        raise UsageError("the two passphrases differ; nothing was changed")
    return first.encode()


def cmd_add_passphrase(args: argparse.Namespace) -> int:
    from blockcrypt.recovery import PBKDFOptions, add_passphrase

    passphrase = _read_new_passphrase(args)
    pbkdf = PBKDFOptions(args.pbkdf, args.pbkdf_force_iterations, args.pbkdf_memory)
    config = _config(args)
    audit = AuditLog.in_state_dir(config.state_dir)

    def body(store: ManagedCMKStore) -> int:
        try:
            volume_uuid, slot = add_passphrase(args.path, store, passphrase, pbkdf)
        except BlockcryptError as exc:
            audit.record(
                "AddRecoveryPassphrase",
                outcome="failure",
                error=exc,
                details={"path": args.path},
            )
            raise
        audit.record(
            "AddRecoveryPassphrase",
            volume_uuid=volume_uuid,
            details={"path": args.path, "keyslot": slot},
        )
        doc = {"path": args.path, "uuid": volume_uuid, "keyslot": slot}
        _emit(
            args,
            doc,
            f"added passphrase keyslot {slot} to {args.path}; `cryptsetup open` "
            "now opens it without the HSM",
        )
        return 0

    return _with_store(args, body)


def cmd_backup_header(args: argparse.Namespace) -> int:
    from blockcrypt.recovery import backup_header

    volume_uuid = backup_header(args.path, args.out)
    doc = {"path": args.path, "uuid": volume_uuid, "backup": args.out}
    _emit(args, doc, f"header of {args.path} ({volume_uuid}) saved to {args.out}")
    return 0


def cmd_restore_header(args: argparse.Namespace) -> int:
    from blockcrypt.recovery import restore_header

    audit = AuditLog.in_state_dir(_config(args).state_dir)
    current, saved = restore_header(args.path, args.backup, args.force)
    audit.record(
        "RestoreHeader",
        volume_uuid=saved,
        details={
            "path": args.path,
            "previous_uuid": current,
            "forced": int(args.force),
        },
    )
    doc = {"path": args.path, "uuid": saved, "previous_uuid": current}
    _emit(args, doc, f"restored the header of {args.path} from {args.backup}")
    return 0


# -- kernel attach ---------------------------------------------------------------


def cmd_attach(args: argparse.Namespace) -> int:
    from blockcrypt.server import kernel

    _no_core_dumps()
    index = kernel.device_index(args.device) if args.device else None
    if not 1 <= args.connections <= 16:
        raise UsageError(f"--connections {args.connections}: expected 1 to 16")
    if args.timeout < 0 or args.dead_conn_timeout < 0:
        raise UsageError("--timeout and --dead-conn-timeout must not be negative")
    # Fail before touching the HSM if the kernel side is missing.
    netlink = kernel.NBDNetlink()
    try:
        config = _config(args)
        audit = AuditLog.in_state_dir(config.state_dir)
        volume = _attach_volume(args.path, config, audit, args.read_only, "kernel")
        device = None
        try:
            device = _run_attached(args, config, volume, netlink, index)
        finally:
            _detach_volume(volume, audit, "kernel", device)
    finally:
        netlink.close()
    return 0


def _run_attached(
    args: argparse.Namespace,
    config: Config,
    volume: Volume,
    netlink: Any,
    index: int | None,
) -> str | None:
    import socket
    import time

    from blockcrypt.server import kernel
    from blockcrypt.server.daemon import export_for, serve

    registry = kernel.AttachmentRegistry(config.state_dir)
    pairs = [socket.socketpair() for _ in range(args.connections)]
    export = export_for(volume, "")
    message = kernel.connect_message(
        [theirs.fileno() for _, theirs in pairs],
        volume.size,
        volume.sector_size,
        int(export.flags),
        args.timeout,
        args.dead_conn_timeout,
        index,
    )
    device: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        stop = asyncio.Event()
        served = asyncio.create_task(
            serve(
                volume,
                None,
                on_ready=lambda _uri: ready.set(),
                preconnected=[ours for ours, _ in pairs],
                stop=stop,
            )
        )
        await ready.wait()
        try:
            # pyroute2 runs its own loop: keep it off ours.
            chosen = await loop.run_in_executor(None, netlink.connect, message)
        except BaseException:
            stop.set()
            await served
            raise
        finally:
            for _, theirs in pairs:
                theirs.close()  # the kernel holds its own reference now
        name = f"/dev/nbd{chosen}"
        device.append(name)
        token = volume.header.token
        registry.add(
            name,
            {
                "device": name,
                "path": os.path.abspath(volume.path),
                "volume_uuid": volume.header.uuid,
                "key_id": token.key_id if token else None,
                "key_version": token.key_version if token else None,
                "read_only": volume.read_only,
                "pid": os.getpid(),
                "pid_start": kernel.process_start(os.getpid()),
                "attached": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        print(f"attached {volume.path} as {name}", file=sys.stderr, flush=True)
        try:
            await served
        finally:
            registry.remove(name, os.getpid())
            with contextlib.suppress(BlockcryptError):
                await loop.run_in_executor(None, netlink.disconnect, chosen)

    asyncio.run(main())
    return device[0] if device else None


def cmd_detach(args: argparse.Namespace) -> int:
    import signal
    import time

    from blockcrypt.server import kernel

    kernel.device_index(args.device)
    device = args.device if args.device.startswith("/dev/") else "/dev/" + args.device
    registry = kernel.AttachmentRegistry(_config(args).state_dir)
    entry = registry.get(device)
    if entry is None:
        raise KernelNBDError(
            f"{device} is not attached by blockcrypt (see `blockcrypt list`); for "
            f"a device attached by nbd-client use `nbd-client -d {device}`"
        )
    # The kernel first: it sends NBD_CMD_DISC and fails what is still queued,
    # then the serving process flushes, wipes the key and exits.
    with kernel.NBDNetlink() as netlink:
        netlink.disconnect(kernel.device_index(device))
    pid = int(entry["pid"])
    if kernel.same_process(entry):  # never signal a stranger that reused the pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while registry.get(device) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    doc = {"device": device, "path": entry.get("path"), "pid": pid}
    _emit(args, doc, f"detached {device} ({entry.get('path')})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from blockcrypt.server import kernel

    entries = kernel.AttachmentRegistry(_config(args).state_dir).list()
    rows = [entries[d] for d in sorted(entries)]
    lines = [
        f"{e['device']}  {e.get('path')}  {e.get('volume_uuid')}  "
        f"{e.get('key_id')} v{e.get('key_version')}"
        + ("  read-only" if e.get("read_only") else "")
        for e in rows
    ]
    doc = {"attachments": rows, "cipher_backend": _backend_status()}
    text = "\n".join(lines) or "no attached volumes"
    _emit(args, doc, f"{text}\ncipher backend: {_backend_status()}")
    return 0


def _backend_status() -> str:
    """Which sector cipher runs, said loudly when it is the slow one."""
    from blockcrypt.crypto import FAST_BACKEND_ERROR, backend_name

    if FAST_BACKEND_ERROR is None:
        return backend_name()
    return f"{backend_name()} (SLOW: {FAST_BACKEND_ERROR})"


class _VersionAction(argparse.Action):
    def __call__(self, parser: Any, *args: Any, **kwargs: Any) -> None:
        print(f"blockcrypt {__version__}, cipher backend: {_backend_status()}")
        parser.exit()


def cmd_demo(args: argparse.Namespace) -> int:
    from blockcrypt.demo import run_demo

    return run_demo(args)


# -- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockcrypt",
        description="KMS-wrapped LUKS2 volumes served over NBD.",
    )
    p.add_argument(
        "--version", action=_VersionAction, nargs=0, help="show version and cipher"
    )
    p.add_argument(
        "--state-dir",
        help="state directory (default: /var/lib/blockcrypt "
        "for root, else $XDG_DATA_HOME/blockcrypt; env BLOCKCRYPT_STATE_DIR)",
    )
    p.add_argument("--config", help="TOML config file (env BLOCKCRYPT_CONFIG)")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v for lifecycle logs, -vv for every request",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parser: Any,
        name: str,
        func: Callable[..., int],
        help: str,
        json_opt: bool = True,
    ) -> Any:
        sp = parser.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        if json_opt:
            sp.add_argument(
                "--json", action="store_true", help="machine-readable output"
            )
        return sp

    kms = sub.add_parser("kms", help="customer master keys and data keys")
    ksub = kms.add_subparsers(dest="kms_command", required=True, metavar="OPERATION")
    sp = add(ksub, "create-key", cmd_create_key, "create an AES-256 CMK inside the HSM")
    sp.add_argument("--alias", required=True, help="unique name for the key")
    add(ksub, "list-keys", cmd_list_keys, "list the CMKs")
    sp = add(ksub, "describe-key", cmd_describe_key, "show one CMK")
    sp.add_argument("key", help="key id or alias")
    sp = add(
        ksub,
        "create-datakey",
        cmd_create_datakey,
        "generate a 64-byte data key and wrap it with a CMK",
    )
    sp.add_argument("key", help="key id or alias")
    sp.add_argument(
        "--volume-uuid", help="volume UUID bound into the wrap (default: new)"
    )
    sp.add_argument(
        "--plaintext-file",
        help="also write the plaintext key to this new "
        "file (mode 0600); without it only the wrapped key is printed",
    )
    sp = add(
        ksub,
        "decrypt-datakey",
        cmd_decrypt_datakey,
        "unwrap a data key printed by create-datakey, or a volume's own key",
    )
    sp.add_argument("key", help="key id or alias that wrapped it")
    sp.add_argument(
        "--in",
        dest="input",
        help="file with the wrapped key JSON (default: standard input)",
    )
    sp.add_argument(
        "--volume",
        metavar="PATH",
        help="unwrap the DEK of this volume instead (for cryptsetup "
        "--volume-key-file; the key is checked against the header's digest)",
    )
    sp.add_argument(
        "--plaintext-file",
        required=True,
        help="new file (mode 0600) for the plaintext key",
    )
    for name, func, text in (
        ("enable-key", cmd_enable_key, "let a disabled CMK wrap and unwrap again"),
        (
            "disable-key",
            cmd_disable_key,
            "refuse every wrap and unwrap with a CMK; "
            "attached volumes keep running, the next attach fails",
        ),
        (
            "cancel-key-deletion",
            cmd_cancel_key_deletion,
            "stop a scheduled deletion; the key stays Disabled",
        ),
        (
            "rotate-key",
            cmd_rotate_key,
            "generate a new key version inside the "
            "HSM; new data keys use it, older versions still unwrap",
        ),
    ):
        sp = add(ksub, name, func, text)
        sp.add_argument("key", help="key id or alias")
    sp = add(
        ksub,
        "schedule-key-deletion",
        cmd_schedule_key_deletion,
        "destroy a CMK after a waiting period; it is unusable meanwhile",
    )
    sp.add_argument("key", help="key id or alias")
    sp.add_argument(
        "--pending-window-days",
        type=int,
        default=DEFAULT_PENDING_DAYS,
        metavar="DAYS",
        help="7 to 1096 (default: 30)",
    )
    sp = add(ksub, "add-alias", cmd_add_alias, "give a CMK another alias")
    sp.add_argument("key", help="key id or alias")
    sp.add_argument("alias", help="the new alias")
    sp = add(ksub, "remove-alias", cmd_remove_alias, "remove an alias")
    sp.add_argument("alias")
    sp = add(ksub, "rename-alias", cmd_rename_alias, "rename an alias")
    sp.add_argument("alias")
    sp.add_argument("new_alias", metavar="NEW_ALIAS")
    add(
        ksub,
        "purge",
        cmd_purge,
        "destroy the material of every CMK whose "
        "deletion date has passed (also run when serve or attach starts)",
    )
    sp = add(ksub, "audit", cmd_audit, "show the audit log")
    sp.add_argument("--key", help="only records of this key id or alias")
    sp.add_argument("--volume", metavar="UUID", help="only records of this volume")
    sp.add_argument(
        "--since",
        metavar="TIME",
        help="only records at or after this ISO 8601 time (UTC unless a zone is given)",
    )

    sp = add(sub, "create", cmd_create, "create a new encrypted volume file")
    sp.add_argument("path")
    sp.add_argument("--size", required=True, help="plaintext size, e.g. 10G")
    sp.add_argument("--key", required=True, help="CMK id or alias that wraps the DEK")
    sp.add_argument("--sector-size", type=int, choices=(512, 4096), default=4096)
    sp.add_argument("--label", help="LUKS2 label")

    sp = add(sub, "info", cmd_info, "show a volume's header (never a key)")
    sp.add_argument("path")

    sp = add(
        sub,
        "rewrap",
        cmd_rewrap,
        "wrap a volume's data key under the newest "
        "version of its CMK, or under another CMK; rewrites only the header",
    )
    sp.add_argument("path")
    sp.add_argument(
        "--key", help="CMK id or alias to move to (default: the volume's own CMK)"
    )

    rec = sub.add_parser("recovery", help="recovery without the HSM")
    rsub = rec.add_subparsers(
        dest="recovery_command", required=True, metavar="OPERATION"
    )
    sp = add(
        rsub,
        "add-passphrase",
        cmd_add_passphrase,
        "add a LUKS2 passphrase "
        "keyslot so that cryptsetup opens the volume without the HSM",
    )
    sp.add_argument("path")
    sp.add_argument(
        "--passphrase-file",
        help="read the new passphrase from this "
        "file (mode 0600; one trailing newline is dropped) instead of "
        "asking twice on the terminal",
    )
    sp.add_argument(
        "--pbkdf",
        choices=("argon2id", "argon2i", "pbkdf2"),
        help="keyslot PBKDF (default: cryptsetup's)",
    )
    sp.add_argument(
        "--pbkdf-force-iterations",
        type=int,
        metavar="N",
        help="skip the benchmark; for tests only",
    )
    sp.add_argument(
        "--pbkdf-memory",
        type=int,
        metavar="KIB",
        help="argon2 memory cost; for tests only",
    )

    sp = add(
        sub,
        "backup-header",
        cmd_backup_header,
        "save the volume's LUKS2 header area to a new file (mode 0600)",
    )
    sp.add_argument("path")
    sp.add_argument("out")
    sp = add(
        sub,
        "restore-header",
        cmd_restore_header,
        "write a header backup back onto its volume",
    )
    sp.add_argument("path")
    sp.add_argument("backup")
    sp.add_argument(
        "--force",
        action="store_true",
        help="restore over an unreadable header, or an older backup over a newer "
        "header of the same volume (never another volume's over an intact one)",
    )

    sp = add(
        sub,
        "attach",
        cmd_attach,
        "serve a volume to the kernel as "
        "/dev/nbdN (needs the nbd module); runs until detach or SIGTERM",
        json_opt=False,
    )
    sp.add_argument("path")
    sp.add_argument("device", nargs="?", help="/dev/nbdN (default: the first free)")
    sp.add_argument("--read-only", action="store_true")
    sp.add_argument(
        "--connections",
        type=int,
        default=1,
        help="sockets handed to the kernel (default: 1)",
    )
    sp.add_argument(
        "--timeout",
        type=int,
        default=30,
        help="per-request timeout in seconds (default: 30)",
    )
    sp.add_argument(
        "--dead-conn-timeout",
        type=int,
        default=60,
        help="seconds to wait for a dead connection (default: 60)",
    )
    sp = add(sub, "detach", cmd_detach, "disconnect a device made by attach")
    sp.add_argument("device", help="/dev/nbdN")
    add(sub, "list", cmd_list, "list attached volumes (device, path, key id)")

    sp = add(
        sub, "serve", cmd_serve, "serve a volume's plaintext over NBD", json_opt=False
    )
    sp.add_argument("path")
    where = sp.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        help="Unix socket path, mode 0600 (default: "
        "/run/blockcrypt/FILENAME.sock for root, e.g. db.img.sock)",
    )
    where.add_argument(
        "--listen",
        help="TCP HOST:PORT (a bare PORT means 127.0.0.1); "
        "plaintext travels unencrypted",
    )
    sp.add_argument("--export-name", default="", help="NBD export name (default: '')")
    sp.add_argument("--read-only", action="store_true")

    sp = add(
        sub,
        "demo",
        cmd_demo,
        "create a key and a volume, serve it, mount an "
        "ext4 file system on it through nbdfuse, then clean up (needs root)",
        json_opt=False,
    )
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
    except BrokenPipeError:
        # The reader of our output went away (`| head`); that is not an error
        # worth a traceback. Point stdout at /dev/null so the exit flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            # Writing our own output failed (a full disk behind `> file`).
            print(f"blockcrypt: error: cannot write output: {exc.strerror}",
                  file=sys.stderr)  # fmt: skip
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
