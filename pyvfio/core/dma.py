"""Memory for DMA: memfd-backed :class:`SharedMemory`, the IOVA
:class:`IovaAllocator`, the :class:`DmaSpace` every backend implements (a
legacy container, an iommufd IOAS, a vfio-user connection) and the
:class:`DmaBuffer` a driver gets.
"""

from __future__ import annotations

import abc
import bisect
import ctypes
import fcntl
import itertools
import mmap
import os
import threading
import weakref
from collections.abc import Iterable

from pyvfio.errors import ClosedError, IovaRangeError, UsageError

PAGE_SIZE = mmap.PAGESIZE


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

    def map_many(self, mappings: Iterable[tuple[int, SharedMemory]],
                 readable: bool = True, writable: bool = True) -> None:
        """Map several whole buffers, ``[(iova, memory), ...]``, all or none.

        Neither VFIO_IOMMU_MAP_DMA (type1) nor IOMMU_IOAS_MAP (iommufd) takes
        more than one range per call (``include/uapi/linux/vfio.h``,
        ``iommufd.h``), so a kernel backend still makes one ioctl per buffer;
        what a batch saves is the per-call work around it, and what it adds is
        atomicity.  Everything that can be refused up front is, before the
        first map: closed memory, an empty buffer, and two entries whose IOVA
        ranges overlap (:class:`UsageError`, :class:`ClosedError`).  When a map
        fails part way (the kernel's error, e.g. ``IovaRangeError`` or
        ``MemlockLimitError``), the buffers this call already mapped are
        unmapped again before the error propagates.
        """
        batch = list(mappings)
        spans = sorted((iova, iova + memory.size, n) for n, (iova, memory) in enumerate(batch))
        for n, (iova, memory) in enumerate(batch):
            if memory.closed:
                raise ClosedError(f"DMA map of closed memory (entry {n})")
            if memory.size <= 0 or iova < 0:
                raise UsageError(f"entry {n}: cannot map {memory.size:#x} bytes at {iova:#x}")
        for (start, end, n), (next_start, _end, m) in itertools.pairwise(spans):
            if next_start < end:
                raise UsageError(f"entries {n} and {m} overlap: IOVA {start:#x}..{end - 1:#x} "
                                 f"and {next_start:#x}")
        self._map_batch(batch, readable, writable)

    def _map_batch(self, batch: list[tuple[int, SharedMemory]], readable: bool,
                   writable: bool) -> None:
        """Map a checked batch (no overlaps, no closed memory), all or none.
        The default makes one :meth:`map` per entry and unmaps what it mapped
        on an error; a kernel backend overrides it to run every check of every
        entry before its first ioctl."""
        done: list[tuple[int, int]] = []
        try:
            for iova, memory in batch:
                self.map(iova, memory, 0, None, readable, writable)
                done.append((iova, memory.size))
        except BaseException:
            self._unmap_quietly(done)
            raise

    def _unmap_quietly(self, done: list[tuple[int, int]]) -> None:
        """Roll back a partly done batch: the first error is the one to report."""
        for iova, size in reversed(done):
            try:
                self.unmap(iova, size)
            except Exception:
                pass

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
