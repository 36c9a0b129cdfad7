"""Helpers every message codec uses: the ProtocolError they raise, checked
packing, and length checks.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from pyvfio.errors import ProtocolError


def _fail(message: str, err: int = errno.EINVAL) -> ProtocolError:
    return ProtocolError(message, err)


def _pack(st: struct.Struct, name: str, *values: Any) -> bytes:
    try:
        return st.pack(*values)
    except struct.error as exc:
        raise _fail(f"{name}: a field does not fit its wire width: {exc}") from None


def _need(payload: bytes | memoryview, size: int, name: str, *, exact: bool = False) -> None:
    n = len(payload)
    if n < size or (exact and n != size):
        want = f"exactly {size}" if exact else f"at least {size}"
        raise _fail(f"{name}: payload is {n} bytes, need {want}")
