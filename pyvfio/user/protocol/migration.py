"""Migration payloads: the MIGRATION and MIG_DEVICE_STATE features, DMA
dirty-page logging (DMA_LOGGING_START/STOP/REPORT) and MIG_DATA_READ /
MIG_DATA_WRITE.

Spec: QEMU ``docs/interop/vfio-user.rst``; ``linux/vfio.h``
``vfio_device_feature_*``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import ClassVar

from pyvfio.user.protocol._codec import _fail, _need, _pack
from pyvfio.user.protocol.version import DEFAULT_MAX_DATA_XFER_SIZE

_MIGRATION_FEATURE = struct.Struct("=Q")


@dataclass(frozen=True)
class MigrationFeature:
    """``VFIO_DEVICE_FEATURE_MIGRATION`` GET data: flags u64 (``VFIO_MIGRATION_*``)."""

    flags: int

    SIZE: ClassVar[int] = _MIGRATION_FEATURE.size

    def pack(self) -> bytes:
        return _pack(_MIGRATION_FEATURE, "MIGRATION feature", self.flags)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> MigrationFeature:
        _need(data, cls.SIZE, "MIGRATION feature", exact=True)
        return cls(_MIGRATION_FEATURE.unpack_from(data)[0])


_MIG_STATE = struct.Struct("=II")


@dataclass(frozen=True)
class MigStateMsg:
    """``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` data: device_state u32,
    data_fd u32 (unused in vfio-user; sent as 0xffffffff by libvfio-user)."""

    device_state: int
    data_fd: int = 0xFFFFFFFF

    SIZE: ClassVar[int] = _MIG_STATE.size

    def pack(self) -> bytes:
        return _pack(_MIG_STATE, "MIG_DEVICE_STATE", self.device_state, self.data_fd)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> MigStateMsg:
        _need(data, cls.SIZE, "MIG_DEVICE_STATE", exact=True)
        return cls(*_MIG_STATE.unpack_from(data))


_LOG_CONTROL = struct.Struct("=QII")
_LOG_RANGE = struct.Struct("=QQ")
MAX_LOG_RANGES = 1024


@dataclass(frozen=True)
class DmaLoggingRange:
    iova: int
    length: int


@dataclass(frozen=True)
class DmaLoggingControl:
    """``VFIO_DEVICE_FEATURE_DMA_LOGGING_START``/``STOP`` data: page_size u64,
    num_ranges u32, reserved u32, then ranges of (iova u64, length u64).
    Zero ranges means log everything."""

    page_size: int
    ranges: tuple[DmaLoggingRange, ...] = ()

    def pack(self) -> bytes:
        return _pack(_LOG_CONTROL, "DMA_LOGGING", self.page_size, len(self.ranges), 0) + \
            b"".join(_pack(_LOG_RANGE, "DMA_LOGGING range", r.iova, r.length)
                     for r in self.ranges)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> DmaLoggingControl:
        _need(data, _LOG_CONTROL.size, "DMA_LOGGING control")
        page_size, n, _reserved = _LOG_CONTROL.unpack_from(data)
        if n > MAX_LOG_RANGES:
            raise _fail(f"DMA_LOGGING: {n} ranges is too many", errno.E2BIG)
        _need(data, _LOG_CONTROL.size + n * _LOG_RANGE.size, "DMA_LOGGING ranges", exact=True)
        ranges = tuple(DmaLoggingRange(*_LOG_RANGE.unpack_from(data, _LOG_CONTROL.size + i * 16))
                       for i in range(n))
        return cls(page_size, ranges)


_LOG_REPORT = struct.Struct("=QQQ")


@dataclass(frozen=True)
class DmaLoggingReport:
    """``VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`` data: iova, length,
    page_size (u64); the GET reply appends the bitmap (u64 words, one bit per
    page_size of IOVA)."""

    iova: int
    length: int
    page_size: int
    bitmap: bytes = b""

    SIZE: ClassVar[int] = _LOG_REPORT.size  # 24

    @property
    def bitmap_size(self) -> int:
        """Bytes of bitmap this range needs (whole u64 words)."""
        if self.page_size <= 0:
            return 0
        pages = -(-self.length // self.page_size)
        return -(-pages // 64) * 8

    def pack(self) -> bytes:
        return _pack(_LOG_REPORT, "DMA_LOGGING_REPORT", self.iova, self.length,
                     self.page_size) + bytes(self.bitmap)

    @classmethod
    def unpack(cls, data: bytes | memoryview, *, reply: bool = False) -> DmaLoggingReport:
        _need(data, cls.SIZE, "DMA_LOGGING_REPORT", exact=not reply)
        iova, length, page_size = _LOG_REPORT.unpack_from(data)
        if page_size == 0 or page_size & (page_size - 1):
            raise _fail(f"DMA_LOGGING_REPORT: page_size {page_size} is not a power of two")
        out = cls(iova, length, page_size)
        if reply:
            bitmap = bytes(data[cls.SIZE:])
            if len(bitmap) != out.bitmap_size:
                raise _fail(f"DMA_LOGGING_REPORT: bitmap of {len(bitmap)} bytes, "
                            f"need {out.bitmap_size}")
            out = cls(iova, length, page_size, bitmap)
        return out


# --- MIG_DATA_READ / MIG_DATA_WRITE ----------------------------------------------------------

_MIG_DATA = struct.Struct("=II")


@dataclass(frozen=True)
class MigData:
    """``struct vfio_user_mig_data``: argsz u32, size u32, data.  A READ
    request has no data (argsz = the largest reply, at least 8 + size); its
    reply and a WRITE request carry ``size`` bytes."""

    size: int
    data: bytes = b""
    argsz: int | None = None

    SIZE: ClassVar[int] = _MIG_DATA.size  # 8

    def pack(self) -> bytes:
        argsz = self.SIZE + max(self.size, len(self.data)) if self.argsz is None else self.argsz
        return _pack(_MIG_DATA, "MIG_DATA", argsz, self.size) + bytes(self.data)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, with_data: bool,
               max_size: int = DEFAULT_MAX_DATA_XFER_SIZE) -> MigData:
        _need(payload, cls.SIZE, "MIG_DATA")
        argsz, size = _MIG_DATA.unpack_from(payload)
        if size > max_size:
            raise _fail(f"MIG_DATA: size {size} > max_data_xfer_size {max_size}", errno.E2BIG)
        if with_data:
            _need(payload, cls.SIZE + size, "MIG_DATA data", exact=True)
            if argsz < cls.SIZE:
                raise _fail(f"MIG_DATA: argsz {argsz} < {cls.SIZE}")
            return cls(size, bytes(payload[cls.SIZE:]), argsz)
        _need(payload, cls.SIZE, "MIG_DATA", exact=True)
        if argsz < cls.SIZE + size:
            raise _fail(f"MIG_DATA_READ: argsz {argsz} < {cls.SIZE + size}")
        return cls(size, b"", argsz)
