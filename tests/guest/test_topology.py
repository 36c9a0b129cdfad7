"""The standard guest topology as the guest's kernel sees it, on each kernel.

These pin what every other guest test relies on: the fixed addresses, the
IOMMU groups (one device alone, three sharing the bridge's group), the drivers
at boot, the VFIO device nodes each kernel offers, and that ``vfio_bound``
really moves a device to vfio-pci and back.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvfio.testing import kconfig, topology

SYSFS_PCI = Path("/sys/bus/pci/devices")


def group_of(bdf: str) -> str:
    return os.path.basename(os.readlink(SYSFS_PCI / bdf / "iommu_group"))


def group_members(group: str) -> set[str]:
    return set(os.listdir(f"/sys/kernel/iommu_groups/{group}/devices"))


def driver_of(bdf: str) -> str | None:
    link = SYSFS_PCI / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def ids_of(bdf: str) -> tuple[int, int]:
    read = lambda name: int((SYSFS_PCI / bdf / name).read_text(), 16)  # noqa: E731
    return read("vendor"), read("device")


def has_iommufd(kernel: str) -> bool:
    """Whether the running kernel is built with iommufd (Debian's 6.1 and 6.12 are
    not; pyvfio-6.12 is).  From its build configuration, so that a kernel that
    claims it and lacks /dev/iommu fails; by name when the configuration is unknown."""
    value = kconfig.option("CONFIG_IOMMUFD")
    return value in ("y", "m") if value is not None else kernel != "debian"


def test_devices_at_their_fixed_addresses(guest_kernel: str) -> None:
    assert ids_of(topology.EDU) == topology.EDU_VENDOR_DEVICE
    assert ids_of(topology.EDU_BRIDGED) == topology.EDU_VENDOR_DEVICE
    assert ids_of(topology.E1000_BRIDGED) == topology.E1000_VENDOR_DEVICE
    assert ids_of(topology.E1000E) == topology.E1000E_VENDOR_DEVICE
    # The bridge chain: root port -> PCIe-to-PCI bridge -> bus 02.
    assert (SYSFS_PCI / topology.ROOT_PORT / topology.PCI_BRIDGE).is_dir()
    assert (SYSFS_PCI / topology.PCI_BRIDGE / "pci_bus" / "0000:02").is_dir()


def test_iommu_groups(guest_kernel: str) -> None:
    assert group_members(group_of(topology.EDU)) == {topology.EDU}
    assert group_members(group_of(topology.E1000E)) == {topology.E1000E}
    bridged = group_of(topology.EDU_BRIDGED)
    assert group_of(topology.E1000_BRIDGED) == bridged
    assert group_members(bridged) == set(topology.BRIDGED_GROUP_MEMBERS)
    assert len({group_of(topology.EDU), group_of(topology.E1000E), bridged}) == 3


def test_drivers_at_boot(guest_kernel: str) -> None:
    for bdf, driver in topology.BOOT_DRIVERS.items():
        assert driver_of(bdf) == driver, bdf


def test_vfio_container_node(guest_kernel: str) -> None:
    mode = os.stat("/dev/vfio/vfio").st_mode
    assert stat.S_ISCHR(mode)
    # No group node until a device of that group is on a vfio driver.
    assert not os.path.exists(f"/dev/vfio/{group_of(topology.EDU)}")


def test_vfio_bound_moves_edu_to_vfio_pci_and_back(
    guest_kernel: str, vfio_bound: Callable[[str], None]
) -> None:
    group = group_of(topology.EDU)
    vfio_bound(topology.EDU)
    assert driver_of(topology.EDU) == "vfio-pci"
    assert stat.S_ISCHR(os.stat(f"/dev/vfio/{group}").st_mode)
    if has_iommufd(guest_kernel):
        cdevs = os.listdir(SYSFS_PCI / topology.EDU / "vfio-dev")
        assert len(cdevs) == 1 and cdevs[0].startswith("vfio")
        assert stat.S_ISCHR(os.stat(f"/dev/vfio/devices/{cdevs[0]}").st_mode)


def test_vfio_bound_restores_the_host_driver(guest_kernel: str) -> None:
    from pyvfio.testing.pytest_guest import SysfsBinding

    binding = SysfsBinding()
    binding.bind(topology.E1000_BRIDGED)
    assert driver_of(topology.E1000_BRIDGED) == "vfio-pci"
    binding.restore()
    assert driver_of(topology.E1000_BRIDGED) == "e1000"
    override = (SYSFS_PCI / topology.E1000_BRIDGED / "driver_override").read_text().strip()
    assert override == "(null)"


def test_iommufd_node(guest_kernel: str) -> None:
    if not has_iommufd(guest_kernel):
        assert not os.path.exists("/dev/iommu")
        kconfig.require("CONFIG_IOMMUFD", feature="iommufd")
    assert stat.S_ISCHR(os.stat("/dev/iommu").st_mode)


def test_mtty_mdev_parent(guest_kernel: str) -> None:
    kconfig.require("CONFIG_SAMPLE_VFIO_MDEV_MTTY", feature="the mtty mdev sample")
    parent = Path("/sys/class/mdev_bus/mtty")
    assert parent.is_dir()
    assert any((parent / "mdev_supported_types").iterdir())


@pytest.mark.guest_config("noiommu")
def test_noiommu_mode(guest_kernel: str, vfio_bound: Callable[[str], None]) -> None:
    kconfig.require("CONFIG_VFIO_NOIOMMU", feature="vfio's no-IOMMU mode")
    # No Intel vIOMMU (dmarN); iommufd's selftest registers its own mock iommu here.
    assert not any(p.name.startswith("dmar") for p in Path("/sys/class/iommu").iterdir())
    param = Path("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode")
    assert param.read_text().strip() == "Y"
    vfio_bound(topology.EDU)
    group = group_of(topology.EDU)
    assert (Path("/sys/kernel/iommu_groups") / group / "name").read_text().strip() \
        == "vfio-noiommu"
    assert stat.S_ISCHR(os.stat(f"/dev/vfio/noiommu-{group}").st_mode)
