"""The fake kernel reacts to sysfs writes the way the kernel does."""

from __future__ import annotations

import errno
import os

import pytest

from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import E1000_BRIDGED, EDU, GPU


def _w(fake: FakeSysfs, rel: str, data: str) -> None:
    fake.write(fake.p(rel), data)


def _read(fake: FakeSysfs, rel: str) -> str:
    with open(fake.p(rel)) as f:
        return f.read()


def _driver(fake: FakeSysfs, bdf: str) -> str | None:
    link = fake.p(f"sys/bus/pci/devices/{bdf}/driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def test_unbind_from_the_wrong_driver_is_enodev(fake: FakeSysfs) -> None:
    with pytest.raises(OSError) as exc:
        _w(fake, "sys/bus/pci/drivers/e1000/unbind", GPU)
    assert exc.value.errno == errno.ENODEV
    assert _driver(fake, GPU) == "nouveau"


def test_bind_a_bound_device_is_ebusy(fake: FakeSysfs) -> None:
    with pytest.raises(OSError) as exc:
        _w(fake, "sys/bus/pci/drivers/e1000/bind", E1000_BRIDGED)
    assert exc.value.errno == errno.EBUSY


def test_vfio_matches_only_through_driver_override(fake: FakeSysfs) -> None:
    with pytest.raises(OSError) as exc:
        _w(fake, "sys/bus/pci/drivers/vfio-pci/bind", EDU)
    assert exc.value.errno == errno.ENODEV
    _w(fake, "sys/bus/pci/drivers_probe", EDU)  # nothing matches: not an error
    assert _driver(fake, EDU) is None
    _w(fake, f"sys/bus/pci/devices/{EDU}/driver_override", "vfio-pci\n")
    assert _read(fake, f"sys/bus/pci/devices/{EDU}/driver_override") == "vfio-pci\n"
    _w(fake, "sys/bus/pci/drivers_probe", EDU)
    assert _driver(fake, EDU) == "vfio-pci"
    assert os.path.exists(fake.p("dev/vfio/31"))
    assert "DRIVER=vfio-pci" in _read(fake, f"sys/bus/pci/devices/{EDU}/uevent")
    _w(fake, "sys/bus/pci/drivers/vfio-pci/unbind", EDU)
    assert not os.path.exists(fake.p("dev/vfio/31"))
    _w(fake, f"sys/bus/pci/devices/{EDU}/driver_override", "\n")
    assert _read(fake, f"sys/bus/pci/devices/{EDU}/driver_override") == "(null)\n"


def test_override_excludes_other_drivers(fake: FakeSysfs) -> None:
    _w(fake, f"sys/bus/pci/devices/{E1000_BRIDGED}/driver_override", "vfio-pci")
    _w(fake, "sys/bus/pci/drivers/e1000/unbind", E1000_BRIDGED)
    with pytest.raises(OSError):
        _w(fake, "sys/bus/pci/drivers/e1000/bind", E1000_BRIDGED)


def test_vfio_refuses_bridges_and_failed_probes_do_not_attach(fake: FakeSysfs) -> None:
    _w(fake, "sys/bus/pci/devices/0000:02:00.0/driver_override", "vfio-pci")
    _w(fake, "sys/bus/pci/drivers_probe", "0000:02:00.0")
    assert _driver(fake, "0000:02:00.0") is None
    fake.fail_probe_devices.add(("vfio-pci", EDU))
    _w(fake, f"sys/bus/pci/devices/{EDU}/driver_override", "vfio-pci")
    _w(fake, "sys/bus/pci/drivers_probe", EDU)
    assert _driver(fake, EDU) is None


def test_unknown_device_is_enodev(fake: FakeSysfs) -> None:
    with pytest.raises(OSError) as exc:
        _w(fake, "sys/bus/pci/drivers_probe", "0000:77:00.0")
    assert exc.value.errno == errno.ENODEV


def test_noiommu_group_appears_and_goes(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "r", iommu=False, noiommu=True)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
    _w(fake, "sys/bus/pci/devices/0000:00:04.0/driver_override", "vfio-pci")
    _w(fake, "sys/bus/pci/drivers_probe", "0000:00:04.0")
    assert os.path.exists(fake.p("dev/vfio/noiommu-0"))
    _w(fake, "sys/bus/pci/drivers/vfio-pci/unbind", "0000:00:04.0")
    assert not os.path.exists(fake.p("dev/vfio/noiommu-0"))
    assert not os.path.exists(fake.p("sys/kernel/iommu_groups/0"))
