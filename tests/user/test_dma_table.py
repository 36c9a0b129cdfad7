"""The vfio-user server's DMA windows (:class:`pyvfio.user.dma.DmaTable`) on
their own: every refusal with its errno, exact edges, accesses that span
windows, message-based windows, views, and dirty logging."""

from __future__ import annotations

import errno
import os
import random

import pytest

from pyvfio.device import SharedMemory
from pyvfio.user.dma import DmaFault, DmaTable

R, W, RW = 1, 2, 3
PAGE = 4096


@pytest.fixture
def mem():
    m = SharedMemory(4 * PAGE)
    yield m
    m.close()


def err(fn, *args, **kw) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args, **kw)
    return exc.value.errno


def test_add_refusals_and_their_errnos(mem) -> None:
    t = DmaTable(max_maps=3)
    assert err(t.add, 0x1000, 0x1000, 4) == errno.EINVAL          # unknown flag
    assert err(t.add, 0x1000, 0, RW) == errno.EINVAL              # empty
    assert err(t.add, 2**64 - PAGE, 2 * PAGE, RW) == errno.EINVAL  # wraps
    t.add(2**64 - PAGE, PAGE, RW)                                  # ends exactly at 2**64
    t.add(0x10000, 0x2000, RW, mem.fd)
    # neighbours touch, overlaps do not
    assert err(t.add, 0x11000, PAGE, RW) == errno.EEXIST
    assert err(t.add, 0xF000, 0x2000, RW) == errno.EEXIST
    assert err(t.add, 0x10000, 0x2000, RW) == errno.EEXIST
    t.add(0x12000, PAGE, RW)
    assert len(t) == 3
    assert err(t.add, 0x20000, PAGE, RW) == errno.ENOSPC          # max_maps
    t.remove(0x12000, PAGE)
    t.add(0xF000, PAGE, RW)                                        # right before 0x10000
    assert [(m.iova, m.size) for m in t.mappings] == \
        [(0xF000, PAGE), (0x10000, 0x2000), (2**64 - PAGE, PAGE)]
    t.remove_all()
    assert len(t) == 0 and t.mappings == []


def test_fd_windows_are_checked_against_the_file(mem) -> None:
    t = DmaTable()
    assert err(t.add, 0, PAGE, RW, mem.fd, 1) == errno.EINVAL         # offset not aligned
    assert err(t.add, 0, PAGE, RW, mem.fd, 4 * PAGE) == errno.EINVAL  # past the end
    assert err(t.add, 0, 5 * PAGE, RW, mem.fd) == errno.EINVAL        # longer than the file
    assert len(t) == 0
    w = t.add(0, PAGE, R, mem.fd, 3 * PAGE)                           # the last page exactly
    assert (w.iova, w.size, w.flags, w.offset, w.end, w.mapped) == (0, PAGE, R, 3 * PAGE,
                                                                    PAGE, True)
    os.pwrite(mem.fd, b"last page", 3 * PAGE)
    assert t.read(0, 9) == b"last page"


def test_remove_needs_the_exact_window(mem) -> None:
    t = DmaTable()
    t.add(0x1000, 0x2000, RW, mem.fd)
    for iova, size in ((0x1000, 0x1000), (0x2000, 0x1000), (0x0, 0x3000), (0x1000, 0x3000),
                       (0x5000, 0x1000)):
        assert err(t.remove, iova, size) == errno.ENOENT
    w = t.remove(0x1000, 0x2000)
    assert (w.iova, w.size, w.mapped) == (0x1000, 0x2000, False)
    assert len(t) == 0
    assert err(t.remove, 0x1000, 0x2000) == errno.ENOENT


def test_access_spans_adjacent_windows_and_no_gap(mem) -> None:
    t = DmaTable()
    t.add(0x1000, PAGE, RW, mem.fd, 0)
    t.add(0x2000, PAGE, RW, mem.fd, 2 * PAGE)  # adjacent IOVA, not adjacent in the file
    t.write(0x1FFE, b"abcd")
    assert os.pread(mem.fd, 2, PAGE - 2) == b"ab"
    assert os.pread(mem.fd, 2, 2 * PAGE) == b"cd"
    assert t.read(0x1FFE, 4) == b"abcd"
    buf = bytearray(4)
    t.readinto(0x1FFE, buf)
    assert buf == b"abcd"
    assert t.contains(0x1000, 2 * PAGE) and t.contains(0x1000, 0)
    assert not t.contains(0x1000, 2 * PAGE + 1)
    assert not t.contains(0xFFF, 2)
    t.add(0x4000, PAGE, RW, mem.fd)  # a gap at 0x3000
    with pytest.raises(DmaFault) as exc:
        t.read(0x2FFF, 2)
    assert exc.value.errno == errno.EFAULT
    assert "0x3000 is not mapped" in str(exc.value)
    for iova, size in ((-1, 1), (0, -1), (2**64 - 1, 2)):
        with pytest.raises(DmaFault) as exc:
            t.read(iova, size)
        assert exc.value.errno == errno.EFAULT


def test_window_protection(mem) -> None:
    t = DmaTable()
    t.add(0x1000, PAGE, R, mem.fd)
    t.add(0x2000, PAGE, W, mem.fd, PAGE)
    assert t.read(0x1000, 4) == b"\0\0\0\0"
    with pytest.raises(DmaFault) as exc:
        t.write(0x1000, b"x")
    assert exc.value.errno == errno.EACCES and "does not allow it" in str(exc.value)
    t.write(0x2000, b"y")
    with pytest.raises(DmaFault) as exc:
        t.read(0x2000, 1)
    assert exc.value.errno == errno.EACCES
    with pytest.raises(DmaFault) as exc:  # a read over both fails on the second
        t.read(0x1FFF, 2)
    assert exc.value.errno == errno.EACCES


def test_windows_without_fd_go_through_the_port() -> None:
    calls: list[tuple] = []

    def port_read(iova: int, size: int) -> bytes:
        calls.append(("read", iova, size))
        return bytes(range(size))

    def port_write(iova: int, data: bytes) -> None:
        calls.append(("write", iova, data))

    t = DmaTable(port=(port_read, port_write))
    w = t.add(0x1000, PAGE, RW)
    assert not w.mapped
    assert t.read(0x1010, 3) == b"\0\1\2"
    t.write(0x1020, b"hi")
    assert calls == [("read", 0x1010, 3), ("write", 0x1020, b"hi")]
    with pytest.raises(DmaFault) as exc:
        t.view(0x1000, 4)
    assert exc.value.errno == errno.EFAULT
    bare = DmaTable()
    bare.add(0, PAGE, RW)
    for fn, args in ((bare.read, (0, 1)), (bare.write, (0, b"x"))):
        with pytest.raises(DmaFault) as exc:
            fn(*args)
        assert exc.value.errno == errno.EFAULT and "no message channel" in str(exc.value)


def test_view_is_one_mapped_window(mem) -> None:
    t = DmaTable()
    t.add(0x1000, PAGE, RW, mem.fd)
    t.add(0x2000, PAGE, RW, mem.fd, PAGE)
    v = t.view(0x1008, 8, write=True)
    v[:] = b"12345678"
    v.release()
    assert os.pread(mem.fd, 8, 8) == b"12345678"
    with pytest.raises(DmaFault):
        t.view(0x1FFC, 8)  # spans two windows


def test_unmap_while_a_view_is_held_lingers_until_released(mem) -> None:
    t = DmaTable()
    t.add(0x1000, PAGE, RW, mem.fd)
    v = t.view(0x1000, 4)
    t.remove(0x1000, PAGE)  # the memory stays until the view goes
    assert len(t) == 0 and len(t._lingering) == 1
    v.release()
    t.add(0x5000, PAGE, RW, mem.fd)
    t.remove(0x5000, PAGE)  # reaps the lingering one too
    assert t._lingering == []


def test_dirty_logging_and_bitmaps(mem) -> None:
    t = DmaTable()
    t.add(0, 4 * PAGE, RW, mem.fd)
    t.write(0, b"x")
    assert t.dirty == set()  # logging off
    t.start_logging(PAGE)
    t.write(PAGE - 1, b"ab")  # pages 0 and 1
    t.write(3 * PAGE, b"")    # nothing
    assert t.dirty == {0, 1}
    t.view(3 * PAGE + 5, 1, write=True).release()
    t.view(2 * PAGE, 1).release()  # a read view marks nothing
    assert t.dirty == {0, 1, 3}
    # bit i = page i of the range, in u64 words
    assert t.dirty_bitmap(0, 4 * PAGE, PAGE, clear=False) == (0b1011).to_bytes(8, "little")
    # a range that starts at page 1, counted from there
    assert t.dirty_bitmap(PAGE, 3 * PAGE, PAGE, clear=False) == (0b101).to_bytes(8, "little")
    # a coarser report page: log pages 0,1 -> unit 0; page 3 -> unit 1
    assert t.dirty_bitmap(0, 4 * PAGE, 2 * PAGE, clear=False) == (0b11).to_bytes(8, "little")
    # a finer one: each log page sets two units
    assert t.dirty_bitmap(0, 2 * PAGE, PAGE // 2, clear=False) == (0b1111).to_bytes(8, "little")
    # more than 64 units: two words
    assert len(t.dirty_bitmap(0, 65 * PAGE, PAGE, clear=False)) == 16
    # clearing forgets only log pages wholly inside the range
    # [PAGE/2, 3 PAGE/2) is one report unit, touching dirty log pages 0 and 1
    assert t.dirty_bitmap(PAGE // 2, PAGE, PAGE) == (0b1).to_bytes(8, "little")
    assert t.dirty == {0, 1, 3}
    assert t.dirty_bitmap(0, 2 * PAGE, PAGE) == (0b11).to_bytes(8, "little")
    assert t.dirty == {3}
    assert t.dirty_bitmap(0, 2 * PAGE, PAGE) == bytes(8)
    t.stop_logging()
    assert (t.log_page_size, t.dirty) == (0, set())
    assert t.dirty_bitmap(0, 4 * PAGE, PAGE) == bytes(8)


def test_mark_dirty_edges() -> None:
    t = DmaTable()
    t.start_logging(PAGE)
    t.mark_dirty(PAGE, PAGE)      # exactly page 1
    assert t.dirty == {1}
    t.mark_dirty(5 * PAGE, 0)     # empty
    assert t.dirty == {1}
    t.mark_dirty(3 * PAGE - 1, PAGE + 2)  # pages 2, 3, 4
    assert t.dirty == {1, 2, 3, 4}


def test_messages_and_permissions_at_the_edges(mem) -> None:
    t = DmaTable()
    w = t.add(0x1000, PAGE, R, mem.fd)
    with pytest.raises(OSError, match=r"DMA_UNMAP: no window 0x1000\+0x2000"):
        t.remove(0x1000, 0x2000)
    with pytest.raises(DmaFault, match=r"DMA write of 0x5000\+0x1: 0x5000 is not mapped"):
        t.write(0x5000, b"x")
    with pytest.raises(DmaFault, match=r"DMA read of 0x5000\+0x1: 0x5000 is not mapped"):
        t.read(0x5000, 1)
    with pytest.raises(DmaFault, match=r"DMA write of 0x1000: window 0x1000\+0x1000 does not "):
        t.view(0x1000, 4, write=True)  # a read-only window gives no writable view
    t.add(0x2000, PAGE, W, mem.fd, PAGE)
    assert t.contains(0x1000, PAGE) and not t.contains(0x2000, 1)  # contains means readable
    t.add(0x3000, PAGE, R, mem.fd, 2 * PAGE)
    t.add(0x4000, PAGE, R, mem.fd, 3 * PAGE)
    with pytest.raises(DmaFault, match=r"DMA 0x3ffc\+0x8 is not inside one fd-mapped window"):
        t.view(0x3FFC, 8)
    # the top of the address space: a window may end exactly at 2**64
    t.add(2**64 - PAGE, PAGE, RW)
    assert t.contains(2**64 - PAGE, PAGE)
    with pytest.raises(DmaFault, match=r"DMA 0xffffffffffffffff\+0x2 is not a valid range"):
        t.read(2**64 - 1, 2)
    # an unmapped window lets go of its file; unmapping all twice is fine
    t.remove(0x1000, PAGE)
    assert w.view is None and w.file is None
    t.remove_all()
    t.remove_all()
    assert len(t) == 0 and t.files == 0


def test_access_over_three_windows(mem) -> None:
    t = DmaTable()
    for i in range(3):
        t.add(0x1000 * (i + 1), PAGE, RW, mem.fd, PAGE * i)
    data = random.Random(13).randbytes(9216)  # 0x1100..0x3500; no period to hide a shift
    t.write(0x1100, data)
    assert t.read(0x1100, len(data)) == data
    buf = bytearray(len(data))
    t.readinto(0x1100, buf)
    assert bytes(buf) == data
    assert os.pread(mem.fd, len(data), 0x100) == data


def test_dirty_edges_without_logging_and_in_bytes() -> None:
    t = DmaTable()
    t.mark_dirty(0, 10)  # logging off: nothing, and no division by zero
    assert t.dirty == set()
    t.dirty = {0}
    assert t.dirty_bitmap(0, PAGE, PAGE) == bytes(8)  # not logging: no bits
    t.start_logging(PAGE)
    t.mark_dirty(5 * PAGE + 1, 0)  # empty access inside a page
    assert t.dirty == set()
    t.mark_dirty(0, 1)
    # a 2-byte report unit over 5 bytes: 3 units, all in dirty log page 0
    assert t.dirty_bitmap(0, 5, 2, clear=False) == (0b111).to_bytes(8, "little")


def test_defaults_and_refusal_messages(mem) -> None:
    t = DmaTable(max_maps=1)
    assert DmaTable().max_maps == 65535  # the spec's default max_dma_maps
    assert (t.log_page_size, t.dirty) == (0, set())
    for call, text in (
            (lambda: t.add(0, PAGE, 4), "DMA_MAP: unknown flags 0x4"),
            (lambda: t.add(0x1000, 0, RW), r"DMA_MAP: bad window 0x1000\+0x0"),
            (lambda: t.add(0, PAGE, RW, mem.fd, 1), "DMA_MAP: fd offset 0x1 is not page aligned"),
            (lambda: t.add(0, 5 * PAGE, RW, mem.fd),
             r"DMA_MAP: 0x0\+0x5000 runs past the end of the 0x4000-byte file")):
        with pytest.raises(OSError, match=text):
            call()
    t.add(0x1000, PAGE, RW)
    with pytest.raises(OSError, match=r"DMA_MAP: already 1 windows \(max_dma_maps 1\)"):
        t.add(0x5000, PAGE, RW)
    t.max_maps = 2
    with pytest.raises(OSError, match=r"DMA_MAP: 0x1800\+0x1000 overlaps a mapped window"):
        t.add(0x1800, PAGE, RW)
    t.add(0x2000, PAGE, W, mem.fd)
    with pytest.raises(DmaFault, match=r"^DMA read of 0x2000: window 0x2000\+0x1000 does not "
                                       "allow it$"):
        t.read(0x2000, 1)


def test_mmap_protection_follows_the_flags(mem) -> None:
    t = DmaTable()
    ro = t.add(0x1000, PAGE, R, mem.fd)
    rw = t.add(0x2000, PAGE, RW, mem.fd, PAGE)
    assert ro.view is not None and ro.view.readonly
    assert rw.view is not None and not rw.view.readonly
    rw.view[0:2] = b"ok"
    assert os.pread(mem.fd, 2, PAGE) == b"ok"  # MAP_SHARED: the client sees it


def test_fd_zero_is_an_fd(mem) -> None:
    saved = os.dup(0)
    try:
        os.dup2(mem.fd, 0)
        t = DmaTable()
        w = t.add(0x1000, PAGE, RW, 0)
        assert w.mapped
        t.remove_all()
    finally:
        os.dup2(saved, 0)
        os.close(saved)


def test_remove_all_keeps_only_what_a_view_holds(mem) -> None:
    t = DmaTable()
    t.add(0x1000, PAGE, RW, mem.fd)
    t.add(0x2000, PAGE, RW, mem.fd, PAGE)
    t.remove_all()
    assert t._lingering == []
    t.add(0x1000, PAGE, RW, mem.fd)
    v = t.view(0x1000, 4)
    t.remove_all()
    assert len(t._lingering) == 1  # the file's mapping, kept for the view
    v.release()
    t.remove_all()
    assert t._lingering == []


def test_dirty_log_pages_just_outside_the_range_set_no_bit() -> None:
    t = DmaTable()
    t.start_logging(PAGE)
    t.mark_dirty(2 * PAGE, 1)  # log page 2 starts where the range ends
    # [PAGE/2, 2 PAGE): two report units, the second one partial
    assert t.dirty_bitmap(PAGE // 2, 3 * PAGE // 2, PAGE, clear=False) == bytes(8)
    t.mark_dirty(0, 1)         # log page 0 ends half a page before the range starts
    # 8-byte report units, finer than the log page: 256 units in 4 words
    assert t.dirty_bitmap(3 * PAGE // 2, PAGE // 2, 8, clear=False) == bytes(32)
    assert t.dirty == {0, 2}


def test_overlaps_edges() -> None:
    t = DmaTable()
    assert not t.overlaps(0, 2**64)                        # empty table
    t.add(0x1000, PAGE, RW)
    t.add(0x3000, PAGE, RW)
    assert not t.overlaps(0, 0x1000)                       # ends where the first begins
    assert not t.overlaps(0x2000, 0x1000)                  # between: touches both, no byte
    assert not t.overlaps(0x5000, 0x10)                    # past the last window
    assert t.overlaps(0x1FFF, 1) and t.overlaps(0x2FFF, 2) and t.overlaps(0, 0x1001)
    assert t.overlaps(0x3800, 0x10)                        # inside the second (i - 1 = 1)
    assert t.overlaps(0, 2**64)


def test_an_access_just_past_a_window_is_unmapped_not_forbidden() -> None:
    t = DmaTable()
    t.add(0x1000, PAGE, R)
    with pytest.raises(DmaFault) as exc:
        t.write(0x2000, b"x")                              # the byte after a read-only window
    assert exc.value.errno == errno.EFAULT
    assert exc.value.strerror == "DMA write of 0x2000+0x1: 0x2000 is not mapped"
