"""Typed register views, block register access and batched DMA maps on the
real kernel, through both backends (iommufd where the guest kernel has it)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvfio.device import Device, SharedMemory
from pyvfio.errors import IovaRangeError, UsageError
from pyvfio.kernel import open_device
from pyvfio.testing.topology import EDU

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = pytest.mark.guest

EDU_ID = 0x010000ED


# Parametrized by a mark, not by fixture params: the guest plugin matches the
# host's test IDs ([kernel-backend]) with the guest's, and only marks keep that order.
BACKENDS = pytest.mark.parametrize("backend", ["legacy", "iommufd"])


@pytest.fixture
def edu_dev(backend: str) -> Iterator[Device]:
    if backend == "iommufd" and not os.path.exists("/dev/iommu"):
        pytest.skip(f"kernel {os.uname().release} has no iommufd (no /dev/iommu)")
    with helpers.vfio_bound(EDU), open_device(EDU, backend) as dev:
        yield dev


@BACKENDS
def test_typed_views_read_and_write_edu_registers(edu_dev: Device) -> None:
    with edu_dev.bar(0).mmap() as m:
        assert m.u32[0] == EDU_ID
        m.u32[1] = 0x12345678  # liveness: reads back the bitwise NOT
        assert m.u32[1] == 0xEDCBA987
        assert edu_dev.bar(0).read32(4) == 0xEDCBA987  # the same register through pread
        assert len(m.u32) == (1 << 20) // 4


@BACKENDS
def test_block_access_is_one_preadv_of_register_width_accesses(edu_dev: Device) -> None:
    bar = edu_dev.bar(0)
    bar.write_block(0x04, [0x0F0F0F0F])
    # edu answers only 4-byte accesses below 0x80: on the 6.12 kernel one wide
    # pread of these 8 bytes is one 8-byte access and reads all ones.
    assert bar.read_block(0x00, 2) == [EDU_ID, 0xF0F0F0F0]
    bar.write_block(0x04, [0x1_00000001])  # masked to 32 bits
    assert bar.read_block(0x04, 1) == [0xFFFFFFFE]
    with pytest.raises(UsageError, match="outside"):
        bar.read_block((1 << 20) - 4, 2)


@BACKENDS
def test_map_many_maps_and_rolls_back_on_the_real_iommu(edu_dev: Device) -> None:
    space = edu_dev.dma
    assert space is not None
    mems = [SharedMemory(4096) for _ in range(3)]
    iovas = [0x100000, 0x200000, 0x300000]
    try:
        space.map_many(list(zip(iovas, mems, strict=True)))
        with pytest.raises(IovaRangeError):  # the kernel says EEXIST: it is mapped
            space.map(iovas[1], mems[1])
        for iova in iovas:
            space.unmap(iova, 4096)
        # The third entry lies outside the IOMMU aperture: refused before any map.
        with pytest.raises(IovaRangeError):
            space.map_many([(iovas[0], mems[0]), (iovas[1], mems[1]), (1 << 62, mems[2])])
        # The third IOVA is taken already: the kernel refuses it (EEXIST) after
        # mapping the first two, which are unmapped again before the error comes out.
        space.map(iovas[2], mems[2])
        with pytest.raises(IovaRangeError, match="already mapped"):
            space.map_many([(iovas[0], mems[0]), (iovas[1], mems[1]), (iovas[2], mems[0])])
        space.map(iovas[0], mems[0])  # would be EEXIST had the rollback not unmapped it
        space.map(iovas[1], mems[1])
        for iova in iovas:
            space.unmap(iova, 4096)
    finally:
        for m in mems:
            m.close()
