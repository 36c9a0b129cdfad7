"""Whole values of the host-use check and its helpers where an order or a
boundary decides them: an idle interface sorting before a busy one, exactly
four (and five) routes or addresses, a plain file among the interfaces, a
link-local or garbled /proc line (net, mountinfo, swaps) before the lines that
count, a disk whose only use is swap or a holder, an md holder, a framebuffer
without a device and fbcon,
process fds that cannot be read, vfio_pci: aliases with ``?`` wildcards or
equal scores, and symlink names (trailing slash, a name ending in X)."""

from __future__ import annotations

import os
from pathlib import Path

from pyvfio.host.model import Host
from pyvfio.host.modules import VfioAliases
from pyvfio.host.sysfs import read_link_name
from pyvfio.host.usage import Use
from pyvfio.testing.fakesysfs import FakeSysfs

NIC = "0000:00:03.0"
DISK = "0000:00:04.0"
FIX = "take {0} down and remove its addresses first (ip addr flush dev {0}; ip link set {0} down), " \
      "or --force to take it anyway"


def _nic(bare: FakeSysfs) -> None:
    bare.add_device(NIC, 0x8086, 0x100E, 0x020000, group=3, driver="e1000")


def _disk(bare: FakeSysfs) -> None:
    bare.add_device(DISK, 0x144D, 0xA808, 0x010802, group=4, driver="nvme")


SWAP_USE = Use(DISK, "swap", "nvme0n1", f"block device nvme0n1 of {DISK} is active swap",
               "swapoff /dev/nvme0n1 first, or --force to take it anyway",
               [f"/sys/class/block/nvme0n1 -> {DISK}", "/proc/swaps"])
"""The whole use of the disk's nvme0n1 as active swap."""


def _uses(bare: FakeSysfs, address: str) -> list[Use]:
    host = Host(bare.root)
    return host.usage.uses(address, host.device(address).class_code)


def _netdev_use(name: str, carries: str, evidence: list[str]) -> Use:
    return Use(NIC, "active-netdev", name,
               f"network interface {name} of {NIC} is in use: it carries {carries}, operstate up",
               FIX.format(name), [f"/sys/class/net/{name} -> {NIC}", *evidence])


def test_an_idle_interface_sorting_first_does_not_hide_a_busy_one(bare: FakeSysfs) -> None:
    """Interfaces are checked in name order; an idle eth0 is skipped and the
    busy eth1 after it is still reported."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    bare.add_netdev(NIC, "eth1")
    bare.add_ipv4_route("eth1", "10.1.0.0", 16)
    assert _uses(bare, NIC) == [
        _netdev_use("eth1", "routes 10.1.0.0/16", ["/proc/net/route, /proc/net/ipv6_route"])]


def test_exactly_four_routes_and_four_addresses_are_all_shown(bare: FakeSysfs) -> None:
    """Four is the cap: four routes and four addresses are listed without a
    "(+0 more)" tail."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    for i in range(4):
        bare.add_ipv4_route("eth0", f"10.{i}.0.0", 16)
        bare.add_ipv6_address("eth0", f"2001:db8::{i + 1}", 64)
    assert _uses(bare, NIC) == [_netdev_use(
        "eth0",
        "routes 10.0.0.0/16, 10.1.0.0/16, 10.2.0.0/16, 10.3.0.0/16 and addresses "
        "2001:db8::1/64, 2001:db8::2/64, 2001:db8::3/64, 2001:db8::4/64",
        ["/proc/net/route, /proc/net/ipv6_route", "/proc/net/if_inet6"])]


def test_a_fifth_route_is_counted_as_one_more(bare: FakeSysfs) -> None:
    """Five routes: the first four are named and the fifth is "(+1 more)"."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    for i in range(5):
        bare.add_ipv4_route("eth0", f"10.{i}.0.0", 16)
    assert _uses(bare, NIC) == [_netdev_use(
        "eth0", "routes 10.0.0.0/16, 10.1.0.0/16, 10.2.0.0/16, 10.3.0.0/16 (+1 more)",
        ["/proc/net/route, /proc/net/ipv6_route"])]


def test_a_link_local_ipv6_route_listed_first_does_not_hide_the_next(bare: FakeSysfs) -> None:
    """The fe80::/64 route every interface has is skipped, and a global route
    listed after it in /proc/net/ipv6_route still counts."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    bare.add_ipv6_route("eth0", "fe80::", 64)
    bare.add_ipv6_route("eth0", "2001:db8::", 32)
    assert _uses(bare, NIC) == [
        _netdev_use("eth0", "routes 2001:db8::/32", ["/proc/net/route, /proc/net/ipv6_route"])]


def test_garbled_ipv6_lines_do_not_hide_the_lines_after_them(bare: FakeSysfs) -> None:
    """A garbled or short line in /proc/net/ipv6_route or /proc/net/if_inet6
    is skipped: it neither stops the reading nor fails it."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    with open(bare.p("proc/net/ipv6_route"), "a") as f:
        f.write("zz 40 " + "0" * 32 + " 00 " + "0" * 32 + " 00000100 00000001 00000000 00000001 eth0\n")
        f.write("short line\n")
    with open(bare.p("proc/net/if_inet6"), "a") as f:
        f.write("short line\n")
    bare.add_ipv6_route("eth0", "2001:db8::", 32)
    bare.add_ipv6_address("eth0", "2001:db8::9", 64)
    assert _uses(bare, NIC) == [_netdev_use(
        "eth0", "routes 2001:db8::/32 and addresses 2001:db8::9/64",
        ["/proc/net/route, /proc/net/ipv6_route", "/proc/net/if_inet6"])]


def test_a_disk_whose_only_use_is_swap(bare: FakeSysfs) -> None:
    """Swap alone (no mount before it on the device) is one whole use."""
    _disk(bare)
    bare.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    bare.add_swap("/dev/nvme0n1")
    assert _uses(bare, DISK) == [SWAP_USE]


def test_a_disk_whose_only_use_is_a_holder(bare: FakeSysfs) -> None:
    """A device-mapper device stacked on the disk, not mounted: one whole
    holder use, with its fix."""
    _disk(bare)
    bare.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    bare.add_dm("dm-0", "vg-data", 0, on=["nvme0n1"])
    assert _uses(bare, DISK) == [Use(
        DISK, "holder", "nvme0n1",
        f"block device nvme0n1 of {DISK} is held by dm-0 (vg-data) "
        "(device-mapper, LVM or md RAID on top of it)",
        "stop what is stacked on it (umount, vgchange -an, dmsetup remove, mdadm --stop) first, "
        "or --force to take it anyway",
        [f"/sys/class/block/nvme0n1 -> {DISK}", "/sys/class/block/nvme0n1/holders/"])]


def test_an_unreadable_fd_does_not_hide_the_other_fds_of_its_process(bare: FakeSysfs) -> None:
    """An fd whose link cannot be read (closed meanwhile) is skipped, and the
    process's other fds are still looked at.  Unreadable entries and wanted
    links are interleaved, so whatever order the directory lists them in,
    some wanted link comes after an unreadable one."""
    paths = [f"/dev/vfio/{g}" for g in range(1, 7)]
    bare.add_process(50, "qemu", [])
    fd_dir = bare.p("proc/50/fd")
    for i, path in enumerate(paths):
        Path(fd_dir, str(10 + 2 * i)).write_text("")  # not a link: readlink fails
        os.symlink(path, f"{fd_dir}/{11 + 2 * i}")
    assert Host(bare.root).holders(set(paths)) == {p: [{"pid": 50, "comm": "qemu"}] for p in paths}


def test_a_holder_whose_comm_cannot_be_read_is_named_by_a_question_mark(bare: FakeSysfs) -> None:
    """A process that exits between its fds and its comm being read is still
    listed, by pid, with the command "?"."""
    bare.add_process(51, "qemu", ["/dev/vfio/4"])
    os.unlink(bare.p("proc/51/comm"))
    assert Host(bare.root).holders({"/dev/vfio/4"}) == {"/dev/vfio/4": [{"pid": 51, "comm": "?"}]}


MODALIAS = "pci:v000015B3d0000101Esv000015B3sd00000001bc02sc00i00"


def _aliases(tmp_path: Path, text: str) -> VfioAliases:
    path = tmp_path / "modules.alias"
    path.write_text(text)
    return VfioAliases(str(path))


def test_question_marks_count_as_wildcards(tmp_path: Path) -> None:
    """A "?" wildcard costs like a "*": an exact device ID (5 wildcards) beats
    a pattern with two "?" in it (7), whichever is listed first."""
    aliases = _aliases(tmp_path, "alias vfio_pci:v000015B3d000010??sv*sd*bc*sc*i* acme_vfio_pci\n"
                                 "alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci\n")
    assert aliases.best_module(MODALIAS) == ("mlx5_vfio_pci", "v000015B3d0000101Esv*sd*bc*sc*i*")


def test_equal_wildcard_counts_keep_the_first_listed(tmp_path: Path) -> None:
    """On a tie the pattern listed first in modules.alias wins."""
    aliases = _aliases(tmp_path, "alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci\n"
                                 "alias vfio_pci:v000015B3d*sv000015B3sd*bc*sc*i* acme_vfio_pci\n")
    assert aliases.best_module(MODALIAS) == ("mlx5_vfio_pci", "v000015B3d0000101Esv*sd*bc*sc*i*")


def test_link_names_keep_their_last_component_verbatim(tmp_path: Path) -> None:
    """The name is the last component of the target: a trailing slash is
    dropped, and a name ending in X keeps its X."""
    os.symlink("../../../bus/pci/drivers/e1000/", tmp_path / "slash")
    os.symlink("../../../bus/pci/drivers/acmeX", tmp_path / "ends-in-x")
    assert read_link_name(str(tmp_path / "slash")) == "e1000"
    assert read_link_name(str(tmp_path / "ends-in-x")) == "acmeX"
    assert read_link_name(str(tmp_path / "absent")) is None


def test_an_address_with_a_garbled_prefix_length_is_skipped(bare: FakeSysfs) -> None:
    """A non-hex prefix length in /proc/net/if_inet6 skips that line like any
    other garbled field (it used to raise out of HostUsage)."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    with open(bare.p("proc/net/if_inet6"), "a") as f:
        f.write("20010db8000000000000000000000009 02 zz 00 80 eth0\n")
    assert _uses(bare, NIC) == []
    bare.add_ipv6_address("eth0", "2001:db8::7", 64)
    assert _uses(bare, NIC) == [_netdev_use("eth0", "addresses 2001:db8::7/64",
                                            ["/proc/net/if_inet6"])]


def test_an_ipv4_route_field_too_long_for_an_address_still_counts(bare: FakeSysfs) -> None:
    """A destination of over 8 hex digits is shown raw and still counts as a
    route (a line that cannot be read is not taken as "no route")."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    with open(bare.p("proc/net/route"), "a") as f:
        f.write("eth0\t123456789\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n")
    assert _uses(bare, NIC) == [_netdev_use("eth0", "routes 123456789/00FFFFFF",
                                            ["/proc/net/route, /proc/net/ipv6_route"])]


def test_swap_named_by_another_node_is_found_by_its_device_number(bare: FakeSysfs) -> None:
    """/proc/swaps may name the device by a node that is not its block name
    (an old-style /dev/mapper node, a /dev/disk/by-* path when swapon was
    given one): the node's device number finds the block device.  A swap
    file before it in the list is no device and is skipped."""
    import stat

    _disk(bare)
    devnum = bare.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    major, minor = (int(n) for n in devnum.split(":"))
    os.makedirs(bare.p("dev/mapper"), exist_ok=True)
    os.mknod(bare.p("dev/mapper/swap0"), stat.S_IFBLK | 0o600, os.makedev(major, minor))
    bare.add_swap("/swapfile")
    bare.add_swap("/dev/mapper/swap0")
    assert _uses(bare, DISK) == [SWAP_USE]


def test_a_disk_mounted_twice_and_held_twice_lists_each(bare: FakeSysfs) -> None:
    """Every mount point and every holder is named, in the kernel's order."""
    _disk(bare)
    devnum = bare.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    bare.add_mount(devnum, "/srv", "/dev/nvme0n1")
    bare.add_mount(devnum, "/var/lib", "/dev/nvme0n1")
    uses = _uses(bare, DISK)
    assert [(u.kind, u.reason) for u in uses] == [
        ("mounted", f"block device nvme0n1 of {DISK} holds a mounted filesystem (/srv, /var/lib)")]
    bare.add_dm("dm-0", "vg-a", 0, on=["nvme0n1"])
    bare.add_dm("dm-1", "vg-b", 1, on=["nvme0n1"])
    held = [u for u in _uses(bare, DISK) if u.kind == "holder"]
    assert [u.reason for u in held] == [
        f"block device nvme0n1 of {DISK} is held by dm-0 (vg-a); dm-1 (vg-b) "
        "(device-mapper, LVM or md RAID on top of it)"]


def test_the_console_framebuffer_is_one_whole_use(bare: FakeSysfs) -> None:
    bare.add_driver("i915", ids=[(0x8086, 0x3E92)])
    bare.add_device("0000:00:02.0", 0x8086, 0x3E92, 0x030000, group=2, driver="i915")
    bare.add_framebuffer(0, "0000:00:02.0")
    assert _uses(bare, "0000:00:02.0")[0] == Use(
        "0000:00:02.0", "boot-vga", "fb0", "framebuffer fb0 (the console) runs on 0000:00:02.0",
        "move the console off fb0 (fbcon=map:, or unbind the framebuffer driver) first, or "
        "--force to take it anyway",
        ["/sys/class/graphics/fb0/device -> 0000:00:02.0"])


def test_a_plain_file_among_the_interfaces_does_not_hide_them(bare: FakeSysfs) -> None:
    """/sys/class/net/bonding_masters (the bonding driver's control file, not
    an interface) sorts before eth0 and is skipped."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    with open(bare.p("sys/class/net/bonding_masters"), "w") as f:
        f.write("\n")
    bare.add_ipv4_route("eth0", "10.1.0.0", 16)
    assert _uses(bare, NIC) == [
        _netdev_use("eth0", "routes 10.1.0.0/16", ["/proc/net/route, /proc/net/ipv6_route"])]


def test_a_garbled_address_line_does_not_hide_the_lines_after_it(bare: FakeSysfs) -> None:
    """A whole-width /proc/net/if_inet6 line with a non-hex scope is skipped,
    and the address after it still counts."""
    _nic(bare)
    bare.add_netdev(NIC, "eth0")
    with open(bare.p("proc/net/if_inet6"), "a") as f:
        f.write("20010db8000000000000000000000009 02 40 zz 80 eth0\n")
    bare.add_ipv6_address("eth0", "2001:db8::7", 64)
    assert _uses(bare, NIC) == [_netdev_use("eth0", "addresses 2001:db8::7/64",
                                            ["/proc/net/if_inet6"])]


def test_a_short_mountinfo_line_does_not_hide_the_mounts_after_it(bare: FakeSysfs) -> None:
    """A mounted filesystem is one whole use, found past a line of
    /proc/self/mountinfo too short to read."""
    _disk(bare)
    devnum = bare.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    with open(bare.p("proc/self/mountinfo"), "a") as f:
        f.write("99 1 259:9\n")
    bare.add_mount(devnum, "/srv", "/dev/nvme0n1")
    assert _uses(bare, DISK) == [Use(
        DISK, "mounted", "nvme0n1",
        f"block device nvme0n1 of {DISK} holds a mounted filesystem (/srv)",
        "unmount /srv first, or --force to take it anyway",
        [f"/sys/class/block/nvme0n1 -> {DISK}", f"/proc/self/mountinfo ({devnum})"])]


def test_a_blank_line_in_proc_swaps_is_skipped(bare: FakeSysfs) -> None:
    _disk(bare)
    bare.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    with open(bare.p("proc/swaps"), "a") as f:
        f.write("\n")
    bare.add_swap("/dev/nvme0n1")
    assert _uses(bare, DISK) == [SWAP_USE]


def test_an_md_holder_is_named_alone_with_each_of_its_mount_points(bare: FakeSysfs) -> None:
    """An md RAID array has no device-mapper name: the holder is named by
    its block name only, then every place it is mounted."""
    _disk(bare)
    bare.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    md = bare.add_md("md127", 127, on=["nvme0n1"])
    bare.add_mount(md, "/srv", "/dev/md127")
    bare.add_mount(md, "/var/lib", "/dev/md127")
    (use,) = _uses(bare, DISK)
    assert use.reason == (f"block device nvme0n1 of {DISK} is held by md127, mounted at /srv, "
                          "/var/lib (device-mapper, LVM or md RAID on top of it)")


def test_a_framebuffer_without_a_device_does_not_hide_the_next(bare: FakeSysfs) -> None:
    """fb0 with no parent device (a virtual framebuffer) is skipped; fb1 on
    the GPU after it is still its console."""
    bare.add_driver("i915", ids=[(0x8086, 0x3E92)])
    bare.add_device("0000:00:02.0", 0x8086, 0x3E92, 0x030000, group=2, driver="i915")
    os.makedirs(bare.p("sys/devices/virtual/graphics/fb0"))
    os.makedirs(bare.p("sys/class/graphics"), exist_ok=True)
    os.symlink("../../devices/virtual/graphics/fb0", bare.p("sys/class/graphics/fb0"))
    bare.add_framebuffer(1, "0000:00:02.0")
    assert [(u.kind, u.name) for u in _uses(bare, "0000:00:02.0")] == [("boot-vga", "fb1")]


def test_fbcon_is_not_counted_as_a_framebuffer(bare: FakeSysfs) -> None:
    """/sys/class/graphics/fbcon is the console's control device, not a
    framebuffer: the boot VGA use names only fb0 (efifb's, on no PCI device)."""
    gpu = "0000:00:02.0"
    bare.add_driver("i915", ids=[(0x8086, 0x3E92)])
    bare.add_device(gpu, 0x8086, 0x3E92, 0x030000, group=2, driver="i915")
    bare.set_boot_vga(gpu)
    bare.add_framebuffer(0, None)
    os.makedirs(bare.p("sys/devices/virtual/graphics/fbcon"))
    os.symlink("../../devices/virtual/graphics/fbcon", bare.p("sys/class/graphics/fbcon"))
    (use,) = _uses(bare, gpu)
    assert use.reason == (f"{gpu} is the boot VGA device and the host has a framebuffer (fb0): "
                          "the firmware console runs on it")
