"""MSI-X, PCIe capabilities, sparse/MSI-X-mappable regions and reset on the
e1000e of the standard topology (a real kernel in the guest)."""

from __future__ import annotations

import pytest

from pyvfio.device import DeviceFlag, IrqAction, IrqIndex, RegionFlag
from pyvfio.kernel import open_device
from pyvfio.pci.config import CapId, ExtCapId
from pyvfio.testing.topology import E1000E
from pyvfio.uapi import vfio as V

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = pytest.mark.guest


@pytest.fixture
def nic():
    with helpers.vfio_bound(E1000E), open_device(E1000E, "legacy") as dev:
        yield dev


def test_msix_vectors_fire_their_own_eventfd(nic) -> None:
    info = nic.irq_info(IrqIndex.MSIX)
    assert info.count == 5
    eventfds = nic.enable_irq(IrqIndex.MSIX, info.count)
    assert nic.config.find_capability(CapId.MSIX) is not None
    # The MSI-X enable bit in the capability's message control is set by vfio.
    cap = nic.config.find_capability(CapId.MSIX)
    assert nic.config.read16(cap.offset + 2) & 0x8000
    for vector in range(info.count):
        # Kernel loopback: ACTION_TRIGGER|DATA_NONE fires the vector's eventfd.
        nic.set_irqs(IrqIndex.MSIX, IrqAction.ACTION_TRIGGER | IrqAction.DATA_NONE, vector, 1)
        fired = [e.wait(2.0) if i == vector else e.read() for i, e in enumerate(eventfds)]
        assert fired[vector] == 1, (vector, fired)
        assert sum(fired) == 1, (vector, fired)
    # DATA_BOOL triggers a sparse set: vectors 1 and 3.
    nic.set_irqs(IrqIndex.MSIX, IrqAction.ACTION_TRIGGER | IrqAction.DATA_BOOL, 1, 3,
                 [True, False, True])
    assert [e.wait(1.0) if i in (1, 3) else e.read() for i, e in enumerate(eventfds)] == [
        0, 1, 0, 1, 0]
    nic.disable_irq(IrqIndex.MSIX)
    assert not nic.config.read16(cap.offset + 2) & 0x8000


def test_pcie_capability_walk(nic) -> None:
    caps = {(c.id, c.extended) for c in nic.config.capabilities()}
    assert (CapId.MSIX, False) in caps
    assert (CapId.EXP, False) in caps
    assert (CapId.MSI, False) in caps
    assert (ExtCapId.ERR, True) in caps  # AER, in the 4 KiB extended space
    assert nic.region_info(7).size == 4096


def test_region_info_with_capability_chain(nic) -> None:
    regions = {r.index: r for r in nic.regions()}
    msix = nic.config.find_capability(CapId.MSIX)
    table_bir = nic.config.read32(msix.offset + 4) & 0x7
    table_region = regions[table_bir]
    assert table_region.flags & RegionFlag.CAPS
    if V.VFIO_REGION_INFO_CAP_SPARSE_MMAP in table_region.caps:
        # Older kernels: the MSI-X table is carved out of the mmap areas.
        table_off = nic.config.read32(msix.offset + 4) & ~0x7
        assert all(not (a.offset <= table_off < a.offset + a.size)
                   for a in table_region.mmap_areas)
    else:
        # Since 4.16 the table may be mmapped: the MSIX_MAPPABLE capability says so.
        assert V.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE in table_region.caps
        assert [(a.offset, a.size) for a in table_region.mmap_areas] == [
            (0, table_region.size)]
    # An I/O port BAR is never mmappable.
    io_bars = [r for r in regions.values() if r.index < 6 and r.size and not
               r.flags & RegionFlag.MMAP]
    assert io_bars and all(not r.mmap_areas for r in io_bars)


def test_reset(nic) -> None:
    assert nic.info.flags & DeviceFlag.RESET
    bar0 = nic.bar(0)
    nic.config.enable_bus_master()
    with open(f"/sys/bus/pci/devices/{E1000E}/reset_method") as f:
        methods = f.read().split()
    assert methods  # the kernel knows a way (QEMU's e1000e: flr/pm); which one differs
    nic.reset()
    # vfio-pci saves and restores config space around the reset, and the
    # device answers MMIO again (STATUS is not all-ones).
    assert nic.config.read16(0x04) & 0x6 == 0x6
    assert bar0.read32(0x8) != 0xFFFFFFFF
    # Resetting twice in a row is fine.
    nic.reset()
