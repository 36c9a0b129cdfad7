"""The evidence a diagnosis records (``pyvfio check --json``'s ``evidence``,
``--verbose``'s notes) and the problems ``_prepare`` raises on its own: a
stale ``/dev/vfio/devices/vfioX`` and a device without an IOMMU group.

Each test asserts the whole evidence list or the whole problem object, as
``check --json`` prints it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvfio.cli import main
from pyvfio.host import Host
from pyvfio.testing.fakesysfs import VFIO_GROUP_MAJOR, FakeSysfs, make_char_node

from .conftest import BUSY_NIC, E1000_BRIDGED, EDU, EDU_BRIDGED, GPU, PCI_BRIDGE

ALIASES = "/lib/modules/6.1.0-fake/modules.alias"  # as the evidence shows it (the root stripped)
VFIO_DEV = "0000:00:03.0"
NO_GROUP = "0001:01:00.0"


def ev(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"source": source, "says": says} for source, says in pairs]


def uevent(bdf: str, says: str) -> tuple[str, str]:
    return (f"/sys/bus/pci/devices/{bdf}/uevent", says)


def msi(group: int) -> tuple[str, str]:
    return (f"/sys/kernel/iommu_groups/{group}/reserved_regions", "0xfee00000-0xfeefffff msi")


def unregistered(group: int) -> tuple[str, str]:
    return (f"/sys/class/vfio/{group}", "absent: vfio has not registered the group")


def check_json(capsys: pytest.CaptureFixture[str], root: str, bdf: str) -> dict:
    main(["--root", root, "check", "--json", bdf])
    (d,) = json.loads(capsys.readouterr().out)
    return d


@pytest.fixture
def cdev(tmp_path: Path) -> Iterator[FakeSysfs]:
    """A kernel with vfio device cdevs (6.6+)."""
    f = FakeSysfs(tmp_path / "cdev", noiommu=False, cdev=True)
    f.add_standard_drivers(variant=True)
    with f:
        yield f


# ---- _driver_evidence ------------------------------------------------------------------------

def test_host_driver_evidence_names_driver_and_the_alias_file(fake: FakeSysfs, capsys) -> None:
    """A device on a host driver: uevent's DRIVER=, then modules.alias as a
    process on the host names it (not under the test root, not the bare
    "modules.alias" placeholder) saying the module has no vfio_pci: alias."""
    d = check_json(capsys, fake.root, GPU)
    assert d["evidence"] == ev(
        uevent(GPU, "DRIVER=nouveau"),
        (ALIASES, "no vfio_pci: alias for module nouveau"),
        unregistered(12),
        msi(12),
    )


def test_driverless_device_evidence(fake: FakeSysfs, capsys) -> None:
    """No driver: uevent says "no driver bound" (not DRIVER=None), and
    modules.alias is not consulted."""
    d = check_json(capsys, fake.root, EDU)
    assert d["evidence"] == ev(uevent(EDU, "no driver bound"), unregistered(31), msi(31))


def test_vfio_pci_does_not_consult_modules_alias(fake: FakeSysfs) -> None:
    """vfio-pci is vfio's own driver: no modules.alias note."""
    d = Host(fake.root).diagnose(BUSY_NIC).as_dict()
    assert d["evidence"] == ev(
        uevent(BUSY_NIC, "DRIVER=vfio-pci"),
        ("/sys/class/vfio/30/dev", "0:0"),
        ("/dev/vfio/30", "character device 0:0"),
        msi(30),
    )


def test_pci_stub_does_not_consult_modules_alias(bare: FakeSysfs) -> None:
    """pci-stub only parks a device: no modules.alias note either."""
    bare.add_device("0000:00:05.0", 0x1234, 0x11E8, 0x00FF00, group=153, driver="pci-stub")
    d = Host(bare.root).diagnose("0000:00:05.0").as_dict()
    assert d["evidence"] == ev(uevent("0000:00:05.0", "DRIVER=pci-stub"), unregistered(153), msi(153))


def test_variant_driver_evidence(cdev: FakeSysfs) -> None:
    """A variant driver: its registration with vfio, then modules.alias
    (named as on the host) saying its module has vfio_pci: aliases."""
    bdf = "0000:00:04.0"
    cdev.add_device(bdf, 0x15B3, 0x101E, 0x020000, group=152, driver="mlx5_vfio_pci")
    d = Host(cdev.root).diagnose(bdf).as_dict()
    assert d["evidence"] == ev(
        uevent(bdf, "DRIVER=mlx5_vfio_pci"),
        (f"/sys/bus/pci/devices/{bdf}/vfio-dev/vfio0", "mlx5_vfio_pci registered the device with vfio"),
        (ALIASES, "module mlx5_vfio_pci has vfio_pci: aliases (a vfio variant driver)"),
        ("/sys/class/vfio-dev/vfio0/dev", "0:4096"),
        ("/dev/vfio/devices/vfio0", "character device 0:4096"),
        ("/sys/class/vfio/152/dev", "0:0"),
        ("/dev/vfio/152", "character device 0:0"),
        msi(152),
    )


def test_modules_alias_without_vfio_aliases_is_still_consulted(bare: FakeSysfs) -> None:
    """modules.alias exists but lists no vfio_pci: alias at all (a kernel
    without vfio variants): it was read, so the note names the file and
    says the module has no alias, not "absent ... not consulted"."""
    Path(bare.p(f"lib/modules/{bare.release}/modules.alias")).write_text("# no vfio_pci aliases\n")
    bare.add_device("0000:00:06.0", 0x8086, 0x100E, 0x020000, group=154, driver="e1000")
    d = Host(bare.root).diagnose("0000:00:06.0").as_dict()
    assert d["evidence"] == ev(
        uevent("0000:00:06.0", "DRIVER=e1000"),
        (ALIASES, "no vfio_pci: alias for module e1000"),
        unregistered(154),
        msi(154),
    )


def test_registration_without_a_driver_says_its_driver(bare: FakeSysfs) -> None:
    """A vfio-dev entry on a device whose driver link is already gone (an
    unbind half done): the note cannot name the driver, so says "its driver"."""
    dev = bare.add_device("0000:00:07.0", 0x1234, 0x11E8, 0x00FF00, group=155)
    os.makedirs(bare.p(f"{dev.sysfs_dir}/vfio-dev/vfio0"))
    d = Host(bare.root).diagnose("0000:00:07.0")
    assert d.vfio_cdev == "vfio0"
    assert d.evidence[:2] == ev(
        uevent("0000:00:07.0", "no driver bound"),
        ("/sys/bus/pci/devices/0000:00:07.0/vfio-dev/vfio0", "its driver registered the device with vfio"),
    )


# ---- _prepare: the device cdev -----------------------------------------------------------------

def test_cdev_node_evidence(cdev: FakeSysfs, capsys) -> None:
    """The cdev check's files come right after the registration note, each
    with what it said."""
    cdev.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00, group=151, driver="vfio-pci")
    d = check_json(capsys, cdev.root, VFIO_DEV)
    assert d["ready"] and d["problems"] == []
    assert d["evidence"] == ev(
        uevent(VFIO_DEV, "DRIVER=vfio-pci"),
        (f"/sys/bus/pci/devices/{VFIO_DEV}/vfio-dev/vfio0", "vfio-pci registered the device with vfio"),
        ("/sys/class/vfio-dev/vfio0/dev", "0:4096"),
        ("/dev/vfio/devices/vfio0", "character device 0:4096"),
        ("/sys/class/vfio/151/dev", "0:0"),
        ("/dev/vfio/151", "character device 0:0"),
        msi(151),
    )


def test_stale_cdev_node_problem(cdev: FakeSysfs, capsys) -> None:
    """A /dev/vfio/devices/vfio0 with another device number: the whole
    stale-node problem, its fix giving the mknod numbers space-separated and
    its evidence the two files compared."""
    cdev.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00, group=151, driver="vfio-pci")
    make_char_node(cdev.p("dev/vfio/devices/vfio0"), 0, 7)
    d = check_json(capsys, cdev.root, VFIO_DEV)
    assert not d["ready"]
    assert d["problems"] == [{
        "device": VFIO_DEV,
        "driver": "vfio-pci",
        "reason": "stale vfio device node: /dev/vfio/devices/vfio0 is device 0:7 but the kernel's "
                  "/sys/class/vfio-dev/vfio0/dev is 0:4096",
        "fix": "remove /dev/vfio/devices/vfio0 and let udev recreate it (udevadm trigger), "
               "or mknod it as c 0 4096",
        "kind": "stale-node",
        "evidence": ["/sys/class/vfio-dev/vfio0/dev: 0:4096",
                     "/dev/vfio/devices/vfio0: character device 0:7"],
    }]


# ---- _prepare: no IOMMU group ----------------------------------------------------------------

def test_no_group_on_an_iommu_host(bare: FakeSysfs, capsys) -> None:
    """No iommu_group link: the evidence says so, the device is not viable
    (false, not null) and the one problem names the device and its driver."""
    bare.add_device(NO_GROUP, 0x8086, 0x100E, 0x020000, driver="e1000")
    d = check_json(capsys, bare.root, NO_GROUP)
    assert (d["group"], d["viable"], d["ready"], d["noiommu"]) == (None, False, False, False)
    assert d["evidence"] == ev(
        uevent(NO_GROUP, "DRIVER=e1000"),
        (ALIASES, "no vfio_pci: alias for module e1000"),
        (f"/sys/bus/pci/devices/{NO_GROUP}/iommu_group", "absent"),
    )
    assert d["problems"] == [{
        "device": NO_GROUP,
        "driver": "e1000",
        "reason": f"{NO_GROUP} has no IOMMU group although an IOMMU is present, so vfio-pci "
                  "cannot take it (its probe fails with EINVAL)",
        "fix": "check dmesg for why the IOMMU driver did not take the device (an IOMMU that "
               "does not cover its segment, a firmware table that leaves it out)",
        "kind": "no-iommu-group",
        "evidence": [],
    }]


def test_no_group_in_noiommu_mode(tmp_path: Path) -> None:
    """vfio's no-IOMMU mode: the group appears on binding; the problem keeps
    the device's current driver, and the device is not viable yet."""
    with FakeSysfs(tmp_path / "noiommu", iommu=False, noiommu=True) as f:
        f.add_standard_drivers()
        f.add_device(NO_GROUP, 0x8086, 0x100E, 0x020000, driver="e1000")
        d = Host(f.root).diagnose(NO_GROUP).as_dict()
    assert (d["group"], d["viable"], d["ready"], d["noiommu"]) == (None, False, False, True)
    assert d["problems"] == [{
        "device": NO_GROUP,
        "driver": "e1000",
        "reason": f"{NO_GROUP} has no IOMMU group yet: in vfio's no-IOMMU mode the group "
                  "appears when the device binds to vfio-pci",
        "fix": f"pyvfio bind {NO_GROUP}",
        "kind": "no-iommu-group",
        "evidence": [],
    }]


# ---- _prepare: the group node (/dev/vfio/N) --------------------------------------------------

def test_stale_group_node_problem(fake: FakeSysfs, capsys) -> None:
    """A /dev/vfio/N with another device number than /sys/class/vfio/N/dev:
    the whole problem, the mknod numbers space-separated."""
    fake.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00, group=151, driver="vfio-pci")
    kernel = Path(fake.p("sys/class/vfio/151/dev")).read_text().strip()
    make_char_node(fake.p("dev/vfio/151"), VFIO_GROUP_MAJOR, 99)
    d = check_json(capsys, fake.root, VFIO_DEV)
    assert not d["ready"] and d["group_node"] is None
    assert d["problems"] == [{
        "device": VFIO_DEV,
        "driver": "vfio-pci",
        "reason": f"stale vfio group node: /dev/vfio/151 is device {VFIO_GROUP_MAJOR}:99 but the "
                  f"kernel's /sys/class/vfio/151/dev is {kernel}",
        "fix": "remove /dev/vfio/151 and let udev recreate it (udevadm trigger), or mknod it "
               f"as c {kernel.replace(':', ' ')}",
        "kind": "stale-node",
        "evidence": [f"/sys/class/vfio/151/dev: {kernel}",
                     f"/dev/vfio/151: character device {VFIO_GROUP_MAJOR}:99"],
    }]


def test_a_group_node_the_kernel_does_not_know_has_no_mknod_fix(fake: FakeSysfs,
                                                                 capsys) -> None:
    """A /dev/vfio/N left from an earlier boot (no /sys/class/vfio/N): there is
    no device number to give, so the fix is only to remove it."""
    fake.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00, group=151)
    make_char_node(fake.p("dev/vfio/151"), VFIO_GROUP_MAJOR, 2)
    d = check_json(capsys, fake.root, VFIO_DEV)
    (stale,) = [p for p in d["problems"] if p["kind"] == "stale-node"]
    assert stale["device"] == VFIO_DEV and stale["driver"] is None
    assert stale["fix"] == "remove /dev/vfio/151 and let udev recreate it (udevadm trigger)"
    assert stale["reason"].startswith("stale vfio group node: /dev/vfio/151 ")


@pytest.mark.parametrize(("driver", "how"), [("vfio-pci", "vfio-pci"),
                                             ("mlx5_vfio_pci", "a vfio variant driver")])
def test_missing_group_node_problem(fake: FakeSysfs, capsys, driver: str, how: str) -> None:
    """A vfio driver bound, /dev/vfio/N missing: the whole problem, which
    says whether the driver is vfio-pci itself or a variant."""
    fake.add_device(VFIO_DEV, 0x15B3, 0x101E, 0x020000, group=151, driver=driver)
    os.unlink(fake.p("dev/vfio/151"))
    d = check_json(capsys, fake.root, VFIO_DEV)
    assert d["problems"] == [{
        "device": VFIO_DEV,
        "driver": driver,
        "reason": f"{VFIO_DEV} is on {driver} ({how}) but /dev/vfio/151 does not exist",
        "fix": "the driver did not register the device with vfio: check dmesg, or rebind with "
               f"pyvfio bind {VFIO_DEV}",
        "kind": "no-group-node",
        "evidence": [],
    }]
    # what the kernel registered, beside what /dev lacks
    kernel = Path(fake.p("sys/class/vfio/151/dev")).read_text().strip()
    registered = ev(("/sys/class/vfio/151/dev", kernel), ("/dev/vfio/151", "absent"))
    at = d["evidence"].index(registered[0])
    assert d["evidence"][at:at + 2] == registered


def test_missing_noiommu_group_node_names_the_noiommu_path(tmp_path: Path, capsys) -> None:
    """In no-IOMMU mode the group node is /dev/vfio/noiommu-N."""
    with FakeSysfs(tmp_path / "noiommu", iommu=False, noiommu=True) as f:
        f.add_standard_drivers()
        f.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00)
        f.write(f.p(f"sys/bus/pci/devices/{VFIO_DEV}/driver_override"), "vfio-pci")
        f.write(f.p("sys/bus/pci/drivers_probe"), VFIO_DEV)
        d = check_json(capsys, f.root, VFIO_DEV)
        assert d["ready"] and d["group_node"] == "/dev/vfio/noiommu-0"
        os.unlink(f.p("dev/vfio/noiommu-0"))
        d = check_json(capsys, f.root, VFIO_DEV)
    (p,) = [p for p in d["problems"] if p["kind"] == "no-group-node"]
    assert p["reason"] == f"{VFIO_DEV} is on vfio-pci (vfio-pci) but /dev/vfio/noiommu-0 does not exist"


def test_a_group_node_that_is_a_regular_file_is_stale(fake: FakeSysfs, capsys) -> None:
    """/dev/vfio/N as a regular file (a copy, a bad mknod): stale, and the fix
    names that path to remove."""
    fake.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00, group=151, driver="vfio-pci")
    kernel = Path(fake.p("sys/class/vfio/151/dev")).read_text().strip()
    os.unlink(fake.p("dev/vfio/151"))
    Path(fake.p("dev/vfio/151")).write_text("")
    d = check_json(capsys, fake.root, VFIO_DEV)
    assert d["problems"] == [{
        "device": VFIO_DEV,
        "driver": "vfio-pci",
        "reason": "stale vfio group node: /dev/vfio/151 is not a character device",
        "fix": "remove /dev/vfio/151 and let udev recreate it (udevadm trigger), or mknod it "
               f"as c {kernel.replace(':', ' ')}",
        "kind": "stale-node",
        "evidence": [f"/sys/class/vfio/151/dev: {kernel}",
                     "/dev/vfio/151: not a character device"],
    }]


def test_a_registered_group_with_only_a_driverless_device(bare: FakeSysfs, capsys) -> None:
    """vfio registered the group (its node is right) but no member is on any
    driver: the disagreement names the device, "no driver" and module "?"."""
    bare.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00, group=7)
    os.makedirs(bare.p("sys/class/vfio/7"))
    Path(bare.p("sys/class/vfio/7/dev")).write_text(f"{VFIO_GROUP_MAJOR}:7\n")
    make_char_node(bare.p("dev/vfio/7"), VFIO_GROUP_MAJOR, 7)
    d = check_json(capsys, bare.root, VFIO_DEV)
    (p,) = [p for p in d["problems"] if p["kind"] == "variant-disagreement"]
    assert p == {
        "device": VFIO_DEV,
        "driver": None,
        "reason": "/dev/vfio/7 exists, so a driver in group 7 registered with vfio, but nothing "
                  "says which: modules.alias lists no vfio_pci alias for no driver (module ?) and "
                  "the kernel has no device cdev for it",
        "fix": "if no driver is a vfio variant driver, its vfio_pci: aliases are missing (run "
               "depmod; check modinfo ?); otherwise the node is stale",
        "kind": "variant-disagreement",
        "evidence": [],
    }


# ---- diagnose_many: who holds the group or the device ----------------------------------------

def test_a_held_group_is_one_whole_in_use_problem(fake: FakeSysfs, capsys) -> None:
    """pid 4242 holds /dev/vfio/30 (through two fds: still one holder)."""
    fake.add_process(4243, "qemu-system-x86", ["/dev/vfio/30", "/dev/vfio/30"])
    d = check_json(capsys, fake.root, BUSY_NIC)
    # in the order /proc lists the processes
    assert sorted(d["in_use"], key=lambda h: h["pid"]) == [
        {"pid": 4242, "comm": "qemu-system-x86", "path": "/dev/vfio/30"},
        {"pid": 4243, "comm": "qemu-system-x86", "path": "/dev/vfio/30"}]
    held = [p for p in d["problems"] if p["kind"] == "in-use"]
    assert sorted(held, key=lambda p: p["reason"]) == [{
        "device": BUSY_NIC,
        "driver": "vfio-pci",
        "reason": f"IOMMU group 30 is in use: /dev/vfio/30 is held open by pid {pid} "
                  "(qemu-system-x86)",
        "fix": f"stop pid {pid} (qemu-system-x86) or wait until it closes /dev/vfio/30",
        "kind": "in-use",
        "evidence": [],
    } for pid in (4242, 4243)]


def test_a_held_device_cdev_or_device_fd_is_the_device_in_use(cdev: FakeSysfs, capsys) -> None:
    """The device's own cdev, or a legacy device fd naming it, is "the
    device", not its group."""
    cdev.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00, group=151, driver="vfio-pci")
    cdev.add_process(5000, "dpdk-app", ["/dev/vfio/devices/vfio0"])
    cdev.add_process(5001, "qemu", [], device_fds=[VFIO_DEV])
    d = check_json(capsys, cdev.root, VFIO_DEV)
    held = [(p["reason"], p["fix"]) for p in d["problems"] if p["kind"] == "in-use"]
    assert sorted(held) == sorted([
        ("the device is in use: /dev/vfio/devices/vfio0 is held open by pid 5000 (dpdk-app)",
         "stop pid 5000 (dpdk-app) or wait until it closes /dev/vfio/devices/vfio0"),
        (f"the device is in use: anon_inode:[vfio-device] {VFIO_DEV} is held open by pid 5001 "
         "(qemu)",
         f"stop pid 5001 (qemu) or wait until it closes anon_inode:[vfio-device] {VFIO_DEV}"),
    ])


# ---- _prepare: the rest of its branches --------------------------------------------------------

def test_a_groupless_device_the_host_uses_names_both_problems(bare: FakeSysfs, capsys) -> None:
    """A device without a group that carries the host's routes: the no-group
    problem, then the use, on the device itself (no "--group" clause) and
    with its driver."""
    bare.add_device(NO_GROUP, 0x8086, 0x100E, 0x020000, driver="e1000")
    bare.add_netdev(NO_GROUP, "eth0")
    bare.add_ipv4_route("eth0", "10.0.0.0", 8)
    d = check_json(capsys, bare.root, NO_GROUP)
    assert [p["kind"] for p in d["problems"]] == ["no-iommu-group", "active-netdev"]
    assert d["problems"][1] == {
        "device": NO_GROUP,
        "driver": "e1000",
        "reason": f"network interface eth0 of {NO_GROUP} is in use: it carries routes 10.0.0.0/8, "
                  "operstate up",
        "fix": "take eth0 down and remove its addresses first (ip addr flush dev eth0; "
               "ip link set eth0 down), or --force to take it anyway",
        "kind": "active-netdev",
        "evidence": [f"/sys/class/net/eth0 -> {NO_GROUP}", "/proc/net/route, /proc/net/ipv6_route"],
    }


def test_a_groupless_device_with_a_held_cdev_is_in_use(cdev: FakeSysfs) -> None:
    """Without an iommu_group link the device's own cdev is still looked
    for among the holders."""
    cdev.add_device(VFIO_DEV, 0x1234, 0x11E8, 0x00FF00, group=151, driver="vfio-pci")
    cdev.remove_group_link(VFIO_DEV)
    cdev.add_process(5000, "dpdk-app", ["/dev/vfio/devices/vfio0"])
    d = Host(cdev.root).diagnose(VFIO_DEV)
    assert d.group is None and d.in_use == [
        {"pid": 5000, "comm": "dpdk-app", "path": "/dev/vfio/devices/vfio0"}]


def test_a_group_member_that_vanished_first_does_not_hide_the_others(fake: FakeSysfs) -> None:
    """The group's first member (by address) is gone from the bus: the
    members after it are still read and judged."""
    os.unlink(fake.p(f"sys/bus/pci/devices/{PCI_BRIDGE}"))
    d = Host(fake.root).diagnose(EDU_BRIDGED)
    assert [(m.device, m.driver_kind) for m in d.members] == [
        (EDU_BRIDGED, "none"), (E1000_BRIDGED, "host")]
    assert not d.viable


def test_a_driverless_bridge_is_named_a_bridge(fake: FakeSysfs, capsys) -> None:
    """A bridge with no driver is not "not bound to vfio": vfio-pci would
    refuse it, so the first problem says it is a bridge."""
    d = check_json(capsys, fake.root, PCI_BRIDGE)
    assert d["driver_kind"] == "none"
    assert d["problems"][0] == {
        "device": PCI_BRIDGE,
        "driver": None,
        "reason": f"{PCI_BRIDGE} is a PCI bridge; vfio-pci does not take bridges",
        "fix": "assign the endpoints behind the bridge instead",
        "kind": "bridge",
        "evidence": [],
    }
    assert "not-vfio" not in [p["kind"] for p in d["problems"]]
