"""The facts about one device that pyvfio.host.sysfs reads for the kernel
backends (IOMMU group, header type, whether a driver is a vfio driver), the
module -> driver lookup, and the fdinfo line that names a legacy device fd.
The guest suites read the same things on real kernels; these pin the edge
cases a real kernel seldom shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvfio.errors import DeviceNotFound
from pyvfio.host.model import Host, _fdinfo_device
from pyvfio.host.sysfs import device_header_type, device_iommu_group, is_vfio_driver, read_str
from pyvfio.testing.fakesysfs import FakeSysfs, make_char_node


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
    assert Host(bare.root).module_driver("vfio_pci") == "vfio-pci"  # a built-in: by its name


def test_module_driver_of_modules_not_loaded(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "r", noiommu=False)  # no driver registered at all
    host = Host(fake.root)
    assert host.module_driver("vfio_pci") == "vfio-pci"  # vfio_pci registers vfio-pci
    assert host.module_driver("mlx5_vfio_pci") == "mlx5_vfio_pci"


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


def test_reserved_regions_skip_malformed_lines(bare: FakeSysfs) -> None:
    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4)
    bare.set_reserved_regions(4, "0x00000000fee00000 0x00000000feefffff msi\n"
                                 "not hex at-all direct\n"
                                 "0x1000\n"
                                 "0x00000000bddde000 0x00000000bdddefff direct\n")
    regions = Host(bare.root).group(4).reserved_regions
    assert [(r.start, r.end, r.type) for r in regions] == [
        (0xFEE00000, 0xFEEFFFFF, "msi"), (0xBDDDE000, 0xBDDDEFFF, "direct")]


def test_an_unreadable_revision_reads_as_unknown(bare: FakeSysfs) -> None:
    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4, revision=0x10,
                    subsystem=(0x1AF4, 0x1100))
    d = bare.p(bare.devices["0000:01:00.0"].sysfs_dir)
    Path(f"{d}/revision").write_text("garbage\n")
    info = Host(bare.root).device("0000:01:00.0").as_dict(None)
    assert info["revision"] is None and info["vendor_id"] == "1234"
    Path(f"{d}/revision").write_text("0x1f\n")
    assert Host(bare.root).device("0000:01:00.0").as_dict(None)["revision"] == "1f"


def test_driver_module_of_a_built_in_driver_is_its_name_as_a_module(bare: FakeSysfs) -> None:
    bare.add_driver("acme-builtin")
    os.unlink(bare.p("sys/bus/pci/drivers/acme-builtin/module"))
    host = Host(bare.root)
    assert host.driver_module("acme-builtin") == "acme_builtin"
    assert host.driver_module("vfio-pci") == "vfio_pci"


def test_holders_skip_what_is_not_a_process_or_cannot_be_read(bare: FakeSysfs) -> None:
    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4, driver="vfio-pci")
    bare.add_process(42, "qemu", ["/dev/vfio/4", "/dev/vfio/4"])  # the same node twice: one entry
    os.makedirs(bare.p("proc/self/fd"))
    os.symlink("/dev/vfio/4", bare.p("proc/self/fd/3"))  # not a pid: skipped
    os.makedirs(bare.p("proc/43/fd/9"))  # a directory where a link should be: unreadable, skipped
    host = Host(bare.root)
    assert host.holders(set()) == {}
    assert host.holders({"/dev/vfio/4", "/dev/vfio/5"}) == {
        "/dev/vfio/4": [{"pid": 42, "comm": "qemu"}], "/dev/vfio/5": []}


def test_node_checks_say_what_they_read(tmp_path: Path) -> None:
    from pyvfio.host.nodes import cdev_node_check, group_node_check

    prefix = str(tmp_path) + "/"
    c = group_node_check(prefix, 7, noiommu=False)
    assert (c.path, c.state, c.kernel_devnum) == ("/dev/vfio/7", "unregistered", None)
    assert c.detail == "/sys/class/vfio/7 and /dev/vfio/7 do not exist"
    assert c.evidence == [("/sys/class/vfio/7/dev", "absent"), ("/dev/vfio/7", "absent")]

    os.makedirs(tmp_path / "sys/class/vfio/noiommu-7")
    (tmp_path / "sys/class/vfio/noiommu-7/dev").write_text("511:3\n")
    c = group_node_check(prefix, 7, noiommu=True)
    assert (c.path, c.state, c.kernel_devnum) == ("/dev/vfio/noiommu-7", "missing", "511:3")
    assert c.detail == "the kernel registered /sys/class/vfio/noiommu-7 (511:3) but /dev/vfio/noiommu-7 does not exist"

    os.makedirs(tmp_path / "dev/vfio")
    (tmp_path / "dev/vfio/noiommu-7").write_text("")
    c = group_node_check(prefix, 7, noiommu=True)
    assert (c.state, c.detail) == ("stale", "/dev/vfio/noiommu-7 is not a character device")
    assert c.evidence[-1] == ("/dev/vfio/noiommu-7", "not a character device") and c.kernel_devnum == "511:3"

    os.makedirs(tmp_path / "dev/vfio/devices")
    make_char_node(str(tmp_path / "dev/vfio/devices/vfio2"), 240, 2)
    c = cdev_node_check(prefix, "vfio2")
    assert (c.path, c.state, c.kernel_devnum) == ("/dev/vfio/devices/vfio2", "stale", None)
    assert c.detail == "/dev/vfio/devices/vfio2 (240:2) is left over: the kernel has no /sys/class/vfio-dev/vfio2"
    assert c.evidence == [("/sys/class/vfio-dev/vfio2/dev", "absent"),
                          ("/dev/vfio/devices/vfio2", "character device 240:2")]
    os.makedirs(tmp_path / "sys/class/vfio-dev/vfio2")
    (tmp_path / "sys/class/vfio-dev/vfio2/dev").write_text("240:2\n")
    c = cdev_node_check(prefix, "vfio2")
    assert (c.state, c.detail, c.kernel_devnum) == ("ok", "/dev/vfio/devices/vfio2 is the kernel's 240:2", "240:2")


def test_vfio_aliases_need_a_release_and_a_pci_modalias(tmp_path: Path) -> None:
    from pyvfio.host.modules import VfioAliases

    assert VfioAliases.for_root(str(tmp_path), None).path is None
    assert VfioAliases.for_root(str(tmp_path), "").patterns() == {}
    aliases = VfioAliases.for_root(str(tmp_path), "6.1.0")
    assert aliases.path == str(tmp_path / "lib/modules/6.1.0/modules.alias")
    os.makedirs(tmp_path / "lib/modules/6.1.0")
    Path(aliases.path).write_text("alias vfio_pci:v00001234d*sv*sd*bc*sc*i* acme_vfio_pci\n"
                                  "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n")
    modalias = "pci:v00001234d000011E8sv00001AF4sd00001100bc00scFFi00"
    assert aliases.best_module(modalias) == ("acme_vfio_pci", "v00001234d*sv*sd*bc*sc*i*")
    assert aliases.best_module(None) is None and aliases.best_module("") is None
    assert aliases.best_module("acpi:" + modalias[4:]) is None
    assert aliases.best_module("pci:v00008086d00001111sv0sd0bc02sc00i00") is None  # vfio_pci itself
    assert aliases.is_vfio_module("acme-vfio-pci") and not aliases.is_vfio_module("e1000")


def test_groups_after_a_device_pass_take_members_from_the_device_links(fake: FakeSysfs) -> None:
    from .conftest import AUDIO, GPU

    os.unlink(fake.p(f"sys/kernel/iommu_groups/12/devices/{AUDIO}"))
    assert list(Host(fake.root).group(12).devices) == [GPU]  # alone: the group's own listing
    host = Host(fake.root)
    host.devices()  # every device's iommu_group link read: membership from those
    groups = {g.number: g for g in host.groups()}
    assert list(groups[12].devices) == [GPU, AUDIO]
    assert host.group(12) is groups[12] and host.groups()[0] is host.groups()[0]  # loaded once


def test_groups_skip_what_cannot_be_loaded(bare: FakeSysfs) -> None:
    import shutil

    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4)
    bare.add_device("0000:02:00.0", 0x1234, 0x11E8, 0x00FF00, group=99)
    shutil.rmtree(bare.p("sys/kernel/iommu_groups/99"))  # the link still names 99
    Path(bare.p("sys/kernel/iommu_groups/2")).write_text("")  # not a group directory
    for lean_first in (False, True):
        host = Host(bare.root)
        if lean_first:
            assert host.device("0000:02:00.0").iommu_group == 99
            host.devices()
        assert [g.number for g in host.groups()] == [4]
    host = Host(bare.root)
    first = host.group(4)
    assert host.groups() == [first] and host.groups()[0] is first


def test_read_str_takes_what_sysfs_holds(tmp_path: Path) -> None:
    """Only the one trailing newline goes (a label's own spaces stay), and bytes
    that are not UTF-8 (a firmware label, a vendor's driver name) become
    U+FFFD instead of an exception."""
    attr = tmp_path / "label"
    attr.write_bytes(b" Onboard LAN \n")
    assert read_str(str(attr)) == " Onboard LAN "
    attr.write_bytes(b"SLOT X\n")
    assert read_str(str(attr)) == "SLOT X"
    attr.write_bytes(b"caf\xe9\n")
    assert read_str(str(attr)) == "caf\ufffd"
    assert read_str(str(tmp_path / "absent")) is None


def test_a_missing_group_is_named(tmp_path: Path) -> None:
    with FakeSysfs(tmp_path / "r", noiommu=False) as fake, \
            pytest.raises(DeviceNotFound) as exc:
        Host(fake.root).group(999)
    assert str(exc.value) == "no IOMMU group 999"


def test_an_empty_driver_override_is_none(bare: FakeSysfs) -> None:
    """The kernel shows no override as "(null)"; an empty file means the same."""
    bare.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=3)
    override = Path(bare.p("sys/bus/pci/devices/0000:00:03.0/driver_override"))
    assert Host(bare.root).device("0000:00:03.0").driver_override is None  # "(null)"
    override.write_text("\n")
    assert Host(bare.root).device("0000:00:03.0").driver_override is None
    override.write_text("vfio-pci\n")
    assert Host(bare.root).device("0000:00:03.0").driver_override == "vfio-pci"


def test_an_empty_vfio_dev_directory_is_no_cdev(bare: FakeSysfs) -> None:
    """vfio-dev/ without an entry (a device between unregistering and the
    directory's removal) is no cdev, not an error."""
    bare.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=3)
    os.makedirs(bare.p("sys/bus/pci/devices/0000:00:03.0/vfio-dev"))
    assert Host(bare.root).device("0000:00:03.0").vfio_cdev is None


def test_a_lean_host_reads_what_a_diagnosis_needs_as_a_full_one_does(fake: FakeSysfs) -> None:
    """Host(lean=True) leaves revision, override, NUMA node and reset methods
    unread; every field it does read equals the full read, device by device."""
    lean_fields = ("address", "vendor_id", "device_id", "subsystem_vendor_id",
                   "subsystem_device_id", "class_code", "driver", "modalias", "iommu_group",
                   "vfio_cdev")
    full = {d.address: d for d in Host(fake.root).devices()}
    lean = Host(fake.root, lean=True).devices()
    assert sorted(d.address for d in lean) == sorted(full) and len(full) >= 9
    for dev in lean:
        assert [getattr(dev, f) for f in lean_fields] == \
            [getattr(full[dev.address], f) for f in lean_fields], dev.address
        assert (dev.revision, dev.driver_override, dev.numa_node, dev.reset_methods) == \
            (None, None, None, None)
