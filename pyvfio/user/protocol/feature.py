"""DEVICE_FEATURE: ``struct vfio_user_device_feature`` and the feature
indexes vfio-user supports.

Spec: QEMU ``docs/interop/vfio-user.rst``, "VFIO_USER_DEVICE_FEATURE";
``linux/vfio.h`` ``VFIO_DEVICE_FEATURE_*``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

from pyvfio.user.protocol._codec import _fail, _need, _pack

# --- DEVICE_FEATURE --------------------------------------------------------------------------


class FeatureFlag(enum.IntFlag):
    """``VFIO_DEVICE_FEATURE_*`` bits of ``flags`` (index in bits 0-15)."""

    MASK = 0xFFFF
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class FeatureIndex(enum.IntEnum):
    """Feature indexes vfio-user supports."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


_FEATURE = struct.Struct("=II")


@dataclass(frozen=True)
class DeviceFeature:
    """``struct vfio_user_device_feature``: argsz u32, flags u32 (feature
    index | GET/SET/PROBE), data.  ``argsz`` in a request is the largest
    reply payload; GET/SET are exclusive unless PROBE is set."""

    flags: int
    data: bytes = b""
    argsz: int | None = None

    SIZE: ClassVar[int] = _FEATURE.size  # 8

    @property
    def feature(self) -> int:
        return self.flags & FeatureFlag.MASK

    @property
    def get(self) -> bool:
        return bool(self.flags & FeatureFlag.GET)

    @property
    def set(self) -> bool:
        return bool(self.flags & FeatureFlag.SET)

    @property
    def probe(self) -> bool:
        return bool(self.flags & FeatureFlag.PROBE)

    def pack(self) -> bytes:
        argsz = self.SIZE + len(self.data) if self.argsz is None else self.argsz
        return _pack(_FEATURE, "DEVICE_FEATURE", argsz, self.flags) + bytes(self.data)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, reply: bool = False) -> DeviceFeature:
        _need(payload, cls.SIZE, "DEVICE_FEATURE")
        argsz, flags = _FEATURE.unpack_from(payload)
        if argsz < cls.SIZE:
            raise _fail(f"DEVICE_FEATURE: argsz {argsz} < {cls.SIZE}")
        if flags & ~int(FeatureFlag.MASK | FeatureFlag.GET | FeatureFlag.SET
                        | FeatureFlag.PROBE):
            raise _fail(f"DEVICE_FEATURE: unknown flags {flags:#x}")
        both = FeatureFlag.GET | FeatureFlag.SET
        if not reply and flags & both == both and not flags & FeatureFlag.PROBE:
            raise _fail("DEVICE_FEATURE: GET and SET together need PROBE")
        return cls(flags, bytes(payload[cls.SIZE:]), argsz)
