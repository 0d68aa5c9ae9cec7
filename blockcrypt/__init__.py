"""blockcrypt: KMS-wrapped LUKS2 volumes served over NBD."""

__version__ = "0.1.0"
