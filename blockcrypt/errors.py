"""Exception hierarchy shared by every blockcrypt package.

Each message answers: what failed, the value seen, what was expected and what to
do next. Messages never carry key material, PINs or sector data.
"""

from __future__ import annotations

import errno

__all__ = [
    "BlockcryptError",
    "ConfigError",
    "HSMMisconfigured",
    "UsageError",
    "AuditLogError",
    "HSMUnavailable",
    "KMSError",
    "KernelNBDError",
    "KeyNotFound",
    "KeyDisabled",
    "KeyPendingDeletion",
    "TokenLoginFailed",
    "UnwrapFailed",
    "StorageError",
    "VolumeFormatError",
    "VolumeBusy",
    "WrongKey",
]


class BlockcryptError(Exception):
    """Base class of every error blockcrypt raises on purpose."""

    #: errno sent to an NBD client when this error ends a request.
    nbd_errno: int = errno.EIO
    #: process exit status when this error ends the command line tool.
    exit_code: int = 1


class ConfigError(BlockcryptError):
    """The configuration is missing, malformed or points at something unusable."""

    exit_code = 78  # EX_CONFIG: systemd's RestartPreventExitStatus= stops loops


class UsageError(BlockcryptError):
    """A command-line value is malformed or out of range."""

    exit_code = 2  # what argparse uses for usage errors


class KMSError(BlockcryptError):
    """A key management operation failed."""


class HSMUnavailable(KMSError):
    """The PKCS#11 module or its token cannot be loaded or reached."""


class HSMMisconfigured(HSMUnavailable):
    """The configured PKCS#11 module or token label does not exist or cannot load."""

    exit_code = 78


class TokenLoginFailed(KMSError):
    """The token refused the PIN."""

    exit_code = 78


class KeyNotFound(KMSError):
    """No customer master key matches the given id or alias."""


class KeyDisabled(KMSError):
    """The customer master key exists but is not usable in its current state."""


class KeyPendingDeletion(KeyDisabled):
    """The customer master key is scheduled for deletion and refuses all use."""


class UnwrapFailed(KMSError):
    """The HSM refused to unwrap a data key: wrong CMK, wrong volume or corrupt blob."""


class StorageError(BlockcryptError):
    """Reading or writing a volume's backing file failed."""


class VolumeFormatError(StorageError):
    """The file is not a blockcrypt volume, or its header cannot be used."""


class VolumeBusy(StorageError):
    """Another process holds the volume."""


class WrongKey(StorageError):
    """A data key does not match the volume's key digest."""


class AuditLogError(BlockcryptError):
    """The audit log cannot be written or read; the operation is refused."""


class KernelNBDError(BlockcryptError):
    """The kernel's NBD driver is missing or refused a netlink request."""
