"""Typed register views, block register access and batched DMA maps, through
the vfio-user backend against a served model (the kernel backends are covered
by tests/guest/test_register_batch.py on real kernels)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator

import pytest

from pyvfio.device import SharedMemory
from pyvfio.devices.edu import EduDevice
from pyvfio.errors import ClosedError, PeerError, UsageError
from pyvfio.user.client import VfioUserDevice, connect

try:
    from .conftest import ScratchDevice
except ImportError:
    from conftest import ScratchDevice  # type: ignore[no-redef]


@pytest.fixture
def dev(serve: Callable[..., str], scratch: ScratchDevice) -> Iterator[VfioUserDevice]:
    with connect(serve(scratch)) as d:
        yield d


def test_typed_views_are_the_registers(dev: VfioUserDevice, scratch: ScratchDevice) -> None:
    bar = dev.bar(0)
    with bar.mmap(4096) as m:  # the mmap-able part of the scratch BAR0: 4096..16383
        m.u32[3] = 0xDEADBEEF
        assert scratch.ram.view[4096 + 12:4096 + 16].tobytes() == struct.pack("<I", 0xDEADBEEF)
        assert m.read32(12) == 0xDEADBEEF
        assert m.u16[6] == 0xBEEF and m.u16[7] == 0xDEAD
        assert m.u8[12] == 0xEF
        m.u64[2] = 0x0123456789ABCDEF
        assert bar.read64(4096 + 16) == 0x0123456789ABCDEF  # the same bytes through REGION_READ
        assert len(m.u32) == m.size // 4 and len(m.u64) == m.size // 8
        with pytest.raises(IndexError):
            m.u32[m.size // 4]
        with pytest.raises(ValueError):
            m.u8[0] = 256
    with pytest.raises(UsageError, match="closed"):
        m.u32  # noqa: B018


def test_read_block_is_one_region_read(dev: VfioUserDevice, scratch: ScratchDevice) -> None:
    bar = dev.bar(0)
    values = [(i * 0x01010101) & 0xFFFFFFFF for i in range(16)]
    scratch.ram.view[4096:4096 + 64] = struct.pack("<16I", *values)
    before = len(scratch.writes)
    assert bar.read_block(4096, 16) == values
    assert bar.read_block(4096, 8, width=8) == list(struct.unpack("<8Q", struct.pack("<16I",
                                                                                     *values)))
    assert bar.read_block(4096 + 4, 3, width=2) == [values[1] & 0xFFFF, values[1] >> 16,
                                                    values[2] & 0xFFFF]
    assert bar.read_block(4096, 0) == []
    # the trapped first page goes through the model's callback, one access of
    # the register width each, in address order
    bar.write_block(0x100, [0x11223344, 0x55667788, 0x1_FFFFFFFF])
    assert scratch.writes[before:] == [(0x100, struct.pack("<I", 0x11223344)),
                                       (0x104, struct.pack("<I", 0x55667788)),
                                       (0x108, struct.pack("<I", 0xFFFFFFFF))]
    assert bar.read_block(0x100, 3) == [0x11223344, 0x55667788, 0xFFFFFFFF]


def test_blocks_keep_the_register_width(serve: Callable[..., str], edu: EduDevice) -> None:
    """edu answers only 4-byte accesses below 0x80 (an 8-byte one reads all
    ones), so a block of its registers must not become wider accesses."""
    with connect(serve(edu)) as dev:
        bar = dev.bar(0)
        bar.write_block(0x04, [0x0F0F0F0F])
        assert bar.read_block(0x00, 3) == [0x010000ED, 0xF0F0F0F0, edu.fact]
        # more registers than one pipelined slice: every one answered, in order
        assert bar.read_block(0x00, 150)[:2] == [0x010000ED, 0xF0F0F0F0]
        assert len(bar.read_block(0x00, 150)) == 150


def test_a_failed_register_in_a_block_raises_and_keeps_the_stream(
        dev: VfioUserDevice) -> None:
    """Offset 0x800 of the scratch BAR0 fails (EIO): the error comes out after
    every pipelined reply was read, and the next access still works."""
    with pytest.raises(PeerError) as info:
        dev.bar(0).read_block(0x7F8, 4)
    assert info.value.errno == errno.EIO
    assert dev.bar(0).read_block(0x7F0, 2) == [0, 0]


@pytest.mark.parametrize(("offset", "count", "width", "match"), [
    (2, 4, 4, "multiple of 4"),
    (0, 4, 3, "width"),
    (0, -1, 4, ">= 0"),
    (16384 - 8, 3, 4, "outside"),
])
def test_bad_blocks_are_refused_before_any_access(dev: VfioUserDevice, scratch: ScratchDevice,
                                                  offset: int, count: int, width: int,
                                                  match: str) -> None:
    before = len(scratch.writes)
    with pytest.raises(UsageError, match=match):
        dev.bar(0).read_block(offset, count, width)
    if count >= 0:  # write_block's count is the length of its values
        with pytest.raises(UsageError, match=match):
            dev.bar(0).write_block(offset, [0] * count, width)
    assert len(scratch.writes) == before


def test_map_many_maps_all_or_none(dev: VfioUserDevice) -> None:
    assert dev.dma is not None
    mems = [SharedMemory(4096) for _ in range(4)]
    try:
        dev.dma.map_many([(0x10000 * (i + 1), m) for i, m in enumerate(mems)])
        assert sorted(m.iova for m in dev.dma.mappings) == [0x10000, 0x20000, 0x30000, 0x40000]
        for i in range(4):
            dev.dma.unmap(0x10000 * (i + 1), 4096)
        # An overlap inside the batch is refused before the first map.
        with pytest.raises(UsageError, match="overlap"):
            dev.dma.map_many([(0x10000, mems[0]), (0x50000, mems[1]), (0x50800, mems[2])])
        assert dev.dma.mappings == []
        # A failure part way (the third overlaps a mapping made earlier) unmaps what it mapped.
        dev.dma.map(0x90000, mems[3])
        with pytest.raises(UsageError, match="overlaps the mapping"):
            dev.dma.map_many([(0x70000, mems[0]), (0x80000, mems[1]), (0x90000, mems[2])])
        assert [(m.iova, m.size) for m in dev.dma.mappings] == [(0x90000, 4096)]
        mems[2].close()
        with pytest.raises(ClosedError):
            dev.dma.map_many([(0x10000, mems[0]), (0x20000, mems[2])])
        assert [(m.iova, m.size) for m in dev.dma.mappings] == [(0x90000, 4096)]
    finally:
        for m in mems:
            m.close()
