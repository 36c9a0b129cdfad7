"""What the host itself uses: the evidence that a device must not be taken.

dpdk-devbind refuses to unbind a NIC that has routes; pyvfio refuses every
kind of use it can see, for the device and for every member that ``--group``
would take.  Each kind of use has its own problem kind:

``active-netdev``
    a network interface of the device carries routes or addresses:
    ``/proc/net/route`` (IPv4, main table, any route, not only the default),
    ``/proc/net/ipv6_route`` and ``/proc/net/if_inet6`` (IPv6, link-local and
    multicast left out: every interface that is up has them).
``mounted``
    a block device of the device (or a partition of it) holds a mounted
    filesystem: ``/proc/self/mountinfo`` (``major:minor`` and mount source).
``swap``
    a block device of the device is active swap: ``/proc/swaps``.
``holder``
    something is stacked on a block device of the device: device-mapper
    (LVM, dm-crypt) or md RAID, as ``/sys/class/block/X/holders/`` lists it.
``boot-vga``
    the device is the boot VGA device (``boot_vga`` reads 1) while a
    framebuffer exists, or a framebuffer (``/sys/class/graphics/fbN/device``)
    sits on the device: the console would go away with it.

Everything is read once per :class:`HostUsage` (one per
:class:`~pyvfio.host.model.Host` snapshot): the class directories
``/sys/class/net``, ``/sys/class/block`` and ``/sys/class/graphics`` are
walked once and mapped to PCI addresses through their link targets (the last
PCI address in ``../../devices/pci0000:00/0000:00:1f.2/ata1/.../block/sda``),
so a host with 10,000 devices costs a few reads, not a walk below each device.

Known blind spot: an IPv4 address configured without a prefix route
(``noprefixroute``) and no other route is not in any ``/proc/net`` table that
names its interface; such an interface counts as idle.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pyvfio.host.sysfs import list_dir, read_str

# Problem kinds (the "kind" field of each problem object).
P_ACTIVE_NETDEV = "active-netdev"
P_MOUNTED = "mounted"
P_SWAP = "swap"
P_HOLDER = "holder"
P_BOOT_VGA = "boot-vga"
USAGE_KINDS = (P_ACTIVE_NETDEV, P_MOUNTED, P_SWAP, P_HOLDER, P_BOOT_VGA)

_BDF_IN_PATH = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")

# /proc/net/if_inet6 scope values (include/net/ipv6.h IPV6_ADDR_SCOPE_*,
# shifted as __ipv6_addr_type() prints them).
_SCOPE_HOST = 0x10
_SCOPE_LINK = 0x20


def pci_owner(link_target: str) -> str | None:
    """The PCI function a sysfs class entry belongs to: the last component of
    its link target that is a PCI address (``None`` for virtual devices)."""
    found = None
    for part in link_target.split("/"):
        if _BDF_IN_PATH.match(part):
            found = part
    return found.lower() if found else None


@dataclass
class Use:
    """One way the host uses a device: ``kind`` (above), the object used
    (``eno1``, ``nvme0n1p1``, ``fb0``), why that counts, what to do, and the
    files that say so."""

    device: str
    kind: str
    name: str
    reason: str
    fix: str
    evidence: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "kind": self.kind, "name": self.name,
                "reason": self.reason, "fix": self.fix, "evidence": list(self.evidence)}


@dataclass
class _Block:
    name: str
    devnum: str | None  # "major:minor"
    owner: str | None
    holders: list[str]


def _ipv4_route(dest_hex: str, mask_hex: str, gateway_hex: str) -> str:
    """A /proc/net/route line's destination as ``a.b.c.d/len`` (the kernel
    prints the addresses as host-order hex of network-order bytes)."""
    def addr(text: str) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(int(text, 16).to_bytes(4, "little"))

    prefix = bin(int(mask_hex, 16)).count("1")
    shown = "default" if prefix == 0 else f"{addr(dest_hex)}/{prefix}"
    gateway = addr(gateway_hex)
    return f"{shown} via {gateway}" if int(gateway) else shown


def _ipv6(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(bytes.fromhex(text))


def _ignorable_ipv6(address: ipaddress.IPv6Address) -> bool:
    """Link-local and multicast: present on every interface that is up."""
    return address.is_link_local or address.is_multicast


class HostUsage:
    """The host's use of its devices, read once under ``prefix`` (the root
    with a trailing slash)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._by_device: dict[str, list[Use]] | None = None

    def p(self, relative: str) -> str:
        return self._prefix + relative

    def block_devices(self, address: str) -> list[str]:
        """The block devices (disks and partitions) on the device ``address``."""
        if self._by_device is None:
            self._by_device = self._read()
        return sorted(self._blocks_by_owner.get(address, ()))

    def uses(self, address: str, class_code: int | None = None) -> list[Use]:
        """Every use of the device ``address`` (empty if the host does not use it).
        ``class_code`` lets the boot VGA check read ``boot_vga`` only for
        display controllers."""
        if self._by_device is None:
            self._by_device = self._read()
        found = list(self._by_device.get(address, ()))
        if class_code is not None and class_code >> 16 == 0x03 and self._framebuffers:
            boot_vga = read_str(self.p(f"sys/bus/pci/devices/{address}/boot_vga"))
            if boot_vga == "1" and not any(u.kind == P_BOOT_VGA for u in found):
                fbs = ", ".join(sorted(self._framebuffers))
                found.append(Use(
                    address, P_BOOT_VGA, "boot_vga",
                    f"{address} is the boot VGA device and the host has a framebuffer ({fbs}): "
                    "the firmware console runs on it",
                    "move the console off it (video=efifb:off, or boot with another primary GPU); "
                    "--force to take it anyway",
                    [f"/sys/bus/pci/devices/{address}/boot_vga = 1", "/sys/class/graphics"],
                ))
        return found

    # ---- reading, once ----

    def _read(self) -> dict[str, list[Use]]:
        by_device: dict[str, list[Use]] = {}
        self._read_netdevs(by_device)
        self._read_blocks(by_device)
        self._read_graphics(by_device)
        return by_device

    def _class_owners(self, cls: str) -> dict[str, str]:
        """``{name: pci address}`` for the entries of ``/sys/class/<cls>``
        that sit on a PCI function."""
        base = self.p(f"sys/class/{cls}")
        owners: dict[str, str] = {}
        # In name order, so that a reading does not depend on the order
        # the directory happens to list its entries in.
        for name in sorted(list_dir(base)):
            try:
                target = os.readlink(f"{base}/{name}")
            except OSError:
                continue
            owner = pci_owner(target)
            if owner is not None:
                owners[name] = owner
        return owners

    def _read_netdevs(self, by_device: dict[str, list[Use]]) -> None:
        owners = self._class_owners("net")
        if not owners:
            return
        routes: dict[str, list[str]] = {}
        text = read_str(self.p("proc/net/route")) or ""
        for line in text.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 8 and cols[0] in owners:
                try:
                    routes.setdefault(cols[0], []).append(_ipv4_route(cols[1], cols[7], cols[2]))
                except (ValueError, OverflowError):  # OverflowError: over 8 hex digits
                    routes.setdefault(cols[0], []).append(f"{cols[1]}/{cols[7]}")
        text = read_str(self.p("proc/net/ipv6_route")) or ""
        for line in text.splitlines():
            cols = line.split()
            if len(cols) >= 10 and cols[9] in owners:
                try:
                    dest = _ipv6(cols[0])
                    if _ignorable_ipv6(dest):
                        continue
                    plen = int(cols[1], 16)
                except ValueError:
                    continue
                routes.setdefault(cols[9], []).append(
                    "default (IPv6)" if plen == 0 else f"{dest}/{plen}")
        addresses: dict[str, list[str]] = {}
        text = read_str(self.p("proc/net/if_inet6")) or ""
        for line in text.splitlines():
            cols = line.split()
            if len(cols) >= 6 and cols[5] in owners:
                try:
                    addr = _ipv6(cols[0])
                    prefix_len = int(cols[2], 16)
                    scope = int(cols[3], 16)
                except ValueError:
                    continue
                if scope in (_SCOPE_HOST, _SCOPE_LINK) or _ignorable_ipv6(addr):
                    continue
                addresses.setdefault(cols[5], []).append(f"{addr}/{prefix_len}")
        for name, owner in sorted(owners.items()):
            r, a = routes.get(name, []), addresses.get(name, [])
            if not r and not a:
                continue
            what = []
            if r:
                what.append("routes " + ", ".join(r[:4]) + (f" (+{len(r) - 4} more)" if len(r) > 4 else ""))
            if a:
                what.append("addresses " + ", ".join(a[:4]) + (f" (+{len(a) - 4} more)" if len(a) > 4 else ""))
            evidence = [f"/sys/class/net/{name} -> {owner}"]
            if r:
                evidence.append("/proc/net/route, /proc/net/ipv6_route")
            if a:
                evidence.append("/proc/net/if_inet6")
            operstate = read_str(self.p(f"sys/class/net/{name}/operstate"))
            state = f", operstate {operstate}" if operstate else ""
            by_device.setdefault(owner, []).append(Use(
                owner, P_ACTIVE_NETDEV, name,
                f"network interface {name} of {owner} is in use: it carries {' and '.join(what)}{state}",
                f"take {name} down and remove its addresses first (ip addr flush dev {name}; "
                f"ip link set {name} down), or --force to take it anyway",
                evidence,
            ))

    def _read_blocks(self, by_device: dict[str, list[Use]]) -> None:
        owners = self._class_owners("block")
        self._blocks_by_owner: dict[str, list[str]] = {}
        for name, owner in owners.items():
            self._blocks_by_owner.setdefault(owner, []).append(name)
        if not owners:
            return
        blocks: dict[str, _Block] = {}
        for name in list_dir(self.p("sys/class/block")):
            base = self.p(f"sys/class/block/{name}")
            blocks[name] = _Block(name, read_str(f"{base}/dev"), owners.get(name),
                                  sorted(list_dir(f"{base}/holders")))
        by_devnum = {b.devnum: b.name for b in blocks.values() if b.devnum}
        mounted: dict[str, list[str]] = {}  # block name -> mount points
        for line in (read_str(self.p("proc/self/mountinfo")) or "").splitlines():
            left, _, right = line.partition(" - ")
            cols, rcols = left.split(), right.split()
            if len(cols) < 5:
                continue
            block = by_devnum.get(cols[2])
            if block is None and len(rcols) >= 2 and rcols[1].startswith("/dev/"):
                # btrfs and others report an anonymous 0:N; the source names the device.
                source = rcols[1][5:]
                block = source if source in blocks else None
            if block is not None:
                mounted.setdefault(block, []).append(cols[4].replace("\\040", " "))
        swapped: set[str] = set()
        for line in (read_str(self.p("proc/swaps")) or "").splitlines()[1:]:
            cols = line.split()
            if not cols or not cols[0].startswith("/dev/"):
                continue
            swap = os.path.basename(cols[0])
            if swap not in blocks:  # /dev/mapper/NAME and other links: by device number
                try:
                    st = os.stat(self.p(cols[0][1:]))
                    swap = by_devnum.get(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", swap)
                except OSError:
                    pass
            swapped.add(swap)
        for b in sorted(blocks.values(), key=lambda b: b.name):
            if b.owner is None:
                continue
            evidence = [f"/sys/class/block/{b.name} -> {b.owner}"]
            if b.name in mounted:
                points = ", ".join(mounted[b.name])
                by_device.setdefault(b.owner, []).append(Use(
                    b.owner, P_MOUNTED, b.name,
                    f"block device {b.name} of {b.owner} holds a mounted filesystem ({points})",
                    f"unmount {points} first, or --force to take it anyway",
                    [*evidence, f"/proc/self/mountinfo ({b.devnum})"],
                ))
            if b.name in swapped:
                by_device.setdefault(b.owner, []).append(Use(
                    b.owner, P_SWAP, b.name,
                    f"block device {b.name} of {b.owner} is active swap",
                    f"swapoff /dev/{b.name} first, or --force to take it anyway",
                    [*evidence, "/proc/swaps"],
                ))
            if b.holders:
                stacked = []
                for h in b.holders:
                    dm_name = read_str(self.p(f"sys/class/block/{h}/dm/name"))
                    label = f"{h} ({dm_name})" if dm_name else h
                    if h in mounted:
                        label += f", mounted at {', '.join(mounted[h])}"
                    stacked.append(label)
                by_device.setdefault(b.owner, []).append(Use(
                    b.owner, P_HOLDER, b.name,
                    f"block device {b.name} of {b.owner} is held by {'; '.join(stacked)} "
                    "(device-mapper, LVM or md RAID on top of it)",
                    "stop what is stacked on it (umount, vgchange -an, dmsetup remove, "
                    "mdadm --stop) first, or --force to take it anyway",
                    [*evidence, f"/sys/class/block/{b.name}/holders/"],
                ))

    def _read_graphics(self, by_device: dict[str, list[Use]]) -> None:
        base = self.p("sys/class/graphics")
        self._framebuffers = [n for n in list_dir(base) if n.startswith("fb") and n[2:].isdigit()]
        for name in sorted(self._framebuffers):
            try:
                target = os.readlink(f"{base}/{name}/device")
            except OSError:
                continue
            owner = pci_owner(target)
            if owner is None:
                continue
            by_device.setdefault(owner, []).append(Use(
                owner, P_BOOT_VGA, name,
                f"framebuffer {name} (the console) runs on {owner}",
                f"move the console off {name} (fbcon=map:, or unbind the framebuffer driver) "
                "first, or --force to take it anyway",
                [f"/sys/class/graphics/{name}/device -> {owner}"],
            ))

    _framebuffers: list[str]
