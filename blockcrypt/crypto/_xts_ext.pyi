# Built by _xts_build.py (cffi); the C declarations live there.
from typing import Any

ffi: Any
lib: Any
