"""Region command group: DEVICE_GET_REGION_INFO (with its capability chain),
DEVICE_GET_REGION_IO_FDS, REGION_READ / REGION_WRITE and REGION_WRITE_MULTI.

Spec: QEMU ``docs/interop/vfio-user.rst``; ``struct vfio_region_info`` and its
capabilities are ``linux/vfio.h``'s.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import ClassVar

from pyvfio.device import RegionFlag
from pyvfio.user.protocol._codec import _fail, _need, _pack
from pyvfio.user.protocol.header import HEADER
from pyvfio.user.protocol.version import DEFAULT_MAX_DATA_XFER_SIZE

# --- DEVICE_GET_REGION_INFO ------------------------------------------------------------------


class RegionCapId(enum.IntEnum):
    """``VFIO_REGION_INFO_CAP_*``."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3
    NVLINK2_SSATGT = 4
    NVLINK2_LNKSPD = 5


_REGION_INFO = struct.Struct("=IIIIQQ")
_CAP_HEADER = struct.Struct("=HHI")
_SPARSE_HEAD = struct.Struct("=II")
_SPARSE_AREA = struct.Struct("=QQ")
_CAP_TYPE = struct.Struct("=II")
MAX_SPARSE_AREAS = 1024
MAX_REGION_CAPS = 64


@dataclass(frozen=True)
class RegionInfoMsg:
    """``struct vfio_region_info`` (argsz, flags, index, cap_offset u32; size,
    offset u64) followed by a capability chain.

    Capabilities are decoded into ``sparse_areas`` (``VFIO_REGION_INFO_CAP_SPARSE_MMAP``,
    a list of ``(offset, size)``, ``None`` when absent) and ``type``
    (``VFIO_REGION_INFO_CAP_TYPE``, ``(type, subtype)``).  ``cap_offset`` and
    the chain's ``next`` fields are offsets from the start of this struct.
    With the MMAP flag, the reply's SCM_RIGHTS fd is the one to mmap at
    ``offset`` (+ the area's offset)."""

    index: int
    argsz: int = _REGION_INFO.size
    flags: int = 0
    size: int = 0
    offset: int = 0
    sparse_areas: tuple[tuple[int, int], ...] | None = None
    type: tuple[int, int] | None = None
    cap_offset: int = 0

    SIZE: ClassVar[int] = _REGION_INFO.size  # 32

    def _caps(self) -> list[tuple[int, int, bytes]]:
        caps: list[tuple[int, int, bytes]] = []
        if self.sparse_areas is not None:
            body = _pack(_SPARSE_HEAD, "sparse mmap", len(self.sparse_areas), 0)
            body += b"".join(_pack(_SPARSE_AREA, "sparse area", o, s)
                             for o, s in self.sparse_areas)
            caps.append((RegionCapId.SPARSE_MMAP, 1, body))
        if self.type is not None:
            caps.append((RegionCapId.TYPE, 1, _pack(_CAP_TYPE, "region type", *self.type)))
        return caps

    def full_size(self) -> int:
        """``argsz`` a reply needs to carry every capability."""
        return self.SIZE + sum(_CAP_HEADER.size + len(b) for _i, _v, b in self._caps())

    def pack(self, *, max_size: int | None = None) -> bytes:
        """Pack a request (no caps) or a reply.  A reply with capabilities
        sets ``argsz`` to the size they need and leaves them out when
        ``max_size`` (the request's argsz) is smaller, as the kernel does."""
        caps = self._caps()
        chain = b""
        flags = self.flags
        cap_offset = self.cap_offset
        argsz = self.argsz
        if caps:
            flags |= RegionFlag.CAPS
            pos = self.SIZE
            parts = []
            for i, (cap_id, version, body) in enumerate(caps):
                nxt = pos + _CAP_HEADER.size + len(body)
                parts.append(_pack(_CAP_HEADER, "cap header", cap_id, version,
                                   nxt if i + 1 < len(caps) else 0) + body)
                pos = nxt
            chain = b"".join(parts)
            argsz = self.SIZE + len(chain)
            cap_offset = self.SIZE
            if max_size is not None and max_size < argsz:
                chain = b""
                cap_offset = 0
        return _pack(_REGION_INFO, "REGION_INFO", argsz, flags, self.index, cap_offset,
                     self.size, self.offset) + chain

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, reply: bool = False) -> RegionInfoMsg:
        _need(payload, cls.SIZE, "DEVICE_GET_REGION_INFO", exact=not reply)
        argsz, flags, index, cap_offset, size, offset = _REGION_INFO.unpack_from(payload)
        if argsz < cls.SIZE:
            raise _fail(f"DEVICE_GET_REGION_INFO: argsz {argsz} < {cls.SIZE}")
        sparse: list[tuple[int, int]] | None = None
        rtype: tuple[int, int] | None = None
        if reply and flags & RegionFlag.CAPS and cap_offset and len(payload) > cls.SIZE:
            seen: set[int] = set()
            pos = cap_offset
            while pos:
                if pos in seen or len(seen) >= MAX_REGION_CAPS:
                    raise _fail("REGION_INFO: capability chain loops")
                seen.add(pos)
                if pos < cls.SIZE or pos + _CAP_HEADER.size > len(payload):
                    raise _fail(f"REGION_INFO: capability at {pos} is outside the reply")
                cap_id, _version, nxt = _CAP_HEADER.unpack_from(payload, pos)
                body = pos + _CAP_HEADER.size
                if cap_id == RegionCapId.SPARSE_MMAP:
                    if body + _SPARSE_HEAD.size > len(payload):
                        raise _fail("REGION_INFO: truncated sparse mmap capability")
                    nr, _ = _SPARSE_HEAD.unpack_from(payload, body)
                    if nr > MAX_SPARSE_AREAS:
                        raise _fail(f"REGION_INFO: {nr} sparse areas is too many", errno.E2BIG)
                    start = body + _SPARSE_HEAD.size
                    if start + nr * _SPARSE_AREA.size > len(payload):
                        raise _fail("REGION_INFO: sparse areas run past the reply")
                    sparse = [_SPARSE_AREA.unpack_from(payload, start + i * _SPARSE_AREA.size)
                              for i in range(nr)]
                elif cap_id == RegionCapId.TYPE:
                    if body + _CAP_TYPE.size > len(payload):
                        raise _fail("REGION_INFO: truncated type capability")
                    rtype = _CAP_TYPE.unpack_from(payload, body)
                pos = nxt
        return cls(index, argsz, flags, size, offset,
                   tuple(sparse) if sparse is not None else None, rtype, cap_offset)


# --- DEVICE_GET_REGION_IO_FDS ----------------------------------------------------------------


class IoFdType(enum.IntEnum):
    """``VFIO_USER_IO_FD_TYPE_*``."""

    IOEVENTFD = 0
    IOREGIONFD = 1
    IOEVENTFD_SHADOW = 2


_IO_FDS = struct.Struct("=IIII")
_SUB_REGION = struct.Struct("=QQIIIIQ")
MAX_IO_FDS = 1024


@dataclass(frozen=True)
class SubRegionIoFd:
    """``vfio_user_sub_region_ioeventfd`` / ``_ioregionfd`` (40 bytes):
    offset, size u64; fd_index, type, flags, padding u32; datamatch or
    user_data u64."""

    offset: int
    size: int
    fd_index: int
    type: int = IoFdType.IOEVENTFD
    flags: int = 0
    data: int = 0


@dataclass(frozen=True)
class RegionIoFds:
    """``vfio_user_region_io_fds_request`` / ``_reply``: argsz, flags, index,
    count (u32) and, in the reply, ``count`` sub-regions; the fds they index
    travel as SCM_RIGHTS.  A reply whose argsz exceeds the request's carries
    the header only (count and argsz tell the client what to ask for)."""

    index: int
    argsz: int = _IO_FDS.size
    flags: int = 0
    count: int = 0
    sub_regions: tuple[SubRegionIoFd, ...] = ()

    SIZE: ClassVar[int] = _IO_FDS.size  # 16
    ENTRY_SIZE: ClassVar[int] = _SUB_REGION.size  # 40

    def pack(self, *, max_size: int | None = None) -> bytes:
        count = len(self.sub_regions) if self.sub_regions else self.count
        argsz = self.argsz
        body = b""
        if self.sub_regions:
            argsz = self.SIZE + self.ENTRY_SIZE * len(self.sub_regions)
            if max_size is None or max_size >= argsz:
                body = b"".join(_pack(_SUB_REGION, "sub-region", s.offset, s.size, s.fd_index,
                                      s.type, s.flags, 0, s.data) for s in self.sub_regions)
        return _pack(_IO_FDS, "REGION_IO_FDS", argsz, self.flags, self.index, count) + body

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, reply: bool = False) -> RegionIoFds:
        _need(payload, cls.SIZE, "DEVICE_GET_REGION_IO_FDS", exact=not reply)
        argsz, flags, index, count = _IO_FDS.unpack_from(payload)
        if argsz < cls.SIZE:
            raise _fail(f"DEVICE_GET_REGION_IO_FDS: argsz {argsz} < {cls.SIZE}")
        if not reply:
            if flags or count:
                raise _fail("DEVICE_GET_REGION_IO_FDS: flags and count must be zero")
            return cls(index, argsz, flags, count)
        if count > MAX_IO_FDS:
            raise _fail(f"REGION_IO_FDS: {count} sub-regions is too many", errno.E2BIG)
        subs: list[SubRegionIoFd] = []
        if len(payload) > cls.SIZE:
            _need(payload, cls.SIZE + count * cls.ENTRY_SIZE, "REGION_IO_FDS reply", exact=True)
            for i in range(count):
                o, s, fdi, t, f, _pad, d = _SUB_REGION.unpack_from(payload,
                                                                   cls.SIZE + i * cls.ENTRY_SIZE)
                subs.append(SubRegionIoFd(o, s, fdi, t, f, d))
        return cls(index, argsz, flags, count, tuple(subs))


# --- REGION_READ / REGION_WRITE / REGION_WRITE_MULTI -----------------------------------------

REGION_ACCESS = struct.Struct("=QII")
"""``struct vfio_user_region_access``: offset u64, region u32, count u32, data."""

REGION_ACCESS_MESSAGE = struct.Struct(HEADER.format + REGION_ACCESS.format.lstrip("=<"))
"""A message header and a region access header in one (spec "Header",
"REGION_READ", "REGION_WRITE"), 32 bytes: a whole REGION_READ request, and the
head of a REGION_WRITE request and of either's reply."""

REGION_ACCESS_PARTS = struct.Struct("=H14sQ8s")
"""The same 32 bytes as :data:`REGION_ACCESS_MESSAGE`, packed from four parts:
``msg_id`` (u16); command, size, flags and error as 14 bytes; ``offset`` (u64);
region and count as 8 bytes.  For a sender whose command, size, flags, region
and count are fixed (the client's ``read8``..``read64`` of one region): four
conversions instead of eight, about half the cost of a pack under CPython.
:func:`region_access_parts` makes the two fixed parts."""


def region_access_parts(command: int, size: int, flags: int, region: int,
                        count: int) -> tuple[bytes, bytes]:
    """The fixed parts of :data:`REGION_ACCESS_PARTS`: ``(command, size, flags,
    error 0)`` as 14 bytes and ``(region, count)`` as 8 bytes, little-endian as
    the spec's "Header" and "REGION_READ" tables lay them out."""
    return (HEADER.pack(0, command, size, flags, 0)[2:],
            REGION_ACCESS.pack(0, region, count)[8:])


@dataclass(frozen=True)
class RegionAccess:
    """REGION_READ/REGION_WRITE request and reply.  ``data`` is present in a
    write request and a read reply; a read request and a write reply carry
    only the 16-byte head."""

    region: int
    offset: int
    count: int
    data: bytes = b""

    SIZE: ClassVar[int] = REGION_ACCESS.size  # 16

    def pack(self) -> bytes:
        return _pack(REGION_ACCESS, "REGION access", self.offset, self.region,
                     self.count) + bytes(self.data)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, with_data: bool,
               max_count: int = DEFAULT_MAX_DATA_XFER_SIZE) -> RegionAccess:
        """``with_data``: a write request or read reply (data must be
        exactly ``count`` bytes); otherwise the payload must be the head only."""
        _need(payload, cls.SIZE, "REGION access")
        offset, region, count = REGION_ACCESS.unpack_from(payload)
        if count > max_count:
            raise _fail(f"REGION access: count {count} > max_data_xfer_size {max_count}",
                        errno.E2BIG)
        if with_data:
            _need(payload, cls.SIZE + count, "REGION access data", exact=True)
            return cls(region, offset, count, bytes(payload[cls.SIZE:]))
        _need(payload, cls.SIZE, "REGION access", exact=True)
        return cls(region, offset, count)


_WR_MULTI_HEAD = struct.Struct("=Q")
_WR_ONE = struct.Struct("=QII8s")
MAX_WRITE_MULTI = 4096


@dataclass(frozen=True)
class WriteOne:
    """One write of REGION_WRITE_MULTI: offset u64, region u32, count u32
    (at most 8), data[8]."""

    region: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class RegionWriteMulti:
    """``VFIO_USER_REGION_WRITE_MULTI``: wr_cnt u64 then wr_cnt 24-byte
    writes.  The reply is wr_cnt only (``writes`` empty)."""

    writes: tuple[WriteOne, ...] = ()
    wr_cnt: int | None = None

    def pack(self) -> bytes:
        n = len(self.writes) if self.wr_cnt is None else self.wr_cnt
        out = [_pack(_WR_MULTI_HEAD, "WRITE_MULTI", n)]
        for w in self.writes:
            if len(w.data) > 8:
                raise _fail("REGION_WRITE_MULTI: a write carries at most 8 bytes")
            out.append(_pack(_WR_ONE, "WRITE_MULTI entry", w.offset, w.region, len(w.data),
                             bytes(w.data)))
        return b"".join(out)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, reply: bool = False) -> RegionWriteMulti:
        _need(payload, _WR_MULTI_HEAD.size, "REGION_WRITE_MULTI")
        (n,) = _WR_MULTI_HEAD.unpack_from(payload)
        if reply:
            _need(payload, _WR_MULTI_HEAD.size, "REGION_WRITE_MULTI reply", exact=True)
            return cls((), n)
        if n == 0 or n > MAX_WRITE_MULTI:
            raise _fail(f"REGION_WRITE_MULTI: wr_cnt {n} out of range 1..{MAX_WRITE_MULTI}")
        _need(payload, _WR_MULTI_HEAD.size + n * _WR_ONE.size, "REGION_WRITE_MULTI", exact=True)
        writes = []
        for i in range(n):
            offset, region, count, data = _WR_ONE.unpack_from(
                payload, _WR_MULTI_HEAD.size + i * _WR_ONE.size)
            if count == 0 or count > 8:
                raise _fail(f"REGION_WRITE_MULTI: write {i} has count {count}, need 1..8")
            writes.append(WriteOne(region, offset, data[:count]))
        return cls(tuple(writes), n)
