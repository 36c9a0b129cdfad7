"""The host model read from a fake root: devices, groups, IOMMU state."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvfio.errors import DeviceNotFound, UsageError
from pyvfio.host import Host, normalize_bdf
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import AUDIO, E1000_BRIDGED, EDU_BRIDGED, GPU, PCI_BRIDGE, ROOT_PORT


@pytest.mark.parametrize(("text", "expected"), [
    ("0000:01:00.0", "0000:01:00.0"),
    ("01:00.0", "0000:01:00.0"),
    ("1:0.1", "0000:01:00.1"),
    (" 0000:AF:1F.7 ", "0000:af:1f.7"),
    ("10000:00:00.0", "10000:00:00.0"),  # VMD domains have five digits
])
def test_normalize_bdf(text: str, expected: str) -> None:
    assert normalize_bdf(text) == expected


@pytest.mark.parametrize("text", ["", "zz", "01:00", "01:00.8", "01:20.0", "0000:01:00.0.1", "g1:00.0"])
def test_normalize_bdf_rejects_garbage(text: str) -> None:
    with pytest.raises(UsageError, match="not a PCI address"):
        normalize_bdf(text)


@given(st.text(max_size=20))
def test_normalize_bdf_is_idempotent_or_raises(text: str) -> None:
    try:
        once = normalize_bdf(text)
    except UsageError:
        return
    assert normalize_bdf(once) == once


def test_device_fields(fake: FakeSysfs) -> None:
    host = Host(fake.root)
    gpu = host.device("01:00.0")
    assert (gpu.vendor_id, gpu.device_id) == (0x10DE, 0x1B80)
    assert (gpu.subsystem_vendor_id, gpu.subsystem_device_id) == (0x10DE, 0x119E)
    assert gpu.class_code == 0x030000 and gpu.revision == 0xA1
    assert gpu.driver == "nouveau" and gpu.driver_override is None
    assert gpu.modalias == "pci:v000010DEd00001B80sv000010DEsd0000119Ebc03sc00i00"
    assert gpu.numa_node == 0 and gpu.iommu_group == 12
    assert gpu.reset_methods == ["flr", "bus"]
    assert not gpu.is_bridge and gpu.vfio_cdev is None
    assert host.device(AUDIO).reset_methods == ["bus"]
    assert host.device(AUDIO).numa_node is None
    assert host.device(EDU_BRIDGED).driver is None
    assert host.device(ROOT_PORT).is_bridge and host.device(PCI_BRIDGE).is_bridge


def test_single_files_are_used_without_a_kernel_uevent(fake: FakeSysfs) -> None:
    """Older or unusual sysfs: uevent without the PCI_* keys."""
    uevent = fake.p(f"sys/bus/pci/devices/{E1000_BRIDGED}/uevent")
    with open(uevent, "w") as f:
        f.write("OF_NAME=foo\n")
    dev = Host(fake.root).device(E1000_BRIDGED)
    assert (dev.vendor_id, dev.device_id, dev.class_code) == (0x8086, 0x100E, 0x020000)
    assert (dev.subsystem_vendor_id, dev.subsystem_device_id) == (0x1AF4, 0x1100)
    assert dev.driver == "e1000"  # from the driver link
    assert dev.modalias and dev.modalias.startswith("pci:v00008086d0000100E")


def test_devices_sorted_and_complete(fake: FakeSysfs) -> None:
    host = Host(fake.root)
    addresses = [d.address for d in host.devices()]
    assert addresses == sorted(fake.devices)


def test_missing_device(fake: FakeSysfs) -> None:
    with pytest.raises(DeviceNotFound, match=r"0000:09:00\.0"):
        Host(fake.root).device("09:00.0")


def test_groups(fake: FakeSysfs) -> None:
    host = Host(fake.root)
    g7 = host.group(7)
    assert g7.devices == [PCI_BRIDGE, EDU_BRIDGED, E1000_BRIDGED]
    assert g7.type == "DMA"
    assert [(r.start, r.end, r.type) for r in g7.reserved_regions] == [(0xFEE00000, 0xFEEFFFFF, "msi")]
    assert host.group(12).devices == [GPU, AUDIO]
    numbers = [g.number for g in host.groups()]
    assert numbers == sorted(numbers) and {1, 7, 12, 20, 30, 31} <= set(numbers)
    with pytest.raises(DeviceNotFound):
        host.group(999)


def test_groups_membership_same_from_links_and_directories(fake: FakeSysfs) -> None:
    by_dirs = {g.number: g.devices for g in Host(fake.root).groups()}
    host = Host(fake.root)
    host.devices()  # groups() then takes members from the devices' links
    assert {g.number: g.devices for g in host.groups()} == by_dirs


def test_iommu_state(fake: FakeSysfs, tmp_path) -> None:
    host = Host(fake.root)
    assert host.iommu_present() and not host.noiommu_enabled()
    bare = FakeSysfs(tmp_path / "noiommu", iommu=False, noiommu=True)
    host = Host(bare.root)
    assert not host.iommu_present() and host.noiommu_enabled()
    assert not Host(FakeSysfs(tmp_path / "novfio", iommu=False).root).noiommu_enabled()
    # iommufd's selftest mock unit is not an IOMMU for real devices
    os.makedirs(bare.p("sys/class/iommu/iommufd_selftest_iommu.0"))
    assert not Host(bare.root).iommu_present()


def test_group_node_and_cdev(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "cdev", cdev=True, noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=3)
    with fake:
        assert Host(fake.root).group_node(3) is None
        fake.write(fake.p("sys/bus/pci/devices/0000:00:03.0/driver_override"), "vfio-pci")
        fake.write(fake.p("sys/bus/pci/drivers_probe"), "0000:00:03.0")
        host = Host(fake.root)
        assert host.group_node(3) == "/dev/vfio/3"
        assert host.device("0000:00:03.0").vfio_cdev == "vfio0"
        assert host.devices()[0].vfio_cdev == "vfio0"  # through sys/class/vfio-dev
        assert os.path.exists(fake.p("dev/vfio/devices/vfio0"))
