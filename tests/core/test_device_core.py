"""The backend-neutral core of pyvfio.device: IOVA allocation, memfd memory,
eventfds, region bounds and widths, IRQ and DMA bookkeeping.

A small in-memory backend stands in for a device here; every real backend is
exercised against real kernels (guest suites) and the real vfio-user server.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import pytest

from pyvfio.device import (
    PAGE_SIZE,
    Device,
    DeviceFlag,
    DeviceInfo,
    DmaBuffer,
    DmaSpace,
    EventFd,
    IovaAllocator,
    IrqAction,
    IrqFlag,
    IrqIndex,
    IrqInfo,
    RegionFlag,
    RegionInfo,
    SharedMemory,
    SparseArea,
)
from pyvfio.errors import ClosedError, IovaRangeError, UsageError

# --- IOVA allocator --------------------------------------------------------------------------


def test_allocator_skips_page_zero_and_respects_ranges() -> None:
    alloc = IovaAllocator([(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFF)])
    first = alloc.allocate(PAGE_SIZE)
    assert first == PAGE_SIZE
    assert alloc.contains(first, PAGE_SIZE)
    assert not alloc.contains(0xFEE00000, PAGE_SIZE)  # the MSI hole


def test_allocator_below_limit_and_exhaustion() -> None:
    alloc = IovaAllocator([(0, 0x10000 - 1)])
    a = alloc.allocate(0x8000, below=0x10000)
    assert a + 0x8000 <= 0x10000
    with pytest.raises(IovaRangeError, match="no free IOVA range"):
        alloc.allocate(0x10000)


def test_allocator_free_merges_and_reserve_checks() -> None:
    alloc = IovaAllocator([(0, 0xFFFFF)])
    a = alloc.allocate(0x2000)
    b = alloc.allocate(0x2000)
    alloc.free(a, 0x2000)
    alloc.free(b, 0x2000)
    # after merging, the whole range is one block again
    assert alloc.allocate(0xFF000) == PAGE_SIZE
    with pytest.raises(IovaRangeError, match="already in use"):
        alloc.reserve(0x10000, PAGE_SIZE)
    with pytest.raises(IovaRangeError, match="outside the valid ranges"):
        alloc.reserve(0x200000, PAGE_SIZE)


# --- memory and eventfds ---------------------------------------------------------------------


def test_shared_memory_is_visible_through_its_fd() -> None:
    mem = SharedMemory(2 * PAGE_SIZE)
    try:
        mem.view[10:15] = b"hello"
        assert os.pread(mem.fd, 5, 10) == b"hello"
        assert mem.address != 0
        other = SharedMemory.from_fd(os.dup(mem.fd), 2 * PAGE_SIZE)
        assert bytes(other.view[10:15]) == b"hello"
        other.close()
    finally:
        mem.close()
    mem.close()  # idempotent


def test_shared_memory_size_is_sealed() -> None:
    mem = SharedMemory(PAGE_SIZE)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 0)
    finally:
        mem.close()


def test_shared_memory_rejects_unaligned_size() -> None:
    with pytest.raises(UsageError, match="multiple of"):
        SharedMemory(100)


def test_eventfd_wait_and_timeout() -> None:
    with EventFd() as ev:
        assert ev.wait(0.01) == 0
        ev.signal(3)
        assert ev.wait(1) == 3
        assert ev.read() == 0
    with pytest.raises(ClosedError):
        ev.fileno()


# --- a device over an in-memory backend ------------------------------------------------------


class MemorySpace(DmaSpace):
    def __init__(self) -> None:
        self.maps: dict[int, tuple[SharedMemory, int]] = {}

    @property
    def iova_ranges(self) -> list[tuple[int, int]]:
        return [(0, 0xFFFFFFF)]

    def map(self, iova: int, memory: SharedMemory, offset: int = 0, size: int | None = None,
            *, readable: bool = True, writable: bool = True) -> None:
        self.maps[iova] = (memory, size or memory.size)

    def unmap(self, iova: int, size: int) -> None:
        del self.maps[iova]


class MemoryDevice(Device):
    backend = "memory"

    def __init__(self) -> None:
        super().__init__("mem0", MemorySpace())
        self.bar0 = bytearray(0x1000)
        self.irq_calls: list[tuple[int, IrqAction, int, int, object]] = []
        self.closed_backend = 0

    def _get_info(self) -> DeviceInfo:
        return DeviceInfo(DeviceFlag.PCI | DeviceFlag.RESET, 9, 5)

    def _get_region_info(self, index: int) -> RegionInfo:
        if index == 0:
            return RegionInfo(0, RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP, 0x1000,
                              mmap_areas=(SparseArea(0, 0x1000),))
        if index == 7:
            return RegionInfo(7, RegionFlag.READ | RegionFlag.WRITE, 256)
        return RegionInfo(index, RegionFlag(0), 0)

    def _region_read(self, index: int, offset: int, size: int) -> bytes:
        if index == 7:
            cfg = bytearray(256)
            cfg[0:4] = bytes.fromhex("3412e811")
            return bytes(cfg[offset:offset + size])
        return bytes(self.bar0[offset:offset + size])

    def _region_write(self, index: int, offset: int, data: bytes) -> None:
        self.bar0[offset:offset + len(data)] = data

    def _region_mmap(self, info: RegionInfo, offset: int, size: int) -> mmap.mmap:
        m = mmap.mmap(-1, size)
        m[:] = bytes(self.bar0[offset:offset + size])
        return m

    def _get_irq_info(self, index: int) -> IrqInfo:
        return IrqInfo(index, 4 if index == IrqIndex.MSIX else 1, IrqFlag.EVENTFD)

    def _set_irqs(self, index: int, flags: IrqAction, start: int, count: int,
                  data: Sequence[int] | Sequence[bool] | None) -> None:
        self.irq_calls.append((index, flags, start, count, data))

    def _reset(self) -> None:
        self.bar0[:] = bytes(len(self.bar0))

    def _close(self) -> None:
        self.closed_backend += 1


def test_region_access_widths_and_bounds() -> None:
    dev = MemoryDevice()
    bar = dev.bar(0)
    bar.write32(0x10, 0xDEADBEEF)
    assert bar.read32(0x10) == 0xDEADBEEF
    assert bar.read16(0x12) == 0xDEAD
    bar.write64(0x20, 0x1122334455667788)
    assert bar.read8(0x20) == 0x88
    with pytest.raises(UsageError, match="outside region 0"):
        bar.read32(0xFFE)
    with pytest.raises(UsageError, match="access width"):
        bar.read_int(0, 3)
    with pytest.raises(UsageError, match=r"regions 0\.\.8"):
        dev.region(9)


def test_mmap_checks_areas_and_width() -> None:
    dev = MemoryDevice()
    dev.bar(0).write32(4, 0xCAFEF00D)
    with dev.bar(0).mmap() as mapped:
        assert mapped.read32(4) == 0xCAFEF00D
        mapped.write16(8, 0xBEEF)
        assert mapped.read16(8) == 0xBEEF
        with pytest.raises(UsageError, match="unaligned"):
            mapped.read32(2)
    with pytest.raises(UsageError, match="cannot be mmapped"):
        dev.region(7).mmap()


@pytest.mark.parametrize("size", [0x1000, 0x3000])  # a BAR (power of two) and not
def test_mapped_accessors_refuse_every_bad_offset(size: int) -> None:
    from pyvfio.device import MappedRegion

    mapped = MappedRegion(MemoryDevice().bar(0), 0, mmap.mmap(-1, size))
    with mapped:
        for width in (1, 2, 4, 8):
            read = getattr(mapped, f"read{8 * width}")
            write = getattr(mapped, f"write{8 * width}")
            last = size - width
            write(last, -1)  # masked to the width
            assert read(last) == (1 << (8 * width)) - 1
            bad = [-width, size, size + width, 1 << 40]
            if width > 1:
                bad += [1, last + 1, size - 1]
            for offset in bad:
                with pytest.raises(UsageError, match="unaligned or out-of-range"):
                    read(offset)
                with pytest.raises(UsageError, match="unaligned or out-of-range"):
                    write(offset, 0)


def test_irq_enable_disable_unmask_records_vfio_semantics() -> None:
    dev = MemoryDevice()
    fds = dev.enable_irq(IrqIndex.MSIX, 4)
    assert len(fds) == 4
    index, flags, start, count, data = dev.irq_calls[-1]
    assert (index, start, count) == (IrqIndex.MSIX, 0, 4)
    assert flags == IrqAction.DATA_EVENTFD | IrqAction.ACTION_TRIGGER
    assert list(data or []) == [e.fd for e in fds]
    with pytest.raises(UsageError, match="4 vector"):
        dev.enable_irq(IrqIndex.MSIX, 5)
    # bad input loses nothing: the working vectors stay
    assert all(e.fd >= 0 for e in fds)
    dev.unmask_irq()
    assert dev.irq_calls[-1][1] == IrqAction.DATA_NONE | IrqAction.ACTION_UNMASK


def test_close_unmaps_buffers_and_is_idempotent() -> None:
    dev = MemoryDevice()
    space = dev.dma
    assert isinstance(space, MemorySpace)
    buf = dev.dma_alloc(3 * PAGE_SIZE, below=1 << 28)
    assert buf.size == 3 * PAGE_SIZE and buf.iova in space.maps
    buf.write(b"abc", 5)
    assert buf.read(5, 3) == b"abc"
    dev.enable_irq(IrqIndex.INTX)
    dev.close()
    dev.close()
    assert space.maps == {}
    assert dev.closed_backend == 1
    with pytest.raises(ClosedError):
        dev.region(0)


def test_config_and_describe() -> None:
    dev = MemoryDevice()
    assert dev.config.vendor_id == 0x1234
    assert dev.config.device_id == 0x11E8
    desc = dev.describe()
    assert desc["ids"]["vendor"] == "1234"
    assert desc["regions"][0]["mmap_areas"] == [{"offset": 0, "size": 0x1000}]
    assert desc["irqs"][IrqIndex.MSIX]["count"] == 4


def test_release_hands_over_without_teardown() -> None:
    dev = MemoryDevice()
    space = dev.dma
    assert isinstance(space, MemorySpace)
    buf = dev.dma_alloc(PAGE_SIZE)
    (ev,) = dev.enable_irq(IrqIndex.MSI)
    calls = len(dev.irq_calls)
    assert dev.irq_eventfds == {IrqIndex.MSI: [ev]} and dev.dma_buffers == [buf]
    dev.release()
    # no SET_IRQS teardown, no unmap: the mapping belongs to the successor now
    assert len(dev.irq_calls) == calls and buf.iova in space.maps
    assert dev.closed and buf.closed and ev.fd == -1 and dev.closed_backend == 1
    dev.release()
    dev.close()
    assert dev.closed_backend == 1


def test_adopted_buffers_and_irqs_are_torn_down_on_close() -> None:
    dev = MemoryDevice()
    space = dev.dma
    assert isinstance(space, MemorySpace)
    memory = SharedMemory(PAGE_SIZE)
    space.map(0x5000, memory)
    space.allocator.reserve(0x5000, PAGE_SIZE)
    buf = DmaBuffer(space, memory, 0x5000)
    dev.adopt_buffer(buf)
    dev.adopt_irq(IrqIndex.MSI, [EventFd()])
    with pytest.raises(UsageError, match="already enabled"):
        dev.adopt_irq(IrqIndex.MSI, [])
    dev.close()
    assert space.maps == {}
    assert dev.irq_calls[-1][1] == IrqAction.DATA_NONE | IrqAction.ACTION_TRIGGER
