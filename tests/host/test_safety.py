"""Issue 10: readiness from the kernel's evidence, and never taking a device
the host uses.  Each case is a small fake root laid out as the kernel lays
out sysfs, /dev and /proc; each fails on the code before the issue."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvfio.cli import main
from pyvfio.errors import BindError, HostUsesDevice
from pyvfio.host import Host, bind
from pyvfio.testing.fakesysfs import VFIO_GROUP_MAJOR, FakeSysfs, make_char_node

from .conftest import as_nobody

MGMT = "0000:02:00.0"  # tg3, eno1, the default route
MGMT_PEER = "0000:02:00.1"  # its sibling port, same group 75
VGPU_VF = "0000:41:00.4"
NO_GROUP = "0001:01:00.0"
NVME = "0000:05:00.0"
NVME_PEER = "0000:05:00.1"


def snapshot(root: str) -> dict[str, str]:
    """Every file, link and node under ``root`` with its content (or target,
    or device number): equal snapshots mean nothing was written anywhere."""
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if os.path.islink(path):
                seen[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                seen[rel] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif os.path.isdir(path):
                seen[rel] = "dir"
            else:
                seen[rel] = f"node {st.st_mode:o} {st.st_rdev}"
    return seen


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def host(tmp_path: Path) -> Iterator[FakeSysfs]:
    f = FakeSysfs(tmp_path / "root", noiommu=False, cdev=True)
    f.add_standard_drivers(variant=True)
    f.add_driver("tg3", ids=[(0x14E4, 0x165F)])
    f.add_driver("r8169", ids=[(0x10EC, 0x8168)])
    f.add_driver("nvidia", ids=[(0x10DE, 0x2236)], registers_vfio=True)
    with f:
        yield f


# ---- 1. the management NIC -------------------------------------------------------------------

def _mgmt(host: FakeSysfs) -> None:
    host.add_device(MGMT, 0x14E4, 0x165F, 0x020000, group=75, driver="tg3")
    host.add_device(MGMT_PEER, 0x14E4, 0x165F, 0x020000, group=75, driver="tg3")
    host.add_netdev(MGMT, "eno1")
    host.add_netdev(MGMT_PEER, "eno2", operstate="down")


def test_management_nic_is_refused_before_any_write(host: FakeSysfs, capsys) -> None:
    _mgmt(host)
    host.add_ipv4_route("eno1", "0.0.0.0", 0, gateway="192.168.1.1")
    before = snapshot(host.root)
    code, out, err = run(capsys, "--root", host.root, "bind", "--group", "02:00.1")
    assert code == 1
    assert "eno1" in err and MGMT in err and "default via 192.168.1.1" in err and "--force" in err
    assert host.writes == [] and snapshot(host.root) == before
    assert host.devices[MGMT].driver == "tg3"
    # check names it with its own kind, for the device and for its group peer
    code, out, _ = run(capsys, "--root", host.root, "check", "--json", MGMT, MGMT_PEER)
    mgmt, peer = json.loads(out)
    (use,) = [p for p in mgmt["problems"] if p["kind"] == "active-netdev"]
    assert use["device"] == MGMT and "/proc/net/route, /proc/net/ipv6_route" in use["evidence"]
    assert [p["device"] for p in peer["problems"] if p["kind"] == "active-netdev"] == [MGMT]
    assert "--group would take it" in next(p for p in peer["problems"] if p["kind"] == "active-netdev")["reason"]


def test_dry_run_shows_the_refusal(host: FakeSysfs, capsys) -> None:
    _mgmt(host)
    host.add_ipv4_route("eno1", "10.0.0.0", 8)
    code, _, err = run(capsys, "--root", host.root, "bind", "--group", "--dry-run", MGMT_PEER)
    assert code == 1 and "10.0.0.0/8" in err and "eno1" in err
    code, out, _ = run(capsys, "--root", host.root, "bind", "--group", "--dry-run", "--json", MGMT_PEER)
    refusal = json.loads(out)["error"]
    assert code == 1 and refusal["kind"] == "host-uses-device"
    assert [p["kind"] for p in refusal["problems"]] == ["active-netdev"]
    assert host.writes == []


def test_force_takes_it(host: FakeSysfs, capsys) -> None:
    _mgmt(host)
    host.add_ipv4_route("eno1", "0.0.0.0", 0, gateway="192.168.1.1")
    code, out, err = run(capsys, "--root", host.root, "bind", "--group", "--force", "--json",
                         "--state-dir", host.p("run/pyvfio/bind"), MGMT_PEER)
    assert code == 0, err
    result = json.loads(out)
    forced = {d["device"]: [p["kind"] for p in d["forced"]] for d in result["devices"]}
    assert forced == {MGMT: ["active-netdev"], MGMT_PEER: []}
    assert host.devices[MGMT].driver == "vfio-pci" and host.devices[MGMT_PEER].driver == "vfio-pci"


@pytest.mark.parametrize("setup", ["ipv4-subnet", "ipv6-address", "ipv6-route"])
def test_every_kind_of_route_or_address_counts(host: FakeSysfs, setup: str) -> None:
    _mgmt(host)
    if setup == "ipv4-subnet":
        host.add_ipv4_route("eno1", "192.168.7.0", 24)
    elif setup == "ipv6-address":
        host.add_ipv6_address("eno1", "2001:db8::5", 64)
    else:
        host.add_ipv6_route("eno1", "2001:db8:1::", 48)
    with pytest.raises(HostUsesDevice, match="eno1") as exc:
        bind(MGMT, root=host.root, group=True)
    assert {p["kind"] for p in exc.value.problems} == {"active-netdev"}
    assert host.writes == []


def test_link_local_alone_is_not_use(host: FakeSysfs) -> None:
    """Every interface that is up has fe80::/64 and multicast routes and a
    link-local address: they carry nothing the host configured."""
    _mgmt(host)
    host.add_ipv6_address("eno1", "fe80::1", 64, scope=0x20)
    host.add_ipv6_route("eno1", "fe80::", 64)
    host.add_ipv6_route("eno1", "ff00::", 8)
    assert Host(host.root).usage.uses(MGMT) == []
    bind(MGMT, root=host.root, group=True)
    assert host.devices[MGMT].driver == "vfio-pci"


# ---- 2. a firmware direct mapping ------------------------------------------------------------

def test_direct_reserved_region_is_not_ready(host: FakeSysfs, capsys) -> None:
    host.add_device("0000:00:14.0", 0x8086, 0xA36D, 0x0C0330, group=5, driver="vfio-pci")
    host.set_reserved_regions(5, "0x00000000bddde000 0x00000000bdddefff direct\n"
                                 "0x00000000fee00000 0x00000000feefffff msi\n")
    code, out, _ = run(capsys, "--root", host.root, "check", "--json", "00:14.0")
    (d,) = json.loads(out)
    assert code == 1 and not d["ready"] and d["viable"]
    (p,) = [p for p in d["problems"] if p["kind"] == "reserved-direct"]
    assert "0x00000000bddde000-0x00000000bdddefff" in p["reason"] and "ownership" in p["reason"]
    assert "RMRR" in p["fix"]


def test_direct_relaxable_stays_fine(host: FakeSysfs) -> None:
    host.add_device("0000:00:14.0", 0x8086, 0xA36D, 0x0C0330, group=5, driver="vfio-pci")
    host.set_reserved_regions(5, "0x00000000bddde000 0x00000000bdddefff direct-relaxable\n")
    assert Host(host.root).diagnose("00:14.0").ready


def test_bind_into_a_direct_group_needs_force(host: FakeSysfs) -> None:
    host.add_device("0000:00:14.0", 0x8086, 0x100E, 0x020000, group=5, driver="e1000")
    host.set_reserved_regions(5, "0x00000000bddde000 0x00000000bdddefff direct\n")
    with pytest.raises(HostUsesDevice, match="direct mapping"):
        bind("00:14.0", root=host.root)
    assert host.writes == []
    (result,) = bind("00:14.0", root=host.root, force=True)
    assert [p["kind"] for p in result.forced] == ["reserved-direct"]


# ---- 3. a vendor driver that registered the device with vfio --------------------------------

def _vgpu(host: FakeSysfs) -> None:
    host.add_device(VGPU_VF, 0x10DE, 0x2236, 0x030200, group=31, driver="nvidia")
    assert host.devices[VGPU_VF].vfio_cdev == "vfio0"
    assert os.path.exists(host.p("dev/vfio/devices/vfio0"))


def test_vendor_driver_registration_is_a_vfio_device(host: FakeSysfs, capsys) -> None:
    _vgpu(host)
    code, out, _ = run(capsys, "--root", host.root, "check", "--json", VGPU_VF)
    (d,) = json.loads(out)
    assert code == 0 and d["ready"] and d["driver_kind"] == "vfio-variant"
    assert d["best_driver"] == "nvidia" and d["problems"] == []
    # The device's own cdev says so, before any whole-group reasoning.
    h = Host(host.root)
    assert h.driver_kind(h.device(VGPU_VF)) == "vfio-variant"
    assert {"source": f"/sys/bus/pci/devices/{VGPU_VF}/vfio-dev/vfio0",
            "says": "nvidia registered the device with vfio"} in d["evidence"]
    assert any(e["says"] == "no vfio_pci: alias for module nvidia" for e in d["evidence"])
    # Nothing rebinds it: bind sees it already on its best driver.
    (result,) = bind(VGPU_VF, root=host.root)
    assert not result.changed and host.devices[VGPU_VF].driver == "nvidia" and host.writes == []


def test_no_modules_alias_at_all(host: FakeSysfs) -> None:
    """A minimal container image: no /lib/modules.  The kernel's registration
    still says what is a vfio device."""
    _vgpu(host)
    host.add_device("0000:04:00.0", 0x15B3, 0x101E, 0x020000, group=20, driver="mlx5_vfio_pci")
    os.unlink(host.p(f"lib/modules/{host.release}/modules.alias"))
    h = Host(host.root)
    for bdf, driver in ((VGPU_VF, "nvidia"), ("0000:04:00.0", "mlx5_vfio_pci")):
        d = h.diagnose(bdf)
        assert d.ready and d.driver_kind == "vfio-variant" and d.best_driver == driver
        assert {"source": "modules.alias",
                "says": "absent (no /lib/modules/<release>/modules.alias); not consulted"} in d.evidence


# ---- 4. no IOMMU group on an IOMMU host ------------------------------------------------------

def test_no_group_on_an_iommu_host_is_refused_before_any_write(host: FakeSysfs, capsys) -> None:
    host.add_device(NO_GROUP, 0x10EC, 0x8168, 0x020000, driver="r8169")
    before = snapshot(host.root)
    with pytest.raises(BindError, match="no IOMMU group although an IOMMU is present"):
        bind(NO_GROUP, root=host.root)
    code, _, err = run(capsys, "--root", host.root, "bind", "--force", "1:01:00.0")
    assert code == 1 and "EINVAL" in err
    assert host.writes == [] and snapshot(host.root) == before
    assert host.devices[NO_GROUP].driver == "r8169"


# ---- 5. stale nodes --------------------------------------------------------------------------

def test_stale_group_node(host: FakeSysfs, capsys) -> None:
    host.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=151, driver="vfio-pci")
    kernel = Path(host.p("sys/class/vfio/151/dev")).read_text().strip()
    assert Host(host.root).diagnose("00:03.0").ready
    make_char_node(host.p("dev/vfio/151"), VFIO_GROUP_MAJOR, 99)
    code, out, _ = run(capsys, "--root", host.root, "check", "--json", "00:03.0")
    (d,) = json.loads(out)
    assert code == 1 and not d["ready"] and d["group_node"] is None
    (p,) = [p for p in d["problems"] if p["kind"] == "stale-node"]
    assert f"/dev/vfio/151 is device {VFIO_GROUP_MAJOR}:99" in p["reason"] and kernel in p["reason"]
    assert "no-group-node" not in [p["kind"] for p in d["problems"]]


def test_stale_cdev_node(host: FakeSysfs) -> None:
    host.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=151, driver="vfio-pci")
    make_char_node(host.p("dev/vfio/devices/vfio0"), 0, 7)
    d = Host(host.root).diagnose("00:03.0")
    assert not d.ready
    (p,) = [p for p in d.problems if p.kind == "stale-node"]
    assert "/dev/vfio/devices/vfio0 is device 0:7" in p.reason and "vfio-dev/vfio0/dev is 0:4096" in p.reason


def test_a_node_the_kernel_does_not_know(host: FakeSysfs) -> None:
    """A /dev/vfio/N left from an earlier boot, with no /sys/class/vfio/N."""
    host.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=151)
    make_char_node(host.p("dev/vfio/151"), VFIO_GROUP_MAJOR, 2)
    d = Host(host.root).diagnose("00:03.0")
    assert [p.kind for p in d.problems] == ["not-vfio", "stale-node"]
    assert "no /sys/class/vfio/151" in d.problems[1].reason


# ---- the host's storage and console ----------------------------------------------------------

def _nvme(host: FakeSysfs) -> None:
    host.add_device(NVME, 0x144D, 0xA808, 0x010802, group=40, driver="nvme")
    host.add_device(NVME_PEER, 0x1234, 0x11E8, 0x00FF00, group=40)
    host.add_block(NVME, "nvme0n1", 0, subdir="nvme/nvme0")
    host.add_block(NVME, "nvme0n1p1", 1, parent="nvme0n1")
    host.add_block(NVME, "nvme0n1p2", 2, parent="nvme0n1")


def test_mounted_filesystem_refused_through_group(host: FakeSysfs) -> None:
    _nvme(host)
    host.add_mount("259:1", "/srv/data", "/dev/nvme0n1p1")
    with pytest.raises(HostUsesDevice, match=r"nvme0n1p1 of 0000:05:00.0 holds a mounted filesystem \(/srv/data\)"):
        bind(NVME_PEER, root=host.root, group=True)
    assert host.writes == []


def test_mount_found_by_source_when_the_number_is_anonymous(host: FakeSysfs) -> None:
    _nvme(host)
    host.add_mount("0:33", "/", "/dev/nvme0n1p2", fstype="btrfs")
    assert [u.kind for u in Host(host.root).usage.uses(NVME)] == ["mounted"]


def test_swap_and_holders(host: FakeSysfs) -> None:
    _nvme(host)
    host.add_swap("/dev/nvme0n1p2")
    host.add_dm("dm-0", "vg0-home", 0, on=["nvme0n1p1"])
    host.add_mount("253:0", "/home", "/dev/mapper/vg0-home")
    d = Host(host.root).diagnose(NVME)
    kinds = [(p.kind, p.device) for p in d.problems]
    assert ("swap", NVME) in kinds and ("holder", NVME) in kinds
    holder = next(p for p in d.problems if p.kind == "holder")
    assert "dm-0 (vg0-home), mounted at /home" in holder.reason
    with pytest.raises(HostUsesDevice) as exc:
        bind(NVME, root=host.root)
    assert {p["kind"] for p in exc.value.problems} == {"swap", "holder"}


def test_boot_vga_with_a_framebuffer(host: FakeSysfs) -> None:
    host.add_device("0000:01:00.0", 0x10DE, 0x1B80, 0x030000, group=12, driver="nouveau")
    host.set_boot_vga("0000:01:00.0")
    assert Host(host.root).usage.uses("0000:01:00.0", 0x030000) == []  # no framebuffer: headless
    host.add_framebuffer(0, None)  # efifb on the firmware's framebuffer
    with pytest.raises(HostUsesDevice, match="boot VGA device"):
        bind("0000:01:00.0", root=host.root)
    host.add_framebuffer(1, "0000:01:00.0")
    kinds = [(u.kind, u.name) for u in Host(host.root).usage.uses("0000:01:00.0", 0x030000)]
    assert kinds == [("boot-vga", "fb1")]


# ---- rights ----------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_user_who_cannot_write_gets_one_line_and_nothing_is_written(
        capsys, nobody_tree: FakeSysfs) -> None:
    """The command runs with the effective uid of nobody (seteuid, so this
    process can come back): it may read the tree, write nothing in it."""
    before = snapshot(nobody_tree.root)
    for device in ("00:03.0", "00:04.0"):
        with as_nobody():
            code, _, err = run(capsys, "--root", nobody_tree.root, "bind", device)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1, err
        assert "cannot write" in lines[0] and "nothing was changed" in lines[0]
    assert snapshot(nobody_tree.root) == before


# ---- the whole host --------------------------------------------------------------------------

def test_check_all_is_every_device_diagnosed_alone(host: FakeSysfs, capsys) -> None:
    """check --all (lean device reads, one /proc scan, usage read once) says
    exactly what check says of each device named on its own."""
    _mgmt(host)
    host.add_ipv4_route("eno1", "0.0.0.0", 0, gateway="192.168.1.1")
    _vgpu(host)
    _nvme(host)
    host.add_mount("259:1", "/srv/data", "/dev/nvme0n1p1")
    host.add_device("0000:00:01.0", 0x8086, 0xA110, 0x060400, group=1, driver="pcieport")
    code, out, _ = run(capsys, "--root", host.root, "check", "--all", "--json")
    whole = json.loads(out)
    assert code == 1
    assert [d["device"] for d in whole] == sorted(a for a in host.devices if a != "0000:00:01.0")
    code, out, _ = run(capsys, "--root", host.root, "check", "--json", *[d["device"] for d in whole])
    assert json.loads(out) == whole
    kinds = {p["kind"] for d in whole for p in d["problems"]}
    assert {"active-netdev", "mounted", "host-driver", "not-vfio"} <= kinds
