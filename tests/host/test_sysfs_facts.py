"""The facts about one device that pyvfio.host.sysfs reads for the kernel
backends (IOMMU group, header type, whether a driver is a vfio driver), the
module -> driver lookup, and the fdinfo line that names a legacy device fd.
The guest suites read the same things on real kernels; these pin the edge
cases a real kernel seldom shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvfio.host.model import Host, _fdinfo_device
from pyvfio.host.sysfs import device_header_type, device_iommu_group, is_vfio_driver
from pyvfio.testing.fakesysfs import FakeSysfs


def test_iommu_group_from_the_link(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    assert device_iommu_group(str(dev)) is None  # no link: no IOMMU
    os.symlink("../../kernel/iommu_groups/12", dev / "iommu_group")
    assert device_iommu_group(str(dev)) == 12
    os.unlink(dev / "iommu_group")
    os.symlink("../../kernel/iommu_groups/not-a-number", dev / "iommu_group")
    assert device_iommu_group(str(dev)) is None


@pytest.mark.parametrize(("header", "kind"), [
    (0x00, 0), (0x80, 0), (0x01, 1), (0x81, 1), (0x02, 2), (0x7F, 0x7F),
])
def test_header_type_without_the_multifunction_bit(tmp_path: Path, header: int, kind: int) -> None:
    config = bytearray(64)
    config[0x0E] = header
    (tmp_path / "config").write_bytes(bytes(config))
    assert device_header_type(str(tmp_path)) == kind


def test_header_type_of_a_short_or_missing_config(tmp_path: Path) -> None:
    assert device_header_type(str(tmp_path)) is None
    (tmp_path / "config").write_bytes(bytes(14))  # ends before the header type
    assert device_header_type(str(tmp_path)) is None
    (tmp_path / "config").write_bytes(bytes(14) + b"\x81")  # exactly up to it
    assert device_header_type(str(tmp_path)) == 1


def _driver(root: Path, name: str, module: str | None) -> None:
    d = root / "sys/bus/pci/drivers" / name
    d.mkdir(parents=True)
    if module is not None:
        (root / "sys/module" / module).mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../../module/{module}", d / "module")


def test_which_drivers_are_vfio_drivers(tmp_path: Path) -> None:
    root = tmp_path
    (root / "sys/module/vfio_pci_core/holders").mkdir(parents=True)
    os.symlink("../../oot_accel", root / "sys/module/vfio_pci_core/holders/oot_accel")
    _driver(root, "oot-accel", "oot_accel")  # built on vfio_pci_core, named otherwise
    _driver(root, "e1000", "e1000")
    _driver(root, "builtin_drv", None)  # built in: no module link
    r = str(root)
    assert not is_vfio_driver(r, None) and not is_vfio_driver(r, "")
    assert not is_vfio_driver(r, None, mdev=True)
    for name in ("vfio-pci", "vfio-platform", "mlx5_vfio_pci", "nvgrace-gpu-vfio-pci"):
        assert is_vfio_driver(r, name), name
    assert is_vfio_driver(r, "i915", mdev=True)  # an mdev's parent driver
    assert is_vfio_driver(r, "oot-accel")
    assert not is_vfio_driver(r, "e1000")
    assert not is_vfio_driver(r, "builtin_drv")
    assert not is_vfio_driver(r, "not-loaded")
    assert not is_vfio_driver(r, "VFIO-PCI-LOOKALIKE") and not is_vfio_driver(r, "x_VFIO_PCI")


def test_module_driver_names_the_driver_a_module_registers(bare: FakeSysfs) -> None:
    bare.add_driver("acme-vfio", module="acme_vfio_mod", vfio=True)
    host = Host(bare.root)
    assert host.module_driver("acme_vfio_mod") == "acme-vfio"  # through the module link
    assert host.module_driver("vfio_pci") == "vfio-pci"  # loaded: found by its link
    assert host.module_driver("other_vfio_pci") == "other_vfio_pci"  # not loaded: its own name
    os.unlink(bare.p("sys/bus/pci/drivers/vfio-pci/module"))
    assert Host(bare.root).module_driver("vfio_pci") == "vfio-pci"  # not found: the known name


def test_fdinfo_names_the_device_of_a_legacy_fd(tmp_path: Path) -> None:
    fdinfo = tmp_path / "fdinfo"
    assert _fdinfo_device(str(fdinfo)) == ""  # gone
    fdinfo.write_text("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n")
    assert _fdinfo_device(str(fdinfo)) == ""  # before Linux 6.18: not printed
    fdinfo.write_text("pos:\t0\nvfio-device-syspath: /sys/devices/pci0000:00/0000:00:03.0\n")
    assert _fdinfo_device(str(fdinfo)) == "0000:00:03.0"
    fdinfo.write_text("vfio-device-syspath: /sys/devices/pci0000:00/0000:00:03.0/\n")
    assert _fdinfo_device(str(fdinfo)) == "0000:00:03.0"


@pytest.mark.parametrize(("value", "enabled"), [
    ("Y", True), ("y", True), ("1", True), ("N", False), ("0", False), ("", False), (None, False),
])
def test_noiommu_mode_parameter(tmp_path: Path, value: str | None, enabled: bool) -> None:
    fake = FakeSysfs(tmp_path / "r", iommu=False, noiommu=False)
    param = fake.p("sys/module/vfio/parameters/enable_unsafe_noiommu_mode")
    if value is None:
        os.unlink(param)
    else:
        Path(param).write_text(value + "\n")
    assert Host(fake.root).noiommu_enabled() is enabled


def test_iommu_present_from_units_and_groups(tmp_path: Path) -> None:
    from .test_diagnosis import _to_vfio

    noiommu = FakeSysfs(tmp_path / "noiommu", iommu=False, noiommu=True)
    noiommu.add_standard_drivers()
    noiommu.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
    with noiommu:
        _to_vfio(noiommu, "0000:00:04.0")
    host = Host(noiommu.root)
    assert [g.noiommu for g in host.groups()] == [True]
    assert not host.iommu_present()  # a no-IOMMU group is not an IOMMU
    os.makedirs(noiommu.p("sys/class/iommu/iommufd_selftest_iommu.0"))
    assert not Host(noiommu.root).iommu_present()  # nor is iommufd's selftest unit
    os.makedirs(noiommu.p("sys/class/iommu/dmar0"))
    assert Host(noiommu.root).iommu_present()

    grouped = FakeSysfs(tmp_path / "grouped", iommu=False, noiommu=False)
    grouped.add_standard_drivers()
    grouped.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00, group=3)  # a unit sysfs lacks
    assert Host(grouped.root).iommu_present()
