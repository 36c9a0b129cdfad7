"""The one device API.

A :class:`Device` is a VFIO device as a userspace driver sees it, whatever
carries it: the kernel's legacy container/group API, iommufd with a device
cdev, a vfio-user connection, or fds handed over by the broker.  A driver
written against this module runs on all of them unchanged.

The split follows QEMU's ``hw/vfio``: this module is the backend-neutral core
and imports no backend.  A backend subclasses :class:`Device` and fills in the
few ``_primitive`` methods (get region info, read, write, mmap, IRQ info,
set IRQs, reset, close); everything a driver calls — typed register access
with exact widths, BAR mmap, config space, eventfd interrupts, DMA buffers —
is written once here on top of them.

DMA goes through a :class:`DmaSpace` (a legacy container, an iommufd IOAS, or
a vfio-user connection's view of client memory).  Buffers are memfd-backed so
that every backend can map them: by virtual address (type1, IOAS_MAP), by file
(IOAS_MAP_FILE) or by passing the fd (vfio-user DMA_MAP), and so that a
successor process can inherit them (handoff).
"""

from __future__ import annotations

import abc
import bisect
import ctypes
import enum
import fcntl
import mmap
import os
import select
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvfio.errors import ClosedError, IovaRangeError, UsageError

if TYPE_CHECKING:
    from pyvfio.pci.config import ConfigSpace

__all__ = [
    "PAGE_SIZE",
    "Device",
    "DeviceFlag",
    "DeviceInfo",
    "DmaBuffer",
    "DmaSpace",
    "EventFd",
    "IovaAllocator",
    "IrqAction",
    "IrqFlag",
    "IrqIndex",
    "IrqInfo",
    "MappedRegion",
    "Region",
    "RegionFlag",
    "RegionIndex",
    "RegionInfo",
    "SharedMemory",
    "SparseArea",
]

PAGE_SIZE = mmap.PAGESIZE


# --- the values below are vfio.h's; the vfio-user protocol reuses them ----------------------


class DeviceFlag(enum.IntFlag):
    """``VFIO_DEVICE_FLAGS_*``."""

    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


class RegionFlag(enum.IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionIndex(enum.IntEnum):
    """``VFIO_PCI_*_REGION_INDEX``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class IrqFlag(enum.IntFlag):
    """``VFIO_IRQ_INFO_*``."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqIndex(enum.IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqAction(enum.IntFlag):
    """``VFIO_IRQ_SET_DATA_*`` | ``VFIO_IRQ_SET_ACTION_*``."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


# --- value types -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """``struct vfio_device_info``: flags and how many regions and IRQ indexes."""

    flags: DeviceFlag
    num_regions: int
    num_irqs: int

    def as_dict(self) -> dict[str, Any]:
        return {"flags": int(self.flags), "flag_names": _flag_names(self.flags),
                "num_regions": self.num_regions, "num_irqs": self.num_irqs}


@dataclass(frozen=True)
class SparseArea:
    """One mmap-able window of a region (``vfio_region_sparse_mmap_area``)."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """``struct vfio_region_info`` with its capabilities decoded.

    ``offset`` is where the region lives in the device fd (kernel) or the
    server's region fd (vfio-user); callers normally do not need it.
    ``mmap_areas`` lists where mmap is allowed: the whole region when the
    region is mmap-able and has no sparse capability, nothing when it is not.
    ``type`` is ``(type, subtype)`` from ``VFIO_REGION_INFO_CAP_TYPE``.
    ``caps`` lists the IDs of every capability the region reported
    (``VFIO_REGION_INFO_CAP_*``: 1 sparse mmap, 2 type, 3 MSI-X mappable).
    """

    index: int
    flags: RegionFlag
    size: int
    offset: int = 0
    mmap_areas: tuple[SparseArea, ...] = ()
    type: tuple[int, int] | None = None
    caps: tuple[int, ...] = ()

    @property
    def readable(self) -> bool:
        return bool(self.flags & RegionFlag.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & RegionFlag.WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & RegionFlag.MMAP) and bool(self.mmap_areas)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": _region_name(self.index),
            "size": self.size,
            "flags": int(self.flags),
            "flag_names": _flag_names(self.flags),
            "mmap_areas": [{"offset": a.offset, "size": a.size} for a in self.mmap_areas],
            "type": list(self.type) if self.type else None,
            "caps": list(self.caps),
        }


@dataclass(frozen=True)
class IrqInfo:
    """``struct vfio_irq_info``."""

    index: int
    count: int
    flags: IrqFlag

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": _irq_name(self.index), "count": self.count,
                "flags": int(self.flags), "flag_names": _flag_names(self.flags)}


def _flag_names(flags: enum.IntFlag) -> list[str]:
    return [f.name for f in type(flags) if f in flags and f.name]


def _region_name(index: int) -> str:
    try:
        return RegionIndex(index).name
    except ValueError:
        return f"REGION{index}"


def outside_region_error(device: str, index: int, size: int, offset: int, width: int
                         ) -> UsageError:
    """The error of an access outside a region, naming the device and region
    (shared by every backend's accessors so that they all say the same)."""
    region = f"region {index} ({_region_name(index)})"
    if size == 0:
        return UsageError(f"{device}: {region} is not implemented (size 0); "
                          f"`pyvfio info` lists the regions the device has")
    return UsageError(f"{device}: {width}-byte access at {offset:#x} is outside {region}, "
                      f"which is {size:#x} bytes")


def _irq_name(index: int) -> str:
    try:
        return IrqIndex(index).name
    except ValueError:
        return f"IRQ{index}"


# --- interrupts ------------------------------------------------------------------------------


class EventFd:
    """An eventfd the device signals.  ``wait()`` blocks until it fires (or the
    timeout passes) and returns the count read, 0 on timeout."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if fd is None else fd
        self._poller: select.poll | None = None

    def fileno(self) -> int:
        if self.fd < 0:
            raise ClosedError("eventfd is closed")
        return self.fd

    def wait(self, timeout: float | None = None) -> int:
        poller = self._poller
        if poller is None:  # made once: interrupt round trips are a hot path
            poller = select.poll()
            poller.register(self.fileno(), select.POLLIN)
            self._poller = poller
        elif self.fd < 0:
            raise ClosedError("eventfd is closed")
        if not poller.poll(None if timeout is None else int(timeout * 1000)):
            return 0
        return self.read()

    def read(self) -> int:
        """Return and clear the counter; 0 when it is not signalled."""
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0

    def signal(self, value: int = 1) -> None:
        os.eventfd_write(self.fileno(), value)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __repr__(self) -> str:
        return f"<EventFd fd={self.fd}>" if self.fd >= 0 else "<EventFd closed>"

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- memory for DMA --------------------------------------------------------------------------


class SharedMemory:
    """Anonymous memory backed by a memfd and mapped into this process.

    Backends map it into a device's IOVA space by address (``address``), by
    file (``fd`` + ``fd_offset``) or by sending the fd to a vfio-user server.
    """

    def __init__(self, size: int, name: str = "pyvfio-dma", *, fd: int | None = None,
                 fd_offset: int = 0) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise UsageError(f"DMA memory size must be a positive multiple of {PAGE_SIZE}: {size}")
        own = fd is None
        self.fd: int = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING) if fd is None else fd
        try:
            if own:
                os.ftruncate(self.fd, size)
                # Whoever we share this memory with (a vfio-user server, a
                # successor process) maps it; a shrink would turn their next
                # access into SIGBUS, so the size is sealed once set.
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.size = size
            self.fd_offset = fd_offset
            self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=fd_offset)
        except BaseException:
            if own:
                os.close(self.fd)
            raise
        self.view = memoryview(self.mmap)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.mmap))
        # The DMA spaces whose map fast path remembers this memory by identity
        # (DmaSpace._remember_memory): close() makes them forget it, so that a
        # closed buffer's stale address is never mapped again.
        self._remembered_by: weakref.WeakSet[DmaSpace] = weakref.WeakSet()

    @property
    def closed(self) -> bool:
        return self.fd < 0

    @classmethod
    def from_fd(cls, fd: int, size: int, fd_offset: int = 0) -> SharedMemory:
        """Map memory someone else created (a handed-over DMA buffer)."""
        return cls(size, fd=fd, fd_offset=fd_offset)

    def close(self) -> None:
        if self.fd < 0:
            return
        for space in list(self._remembered_by):
            space._forget_memory(self)
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:  # a caller still holds a view; the fd goes anyway
            pass
        os.close(self.fd)
        self.fd = -1


class IovaAllocator:
    """First-fit allocator of IOVA ranges inside the ranges the IOMMU translates.

    ``ranges`` are inclusive ``(start, last)`` pairs as the kernel reports them
    (type1 ``VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE``, ``IOMMU_IOAS_IOVA_RANGES``).
    Page 0 is never handed out, so that a zero IOVA always means a bug.
    """

    def __init__(self, ranges: Iterable[tuple[int, int]], align: int = PAGE_SIZE) -> None:
        self.align = align
        self._free: list[tuple[int, int]] = []  # sorted (start, end-exclusive)
        for start, last in sorted(ranges):
            start = max(start, align)
            start = -(-start // align) * align
            end = ((last + 1) // align) * align
            if end > start:
                self._free.append((start, end))
        self._ranges = list(self._free)
        self._lock = threading.Lock()

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The usable ranges as inclusive ``(start, last)`` pairs."""
        return [(s, e - 1) for s, e in self._ranges]

    def contains(self, iova: int, size: int) -> bool:
        return any(s <= iova and iova + size <= e for s, e in self._ranges)

    def allocate(self, size: int, *, below: int | None = None) -> int:
        """Reserve ``size`` bytes (rounded up to the alignment) and return the IOVA.
        ``below`` keeps the whole range under that address (for devices that
        only drive 28 or 32 address bits)."""
        size = -(-size // self.align) * self.align
        with self._lock:
            for i, (start, end) in enumerate(self._free):
                if end - start >= size and (below is None or start + size <= below):
                    if end - start == size:
                        del self._free[i]
                    else:
                        self._free[i] = (start + size, end)
                    return start
        where = f" below {below:#x}" if below is not None else ""
        raise IovaRangeError(f"no free IOVA range of {size:#x} bytes{where} in {self.ranges_text()}")

    def reserve(self, iova: int, size: int) -> None:
        """Take a fixed range out of the free list (a caller-chosen IOVA)."""
        size = -(-size // self.align) * self.align
        if iova % self.align or not self.contains(iova, size):
            raise IovaRangeError(f"IOVA {iova:#x}+{size:#x} is outside the valid ranges "
                                 f"{self.ranges_text()} or not aligned to {self.align:#x}")
        with self._lock:
            for i, (start, end) in enumerate(self._free):
                if start <= iova and iova + size <= end:
                    pieces = [(start, iova), (iova + size, end)]
                    self._free[i:i + 1] = [p for p in pieces if p[1] > p[0]]
                    return
        raise IovaRangeError(f"IOVA {iova:#x}+{size:#x} is already in use")

    def free(self, iova: int, size: int) -> None:
        size = -(-size // self.align) * self.align
        with self._lock:
            i = bisect.bisect_left(self._free, (iova, iova + size))
            self._free.insert(i, (iova, iova + size))
            merged: list[tuple[int, int]] = []
            for start, end in self._free:
                if merged and merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], end)
                else:
                    merged.append((start, end))
            self._free = merged

    def ranges_text(self) -> str:
        return ", ".join(f"[{s:#x}-{e:#x}]" for s, e in self.ranges) or "(none)"


class DmaSpace(abc.ABC):
    """An IOVA address space that devices DMA through.

    Implemented by the legacy container, an iommufd IOAS, and the vfio-user
    client's connection.  ``map`` makes ``size`` bytes of ``memory`` starting
    at ``offset`` visible to the device at ``iova``; ``unmap`` undoes it.
    """

    # Made on first use (:attr:`allocator`).  Subclasses set it to None in
    # __init__ too: attributes first set later, or through __dict__, cost
    # CPython its fast attribute access for the whole object, and the DMA
    # hot path reads several attributes per call.
    _iova_allocator: IovaAllocator | None = None
    # The memory of the last whole-buffer map, for backends whose map has a
    # fast path for repeating it (kernel legacy and iommufd).
    _last_memory: SharedMemory | None = None

    def _remember_memory(self, memory: SharedMemory) -> None:
        """Note that the map fast path now refers to ``memory``; its close()
        then calls :meth:`_forget_memory`."""
        memory._remembered_by.add(self)
        self._last_memory = memory

    def _forget_memory(self, memory: SharedMemory) -> None:
        if self._last_memory is memory:
            self._last_memory = None

    @property
    @abc.abstractmethod
    def iova_ranges(self) -> list[tuple[int, int]]:
        """Inclusive ``(start, last)`` ranges the device can reach."""

    # readable/writable are not keyword-only on purpose: CPython looks each
    # missing keyword-only default up in a dict on every call, which is a
    # measurable share of a map+unmap pair (benchmarks/iommufd_bench.py).
    @abc.abstractmethod
    def map(self, iova: int, memory: SharedMemory, offset: int = 0, size: int | None = None,
            readable: bool = True, writable: bool = True) -> None: ...

    @abc.abstractmethod
    def unmap(self, iova: int, size: int) -> None: ...

    @property
    def page_size(self) -> int:
        return PAGE_SIZE

    @property
    def allocator(self) -> IovaAllocator:
        alloc = self._iova_allocator
        if alloc is None:
            alloc = IovaAllocator(self.iova_ranges, self.page_size)
            self._iova_allocator = alloc
        return alloc

    def alloc_buffer(self, size: int, *, iova: int | None = None, below: int | None = None,
                     name: str = "pyvfio-dma") -> DmaBuffer:
        """Allocate memfd-backed memory, pick an IOVA for it (or take ``iova``)
        and map it.  The buffer unmaps and frees itself on ``close()``."""
        size = -(-size // self.page_size) * self.page_size
        memory = SharedMemory(size, name)
        try:
            if iova is None:
                iova = self.allocator.allocate(size, below=below)
            else:
                self.allocator.reserve(iova, size)
            try:
                self.map(iova, memory)
            except BaseException:
                self.allocator.free(iova, size)
                raise
        except BaseException:
            memory.close()
            raise
        return DmaBuffer(self, memory, iova)


class DmaBuffer:
    """Host memory mapped for device DMA at ``iova``.

    ``view`` is a writable memoryview of the memory; ``read``/``write`` are
    conveniences.  ``close()`` unmaps it from the device first, then releases
    the memory (that order is what keeps the device from writing into freed
    pages).
    """

    def __init__(self, space: DmaSpace, memory: SharedMemory, iova: int) -> None:
        self.space = space
        self.memory = memory
        self.iova = iova
        self.size = memory.size
        self._closed = False

    @property
    def view(self) -> memoryview:
        if self._closed:
            raise ClosedError(f"{self!r} is closed (unmapped and freed)")
        return self.memory.view

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        end = self.size if size is None else offset + size
        if not 0 <= offset <= end <= self.size:
            raise UsageError(f"{offset:#x}+{end - offset:#x} is outside {self!r}")
        return bytes(self.view[offset:end])

    def write(self, data: bytes, offset: int = 0) -> None:
        if not 0 <= offset <= offset + len(data) <= self.size:
            raise UsageError(f"writing {len(data):#x} bytes at {offset:#x} overruns {self!r}")
        self.view[offset:offset + len(data)] = data

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.space.unmap(self.iova, self.size)
            self.space.allocator.free(self.iova, self.size)
        finally:
            self.memory.close()

    def release(self) -> None:
        """Drop this process's hold on the memory but leave the mapping in
        place: another process that received the memfd (handoff) owns it now,
        and the device keeps reaching the pages through the IOMMU."""
        if not self._closed:
            self._closed = True
            self.memory.close()

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<DmaBuffer iova={self.iova:#x} size={self.size:#x}{state}>"


# --- regions ---------------------------------------------------------------------------------

_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


class Region:
    """One region of a device (a BAR, the ROM, config space).

    ``read``/``write`` go through the backend (pread/pwrite on the device fd,
    or REGION_READ/REGION_WRITE messages) as *one* access of exactly the
    given size, which is what device registers need.  ``mmap()`` maps the
    region (or a sparse area of it) for direct loads and stores.
    """

    def __init__(self, device: Device, info: RegionInfo) -> None:
        self.device = device
        self.info = info
        self.index = info.index
        self.size = info.size
        self._install_fast_paths()

    def _install_fast_paths(self) -> None:
        """Give this instance its own ``read8``..``write64``: one closure with a
        bounds test around the backend's reader/writer for this region
        (:meth:`Device._region_accessors`).  Register access is the hot path
        of a driver, and in CPython every call layer costs about as much as
        the ``pread`` itself; the methods below stay as the reference
        behaviour (and the fallback for subclasses)."""
        size, index, name = self.size, self.index, self.device.name
        native = self.device._region_int_accessors(self.info)
        if native is not None:
            for width, (read_n, write_n) in native.items():
                setattr(self, f"read{8 * width}", read_n)
                setattr(self, f"write{8 * width}", write_n)
            return
        reader, writer = self.device._region_accessors(self.info)
        from_bytes = int.from_bytes

        def bad(offset: int, width: int) -> UsageError:
            return outside_region_error(name, index, size, offset, width)

        def make(width: int) -> tuple[Callable[[int], int], Callable[[int, int], None]]:
            limit = size - width
            mask = (1 << (8 * width)) - 1

            def read_n(offset: int) -> int:
                if not 0 <= offset <= limit:
                    raise bad(offset, width)
                return from_bytes(reader(offset, width), "little")

            def write_n(offset: int, value: int) -> None:
                if not 0 <= offset <= limit:
                    raise bad(offset, width)
                writer(offset, (value & mask).to_bytes(width, "little"))

            return read_n, write_n

        for width in (1, 2, 4, 8):
            read_n, write_n = make(width)
            setattr(self, f"read{8 * width}", read_n)
            setattr(self, f"write{8 * width}", write_n)

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise outside_region_error(self.device.name, self.index, self.size, offset, size)

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return self.device._region_read(self.index, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.device._region_write(self.index, offset, bytes(data))

    def read_int(self, offset: int, width: int) -> int:
        fmt = _FORMATS.get(width)
        if fmt is None:
            raise UsageError(f"access width must be 1, 2, 4 or 8 bytes, not {width}")
        return int.from_bytes(self.read(offset, width), "little")

    def write_int(self, offset: int, width: int, value: int) -> None:
        if width not in _FORMATS:
            raise UsageError(f"access width must be 1, 2, 4 or 8 bytes, not {width}")
        self.write(offset, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))

    def read8(self, offset: int) -> int:
        return self.read_int(offset, 1)

    def read16(self, offset: int) -> int:
        return self.read_int(offset, 2)

    def read32(self, offset: int) -> int:
        return self.read_int(offset, 4)

    def read64(self, offset: int) -> int:
        return self.read_int(offset, 8)

    def write8(self, offset: int, value: int) -> None:
        self.write_int(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        self.write_int(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        self.write_int(offset, 4, value)

    def write64(self, offset: int, value: int) -> None:
        self.write_int(offset, 8, value)

    def mmap(self, offset: int = 0, size: int | None = None) -> MappedRegion:
        """Map ``size`` bytes at ``offset`` (default: the first mmap area)."""
        areas = self.info.mmap_areas
        if not (self.info.flags & RegionFlag.MMAP) or not areas:
            raise UsageError(f"region {self.index} of {self.device.name} cannot be mmapped")
        if size is None:
            area = next((a for a in areas if a.offset <= offset < a.offset + a.size), None)
            if area is None:
                raise UsageError(f"offset {offset:#x} is in no mmap area of region {self.index}")
            size = area.offset + area.size - offset
        if not any(a.offset <= offset and offset + size <= a.offset + a.size for a in areas):
            raise UsageError(f"{offset:#x}+{size:#x} is not inside one mmap area of region "
                             f"{self.index}: {[(a.offset, a.size) for a in areas]}")
        return MappedRegion(self, offset, self.device._region_mmap(self.info, offset, size))

    def __repr__(self) -> str:
        return f"<Region {_region_name(self.index)} size={self.size:#x} flags={self.info.flags!r}>"


class MappedRegion:
    """A region mapped into this process.  ``read32``/``write32`` (and the 8-,
    16- and 64-bit forms) each compile to one load or store of that width,
    because they go through a memoryview cast to that item size."""

    def __init__(self, region: Region, offset: int, mapping: mmap.mmap) -> None:
        self.region = region
        self.offset = offset
        self.mmap = mapping
        self.size = len(mapping)
        raw = memoryview(mapping)
        self._views: dict[int, memoryview] = {
            w: raw.cast(f) for w, f in _FORMATS.items() if self.size % w == 0  # type: ignore[call-overload]
        }
        self._raw = raw
        # Per-instance accessors: one alignment/bounds test and one memoryview
        # item access, no helper call -- a mapped register read is a single
        # load, and the Python around it is the whole cost (benchmarks/).
        for width, view in self._views.items():
            read_n, write_n = self._accessors(view, width)
            setattr(self, f"read{8 * width}", read_n)
            setattr(self, f"write{8 * width}", write_n)

    def _accessors(self, view: memoryview, width: int
                   ) -> tuple[Callable[[int], int], Callable[[int, int], None]]:
        shift = width.bit_length() - 1
        misaligned = width - 1
        limit = self.size - width
        mask = (1 << (8 * width)) - 1

        def bad(offset: int) -> UsageError:
            return UsageError(f"unaligned or out-of-range {width}-byte access at {offset:#x}")

        if self.size & (self.size - 1) == 0:
            # BARs are powers of two: then one AND finds a misaligned, negative
            # (Python ints have infinite sign bits) or too large offset.  A
            # register read is one Python frame, so every test in it counts.
            invalid = ~(self.size - 1) | misaligned

            def read_n(offset: int) -> int:
                if offset & invalid:
                    raise bad(offset)
                return view[offset >> shift]

            def write_n(offset: int, value: int) -> None:
                if offset & invalid:
                    raise bad(offset)
                view[offset >> shift] = value & mask

            return read_n, write_n

        def read_any(offset: int) -> int:
            if offset & misaligned or not 0 <= offset <= limit:
                raise bad(offset)
            return view[offset >> shift]

        def write_any(offset: int, value: int) -> None:
            if offset & misaligned or not 0 <= offset <= limit:
                raise bad(offset)
            view[offset >> shift] = value & mask

        return read_any, write_any

    def _view(self, offset: int, width: int) -> memoryview:
        if offset % width or offset < 0 or offset + width > self.size:
            raise UsageError(f"unaligned or out-of-range {width}-byte access at {offset:#x}")
        return self._views[width]

    def read8(self, offset: int) -> int:
        return int(self._view(offset, 1)[offset])

    def read16(self, offset: int) -> int:
        return int(self._view(offset, 2)[offset >> 1])

    def read32(self, offset: int) -> int:
        return int(self._view(offset, 4)[offset >> 2])

    def read64(self, offset: int) -> int:
        return int(self._view(offset, 8)[offset >> 3])

    def write8(self, offset: int, value: int) -> None:
        self._view(offset, 1)[offset] = value & 0xFF

    def write16(self, offset: int, value: int) -> None:
        self._view(offset, 2)[offset >> 1] = value & 0xFFFF

    def write32(self, offset: int, value: int) -> None:
        self._view(offset, 4)[offset >> 2] = value & 0xFFFFFFFF

    def write64(self, offset: int, value: int) -> None:
        self._view(offset, 8)[offset >> 3] = value & 0xFFFFFFFFFFFFFFFF

    def close(self) -> None:
        for v in self._views.values():
            v.release()
        self._views.clear()
        self._raw.release()
        self.mmap.close()

    def __enter__(self) -> MappedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the device ------------------------------------------------------------------------------


@dataclass
class _IrqState:
    eventfds: list[EventFd] = field(default_factory=list)


class Device(abc.ABC):
    """A VFIO device, backend-neutral.  Use as a context manager.

    Attributes: ``name`` (a PCI address for kernel devices, the socket path
    for vfio-user), ``backend`` ("legacy", "iommufd", "vfio-user"),
    ``backend_reason`` (why that backend was chosen), ``dma`` (the
    :class:`DmaSpace` the device's DMA goes through, or ``None``).
    """

    backend: str = "?"
    backend_reason: str = ""

    def __init__(self, name: str, dma: DmaSpace | None = None) -> None:
        self.name = name
        self.dma = dma
        self._info: DeviceInfo | None = None
        self._regions: dict[int, Region] = {}
        self._irqs: dict[int, _IrqState] = {}
        self._buffers: list[DmaBuffer] = []
        self._config: ConfigSpace | None = None
        self._closed = False

    # ---- what a backend implements ----

    @abc.abstractmethod
    def _get_info(self) -> DeviceInfo: ...

    @abc.abstractmethod
    def _get_region_info(self, index: int) -> RegionInfo: ...

    @abc.abstractmethod
    def _region_read(self, index: int, offset: int, size: int) -> bytes: ...

    @abc.abstractmethod
    def _region_write(self, index: int, offset: int, data: bytes) -> None: ...

    @abc.abstractmethod
    def _region_mmap(self, info: RegionInfo, offset: int, size: int) -> mmap.mmap: ...

    def _region_accessors(self, info: RegionInfo
                          ) -> tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]]:
        """``(read(offset, size), write(offset, data))`` for one region, used by
        :class:`Region`'s fast register accessors.  A backend may return
        closures with its per-region state bound (the kernel backend binds
        the fd and the region's offset); the default goes through
        ``_region_read``/``_region_write``."""
        index = info.index

        def read(offset: int, size: int) -> bytes:
            return self._region_read(index, offset, size)

        def write(offset: int, data: bytes) -> None:
            self._region_write(index, offset, data)

        return read, write

    def _region_int_accessors(self, info: RegionInfo
                              ) -> dict[int, tuple[Callable[[int], int],
                                                   Callable[[int, int], None]]] | None:
        """Optionally, complete ``{width: (read_n(offset), write_n(offset, value))}``
        register accessors for one region (bounds checks included), for a
        backend that can do an access in a single Python frame.  None (the
        default): :class:`Region` builds them on :meth:`_region_accessors`."""
        return None

    @abc.abstractmethod
    def _get_irq_info(self, index: int) -> IrqInfo: ...

    @abc.abstractmethod
    def _set_irqs(self, index: int, flags: IrqAction, start: int, count: int,
                  data: Sequence[int] | Sequence[bool] | None) -> None:
        """``VFIO_DEVICE_SET_IRQS``: ``data`` is a list of fds (-1 to tear one
        down) for DATA_EVENTFD, a list of bools for DATA_BOOL, else None."""

    @abc.abstractmethod
    def _reset(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the backend's fds.  Called once, after the core has torn
        down IRQs and DMA buffers."""

    # ---- public API ----

    def _ensure_open(self) -> None:
        if self._closed:
            raise ClosedError(f"device {self.name} is closed")

    @property
    def info(self) -> DeviceInfo:
        self._ensure_open()
        if self._info is None:
            self._info = self._get_info()
        return self._info

    def region_info(self, index: int) -> RegionInfo:
        return self.region(index).info

    def region(self, index: int) -> Region:
        self._ensure_open()
        region = self._regions.get(index)
        if region is None:
            if not 0 <= index < self.info.num_regions:
                raise UsageError(f"{self.name} has regions 0..{self.info.num_regions - 1}, "
                                 f"not {index}")
            region = Region(self, self._get_region_info(index))
            self._regions[index] = region
        return region

    def regions(self) -> list[RegionInfo]:
        """Info of every region the device reports (including empty ones)."""
        return [self.region(i).info for i in range(self.info.num_regions)]

    def bar(self, n: int) -> Region:
        if not 0 <= n <= 5:
            raise UsageError(f"BAR number must be 0..5, not {n}")
        return self.region(n)

    @property
    def config(self) -> ConfigSpace:
        """PCI config space (region 7) with capability walking."""
        if self._config is None:
            from pyvfio.pci.config import ConfigSpace

            region = self.region(RegionIndex.CONFIG)
            self._config = ConfigSpace(region.read, region.write, size=region.size,
                                       name=self.name)
        return self._config

    def irq_info(self, index: int) -> IrqInfo:
        self._ensure_open()
        if not 0 <= index < self.info.num_irqs:
            raise UsageError(f"{self.name} has IRQ indexes 0..{self.info.num_irqs - 1}, not {index}")
        return self._get_irq_info(index)

    def irqs(self) -> list[IrqInfo]:
        return [self._get_irq_info(i) for i in range(self.info.num_irqs)]

    def set_irqs(self, index: int, flags: IrqAction, start: int = 0, count: int = 0,
                 data: Sequence[int] | Sequence[bool] | None = None) -> None:
        """Raw ``VFIO_DEVICE_SET_IRQS``, for what the helpers below do not cover."""
        self._ensure_open()
        self._set_irqs(index, IrqAction(flags), start, count, data)

    def enable_irq(self, index: int, count: int = 1) -> list[EventFd]:
        """Route ``count`` vectors of IRQ ``index`` to new eventfds and return them.
        For MSI/MSI-X this enables the vectors; for INTx remember to
        :meth:`unmask_irq` after handling each interrupt (INTx is auto-masked)."""
        info = self.irq_info(index)
        if count < 1 or count > info.count:
            raise UsageError(f"IRQ index {_irq_name(index)} of {self.name} has {info.count} "
                             f"vector(s); cannot enable {count}")
        self.disable_irq(index)
        fds = [EventFd() for _ in range(count)]
        try:
            self._set_irqs(index, IrqAction.DATA_EVENTFD | IrqAction.ACTION_TRIGGER, 0, count,
                           [e.fd for e in fds])
        except BaseException:
            for e in fds:
                e.close()
            raise
        self._irqs[index] = _IrqState(fds)
        return fds

    def disable_irq(self, index: int) -> None:
        """Tear down all vectors of IRQ ``index`` (DATA_NONE|TRIGGER, count 0)."""
        state = self._irqs.pop(index, None)
        if state is None:
            return
        try:
            self._set_irqs(index, IrqAction.DATA_NONE | IrqAction.ACTION_TRIGGER, 0, 0, None)
        finally:
            for e in state.eventfds:
                e.close()

    def unmask_irq(self, index: int = IrqIndex.INTX, vector: int = 0) -> None:
        self._set_irqs(index, IrqAction.DATA_NONE | IrqAction.ACTION_UNMASK, vector, 1, None)

    def mask_irq(self, index: int = IrqIndex.INTX, vector: int = 0) -> None:
        self._set_irqs(index, IrqAction.DATA_NONE | IrqAction.ACTION_MASK, vector, 1, None)

    def dma_alloc(self, size: int, *, iova: int | None = None,
                  below: int | None = None) -> DmaBuffer:
        """Allocate a DMA buffer mapped into the device's IOVA space.  It is
        unmapped when closed, at the latest when the device closes."""
        self._ensure_open()
        if self.dma is None:
            raise UsageError(f"{self.name} has no DMA address space")
        buf = self.dma.alloc_buffer(size, iova=iova, below=below)
        self._buffers.append(buf)
        return buf

    def reset(self) -> None:
        self._ensure_open()
        self._reset()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Disable IRQs, unmap this device's DMA buffers, then release the
        backend.  Idempotent."""
        if self._closed:
            return
        try:
            for index in list(self._irqs):
                try:
                    self.disable_irq(index)
                except OSError:
                    pass
            for buf in self._buffers:
                try:
                    buf.close()
                except OSError:
                    pass
            self._buffers.clear()
        finally:
            self._closed = True
            self._close()

    # ---- handing a live device to another process ----

    @property
    def irq_eventfds(self) -> dict[int, list[EventFd]]:
        """The eventfds of each enabled IRQ index (what the kernel signals)."""
        return {index: list(state.eventfds) for index, state in self._irqs.items()}

    @property
    def dma_buffers(self) -> list[DmaBuffer]:
        """The DMA buffers allocated through :meth:`dma_alloc` and not closed."""
        return [b for b in self._buffers if not b.closed]

    def adopt_irq(self, index: int, eventfds: Sequence[EventFd]) -> None:
        """Take over eventfds already routed to IRQ ``index`` (by a previous
        owner of the device): no SET_IRQS call, the vectors stay as they are."""
        self._ensure_open()
        if index in self._irqs:
            raise UsageError(f"IRQ index {_irq_name(index)} of {self.name} is already enabled")
        self._irqs[index] = _IrqState(list(eventfds))

    def adopt_buffer(self, buffer: DmaBuffer) -> None:
        """Take over a buffer that is already mapped (a handed-over memfd):
        it is unmapped when the device closes, like one from :meth:`dma_alloc`."""
        self._ensure_open()
        self._buffers.append(buffer)

    def release(self) -> None:
        """Close this process's fds *without* the teardown :meth:`close` does:
        no IRQ disable, no DMA unmap, no reset.  For a device handed over to
        another process, whose copies of the fds keep the device, its vectors
        and its mappings live.  Idempotent."""
        if self._closed:
            return
        for buf in self._buffers:
            buf.release()
        self._buffers.clear()
        for state in self._irqs.values():
            for e in state.eventfds:
                e.close()
        self._irqs.clear()
        self._closed = True
        self._close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """What ``pyvfio info --json`` prints: backend, IDs, regions, IRQs."""
        out: dict[str, Any] = {"device": self.name, "backend": self.backend,
                               "backend_reason": self.backend_reason,
                               "info": self.info.as_dict()}
        if self.info.flags & DeviceFlag.PCI and self.info.num_regions > RegionIndex.CONFIG:
            hdr = self.region(RegionIndex.CONFIG).read(0, 64)
            vendor, device, _cmd, _sts, rev = struct.unpack_from("<HHHHB", hdr)
            class_code = int.from_bytes(hdr[9:12], "little")
            svid, sdid = struct.unpack_from("<HH", hdr, 0x2C)
            out["ids"] = {"vendor": f"{vendor:04x}", "device": f"{device:04x}",
                          "subsystem_vendor": f"{svid:04x}", "subsystem_device": f"{sdid:04x}",
                          "class": f"{class_code:06x}", "revision": f"{rev:02x}"}
        out["regions"] = [r.as_dict() for r in self.regions()]
        out["irqs"] = [i.as_dict() for i in self.irqs()]
        return out

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.backend
        return f"<{type(self).__name__} {self.name} ({state})>"
