"""Customer master keys (CMKs) and the volume data keys (DEKs) they wrap.

A :class:`CMKStore` creates CMKs, draws fresh DEKs wrapped under a CMK, and
unwraps them again. Backends: :class:`PKCS11CMKStore` (production, and the
embedded SoftHSM2 default) and :class:`MemoryCMKStore` (unit tests only).
Open the configured one with :func:`blockcrypt.config.open_store`.
"""

from blockcrypt.kms._base import (
    CMKStore,
    DataKey,
    KeyInfo,
    WrappedKey,
    encryption_context,
)
from blockcrypt.kms.embedded import ensure_embedded_token
from blockcrypt.kms.lifecycle import (
    KeyCatalog,
    KeyState,
    ManagedCMKStore,
    open_managed_store,
)
from blockcrypt.kms.memory import MemoryCMKStore
from blockcrypt.kms.pkcs11 import PKCS11CMKStore

__all__ = [
    "CMKStore",
    "DataKey",
    "KeyCatalog",
    "KeyInfo",
    "KeyState",
    "ManagedCMKStore",
    "MemoryCMKStore",
    "PKCS11CMKStore",
    "WrappedKey",
    "encryption_context",
    "ensure_embedded_token",
    "open_managed_store",
]
