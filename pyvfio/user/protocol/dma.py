"""DMA command group: DMA_MAP and DMA_UNMAP (client -> server) and DMA_READ /
DMA_WRITE (server -> client).

Spec: QEMU ``docs/interop/vfio-user.rst``, "VFIO_USER_DMA_MAP" to
"VFIO_USER_DMA_WRITE"; libvfio-user ``include/vfio-user.h``.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import ClassVar

from pyvfio.user.protocol._codec import _fail, _need, _pack
from pyvfio.user.protocol.version import DEFAULT_MAX_DATA_XFER_SIZE

# --- DMA_MAP / DMA_UNMAP ---------------------------------------------------------------------


class DmaMapFlag(enum.IntFlag):
    """``VFIO_USER_F_DMA_REGION_*``."""

    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlag(enum.IntFlag):
    """``VFIO_DMA_UNMAP_FLAG_*`` as libvfio-user takes them."""

    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


_DMA_MAP = struct.Struct("=IIQQQ")


@dataclass(frozen=True)
class DmaMap:
    """``struct vfio_user_dma_map``: argsz u32, flags u32, offset u64 (into
    the fd, 0 without one), address u64 (the DMA address), size u64.  An fd,
    when the memory is mappable, travels as SCM_RIGHTS.  No reply payload."""

    address: int
    size: int
    flags: int = DmaMapFlag.READ | DmaMapFlag.WRITE
    offset: int = 0
    argsz: int = _DMA_MAP.size

    SIZE: ClassVar[int] = _DMA_MAP.size  # 32

    def pack(self) -> bytes:
        return _pack(_DMA_MAP, "DMA_MAP", self.argsz, self.flags, self.offset, self.address,
                     self.size)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> DmaMap:
        _need(payload, cls.SIZE, "DMA_MAP", exact=True)
        argsz, flags, offset, address, size = _DMA_MAP.unpack_from(payload)
        if argsz != cls.SIZE:
            raise _fail(f"DMA_MAP: argsz {argsz} != {cls.SIZE}")
        return cls(address, size, flags, offset, argsz)


_DMA_UNMAP = struct.Struct("=IIQQ")
_BITMAP = struct.Struct("=QQ")


@dataclass(frozen=True)
class DmaUnmap:
    """``struct vfio_user_dma_unmap``: argsz u32, flags u32, address u64,
    size u64, and with ``GET_DIRTY_BITMAP`` a ``struct vfio_user_bitmap``
    (pgsize u64, size u64 = bitmap bytes).

    In a request ``argsz`` is the largest reply payload the client takes; the
    reply echoes the entry and, for ``GET_DIRTY_BITMAP``, appends the bitmap
    (``bitmap``)."""

    address: int
    size: int
    flags: int = 0
    argsz: int = _DMA_UNMAP.size
    bitmap_pgsize: int = 0
    bitmap_size: int = 0
    bitmap: bytes = b""

    SIZE: ClassVar[int] = _DMA_UNMAP.size  # 24

    @property
    def wants_bitmap(self) -> bool:
        return bool(self.flags & DmaUnmapFlag.GET_DIRTY_BITMAP)

    @property
    def reply_size(self) -> int:
        """Reply payload size this request implies."""
        if self.wants_bitmap:
            return self.SIZE + _BITMAP.size + self.bitmap_size
        return self.SIZE

    def pack(self) -> bytes:
        out = _pack(_DMA_UNMAP, "DMA_UNMAP", self.argsz, self.flags, self.address, self.size)
        if self.wants_bitmap:
            out += _pack(_BITMAP, "DMA_UNMAP bitmap", self.bitmap_pgsize, self.bitmap_size)
            out += self.bitmap
        return out

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, reply: bool = False) -> DmaUnmap:
        _need(payload, cls.SIZE, "DMA_UNMAP")
        argsz, flags, address, size = _DMA_UNMAP.unpack_from(payload)
        if flags & ~int(DmaUnmapFlag.GET_DIRTY_BITMAP | DmaUnmapFlag.ALL):
            raise _fail(f"DMA_UNMAP: unknown flags {flags:#x}")
        if not flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            _need(payload, cls.SIZE, "DMA_UNMAP", exact=True)
            if argsz < cls.SIZE:
                raise _fail(f"DMA_UNMAP: argsz {argsz} < {cls.SIZE}")
            return cls(address, size, flags, argsz)
        if flags & DmaUnmapFlag.ALL:
            raise _fail("DMA_UNMAP: GET_DIRTY_BITMAP cannot be combined with ALL")
        _need(payload, cls.SIZE + _BITMAP.size, "DMA_UNMAP with bitmap")
        pgsize, bsize = _BITMAP.unpack_from(payload, cls.SIZE)
        rest = bytes(payload[cls.SIZE + _BITMAP.size:])
        if reply:
            if len(rest) != bsize:
                raise _fail(f"DMA_UNMAP reply: bitmap is {len(rest)} bytes, header says {bsize}")
        else:
            if rest:
                raise _fail("DMA_UNMAP: request carries bitmap data")
            if argsz < cls.SIZE + _BITMAP.size + bsize:
                raise _fail(f"DMA_UNMAP: argsz {argsz} too small for a {bsize}-byte bitmap")
        return cls(address, size, flags, argsz, pgsize, bsize, rest)


# --- DMA_READ / DMA_WRITE (server -> client) -------------------------------------------------

DMA_ACCESS = struct.Struct("=QQ")
"""``struct vfio_user_dma_region_access``: address u64, count u64, data."""


@dataclass(frozen=True)
class DmaAccess:
    """DMA_READ/DMA_WRITE request and reply (server to client).  Data is in
    a write request and a read reply.  The spec's DMA_WRITE reply table gives
    ``count`` 4 bytes; libvfio-user sends the 16-byte head, so a write reply
    of 12 or 16 bytes is accepted."""

    address: int
    count: int
    data: bytes = b""

    SIZE: ClassVar[int] = DMA_ACCESS.size  # 16

    def pack(self) -> bytes:
        return _pack(DMA_ACCESS, "DMA access", self.address, self.count) + bytes(self.data)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, with_data: bool,
               max_count: int = DEFAULT_MAX_DATA_XFER_SIZE) -> DmaAccess:
        if not with_data and len(payload) == 12:  # a DMA_WRITE reply per the spec table
            address, count = struct.unpack_from("=QI", payload)
            return cls(address, count)
        _need(payload, cls.SIZE, "DMA access")
        address, count = DMA_ACCESS.unpack_from(payload)
        if count > max_count:
            raise _fail(f"DMA access: count {count} > max_data_xfer_size {max_count}",
                        errno.E2BIG)
        if with_data:
            _need(payload, cls.SIZE + count, "DMA access data", exact=True)
            return cls(address, count, bytes(payload[cls.SIZE:]))
        _need(payload, cls.SIZE, "DMA access", exact=True)
        return cls(address, count)
