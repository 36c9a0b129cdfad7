"""A fake host root: a directory tree shaped like sysfs/dev/proc, plus a
Python object that plays the kernel when something writes into it.

A plain file tree cannot react to ``echo 0000:01:00.0 > .../unbind``, so (like
libvirt's ``virpcimock``, which intercepts ``open``/``write`` in an LD_PRELOAD
library) :class:`FakeSysfs` implements :class:`pyvfio.host.sysfs.SysfsWriter`
and applies the kernel's semantics to the tree:

- ``driver_override``: a newline ends the value; an empty value clears it
  (reads back ``(null)``, as ``driver_override_show()`` prints a NULL).
- ``drivers/X/bind``: ``ENODEV`` if no such device or X does not match it,
  ``EBUSY`` if the device has a driver; a probe that fails means ``ENODEV``.
- ``drivers/X/unbind``: ``ENODEV`` unless the device is bound to X.
- ``drivers_probe``: a bound device is left alone; otherwise drivers are tried
  in registration order and the first one that matches and probes wins; no
  match is not an error (``bus_rescan_devices_helper()`` returns 0).
- matching follows ``pci_match_device()``: with ``driver_override`` set only
  that driver matches; vfio drivers match only through the override
  (``PCI_DRIVER_OVERRIDE_DEVICE_VFIO`` ids are ``override_only``).
- a vfio driver's probe creates ``/dev/vfio/N`` (and, with ``cdev=True``,
  ``vfio-dev/vfioX`` plus ``/dev/vfio/devices/vfioX``); it refuses bridges
  (``vfio_pci_probe()`` rejects non-normal headers) and devices without a
  group unless no-IOMMU mode is on, where it makes a ``noiommu-N`` group.

Use it in tests with :meth:`install` (routes pyvfio's writes for this root
through the fake, also for ``pyvfio.cli.main(["--root", ...])``) and
:meth:`uninstall`, or as a context manager.  ``fail_probe`` on a driver makes
its probe fail, to exercise rollback; so do :attr:`fail_probe_devices`
(``(driver, address)`` pairs) and :attr:`fail_writes` (a relative path -> the errno to raise).
"""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvfio.host.sysfs import install_writer, uninstall_writer

ANY = None
_RESERVED = "0x00000000fee00000 0x00000000feefffff msi\n"
# Device numbers the fake kernel hands out.  A real kernel allocates vfio's
# majors dynamically; the fake's nodes use major 0, which no character driver
# can hold (register_chrdev(0, ...) asks for a dynamic major), so opening a
# fake node can never reach a real device of the machine running the tests:
# it fails with ENXIO.  Groups count minors from 0, device cdevs from 4096.
VFIO_GROUP_MAJOR = 0
VFIO_CDEV_MAJOR = 0
VFIO_CDEV_MINOR_BASE = 4096
BLOCK_EXT_MAJOR = 259  # blkext: NVMe namespaces and partitions (only sysfs text, no nodes)
_ROUTE_HEADER = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU"
                 "\tWindow\tIRTT\n")
_SWAPS_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


def make_char_node(path: str, major: int, minor: int) -> None:
    """A character device node (as devtmpfs makes it).  Without CAP_MKNOD a
    regular file stands in, which pyvfio reports as a stale node: tests that
    need real nodes run as root (the guest harness and this machine do)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
    except PermissionError:
        _write(path, "")


@dataclass
class FakeDriver:
    name: str
    module: str
    ids: list[tuple[int | None, int | None]] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)  # (base << 8 | sub) matched
    vfio: bool = False
    fail_probe: bool = False
    # A vendor driver (nvidia's vGPU VFs) that matches like a host driver but
    # registers the devices it takes with vfio.
    registers_vfio: bool = False

    def matches(self, dev: FakeDevice) -> bool:
        if dev.driver_override is not None:
            return dev.driver_override == self.name
        if self.vfio:
            return False
        if (dev.class_code >> 8) in self.classes:
            return True
        return any(
            (v is None or v == dev.vendor) and (d is None or d == dev.device) for v, d in self.ids
        )


@dataclass
class FakeDevice:
    address: str
    vendor: int
    device: int
    class_code: int
    subsystem_vendor: int
    subsystem_device: int
    revision: int
    group: int | None
    numa_node: int
    reset_methods: tuple[str, ...]
    sysfs_dir: str
    driver: str | None = None
    driver_override: str | None = None
    vfio_cdev: str | None = None

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 16 == 0x06 and (self.class_code >> 8) & 0xFF in (0x04, 0x07, 0x09)

    @property
    def modalias(self) -> str:
        c = self.class_code
        return (
            f"pci:v{self.vendor:08X}d{self.device:08X}sv{self.subsystem_vendor:08X}"
            f"sd{self.subsystem_device:08X}bc{c >> 16:02X}sc{(c >> 8) & 0xFF:02X}i{c & 0xFF:02X}"
        )


def _write(path: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with open(path, "wb") as f:
        f.write(data)


def read_ifindex(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def _symlink(target: str, link: str) -> None:
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass
    os.symlink(target, link)


def _oserror(err: int, path: str) -> OSError:
    return OSError(err, os.strerror(err), path)


class FakeSysfs:
    """A fake host under ``root`` (created if missing)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        release: str = "6.1.0-fake",
        iommu: bool = True,
        noiommu: bool | None = None,
        cdev: bool = False,
        pci_ids: str | None = None,
    ) -> None:
        """``noiommu``: the vfio module parameter (``None``: vfio not loaded,
        so the parameter file is absent).  ``pci_ids``: a pci.ids file to link
        at ``usr/share/misc/pci.ids``."""
        self.root = os.fspath(root)
        self.release = release
        self.cdev = cdev
        self.noiommu = noiommu
        self.drivers: dict[str, FakeDriver] = {}
        self.devices: dict[str, FakeDevice] = {}
        self.writes: list[tuple[str, str]] = []
        # Fault injection: (driver, address) pairs whose probe fails, and
        # writes (relative path -> errno) the kernel refuses.
        self.fail_probe_devices: set[tuple[str, str]] = set()
        self.fail_writes: dict[str, int] = {}
        self._next_cdev = 0
        self._aliases: list[str] = []
        r = self.root
        for d in ("sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/kernel/iommu_groups",
                  "sys/class/iommu", "sys/module", "dev/vfio", "proc/sys/kernel",
                  f"lib/modules/{release}"):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        _write(self.p("sys/bus/pci/drivers_probe"), "")
        _write(self.p("sys/bus/pci/rescan"), "")
        _write(self.p("proc/sys/kernel/osrelease"), release + "\n")
        os.makedirs(self.p("proc/sys/kernel/random"), exist_ok=True)
        self.reboot()
        # The container device stays a plain file: its ioctls fail (ENOTTY),
        # which the broker's error-path tests rely on.
        _write(self.p("dev/vfio/vfio"), "")
        self._next_group_minor = 0
        self._next_netdev = 2  # ifindex 1 is lo
        self._next_mount_id = 30
        os.makedirs(self.p("proc/net"), exist_ok=True)
        os.makedirs(self.p("proc/self"), exist_ok=True)
        _write(self.p("proc/net/route"), _ROUTE_HEADER)
        _write(self.p("proc/net/ipv6_route"), "")
        _write(self.p("proc/net/if_inet6"), "")
        _write(self.p("proc/self/mountinfo"),
               "21 1 0:19 / / rw,relatime shared:1 - tmpfs rootfs rw\n")
        _write(self.p("proc/swaps"), _SWAPS_HEADER)
        if iommu:
            os.makedirs(self.p("sys/class/iommu/dmar0"), exist_ok=True)
        if noiommu is not None:
            os.makedirs(self.p("sys/module/vfio/parameters"), exist_ok=True)
            _write(self.p("sys/module/vfio/parameters/enable_unsafe_noiommu_mode"),
                   "Y\n" if noiommu else "N\n")
        self._write_aliases()
        if pci_ids:
            os.makedirs(self.p("usr/share/misc"), exist_ok=True)
            _symlink(os.path.abspath(pci_ids), self.p("usr/share/misc/pci.ids"))

    def p(self, relative: str) -> str:
        return os.path.join(self.root, relative.lstrip("/"))

    # ---- building ----

    def _write_aliases(self) -> None:
        lines = ["# Aliases extracted from modules themselves.", *self._aliases]
        _write(self.p(f"lib/modules/{self.release}/modules.alias"), "\n".join(lines) + "\n")

    def add_driver(
        self,
        name: str,
        module: str | None = None,
        *,
        ids: Iterable[tuple[int | None, int | None]] = (),
        classes: Iterable[int] = (),
        vfio: bool = False,
        vfio_aliases: Sequence[str] = (),
        fail_probe: bool = False,
        loaded: bool = True,
        registers_vfio: bool = False,
    ) -> FakeDriver:
        """Register a PCI driver.  ``vfio_aliases`` are the patterns after
        ``vfio_pci:`` that depmod would write into modules.alias for its
        module (written even when ``loaded`` is false: the module exists)."""
        module = module or name.replace("-", "_")
        drv = FakeDriver(name, module, list(ids), list(classes), vfio, fail_probe, registers_vfio)
        for pattern in vfio_aliases:
            self._aliases.append(f"alias vfio_pci:{pattern} {module}")
        if vfio_aliases:
            self._write_aliases()
        if not loaded:
            return drv
        self.drivers[name] = drv
        base = self.p(f"sys/bus/pci/drivers/{name}")
        os.makedirs(base, exist_ok=True)
        for attr in ("bind", "unbind", "new_id", "remove_id", "uevent"):
            _write(f"{base}/{attr}", "")
        os.makedirs(self.p(f"sys/module/{module}/drivers"), exist_ok=True)
        _symlink(f"../../../../module/{module}", f"{base}/module")
        return drv

    def add_standard_drivers(self, *, variant: bool = False) -> None:
        """vfio-pci, pci-stub, pcieport and a few host drivers used by the
        topologies; ``variant`` adds mlx5_core and mlx5_vfio_pci."""
        self.add_driver("pcieport", classes=[0x0604])
        self.add_driver("e1000", ids=[(0x8086, 0x100E)])
        self.add_driver("e1000e", ids=[(0x8086, 0x10D3)])
        self.add_driver("snd_hda_intel", classes=[0x0403])
        self.add_driver("nouveau", ids=[(0x10DE, ANY)], classes=[])
        self.add_driver("ahci", classes=[0x0106])
        self.add_driver("xhci_hcd", classes=[0x0C03])
        self.add_driver("nvme", classes=[0x0108])
        if variant:
            self.add_driver("mlx5_core", ids=[(0x15B3, 0x101E)])
            self.add_driver("mlx5_vfio_pci", vfio=True,
                            vfio_aliases=["v000015B3d0000101Esv*sd*bc*sc*i*"])
        self.add_driver("vfio-pci", "vfio_pci", vfio=True, vfio_aliases=["v*d*sv*sd*bc*sc*i*"])
        self.add_driver("pci-stub", "pci_stub", vfio=False)

    def add_device(
        self,
        address: str,
        vendor: int,
        device: int,
        class_code: int,
        *,
        group: int | None = None,
        driver: str | None = None,
        subsystem: tuple[int, int] = (0, 0),
        revision: int = 0,
        numa_node: int = -1,
        reset_methods: Sequence[str] = ("flr", "bus"),
        driver_override: str | None = None,
    ) -> FakeDevice:
        """Add a PCI function; with ``driver`` it starts bound (no probe
        checks: boot-time state)."""
        domain, bus = address.split(":")[:2]
        sysfs_dir = f"sys/devices/pci{domain}:{bus}/{address}"
        d = self.p(sysfs_dir)
        os.makedirs(d, exist_ok=True)
        dev = FakeDevice(address, vendor, device, class_code, subsystem[0], subsystem[1],
                         revision, group, numa_node, tuple(reset_methods), sysfs_dir,
                         driver_override=driver_override)
        self.devices[address] = dev
        c = class_code
        _write(f"{d}/vendor", f"0x{vendor:04x}\n")
        _write(f"{d}/device", f"0x{device:04x}\n")
        _write(f"{d}/subsystem_vendor", f"0x{subsystem[0]:04x}\n")
        _write(f"{d}/subsystem_device", f"0x{subsystem[1]:04x}\n")
        _write(f"{d}/class", f"0x{c:06x}\n")
        _write(f"{d}/revision", f"0x{revision:02x}\n")
        _write(f"{d}/modalias", dev.modalias + "\n")
        _write(f"{d}/numa_node", f"{numa_node}\n")
        _write(f"{d}/irq", "0\n")
        _write(f"{d}/enable", "1\n")
        _write(f"{d}/resource", "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 13)
        if reset_methods:
            _write(f"{d}/reset_method", " ".join(reset_methods) + "\n")
        _write(f"{d}/config", self._config(dev))
        self._write_override(dev)
        _symlink(f"../../../devices/pci{domain}:{bus}/{address}", self.p(f"sys/bus/pci/devices/{address}"))
        if group is not None:
            self._join_group(dev, group)
        if driver is not None:
            self._attach(self.drivers[driver], dev)
        else:
            self._write_uevent(dev)
        return dev

    @staticmethod
    def _config(dev: FakeDevice) -> bytes:
        cfg = bytearray(256)
        cfg[0:2] = dev.vendor.to_bytes(2, "little")
        cfg[2:4] = dev.device.to_bytes(2, "little")
        cfg[8] = dev.revision
        cfg[9:12] = dev.class_code.to_bytes(3, "little")
        cfg[0x0E] = 0x01 if dev.is_bridge else 0x00
        if not dev.is_bridge:
            cfg[0x2C:0x2E] = dev.subsystem_vendor.to_bytes(2, "little")
            cfg[0x2E:0x30] = dev.subsystem_device.to_bytes(2, "little")
        return bytes(cfg)

    def _join_group(self, dev: FakeDevice, group: int, name: str | None = None) -> None:
        g = self.p(f"sys/kernel/iommu_groups/{group}")
        if not os.path.isdir(g):
            os.makedirs(f"{g}/devices")
            if name is None:
                _write(f"{g}/type", "DMA\n")
                _write(f"{g}/reserved_regions", _RESERVED)
            else:
                _write(f"{g}/name", name + "\n")
        dev.group = group
        # sys/kernel/iommu_groups/N/devices/<bdf> -> ../../../../devices/pciD:B/<bdf>
        _symlink(f"../../../../{dev.sysfs_dir[len('sys/'):]}", f"{g}/devices/{dev.address}")
        depth = dev.sysfs_dir.count("/")  # sys/devices/pciD:B/bdf -> 3 levels below sys
        _symlink("../" * depth + f"kernel/iommu_groups/{group}", self.p(f"{dev.sysfs_dir}/iommu_group"))

    def add_process(
        self, pid: int, comm: str, open_paths: Iterable[str], device_fds: Iterable[str] = ()
    ) -> None:
        """A process holding ``open_paths`` (as it sees them: ``/dev/vfio/12``)
        and legacy vfio device fds of the devices ``device_fds`` (an
        ``anon_inode:[vfio-device]`` link, with the ``vfio-device-syspath``
        fdinfo line of Linux 6.18+)."""
        base = self.p(f"proc/{pid}")
        os.makedirs(f"{base}/fd", exist_ok=True)
        os.makedirs(f"{base}/fdinfo", exist_ok=True)
        _write(f"{base}/comm", comm + "\n")
        paths = ["/dev/null", "/dev/null", "/dev/null", *open_paths]
        for fd, path in enumerate(paths):
            _symlink(path, f"{base}/fd/{fd}")
            _write(f"{base}/fdinfo/{fd}", "pos:\t0\nflags:\t02\nmnt_id:\t1\nino:\t1\n")
        for fd, address in enumerate(device_fds, start=len(paths)):
            _symlink("anon_inode:[vfio-device]", f"{base}/fd/{fd}")
            _write(f"{base}/fdinfo/{fd}", "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n"
                   f"vfio-device-syspath: /{self.devices[address].sysfs_dir}\n")

    # ---- what the host uses (pyvfio.host.usage) ----

    def _append(self, relative: str, line: str) -> None:
        with open(self.p(relative), "a") as f:
            f.write(line + "\n")

    def add_netdev(self, address: str, name: str, *, operstate: str = "up") -> int:
        """A network interface on the device (``.../<bdf>/net/<name>`` and its
        ``/sys/class/net`` link); returns its ifindex."""
        dev = self.devices[address]
        ifindex = self._next_netdev
        self._next_netdev += 1
        d = self.p(f"{dev.sysfs_dir}/net/{name}")
        os.makedirs(d, exist_ok=True)
        _write(f"{d}/ifindex", f"{ifindex}\n")
        _write(f"{d}/operstate", operstate + "\n")
        os.makedirs(self.p("sys/class/net"), exist_ok=True)
        _symlink(f"../../{dev.sysfs_dir[len('sys/'):]}/net/{name}", self.p(f"sys/class/net/{name}"))
        return ifindex

    def add_ipv4_route(self, iface: str, destination: str = "0.0.0.0", prefix: int = 0,
                       gateway: str = "0.0.0.0") -> None:
        """A line of ``/proc/net/route`` (addresses as the kernel prints them:
        the network-order bytes read as a host-order hex word)."""
        def word(address: str) -> str:
            return f"{int.from_bytes(bytes(int(x) for x in address.split('.')), 'little'):08X}"

        mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0
        mask_text = ".".join(str(b) for b in mask.to_bytes(4, "big"))
        flags = 0x0003 if gateway != "0.0.0.0" else 0x0001  # RTF_UP | RTF_GATEWAY
        self._append("proc/net/route", f"{iface}\t{word(destination)}\t{word(gateway)}\t{flags:04X}"
                     f"\t0\t0\t100\t{word(mask_text)}\t0\t0\t0")

    def add_ipv6_address(self, iface: str, address: str, prefix: int = 64, *, scope: int = 0) -> None:
        """A line of ``/proc/net/if_inet6`` (scope 0 global, 0x20 link)."""
        import ipaddress

        packed = ipaddress.IPv6Address(address).packed.hex()
        ifindex = read_ifindex(self.p(f"sys/class/net/{iface}/ifindex"))
        self._append("proc/net/if_inet6", f"{packed} {ifindex:02x} {prefix:02x} {scope:02x} 80 {iface:>8}")

    def add_ipv6_route(self, iface: str, destination: str, prefix: int) -> None:
        """A line of ``/proc/net/ipv6_route``."""
        import ipaddress

        packed = ipaddress.IPv6Address(destination).packed.hex()
        self._append("proc/net/ipv6_route", f"{packed} {prefix:02x} {'0' * 32} 00 {'0' * 32} "
                     f"00000100 00000001 00000000 00000001 {iface:>8}")

    def add_block(self, address: str, name: str, minor: int, *, parent: str | None = None,
                  subdir: str | None = None) -> str:
        """A block device on the device: an NVMe namespace (``subdir``
        ``nvme/nvme0``), or a partition of ``parent``.  Returns its major:minor."""
        dev = self.devices[address]
        if parent is not None:
            target = os.readlink(self.p(f"sys/class/block/{parent}"))
            rel = f"{target[len('../../'):]}/{name}"
        else:
            rel = f"{dev.sysfs_dir[len('sys/'):]}/{subdir or 'block'}/{name}"
        d = self.p(f"sys/{rel}")
        os.makedirs(f"{d}/holders", exist_ok=True)
        devnum = f"{BLOCK_EXT_MAJOR}:{minor}"
        _write(f"{d}/dev", devnum + "\n")
        os.makedirs(self.p("sys/class/block"), exist_ok=True)
        _symlink(f"../../{rel}", self.p(f"sys/class/block/{name}"))
        return devnum

    def add_dm(self, name: str, dm_name: str, minor: int, *, on: Sequence[str]) -> str:
        """A device-mapper device (LVM, dm-crypt) stacked on the block devices ``on``."""
        rel = f"devices/virtual/block/{name}"
        d = self.p(f"sys/{rel}")
        os.makedirs(f"{d}/dm", exist_ok=True)
        os.makedirs(f"{d}/holders", exist_ok=True)
        devnum = f"253:{minor}"
        _write(f"{d}/dev", devnum + "\n")
        _write(f"{d}/dm/name", dm_name + "\n")
        _symlink(f"../../{rel}", self.p(f"sys/class/block/{name}"))
        for lower in on:
            _symlink(f"../../{name}", self.p(f"sys/class/block/{lower}/holders/{name}"))
        return devnum

    def add_md(self, name: str, minor: int, *, on: Sequence[str]) -> str:
        """An md RAID array (major 9) on the block devices ``on``: a holder
        with no ``dm/name``."""
        rel = f"devices/virtual/block/{name}"
        d = self.p(f"sys/{rel}")
        os.makedirs(f"{d}/holders", exist_ok=True)
        devnum = f"9:{minor}"
        _write(f"{d}/dev", devnum + "\n")
        _symlink(f"../../{rel}", self.p(f"sys/class/block/{name}"))
        for lower in on:
            _symlink(f"../../{name}", self.p(f"sys/class/block/{lower}/holders/{name}"))
        return devnum

    def add_mount(self, devnum: str, mount_point: str, source: str, fstype: str = "ext4") -> None:
        """A line of ``/proc/self/mountinfo``."""
        self._next_mount_id += 1
        self._append("proc/self/mountinfo", f"{self._next_mount_id} 1 {devnum} / "
                     f"{mount_point} rw,relatime - {fstype} {source} rw")

    def add_swap(self, path: str) -> None:
        """A line of ``/proc/swaps``."""
        self._append("proc/swaps", f"{path}\t\t\t\tpartition\t8388604\t\t0\t\t-2")

    def set_boot_vga(self, address: str, value: bool = True) -> None:
        _write(self.p(f"{self.devices[address].sysfs_dir}/boot_vga"), "1\n" if value else "0\n")

    def add_framebuffer(self, number: int, address: str | None) -> None:
        """``/sys/class/graphics/fbN``, on the PCI device ``address`` or (None)
        on a platform device such as efifb's ``efi-framebuffer.0``."""
        rel = f"devices/platform/efi-framebuffer.0/graphics/fb{number}"
        owner = "efi-framebuffer.0"
        if address is not None:
            rel = f"{self.devices[address].sysfs_dir[len('sys/'):]}/graphics/fb{number}"
            owner = address
        d = self.p(f"sys/{rel}")
        os.makedirs(d, exist_ok=True)
        _symlink(f"../../../{owner}", f"{d}/device")
        os.makedirs(self.p("sys/class/graphics"), exist_ok=True)
        _symlink(f"../../{rel}", self.p(f"sys/class/graphics/fb{number}"))

    def set_reserved_regions(self, group: int, text: str) -> None:
        _write(self.p(f"sys/kernel/iommu_groups/{group}/reserved_regions"), text)

    def remove_group_link(self, address: str) -> None:
        """The device loses its ``iommu_group`` (an IOMMU that did not take it)."""
        dev = self.devices[address]
        if dev.group is not None:
            os.unlink(self.p(f"sys/kernel/iommu_groups/{dev.group}/devices/{address}"))
        os.unlink(self.p(f"{dev.sysfs_dir}/iommu_group"))
        dev.group = None

    def populate(self, count: int, *, seed: int = 0, start_group: int = 100) -> list[str]:
        """Add ``count`` devices (a mix of NICs, GPUs with audio functions,
        NVMe, USB and root ports spread over domains and buses), each group
        holding one slot's functions.  Returns the addresses."""
        rng = random.Random(seed)
        kinds = [
            (0x8086, 0x10D3, 0x020000, "e1000e", 1),
            (0x8086, 0x100E, 0x020000, "e1000", 1),
            (0x10DE, 0x1B80, 0x030000, "nouveau", 2),  # + audio 10de:10f0
            (0x144D, 0xA808, 0x010802, "nvme", 1),
            (0x1B36, 0x000D, 0x0C0330, "xhci_hcd", 1),
            (0x8086, 0xA110, 0x060400, "pcieport", 1),
            (0x1234, 0x11E8, 0x00FF00, None, 1),
        ]
        addresses: list[str] = []
        group = start_group
        slot = 0
        while len(addresses) < count:
            vendor, device, cls, driver, functions = rng.choice(kinds)
            domain, rest = divmod(slot, 256 * 32)
            bus, dev_no = divmod(rest, 32)
            slot += 1
            for fn in range(min(functions, count - len(addresses))):
                address = f"{domain:04x}:{bus:02x}:{dev_no:02x}.{fn}"
                if fn == 0:
                    self.add_device(address, vendor, device, cls, group=group, driver=driver,
                                    subsystem=(vendor, 0x0001), numa_node=domain % 2)
                else:  # the GPU's HDMI audio function
                    self.add_device(address, 0x10DE, 0x10F0, 0x040300, group=group,
                                    driver="snd_hda_intel", subsystem=(vendor, 0x0001))
                addresses.append(address)
            group += 1
        return addresses

    def reboot(self) -> None:
        """A new ``proc/sys/kernel/random/boot_id`` (devices keep their state:
        enough to test that records from an earlier boot are recognised)."""
        _write(self.p("proc/sys/kernel/random/boot_id"), f"{random.getrandbits(128):032x}\n")

    # ---- the kernel's side ----

    def _write_override(self, dev: FakeDevice) -> None:
        _write(self.p(f"{dev.sysfs_dir}/driver_override"), f"{dev.driver_override or '(null)'}\n")

    def _write_uevent(self, dev: FakeDevice) -> None:
        lines = []
        if dev.driver:
            lines.append(f"DRIVER={dev.driver}")
        lines += [
            f"PCI_CLASS={dev.class_code:X}",
            f"PCI_ID={dev.vendor:04X}:{dev.device:04X}",
            f"PCI_SUBSYS_ID={dev.subsystem_vendor:04X}:{dev.subsystem_device:04X}",
            f"PCI_SLOT_NAME={dev.address}",
            f"MODALIAS={dev.modalias}",
        ]
        _write(self.p(f"{dev.sysfs_dir}/uevent"), "\n".join(lines) + "\n")

    def group_node(self, group: int) -> str:
        noiommu = os.path.exists(self.p(f"sys/kernel/iommu_groups/{group}/name"))
        return f"/dev/vfio/{'noiommu-' if noiommu else ''}{group}"

    def _probe(self, drv: FakeDriver, dev: FakeDevice) -> bool:
        """``drv->probe()``: True if it took the device."""
        if drv.fail_probe or (drv.name, dev.address) in self.fail_probe_devices:
            return False
        if drv.vfio:
            if dev.is_bridge:
                return False
            if dev.group is None:
                if not self.noiommu:
                    return False
                numbers = [int(n) for n in os.listdir(self.p("sys/kernel/iommu_groups"))]
                self._join_group(dev, max(numbers, default=-1) + 1, name="vfio-noiommu")
        self._attach(drv, dev)
        return True

    def _attach(self, drv: FakeDriver, dev: FakeDevice) -> None:
        dev.driver = drv.name
        depth = dev.sysfs_dir.count("/")
        _symlink("../" * depth + f"bus/pci/drivers/{drv.name}", self.p(f"{dev.sysfs_dir}/driver"))
        _symlink(f"../../../../{dev.sysfs_dir[4:]}", self.p(f"sys/bus/pci/drivers/{drv.name}/{dev.address}"))
        self._write_uevent(dev)
        if (drv.vfio or drv.registers_vfio) and dev.group is not None:
            self._register_group(dev.group)
            if self.cdev:
                name = f"vfio{self._next_cdev}"
                minor = VFIO_CDEV_MINOR_BASE + self._next_cdev
                self._next_cdev += 1
                os.makedirs(self.p(f"{dev.sysfs_dir}/vfio-dev/{name}"), exist_ok=True)
                _write(self.p(f"{dev.sysfs_dir}/vfio-dev/{name}/dev"), f"{VFIO_CDEV_MAJOR}:{minor}\n")
                os.makedirs(self.p("dev/vfio/devices"), exist_ok=True)
                make_char_node(self.p(f"dev/vfio/devices/{name}"), VFIO_CDEV_MAJOR, minor)
                os.makedirs(self.p("sys/class/vfio-dev"), exist_ok=True)
                _symlink(f"../../{dev.sysfs_dir[len('sys/'):]}/vfio-dev/{name}",
                         self.p(f"sys/class/vfio-dev/{name}"))
                dev.vfio_cdev = name

    def _register_group(self, group: int) -> None:
        """vfio_group_alloc(): ``/sys/class/vfio/N`` with ``dev`` and the
        node ``/dev/vfio/N`` carrying that number (once per group)."""
        node = self.group_node(group)
        name = node.rpartition("/")[2]
        klass = self.p(f"sys/devices/virtual/vfio/{name}")
        if os.path.isdir(klass):
            return
        minor = self._next_group_minor
        self._next_group_minor += 1
        os.makedirs(klass)
        _write(f"{klass}/dev", f"{VFIO_GROUP_MAJOR}:{minor}\n")
        os.makedirs(self.p("sys/class/vfio"), exist_ok=True)
        _symlink(f"../../devices/virtual/vfio/{name}", self.p(f"sys/class/vfio/{name}"))
        make_char_node(self.p(node), VFIO_GROUP_MAJOR, minor)

    def _unregister_group(self, group: int) -> None:
        node = self.group_node(group)
        name = node.rpartition("/")[2]
        for path in (self.p(node), self.p(f"sys/class/vfio/{name}"),
                     self.p(f"sys/devices/virtual/vfio/{name}/dev")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.p(f"sys/devices/virtual/vfio/{name}"))
        except FileNotFoundError:
            pass

    def _detach(self, dev: FakeDevice) -> None:
        drv = self.drivers[dev.driver] if dev.driver else None
        dev.driver = None
        os.unlink(self.p(f"{dev.sysfs_dir}/driver"))
        if drv is not None:
            os.unlink(self.p(f"sys/bus/pci/drivers/{drv.name}/{dev.address}"))
        self._write_uevent(dev)
        if drv is not None and (drv.vfio or drv.registers_vfio):
            if dev.vfio_cdev:
                os.unlink(self.p(f"{dev.sysfs_dir}/vfio-dev/{dev.vfio_cdev}/dev"))
                os.rmdir(self.p(f"{dev.sysfs_dir}/vfio-dev/{dev.vfio_cdev}"))
                os.rmdir(self.p(f"{dev.sysfs_dir}/vfio-dev"))
                os.unlink(self.p(f"dev/vfio/devices/{dev.vfio_cdev}"))
                os.unlink(self.p(f"sys/class/vfio-dev/{dev.vfio_cdev}"))
                dev.vfio_cdev = None
            if dev.group is not None and not any(
                d.group == dev.group and d.driver
                and (self.drivers[d.driver].vfio or self.drivers[d.driver].registers_vfio)
                for d in self.devices.values()
            ):
                node = self.group_node(dev.group)
                self._unregister_group(dev.group)
                if node.startswith("/dev/vfio/noiommu-"):  # vfio frees its fake group
                    g = self.p(f"sys/kernel/iommu_groups/{dev.group}")
                    os.unlink(f"{g}/devices/{dev.address}")
                    os.unlink(f"{g}/name")
                    os.rmdir(f"{g}/devices")
                    os.rmdir(g)
                    os.unlink(self.p(f"{dev.sysfs_dir}/iommu_group"))
                    dev.group = None

    def _device_for(self, value: str, path: str) -> FakeDevice:
        dev = self.devices.get(value.strip())
        if dev is None:
            raise _oserror(errno.ENODEV, path)
        return dev

    def write(self, path: str, data: str) -> None:
        """:class:`pyvfio.host.sysfs.SysfsWriter`: one write(2) into ``path``."""
        rel = os.path.relpath(path, self.root)
        self.writes.append((rel, data))
        if rel in self.fail_writes:
            raise _oserror(self.fail_writes[rel], path)
        parts = rel.split("/")
        if parts[-1] == "driver_override" and parts[-2] in self.devices:
            dev = self.devices[parts[-2]]
            if len(data) >= 4096:
                raise _oserror(errno.EINVAL, path)
            value = data.split("\n", 1)[0]
            dev.driver_override = value or None
            self._write_override(dev)
            return
        if rel == "sys/bus/pci/drivers_probe":
            dev = self._device_for(data, path)
            if dev.driver is None:
                for drv in self.drivers.values():
                    if drv.matches(dev) and self._probe(drv, dev):
                        break
            return
        if len(parts) == 6 and parts[:4] == ["sys", "bus", "pci", "drivers"] and parts[4] in self.drivers:
            drv = self.drivers[parts[4]]
            if parts[5] == "bind":
                dev = self._device_for(data, path)
                if dev.driver is not None:
                    raise _oserror(errno.EBUSY, path)
                if not drv.matches(dev) or not self._probe(drv, dev):
                    raise _oserror(errno.ENODEV, path)
                return
            if parts[5] == "unbind":
                dev = self._device_for(data, path)
                if dev.driver != drv.name:
                    raise _oserror(errno.ENODEV, path)
                self._detach(dev)
                return
        if not os.path.isfile(path):
            raise _oserror(errno.ENOENT, path)
        _write(path, data)

    # ---- installing ----

    def install(self) -> FakeSysfs:
        install_writer(self.root, self)
        return self

    def uninstall(self) -> None:
        uninstall_writer(self.root)

    def __enter__(self) -> FakeSysfs:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()
