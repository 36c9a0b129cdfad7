"""DEVICE_GET_INFO: ``struct vfio_user_device_info``.

Spec: QEMU ``docs/interop/vfio-user.rst``, "VFIO_USER_DEVICE_GET_INFO".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from pyvfio.device import DeviceFlag
from pyvfio.user.protocol._codec import _fail, _need, _pack

# --- DEVICE_GET_INFO -------------------------------------------------------------------------

_DEVICE_INFO = struct.Struct("=IIII")


@dataclass(frozen=True)
class DeviceInfoMsg:
    """``struct vfio_user_device_info``: argsz, flags (``VFIO_DEVICE_FLAGS_*``),
    num_regions, num_irqs (all u32).  The request sets only argsz."""

    argsz: int = _DEVICE_INFO.size
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    SIZE: ClassVar[int] = _DEVICE_INFO.size  # 16

    def pack(self) -> bytes:
        return _pack(_DEVICE_INFO, "DEVICE_GET_INFO", self.argsz, self.flags, self.num_regions,
                     self.num_irqs)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, reply: bool = False) -> DeviceInfoMsg:
        _need(payload, cls.SIZE, "DEVICE_GET_INFO", exact=not reply)
        argsz, flags, num_regions, num_irqs = _DEVICE_INFO.unpack_from(payload)
        if argsz < cls.SIZE:
            raise _fail(f"DEVICE_GET_INFO: argsz {argsz} < {cls.SIZE}")
        return cls(argsz, DeviceFlag(flags), num_regions, num_irqs)
