"""What the host-use check says, word for word, for each kind of use: the
routes and addresses of a network interface (capped at four, IPv6 link-local
and multicast left out), mounts with escaped spaces, swap through a
device-mapper name, stacked block devices, framebuffers and the boot VGA."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvfio.host.model import Host
from pyvfio.testing.fakesysfs import FakeSysfs, make_char_node

NIC = "0000:00:03.0"
DISK = "0000:00:04.0"
GPU = "0000:00:05.0"


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[FakeSysfs]:
    f = FakeSysfs(tmp_path / "root", noiommu=False)
    f.add_standard_drivers()
    f.add_device(NIC, 0x8086, 0x100E, 0x020000, group=3, driver="e1000")
    f.add_device(DISK, 0x144D, 0xA808, 0x010802, group=4, driver="nvme")
    f.add_device(GPU, 0x1234, 0x1111, 0x030000, group=5)
    with f:
        yield f


def _uses(tree: FakeSysfs, address: str) -> list:
    host = Host(tree.root)
    return host.usage.uses(address, host.device(address).class_code)


def test_a_netdev_with_many_routes_and_addresses(tree: FakeSysfs) -> None:
    tree.add_netdev(NIC, "eth0", operstate="down")
    tree.add_netdev(NIC, "eth1")  # nothing on it: no use
    for i in range(5):
        tree.add_ipv4_route("eth0", f"10.{i}.0.0", 16)
    tree.add_ipv4_route("eth0", gateway="10.0.0.1")
    tree.add_ipv6_route("eth0", "2001:db8::", 32)
    tree.add_ipv6_route("eth0", "::", 0)
    tree.add_ipv6_route("eth0", "fe80::", 64)  # link-local: on every interface that is up
    tree.add_ipv6_route("eth0", "ff00::", 8)  # multicast: likewise
    tree.add_ipv6_address("eth0", "fe80::1", scope=0x20)
    tree.add_ipv6_address("eth0", "::1", 128, scope=0x10)
    tree.add_ipv6_address("eth0", "2001:db8::5", 64)
    for i in range(4):
        tree.add_ipv6_address("eth0", f"2001:db8:1::{i + 1}", 48)
    (use,) = _uses(tree, NIC)
    assert (use.kind, use.name, use.device) == ("active-netdev", "eth0", NIC)
    assert use.reason == (
        f"network interface eth0 of {NIC} is in use: it carries routes 10.0.0.0/16, 10.1.0.0/16, "
        "10.2.0.0/16, 10.3.0.0/16 (+4 more) and addresses 2001:db8::5/64, 2001:db8:1::1/48, "
        "2001:db8:1::2/48, 2001:db8:1::3/48 (+1 more), operstate down")
    assert use.fix == ("take eth0 down and remove its addresses first (ip addr flush dev eth0; "
                       "ip link set eth0 down), or --force to take it anyway")
    assert use.evidence == [f"/sys/class/net/eth0 -> {NIC}", "/proc/net/route, /proc/net/ipv6_route",
                            "/proc/net/if_inet6"]


def test_routes_alone_and_addresses_alone(tree: FakeSysfs) -> None:
    tree.add_netdev(NIC, "eth0")
    tree.add_ipv4_route("eth0", gateway="192.168.1.1")
    tree.add_ipv6_route("eth0", "::", 0)
    (use,) = _uses(tree, NIC)
    assert use.reason == (f"network interface eth0 of {NIC} is in use: it carries routes "
                          "default via 192.168.1.1, default (IPv6), operstate up")
    assert use.evidence == [f"/sys/class/net/eth0 -> {NIC}", "/proc/net/route, /proc/net/ipv6_route"]
    os.unlink(tree.p("proc/net/route"))
    os.unlink(tree.p("proc/net/ipv6_route"))
    tree.add_ipv6_address("eth0", "2001:db8::7", 64)
    os.unlink(tree.p("sys/class/net/eth0/operstate"))
    (use,) = _uses(tree, NIC)
    assert use.reason == f"network interface eth0 of {NIC} is in use: it carries addresses 2001:db8::7/64"
    assert use.evidence == [f"/sys/class/net/eth0 -> {NIC}", "/proc/net/if_inet6"]


def test_malformed_proc_lines_are_skipped(tree: FakeSysfs) -> None:
    tree.add_netdev(NIC, "eth0")
    with open(tree.p("proc/net/route"), "a") as f:
        f.write("eth0\tZZZZ\t00000000\t0001\t0\t0\t100\t0000FFFF\t0\t0\t0\n")  # kept, as written
        f.write("eth0\tshort\n")
    with open(tree.p("proc/net/ipv6_route"), "a") as f:
        f.write("zz 40 " + "0" * 32 + " 00 " + "0" * 32 + " 00000100 00000001 00000000 00000001 eth0\n")
    with open(tree.p("proc/net/if_inet6"), "a") as f:
        f.write("zz 02 40 00 80 eth0\n")
    (use,) = _uses(tree, NIC)
    assert use.reason == f"network interface eth0 of {NIC} is in use: it carries routes ZZZZ/0000FFFF, operstate up"


def test_mounts_swap_and_holders_of_a_disk(tree: FakeSysfs) -> None:
    tree.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    p1 = tree.add_block(DISK, "nvme0n1p1", 1, parent="nvme0n1")
    tree.add_block(DISK, "nvme0n1p2", 2, parent="nvme0n1")
    tree.add_block(DISK, "nvme0n1p3", 3, parent="nvme0n1")
    tree.add_mount(p1, "/srv/my\\040data", "/dev/nvme0n1p1")
    tree.add_mount("0:45", "/home", "/dev/nvme0n1p1", fstype="btrfs")  # anonymous devnum, by source
    tree.add_mount("0:46", "/tmp", "tmpfs", fstype="tmpfs")
    dm = tree.add_dm("dm-0", "vg-root", 0, on=["nvme0n1p2"])
    tree.add_mount(dm, "/", "/dev/mapper/vg-root")
    tree.add_dm("dm-1", "cryptswap", 1, on=["nvme0n1p3"])
    os.makedirs(tree.p("dev/mapper"))
    make_char_node(tree.p("dev/mapper/cryptswap"), 253, 1)  # a character node has the same rdev
    tree.add_swap("/dev/mapper/cryptswap")
    tree.add_swap("/dev/nvme0n1p3")
    tree.add_swap("/swapfile")
    uses = _uses(tree, DISK)
    assert [(u.kind, u.name) for u in uses] == [
        ("mounted", "nvme0n1p1"), ("holder", "nvme0n1p2"), ("swap", "nvme0n1p3"),
        ("holder", "nvme0n1p3")]
    mounted, root_holder, swap, swap_holder = uses
    assert mounted.reason == (f"block device nvme0n1p1 of {DISK} holds a mounted filesystem "
                              "(/srv/my data, /home)")
    assert mounted.fix == "unmount /srv/my data, /home first, or --force to take it anyway"
    assert mounted.evidence == [f"/sys/class/block/nvme0n1p1 -> {DISK}", f"/proc/self/mountinfo ({p1})"]
    assert root_holder.reason == (f"block device nvme0n1p2 of {DISK} is held by dm-0 (vg-root), "
                                  "mounted at / (device-mapper, LVM or md RAID on top of it)")
    assert root_holder.evidence == [f"/sys/class/block/nvme0n1p2 -> {DISK}",
                                    "/sys/class/block/nvme0n1p2/holders/"]
    assert swap.reason == f"block device nvme0n1p3 of {DISK} is active swap"
    assert swap.fix == "swapoff /dev/nvme0n1p3 first, or --force to take it anyway"
    assert swap.evidence == [f"/sys/class/block/nvme0n1p3 -> {DISK}", "/proc/swaps"]
    assert swap_holder.reason.startswith(f"block device nvme0n1p3 of {DISK} is held by dm-1 (cryptswap) (")
    host = Host(tree.root)
    assert host.usage.block_devices(DISK) == ["nvme0n1", "nvme0n1p1", "nvme0n1p2", "nvme0n1p3"]
    assert host.usage.block_devices(NIC) == []


def test_a_swap_on_a_mapper_name_is_found_by_device_number(tree: FakeSysfs) -> None:
    tree.add_block(DISK, "nvme0n1", 0, subdir="nvme/nvme0")
    dm = tree.add_dm("dm-3", "swapvol", 3, on=["nvme0n1"])
    os.makedirs(tree.p("dev/mapper"))
    major, minor = (int(x) for x in dm.split(":"))
    make_char_node(tree.p("dev/mapper/swapvol"), major, minor)
    tree.add_swap("/dev/mapper/swapvol")
    (holder,) = _uses(tree, DISK)
    assert holder.kind == "holder" and "dm-3 (swapvol)" in holder.reason


def test_framebuffer_and_boot_vga(tree: FakeSysfs) -> None:
    assert _uses(tree, GPU) == []
    tree.set_boot_vga(GPU)
    assert _uses(tree, GPU) == []  # no framebuffer: no console on it
    tree.add_framebuffer(0, None)  # efifb, a platform device
    (use,) = _uses(tree, GPU)
    assert (use.kind, use.name) == ("boot-vga", "boot_vga")
    assert use.reason == (f"{GPU} is the boot VGA device and the host has a framebuffer (fb0): "
                          "the firmware console runs on it")
    assert use.evidence == [f"/sys/bus/pci/devices/{GPU}/boot_vga = 1", "/sys/class/graphics"]
    host = Host(tree.root)
    assert host.usage.uses(GPU) == []  # without the class code the boot VGA is not read
    assert host.usage.uses(NIC, 0x020000) == []
    tree.add_framebuffer(1, GPU)
    (use,) = _uses(tree, GPU)  # the framebuffer on the device says it: one use, not two
    assert (use.kind, use.name) == ("boot-vga", "fb1")
    assert use.reason == f"framebuffer fb1 (the console) runs on {GPU}"
    assert use.evidence == [f"/sys/class/graphics/fb1/device -> {GPU}"]
    tree.set_boot_vga(GPU, False)
    assert [u.name for u in _uses(tree, GPU)] == ["fb1"]
