"""The vfio-user wire protocol: message header, every command's body, and
framing over an ``AF_UNIX`` stream socket with ``SCM_RIGHTS`` fds.

Spec: QEMU ``docs/interop/vfio-user.rst``; struct layouts cross-checked with
nutanix/libvfio-user ``include/vfio-user.h`` and QEMU ``hw/vfio-user/protocol.h``.
All integers are in host byte order (the spec says so); every struct is packed.

Each message body is a small dataclass with ``pack() -> bytes`` and
``unpack(payload) -> instance``.  ``unpack`` checks every length it is given
and raises :class:`~pyvfio.errors.ProtocolError` (with the errno a server
should answer: ``EINVAL`` for malformed input, ``E2BIG`` for sizes over the
negotiated limits) and never anything else, whatever the bytes.  ``pack``
raises ``ProtocolError`` too when a field does not fit its wire width.

Framing lives at the end of the module: :func:`send_message` writes one
message (and its fds) and :class:`MessageReader` reads whole messages with
their fds, bounded in size and fd count so that a hostile peer cannot make us
allocate gigabytes or leak descriptors.

This module is used by both sides: the server (:mod:`pyvfio.user.server`)
and the client (:mod:`pyvfio.user.client`).
"""

from __future__ import annotations

import array
import enum
import errno
import json
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyvfio.device import DeviceFlag, IrqAction, IrqFlag, RegionFlag
from pyvfio.errors import ConnectionClosed, ProtocolError

# The migration states and flags are vfio.h's, shared with the kernel backend.
from pyvfio.migration import MigFlag as MigrationFlag
from pyvfio.migration import MigState

__all__ = [
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_DMA_MAPS",
    "DEFAULT_MAX_MSG_FDS",
    "DEFAULT_PGSIZES",
    "HEADER",
    "HEADER_SIZE",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "Capabilities",
    "Command",
    "DeviceFeature",
    "DeviceInfoMsg",
    "DmaAccess",
    "DmaLoggingControl",
    "DmaLoggingRange",
    "DmaLoggingReport",
    "DmaMap",
    "DmaMapFlag",
    "DmaUnmap",
    "DmaUnmapFlag",
    "FeatureFlag",
    "FeatureIndex",
    "Header",
    "IoFdType",
    "IrqInfoMsg",
    "IrqSet",
    "Message",
    "MessageReader",
    "MigData",
    "MigState",
    "MigStateMsg",
    "MigrationFeature",
    "MigrationFlag",
    "MsgFlag",
    "RegionAccess",
    "RegionCapId",
    "RegionInfoMsg",
    "RegionIoFds",
    "RegionWriteMulti",
    "SubRegionIoFd",
    "Version",
    "WriteOne",
    "pack_message",
    "send_message",
]

VERSION_MAJOR = 0
"""Protocol major version spoken (libvfio-user and QEMU use 0)."""
VERSION_MINOR = 2
"""Highest minor version spoken; the reply carries min(client's, ours)."""

DEFAULT_MAX_MSG_FDS = 1
"""What a peer that does not state ``max_msg_fds`` can receive (spec)."""
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
"""Spec default for ``max_data_xfer_size``: 1 MiB."""
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096

MAX_MSG_FDS_LIMIT = 1024
"""We refuse to negotiate more fds per message than this (libvfio-user's
``VFIO_USER_CLIENT_MAX_MSG_FDS_LIMIT`` is 1024 too)."""
MAX_DATA_XFER_LIMIT = 64 << 20
"""We refuse transfers bigger than this whatever the peer says (QEMU's
``VFIO_USER_MAX_MAX_XFER``)."""
MAX_JSON_SIZE = 64 << 10
"""Version JSON larger than this is refused."""


class Command(enum.IntEnum):
    """``enum vfio_user_command``.  14 (the old ``DIRTY_PAGES``) is retired."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgFlag(enum.IntFlag):
    """Header ``flags``: type in bits 0-3, then No_reply and Error."""

    COMMAND = 0x0
    REPLY = 0x1
    TYPE_MASK = 0xF
    NO_REPLY = 0x10
    ERROR = 0x20


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


# --- header ----------------------------------------------------------------------------------

HEADER = struct.Struct("=HHIII")
"""``struct vfio_user_header``: msg_id u16, command u16, msg_size u32 (header
included), flags u32, error u32."""
HEADER_SIZE = HEADER.size  # 16


@dataclass(frozen=True)
class Header:
    """``struct vfio_user_header``."""

    msg_id: int
    command: int
    msg_size: int
    flags: int = 0
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & MsgFlag.TYPE_MASK == MsgFlag.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & MsgFlag.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & MsgFlag.ERROR)

    def pack(self) -> bytes:
        return _pack(HEADER, "header", self.msg_id, self.command, self.msg_size, self.flags,
                     self.error)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        _need(data, HEADER_SIZE, "header")
        msg_id, command, msg_size, flags, err = HEADER.unpack_from(data)
        if msg_size < HEADER_SIZE:
            raise _fail(f"header: msg_size {msg_size} is smaller than the header")
        return cls(msg_id, command, msg_size, flags, err)


def pack_message(msg_id: int, command: int, payload: bytes = b"", flags: int = 0,
                 error: int = 0) -> bytes:
    """Header plus payload, as one bytes object."""
    return _pack(HEADER, "header", msg_id, command, HEADER_SIZE + len(payload), flags,
                 error) + payload


# --- VERSION ---------------------------------------------------------------------------------


def _cap_int(caps: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = caps.get(name, default)
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise _fail(f"VERSION: capability {name!r} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise _fail(f"VERSION: capability {name!r} = {value} is outside [{lo}, {hi}]")
    return value


@dataclass(frozen=True)
class Capabilities:
    """The ``capabilities`` object of the VERSION JSON, with spec defaults.

    ``migration`` is libvfio-user's object (``pgsize``, ``max_bitmap_size``)
    that bounds the dirty bitmap of ``DMA_UNMAP`` with ``GET_DIRTY_BITMAP``;
    ``None`` when absent.  ``twin_socket`` is ``{"supported": bool,
    "fd_index": int}`` or ``None``.  ``extra`` keeps unknown keys so that a
    newer peer's capabilities survive a round trip.
    """

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    write_multiple: bool = False
    migration: dict[str, int] | None = None
    twin_socket: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN: ClassVar[frozenset[str]] = frozenset(
        {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple",
         "migration", "twin_socket"})

    @classmethod
    def from_json(cls, caps: Any) -> Capabilities:
        """Validate a decoded ``capabilities`` object (absent keys take the
        spec defaults)."""
        if not isinstance(caps, dict):
            raise _fail(f"VERSION: 'capabilities' must be an object, not {type(caps).__name__}")
        write_multiple = caps.get("write_multiple", False)
        if not isinstance(write_multiple, bool):
            raise _fail("VERSION: capability 'write_multiple' must be a boolean")
        migration = caps.get("migration")
        if migration is not None:
            if not isinstance(migration, dict):
                raise _fail("VERSION: capability 'migration' must be an object")
            migration = {
                "pgsize": _cap_int(migration, "pgsize", 4096, 1, 1 << 40),
                "max_bitmap_size": _cap_int(migration, "max_bitmap_size", 256 << 20, 0, 1 << 40),
            }
        twin = caps.get("twin_socket")
        if twin is not None:
            if not isinstance(twin, dict):
                raise _fail("VERSION: capability 'twin_socket' must be an object")
            supported = twin.get("supported", False)
            if not isinstance(supported, bool):
                raise _fail("VERSION: 'twin_socket.supported' must be a boolean")
            twin_out: dict[str, Any] = {"supported": supported}
            if "fd_index" in twin:
                twin_out["fd_index"] = _cap_int(twin, "fd_index", 0, 0, MAX_MSG_FDS_LIMIT)
            twin = twin_out
        pgsizes = _cap_int(caps, "pgsizes", DEFAULT_PGSIZES, 1, (1 << 64) - 1)
        return cls(
            max_msg_fds=_cap_int(caps, "max_msg_fds", DEFAULT_MAX_MSG_FDS, 0, MAX_MSG_FDS_LIMIT),
            max_data_xfer_size=_cap_int(caps, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE,
                                        1, (1 << 64) - 1),
            max_dma_maps=_cap_int(caps, "max_dma_maps", DEFAULT_MAX_DMA_MAPS, 0, (1 << 32) - 1),
            pgsizes=pgsizes,
            write_multiple=write_multiple,
            migration=migration,
            twin_socket=twin,
            extra={k: v for k, v in caps.items() if k not in cls._KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(max_msg_fds=self.max_msg_fds, max_data_xfer_size=self.max_data_xfer_size,
                   max_dma_maps=self.max_dma_maps, pgsizes=self.pgsizes)
        if self.write_multiple:
            out["write_multiple"] = True
        if self.migration is not None:
            out["migration"] = dict(self.migration)
        if self.twin_socket is not None:
            out["twin_socket"] = dict(self.twin_socket)
        return out


_VERSION = struct.Struct("=HH")


@dataclass(frozen=True)
class Version:
    """``struct vfio_user_version``: major u16, minor u16, then optional
    NUL-terminated UTF-8 JSON ``{"capabilities": {...}}``.

    ``capabilities`` is ``None`` when the message carried no JSON at all
    (every capability then takes its default)."""

    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    capabilities: Capabilities | None = None

    @property
    def caps(self) -> Capabilities:
        return self.capabilities if self.capabilities is not None else Capabilities()

    def pack(self) -> bytes:
        head = _pack(_VERSION, "VERSION", self.major, self.minor)
        if self.capabilities is None:
            return head
        text = json.dumps({"capabilities": self.capabilities.to_json()}, separators=(",", ":"))
        return head + text.encode() + b"\0"

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Version:
        _need(payload, _VERSION.size, "VERSION")
        major, minor = _VERSION.unpack_from(payload)
        raw = bytes(payload[_VERSION.size:])
        if not raw:
            return cls(major, minor, None)
        if len(raw) > MAX_JSON_SIZE:
            raise _fail(f"VERSION: JSON of {len(raw)} bytes is over {MAX_JSON_SIZE}", errno.E2BIG)
        if raw[-1] != 0:
            raise _fail("VERSION: version data is not NUL-terminated")
        text = raw[:-1]
        if 0 in text:
            raise _fail("VERSION: version data has a NUL inside the JSON")
        try:
            doc = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _fail(f"VERSION: version data is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _fail("VERSION: version data must be a JSON object")
        caps = doc.get("capabilities", {})
        return cls(major, minor, Capabilities.from_json(caps))


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


# --- DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS ---------------------------------------------------

_IRQ_INFO = struct.Struct("=IIII")


@dataclass(frozen=True)
class IrqInfoMsg:
    """``struct vfio_irq_info``: argsz, flags (``VFIO_IRQ_INFO_*``), index,
    count (u32).  The request sets argsz and index."""

    index: int
    argsz: int = _IRQ_INFO.size
    flags: int = 0
    count: int = 0

    SIZE: ClassVar[int] = _IRQ_INFO.size  # 16

    def pack(self) -> bytes:
        return _pack(_IRQ_INFO, "DEVICE_GET_IRQ_INFO", self.argsz, self.flags, self.index,
                     self.count)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, reply: bool = False) -> IrqInfoMsg:
        _need(payload, cls.SIZE, "DEVICE_GET_IRQ_INFO", exact=not reply)
        argsz, flags, index, count = _IRQ_INFO.unpack_from(payload)
        if argsz < cls.SIZE:
            raise _fail(f"DEVICE_GET_IRQ_INFO: argsz {argsz} < {cls.SIZE}")
        return cls(index, argsz, IrqFlag(flags), count)


_IRQ_SET = struct.Struct("=IIIII")
_DATA_MASK = int(IrqAction.DATA_NONE | IrqAction.DATA_BOOL | IrqAction.DATA_EVENTFD)
_ACTION_MASK = int(IrqAction.ACTION_MASK | IrqAction.ACTION_UNMASK | IrqAction.ACTION_TRIGGER)
MAX_IRQ_COUNT = 2048  # the PCI maximum of MSI-X vectors


@dataclass(frozen=True)
class IrqSet:
    """``struct vfio_irq_set``: argsz, flags, index, start, count (u32), then
    for ``DATA_BOOL`` ``count`` bytes of booleans.  For ``DATA_EVENTFD`` the
    eventfds travel as SCM_RIGHTS (none: de-assign the range).  ``argsz`` is
    the whole request payload (no reply payload).

    Exactly one DATA flag and one ACTION flag must be set; ``count`` is
    bounded by :data:`MAX_IRQ_COUNT`."""

    index: int
    flags: int
    start: int = 0
    count: int = 0
    bools: tuple[bool, ...] | None = None
    argsz: int | None = None

    SIZE: ClassVar[int] = _IRQ_SET.size  # 20

    @property
    def data_type(self) -> int:
        return self.flags & _DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & _ACTION_MASK

    def pack(self) -> bytes:
        data = b""
        if self.flags & IrqAction.DATA_BOOL:
            data = bytes(1 if b else 0 for b in (self.bools or ()))
        argsz = self.SIZE + len(data) if self.argsz is None else self.argsz
        return _pack(_IRQ_SET, "DEVICE_SET_IRQS", argsz, self.flags, self.index, self.start,
                     self.count) + data

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> IrqSet:
        _need(payload, cls.SIZE, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = _IRQ_SET.unpack_from(payload)
        if argsz != len(payload):
            raise _fail(f"DEVICE_SET_IRQS: argsz {argsz} != payload size {len(payload)}")
        if flags & ~(_DATA_MASK | _ACTION_MASK):
            raise _fail(f"DEVICE_SET_IRQS: unknown flags {flags:#x}")
        data_type, action = flags & _DATA_MASK, flags & _ACTION_MASK
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise _fail(f"DEVICE_SET_IRQS: flags {flags:#x} need exactly one DATA and one "
                        "ACTION flag")
        if count > MAX_IRQ_COUNT or start > MAX_IRQ_COUNT:
            raise _fail(f"DEVICE_SET_IRQS: start {start} count {count} out of range")
        bools: tuple[bool, ...] | None = None
        if data_type == IrqAction.DATA_BOOL:
            _need(payload, cls.SIZE + count, "DEVICE_SET_IRQS bools", exact=True)
            bools = tuple(bool(b) for b in bytes(payload[cls.SIZE:]))
        elif len(payload) != cls.SIZE:
            raise _fail(f"DEVICE_SET_IRQS: {len(payload) - cls.SIZE} bytes of data with "
                        f"flags {flags:#x}")
        return cls(index, flags, start, count, bools, argsz)


# --- REGION_READ / REGION_WRITE / REGION_WRITE_MULTI -----------------------------------------

REGION_ACCESS = struct.Struct("=QII")
"""``struct vfio_user_region_access``: offset u64, region u32, count u32, data."""


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


# --- framing ---------------------------------------------------------------------------------

_INT_SIZE = array.array("i").itemsize
# socket's flags are IntFlag members: ``&`` on them is slow on the per-message path.
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def send_message(sock: socket.socket, data: bytes | Sequence[bytes],
                 fds: Iterable[int] = ()) -> None:
    """Send one packed message (bytes, or a list of buffers) with ``fds`` as
    SCM_RIGHTS attached to its first byte.  Loops over short writes (the
    fds go with the first chunk only)."""
    buffers: list[Any] = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    fd_list = list(fds)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list))] if fd_list else []
    total = sum(len(b) for b in buffers)
    sent = sock.sendmsg(buffers, anc)
    if sent < total:
        # Rare: a signal or a full socket buffer cut the write short.  The
        # fds went with the first chunk; send the rest as plain bytes.
        rest = memoryview(b"".join(bytes(b) for b in buffers))[sent:]
        while len(rest):
            rest = rest[sock.send(rest):]


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Message:
    """A received message: header fields, payload, fds (owned by whoever
    takes the message; close them when done), and ``problem`` when the
    message could not be taken whole (too big, too many fds): the header is
    valid, the payload was discarded, and the receiver should answer with an
    error reply carrying ``problem.errno``."""

    __slots__ = ("command", "error", "fds", "flags", "msg_id", "payload", "problem")

    def __init__(self, msg_id: int, command: int, flags: int, error: int, payload: bytes,
                 fds: list[int], problem: ProtocolError | None = None) -> None:
        self.msg_id = msg_id
        self.command = command
        self.flags = flags
        self.error = error
        self.payload = payload
        self.fds = fds
        self.problem = problem

    @property
    def header(self) -> Header:
        return Header(self.msg_id, self.command, HEADER_SIZE + len(self.payload), self.flags,
                      self.error)

    # Plain ints, not MsgFlag: an IntFlag ``&`` builds an enum member, which
    # costs microseconds on the per-message path.
    @property
    def is_reply(self) -> bool:
        return self.flags & 0xF == 1  # MsgFlag.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & 0x10)  # MsgFlag.NO_REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & 0x20)  # MsgFlag.ERROR

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds = []

    def __repr__(self) -> str:
        try:
            name = Command(self.command).name
        except ValueError:
            name = str(self.command)
        kind = "reply" if self.is_reply else "command"
        return (f"<Message {kind} {name} id={self.msg_id} flags={self.flags:#x} "
                f"error={self.error} payload={len(self.payload)}B fds={self.fds}>")


class MessageReader:
    """Reads whole messages (with their SCM_RIGHTS fds) from a stream socket.

    One ``recvmsg`` usually returns one or several whole messages; a message
    split across reads is assembled in a buffer bounded by ``max_msg_size``.
    A message over that bound is not stored: its bytes are read and dropped
    and it is returned with ``problem`` set (``E2BIG``), so the stream stays
    in sync.  fds beyond ``max_fds`` are closed by the kernel (``MSG_CTRUNC``)
    and the message gets ``problem`` too.  A ``msg_size`` smaller than the
    header cannot be resynchronised: :meth:`read_some` raises
    :class:`ProtocolError` and the connection must be closed.

    The kernel never merges the bytes of two sends carrying fds into one
    read, and stops a read right after the send that carried fds, so fds
    received by one ``recvmsg`` belong to the last message that starts in
    that read (or, if none starts there, to the one being assembled).
    Received fds are ``O_CLOEXEC``.
    """

    def __init__(self, sock: socket.socket, *, max_msg_size: int = DEFAULT_MAX_DATA_XFER_SIZE + 4096,
                 max_fds: int = 16, bufsize: int = 65536) -> None:
        self.sock = sock
        self.max_msg_size = max_msg_size
        self.max_fds = max_fds
        self.bufsize = bufsize
        self._cmsg_space = socket.CMSG_SPACE(max_fds * _INT_SIZE)
        self._pending = b""  # bytes of an incomplete header / small message
        self._pending_fds: list[int] = []  # fds that came with those bytes
        self._pending_truncated = False
        self._big: bytearray | None = None  # payload being assembled
        self._big_view: memoryview | None = None
        self._big_have = 0
        self._big_head: tuple[int, int, int, int] | None = None
        self._big_fds: list[int] = []
        self._big_problem: ProtocolError | None = None
        self._discard = 0  # bytes left to drop of an oversized message
        self._queue: list[Message] = []
        self.eof = False

    @property
    def queued(self) -> int:
        """Whole messages already received and not yet taken by :meth:`read`
        (a client checks it so that a server command that arrived in the same
        read as a reply is not left waiting)."""
        return len(self._queue)

    def close(self) -> None:
        """Close every fd held in half-read or queued messages."""
        close_fds(self._big_fds)
        close_fds(self._pending_fds)
        self._big_fds = []
        self._pending_fds = []
        for m in self._queue:
            m.close_fds()
        self._queue.clear()

    def read(self) -> Message | None:
        """Block until one whole message is in; ``None`` on a clean EOF
        between messages.  Raises :class:`ConnectionClosed` on EOF inside a
        message."""
        while not self._queue:
            if self.eof:
                return None
            self._queue.extend(self.read_some())
        return self._queue.pop(0)

    def read_some(self) -> list[Message]:
        """One ``recvmsg``; the messages it completed (maybe none).  Sets
        ``eof`` on a clean end of stream."""
        if self._queue:
            out, self._queue = self._queue, []
            return out
        try:
            data, anc, msg_flags, _addr = self.sock.recvmsg(
                self.bufsize, self._cmsg_space, _MSG_CMSG_CLOEXEC)
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.close()
            raise ConnectionClosed(f"vfio-user peer broke the connection: {exc}") from None
        if not anc and len(data) >= HEADER_SIZE and not self._pending and self._big is None \
                and not self._discard:
            # Fast path: exactly one whole message and no fds (the common case).
            msg_id, command, msg_size, flags, err = HEADER.unpack_from(data)
            if msg_size == len(data):
                return [Message(msg_id, command, flags, err, data[HEADER_SIZE:], [])]
        fds: list[int] = []
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                n = len(cdata) // _INT_SIZE
                fds.extend(array.array("i", cdata[:n * _INT_SIZE]))
        truncated = bool(msg_flags & _MSG_CTRUNC)
        if not data:
            close_fds(fds)
            self.eof = True
            if self._pending or self._big is not None or self._discard:
                self.close()
                raise ConnectionClosed("vfio-user peer closed the connection inside a message")
            return []
        try:
            return self._feed(data, fds, truncated)
        except BaseException:
            close_fds(fds)
            raise

    def _feed(self, data: bytes, fds: list[int], truncated: bool) -> list[Message]:
        out: list[Message] = []
        pos = 0
        n = len(data)
        # 1. finish a message in progress (oversized-discard or big payload)
        if self._discard:
            take = min(self._discard, n)
            self._discard -= take
            pos = take
            if not self._discard:
                assert self._big_head is not None
                out.append(self._finish_big())
        elif self._big is not None:
            assert self._big_view is not None
            take = min(len(self._big) - self._big_have, n)
            self._big_view[self._big_have:self._big_have + take] = data[:take]
            self._big_have += take
            pos = take
            if self._big_have == len(self._big):
                out.append(self._finish_big())
        carry: list[int] = []
        if self._pending:
            data = self._pending + data[pos:]
            pos = 0
            n = len(data)
            self._pending = b""
            carry, self._pending_fds = self._pending_fds, []
            if self._pending_truncated:
                self._pending_truncated = False
                truncated = True
        last_start: Message | None = None
        # 2. whole messages in this chunk
        while pos < n:
            if n - pos < HEADER_SIZE:
                self._pending = data[pos:]
                self._pending_fds, carry = carry, []
                break
            msg_id, command, msg_size, flags, err = HEADER.unpack_from(data, pos)
            if msg_size < HEADER_SIZE:
                for m in out:
                    m.close_fds()
                close_fds(carry)
                raise _fail(f"message header claims msg_size {msg_size} < {HEADER_SIZE}; "
                            "the stream cannot be resynchronised")
            end = pos + msg_size
            if end <= n:
                m = Message(msg_id, command, flags, err, data[pos + HEADER_SIZE:end], carry)
                carry = []
                out.append(m)
                last_start = m
                pos = end
                continue
            # the message continues in later reads
            self._big_head = (msg_id, command, flags, err)
            self._big_fds, carry = carry, []
            have = n - pos - HEADER_SIZE
            if msg_size > self.max_msg_size:
                self._big_problem = _fail(
                    f"message of {msg_size} bytes is over the {self.max_msg_size}-byte limit",
                    errno.E2BIG)
                self._discard = msg_size - HEADER_SIZE - have
                self._big = None
            else:
                self._big_problem = None
                self._big = bytearray(msg_size - HEADER_SIZE)
                self._big_view = memoryview(self._big)
                self._big_view[:have] = data[pos + HEADER_SIZE:]
                self._big_have = have
            last_start = None
            pos = n
            # fds of this read belong to the message that starts here
            self._attach(None, fds, truncated)
            return out
        if fds or truncated:
            if last_start is not None:
                self._attach(last_start, fds, truncated)
            elif self._big is not None or self._discard:
                self._attach(None, fds, truncated)
            elif out:
                self._attach(out[-1], fds, truncated)
            else:  # only a header fragment so far: the fds wait for it
                self._pending_fds.extend(fds)
                if truncated:
                    self._pending_truncated = True
        return out

    def _attach(self, msg: Message | None, fds: list[int], truncated: bool) -> None:
        if msg is None:
            self._big_fds.extend(fds)
            if truncated and self._big_problem is None:
                self._big_problem = _fail("message carried more fds than allowed")
            return
        msg.fds.extend(fds)
        if truncated and msg.problem is None:
            msg.problem = _fail(f"message carried more than {self.max_fds} fds")

    def _finish_big(self) -> Message:
        assert self._big_head is not None
        msg_id, command, flags, err = self._big_head
        payload = bytes(self._big) if self._big is not None else b""
        m = Message(msg_id, command, flags, err, payload, self._big_fds, self._big_problem)
        self._big = None
        self._big_view = None
        self._big_have = 0
        self._big_head = None
        self._big_fds = []
        self._big_problem = None
        return m
