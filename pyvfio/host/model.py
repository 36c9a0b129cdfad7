"""PCI devices and IOMMU groups as sysfs shows them, read under a root.

Layout read (all under ``root``)::

    sys/bus/pci/devices/<bdf>/        uevent (DRIVER, PCI_CLASS, PCI_ID, PCI_SUBSYS_ID,
                                      MODALIAS), revision, driver_override, numa_node,
                                      reset_method, iommu_group -> .../iommu_groups/N,
                                      vfio-dev/vfioX (the vfio device cdev, Linux 6.6+)
    sys/bus/pci/drivers/<name>/module -> .../module/<module>
    sys/kernel/iommu_groups/N/        devices/<bdf>, type, reserved_regions
    sys/class/iommu/                  one entry per IOMMU unit (dmar0, ivhd0, ...)
    sys/module/vfio/parameters/enable_unsafe_noiommu_mode
    dev/vfio/N, dev/vfio/noiommu-N, dev/vfio/devices/vfioX
    proc/sys/kernel/osrelease         the release whose lib/modules/<release>/modules.alias applies

One ``uevent`` read gives the IDs, class, driver and modalias that would
otherwise take seven reads: the kernel regenerates it on every read
(``dev_uevent()`` + ``pci_uevent()``), so it is as fresh as the single files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pyvfio.errors import DeviceNotFound
from pyvfio.host.modules import VFIO_PCI_MODULE, VfioAliases
from pyvfio.host.nodes import NODE_OK, NodeCheck, group_node_check
from pyvfio.host.sysfs import (
    SysfsWriter,
    list_dir,
    read_link_name,
    read_str,
    writer_for,
)
from pyvfio.host.usage import HostUsage
from pyvfio.pci.address import PciAddress
from pyvfio.pci.ids import PciIds

# Driver kinds (the ``driver_kind`` field of ``pyvfio check --json``).
KIND_VFIO = "vfio"
KIND_VARIANT = "vfio-variant"
KIND_STUB = "stub"
KIND_HOST = "host"
KIND_BRIDGE = "bridge"
KIND_NONE = "none"
DRIVER_KINDS = (KIND_VFIO, KIND_VARIANT, KIND_STUB, KIND_HOST, KIND_BRIDGE, KIND_NONE)
# Kinds that keep a group viable (see pyvfio.host.diagnosis).
VIABLE_KINDS = (KIND_VFIO, KIND_VARIANT, KIND_STUB, KIND_NONE, KIND_BRIDGE)

VFIO_PCI = "vfio-pci"
PCI_STUB = "pci-stub"
# Drivers a bridge may keep without breaking its group's viability: they never
# do DMA on behalf of the bridge (the kernel marks pcieport driver_managed_dma).
BRIDGE_DRIVERS = ("pcieport", "shpchp")


def normalize_bdf(text: str) -> str:
    """``"1:0.0"``, ``"01:00.0"``, ``"0000:01:00.0"`` -> ``"0000:01:00.0"``.

    Raises :class:`UsageError` for anything that is not a PCI address
    (:class:`~pyvfio.pci.address.PciAddress` is the one parser)."""
    return PciAddress.normalize(text)


def _hex_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 16)
    except ValueError:
        return None


@dataclass
class PciDevice:
    """One PCI function.  IDs are ints; ``None`` means sysfs did not say."""

    address: str
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int | None
    subsystem_device_id: int | None
    class_code: int
    revision: int | None
    driver: str | None
    driver_override: str | None
    modalias: str | None
    numa_node: int | None
    iommu_group: int | None
    vfio_cdev: str | None
    reset_methods: list[str] | None

    @property
    def is_bridge(self) -> bool:
        """PCI-to-PCI (06 04), CardBus (06 07) or semi-transparent (06 09)
        bridge: the classes whose header is a bridge header."""
        return self.class_code >> 16 == 0x06 and (self.class_code >> 8) & 0xFF in (0x04, 0x07, 0x09)

    def as_dict(self, ids: PciIds | None = None) -> dict[str, Any]:
        """The ``pyvfio ls --json`` object for this device."""
        d: dict[str, Any] = {
            "device": self.address,
            "vendor_id": f"{self.vendor_id:04x}",
            "device_id": f"{self.device_id:04x}",
            "subsystem_vendor_id": None if self.subsystem_vendor_id is None else f"{self.subsystem_vendor_id:04x}",
            "subsystem_device_id": None if self.subsystem_device_id is None else f"{self.subsystem_device_id:04x}",
            "class": f"{self.class_code:06x}",
            "revision": None if self.revision is None else f"{self.revision:02x}",
            "vendor_name": None,
            "device_name": None,
            "subsystem_name": None,
            "class_name": None,
            "driver": self.driver,
            "driver_override": self.driver_override,
            "modalias": self.modalias,
            "numa_node": self.numa_node,
            "iommu_group": self.iommu_group,
            "is_bridge": self.is_bridge,
            "vfio_cdev": self.vfio_cdev,
            "vfio_cdev_path": f"/dev/vfio/devices/{self.vfio_cdev}" if self.vfio_cdev else None,
            "reset_methods": self.reset_methods,
        }
        if ids is not None:
            d["vendor_name"] = ids.vendor(self.vendor_id)
            d["device_name"] = ids.device(self.vendor_id, self.device_id)
            if self.subsystem_vendor_id is not None and self.subsystem_device_id is not None:
                d["subsystem_name"] = ids.subsystem(
                    self.vendor_id, self.device_id, self.subsystem_vendor_id, self.subsystem_device_id
                )
            d["class_name"] = ids.class_name(self.class_code)
        return d


@dataclass
class ReservedRegion:
    """One line of ``iommu_groups/N/reserved_regions``: ``start end type``."""

    start: int
    end: int
    type: str

    def as_dict(self) -> dict[str, Any]:
        return {"start": f"{self.start:#018x}", "end": f"{self.end:#018x}", "type": self.type}


@dataclass
class IommuGroup:
    number: int
    devices: list[str]
    type: str | None
    reserved_regions: list[ReservedRegion] = field(default_factory=list)
    noiommu: bool = False


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_CLOEXEC


def _read_at(dir_fd: int, name: str) -> str | None:
    """An attribute of the directory ``dir_fd`` as text, ``None`` if absent.
    Opening relative to the device's directory fd saves the kernel walking
    the long (symlinked) sysfs path again for every attribute."""
    try:
        fd = os.open(name, _O_READ, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return None
    finally:
        os.close(fd)


def _link_name_at(dir_fd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd).rstrip("/").rpartition("/")[2]
    except OSError:
        return None


def load_device(
    sys_dir: str, address: str, cdevs_by_device: dict[str, str] | None = None, *, lean: bool = False
) -> PciDevice | None:
    """Read one device; ``None`` if ``sys/bus/pci/devices/<address>`` is absent.

    ``cdevs_by_device``: the vfio cdevs of all devices, from one listing of
    ``sys/class/vfio-dev`` (saves a directory lookup per device when reading
    them all); without it the device's ``vfio-dev`` directory is listed."""
    try:
        dfd = os.open(f"{sys_dir}/bus/pci/devices/{address}", _O_DIR)
    except OSError:
        return None
    try:
        return _load_device_at(dfd, address, cdevs_by_device, lean)
    finally:
        os.close(dfd)


def _load_device_at(
    dfd: int, address: str, cdevs_by_device: dict[str, str] | None, lean: bool = False
) -> PciDevice | None:
    uevent = _read_at(dfd, "uevent")
    if uevent is None:
        return None
    info: dict[str, str] = {}
    for line in uevent.split("\n"):
        key, _, value = line.partition("=")
        info[key] = value
    pci_id = info.get("PCI_ID")
    if pci_id is not None:
        vendor, _, device = pci_id.partition(":")
        vendor_id, device_id = int(vendor, 16), int(device, 16)
    else:  # not a kernel uevent: fall back to the single files
        vendor_id = _hex_or_none(_read_at(dfd, "vendor")) or 0
        device_id = _hex_or_none(_read_at(dfd, "device")) or 0
    subsys = info.get("PCI_SUBSYS_ID")
    if subsys is not None:
        sv, _, sd = subsys.partition(":")
        sub_vendor: int | None = int(sv, 16)
        sub_device: int | None = int(sd, 16)
    else:
        sub_vendor = _hex_or_none(_read_at(dfd, "subsystem_vendor"))
        sub_device = _hex_or_none(_read_at(dfd, "subsystem_device"))
    cls = info.get("PCI_CLASS")
    class_code = int(cls, 16) if cls is not None else (_hex_or_none(_read_at(dfd, "class")) or 0)
    driver = info.get("DRIVER")
    if driver is None:
        driver = _link_name_at(dfd, "driver")
    modalias = info.get("MODALIAS")
    if modalias is None:
        modalias = _read_at(dfd, "modalias")
    if lean:
        # What a diagnosis needs is all read; the rest stays None (see Host(lean=True)).
        return PciDevice(address, vendor_id, device_id, sub_vendor, sub_device, class_code, None,
                         driver, None, modalias, None, _group_at(dfd), _cdev_at(dfd, address, cdevs_by_device),
                         None)
    override = _read_at(dfd, "driver_override")
    if override == "(null)" or override == "":
        override = None
    numa = _read_at(dfd, "numa_node")
    numa_node = int(numa) if numa and numa.lstrip("-").isdigit() and numa != "-1" else None
    reset = _read_at(dfd, "reset_method")
    return PciDevice(
        address=address,
        vendor_id=vendor_id,
        device_id=device_id,
        subsystem_vendor_id=sub_vendor,
        subsystem_device_id=sub_device,
        class_code=class_code,
        revision=_hex_or_none(_read_at(dfd, "revision")),
        driver=driver,
        driver_override=override,
        modalias=modalias,
        numa_node=numa_node,
        iommu_group=_group_at(dfd),
        vfio_cdev=_cdev_at(dfd, address, cdevs_by_device),
        reset_methods=reset.split() if reset is not None else None,
    )


def _group_at(dfd: int) -> int | None:
    group_name = _link_name_at(dfd, "iommu_group")
    return int(group_name) if group_name and group_name.isdigit() else None


def _cdev_at(dfd: int, address: str, cdevs_by_device: dict[str, str] | None) -> str | None:
    if cdevs_by_device is not None:
        return cdevs_by_device.get(address)
    cdevs: list[str] = []
    try:
        cdev_fd = os.open("vfio-dev", _O_DIR, dir_fd=dfd)
    except OSError:
        return None
    try:
        cdevs = os.listdir(cdev_fd)
    finally:
        os.close(cdev_fd)
    return cdevs[0] if cdevs else None


def _parse_reserved(text: str | None) -> list[ReservedRegion]:
    regions = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            try:
                regions.append(ReservedRegion(int(parts[0], 16), int(parts[1], 16), parts[2]))
            except ValueError:
                continue
    return regions


class Host:
    """The host under ``root``: a snapshot, cached on first read.  Call
    :meth:`refresh` after changing bindings to read the kernel's state again.

    ``writer`` is how sysfs writes happen (see :mod:`pyvfio.host.sysfs`);
    by default the one installed for ``root``, else real file writes."""

    def __init__(self, root: str = "/", *, writer: SysfsWriter | None = None,
                 lean: bool = False) -> None:
        """``lean``: :meth:`devices` reads only what a diagnosis needs (IDs,
        class, driver, modalias, group, cdev) and leaves ``revision``,
        ``driver_override``, ``numa_node`` and ``reset_methods`` None: the
        whole-host diagnosis (``check --all``) of a 10,000-device host then
        costs no more than ``lspci -vmmnnk``."""
        self.root = os.fspath(root)
        self.lean = lean
        self._prefix = self.root.rstrip("/") + "/"
        self.sys = self._prefix + "sys"
        self.writer: SysfsWriter = writer if writer is not None else writer_for(self.root)
        # Support files do not change with bindings: kept across refresh().
        self._ids_loaded = False
        self._ids: PciIds | None = None
        self._aliases: VfioAliases | None = None
        self.refresh()

    def refresh(self) -> None:
        self._devices: dict[str, PciDevice] = {}
        self._all: list[PciDevice] | None = None
        self._groups: dict[int, IommuGroup] = {}
        self._all_groups: list[IommuGroup] | None = None
        self._driver_modules: dict[str, str] = {}
        self._vfio_nodes: set[str] | None = None
        self._vfio_groups: set[str] | None = None
        self._usage: HostUsage | None = None

    @property
    def usage(self) -> HostUsage:
        """What the host uses (netdevs, mounts, swap, holders, console), read
        once per snapshot: see :mod:`pyvfio.host.usage`."""
        if self._usage is None:
            self._usage = HostUsage(self._prefix)
        return self._usage

    def path(self, relative: str) -> str:
        """``relative`` (``"sys/bus/pci"`` or ``"/dev/vfio/3"``) under the root."""
        return self._prefix + relative.lstrip("/")

    # ---- support files ----

    @property
    def ids(self) -> PciIds | None:
        if not self._ids_loaded:
            self._ids = PciIds.find(self.root)
            self._ids_loaded = True
        return self._ids

    @property
    def release(self) -> str | None:
        return read_str(self.path("proc/sys/kernel/osrelease"))

    @property
    def aliases(self) -> VfioAliases:
        if self._aliases is None:
            self._aliases = VfioAliases.for_root(self.root, self.release)
        return self._aliases

    # ---- devices ----

    def device(self, address: str) -> PciDevice:
        """One device by PCI address (any form :func:`normalize_bdf` takes);
        raises :class:`DeviceNotFound`."""
        dev = self._devices.get(address)
        if dev is not None:
            return dev
        bdf = normalize_bdf(address)
        dev = self._devices.get(bdf)
        if dev is None:
            dev = load_device(self.sys, bdf)
            if dev is None:
                raise DeviceNotFound(f"no PCI device {bdf} (no {self.path('sys/bus/pci/devices')}/{bdf})")
            self._devices[bdf] = dev
        return dev

    def devices(self) -> list[PciDevice]:
        """Every PCI device, sorted by address."""
        if self._all is None:
            found = []
            cdevs = self._cdevs_by_device()
            for name in sorted(list_dir(self.path("sys/bus/pci/devices"))):
                dev = self._devices.get(name) or load_device(self.sys, name, cdevs, lean=self.lean)
                if dev is not None:
                    self._devices[name] = dev
                    found.append(dev)
            self._all = found
        return self._all

    def _cdevs_by_device(self) -> dict[str, str]:
        """``{address: "vfioX"}`` from ``sys/class/vfio-dev/vfioX`` links
        (``.../<address>/vfio-dev/vfioX``)."""
        found: dict[str, str] = {}
        class_dir = self.path("sys/class/vfio-dev")
        for name in list_dir(class_dir):
            try:
                target = os.readlink(f"{class_dir}/{name}")
            except OSError:
                continue
            parts = target.rstrip("/").split("/")
            if len(parts) >= 3 and parts[-2] == "vfio-dev":
                found[parts[-3]] = name
        return found

    # ---- IOMMU ----

    def iommu_present(self) -> bool:
        """Whether the kernel runs with an IOMMU: an IOMMU unit is registered
        (``/sys/class/iommu``) or a real (not no-IOMMU) group exists.

        iommufd's selftest (``CONFIG_IOMMUFD_TEST``) registers a mock unit,
        ``iommufd_selftest_iommu.0``, that translates no real device: it does
        not count."""
        units = list_dir(self.path("sys/class/iommu"))
        if any(not u.startswith("iommufd_selftest") for u in units):
            return True
        return any(not g.noiommu for g in self.groups())

    def noiommu_enabled(self) -> bool:
        """vfio's ``enable_unsafe_noiommu_mode`` parameter (``Y``/``N``)."""
        value = read_str(self.path("sys/module/vfio/parameters/enable_unsafe_noiommu_mode"))
        return value in ("Y", "y", "1")

    def _load_group(self, number: int, members: list[str] | None = None) -> IommuGroup | None:
        base = self.path(f"sys/kernel/iommu_groups/{number}")
        try:
            gfd = os.open(base, _O_DIR)
        except OSError:
            return None
        try:
            if members is None:
                try:
                    members = sorted(os.listdir(f"{base}/devices"))
                except OSError:
                    members = []
            group_type = _read_at(gfd, "type")
            reserved = _read_at(gfd, "reserved_regions")
        finally:
            os.close(gfd)
        return IommuGroup(
            number=number,
            devices=members,
            type=group_type,
            reserved_regions=_parse_reserved(reserved),
            # vfio's no-IOMMU groups exist only while a device is bound, and
            # vfio names them noiommu-N, in /sys/class/vfio (the kernel's
            # word, drivers/vfio/group.c) as in /dev/vfio (which may be gone).
            noiommu=(f"noiommu-{number}" in self._vfio_class()
                     or f"noiommu-{number}" in self._nodes()),
        )

    def group(self, number: int) -> IommuGroup:
        """One IOMMU group; raises :class:`DeviceNotFound` if it does not exist."""
        grp = self._groups.get(number)
        if grp is None:
            grp = self._load_group(number)
            if grp is None:
                raise DeviceNotFound(f"no IOMMU group {number}")
            self._groups[number] = grp
        return grp

    def groups(self) -> list[IommuGroup]:
        """Every IOMMU group, by number."""
        if self._all_groups is None:
            numbers = sorted(int(n) for n in list_dir(self.path("sys/kernel/iommu_groups")) if n.isdigit())
            members: dict[int, list[str]] | None = None
            if self._all is not None:
                # Every device's iommu_group link is already read: the same
                # membership as the groups' devices/ directories, without
                # listing thousands of them.
                members = {n: [] for n in numbers}
                for dev in self._all:
                    if dev.iommu_group is not None:
                        members.setdefault(dev.iommu_group, []).append(dev.address)
            groups = []
            for n in numbers:
                grp = self._groups.get(n)
                if grp is None:
                    grp = self._load_group(n, members[n] if members is not None else None)
                    if grp is None:
                        continue
                    self._groups[n] = grp
                groups.append(grp)
            self._all_groups = groups
        return self._all_groups

    def _nodes(self) -> set[str]:
        if self._vfio_nodes is None:
            self._vfio_nodes = set(list_dir(self.path("dev/vfio")))
        return self._vfio_nodes

    def group_node(self, number: int) -> str | None:
        """The group's character device as a process sees it (``/dev/vfio/N``
        or ``/dev/vfio/noiommu-N``) if it exists and carries the kernel's
        device number (see :mod:`pyvfio.host.nodes`).  vfio creates it when
        the first member registers with vfio."""
        check = self.group_node_check(number)
        return check.path if check is not None and check.state == NODE_OK else None

    def group_node_check(self, number: int) -> NodeCheck | None:
        """The verdict on the group's node, ``None`` when neither the kernel
        (``/sys/class/vfio/N``) nor ``/dev/vfio`` has one."""
        nodes = self._nodes()
        registered = self._vfio_class()
        for noiommu in (False, True):
            name = f"noiommu-{number}" if noiommu else str(number)
            if name in nodes or name in registered:
                return group_node_check(self._prefix, number, noiommu)
        return None

    def _vfio_class(self) -> set[str]:
        """The groups vfio registered (``/sys/class/vfio``), listed once."""
        if self._vfio_groups is None:
            self._vfio_groups = set(list_dir(self.path("sys/class/vfio")))
        return self._vfio_groups

    # ---- drivers ----

    def driver_loaded(self, driver: str) -> bool:
        return os.path.isdir(self.path(f"sys/bus/pci/drivers/{driver}"))

    def driver_module(self, driver: str) -> str:
        """The module behind a driver (``drivers/<name>/module`` link), else
        the driver name spelled as a module name."""
        module = self._driver_modules.get(driver)
        if module is None:
            module = read_link_name(self.path(f"sys/bus/pci/drivers/{driver}/module"))
            if module is None:
                module = driver.replace("-", "_")
            self._driver_modules[driver] = module
        return module

    def module_driver(self, module: str) -> str:
        """The PCI driver name a module registers: found through the loaded
        drivers' module links, else the module name (``vfio_pci`` registers
        ``vfio-pci``, most variants keep their module name)."""
        for driver in list_dir(self.path("sys/bus/pci/drivers")):
            if self.driver_module(driver) == module:
                return driver
        return VFIO_PCI if module == VFIO_PCI_MODULE else module

    def driver_kind(self, dev: PciDevice) -> str:
        """``vfio``, ``vfio-variant``, ``stub``, ``host``, ``bridge`` or ``none``
        from the bound driver and ``modules.alias`` (the /dev/vfio cross-check
        is the diagnosis's job: it needs the whole group)."""
        driver = dev.driver
        if driver is None:
            return KIND_NONE
        if driver == VFIO_PCI:
            return KIND_VFIO
        if driver == PCI_STUB:
            return KIND_STUB
        if driver in BRIDGE_DRIVERS and dev.is_bridge:
            return KIND_BRIDGE
        module = self.driver_module(driver)
        if module == VFIO_PCI_MODULE:
            return KIND_VFIO
        if dev.vfio_cdev is not None or self.aliases.is_vfio_module(module):
            # The kernel's own word (.../<bdf>/vfio-dev/vfioX: the driver
            # registered the device with vfio) outranks modules.alias, which a
            # vendor driver (nvidia's vGPU VFs) or a minimal image may lack.
            return KIND_VARIANT
        return KIND_HOST

    def best_driver(self, dev: PciDevice) -> str:
        """The vfio variant whose ``vfio_pci:`` alias matches the device with
        the fewest wildcards, else ``vfio-pci``."""
        if dev.vfio_cdev is not None and dev.driver:
            return dev.driver  # registered with vfio already: nothing to rebind
        found = self.aliases.best_module(dev.modalias)
        if found is None:
            return VFIO_PCI
        return self.module_driver(found[0])

    # ---- processes ----

    def holders(self, paths: set[str]) -> dict[str, list[dict[str, Any]]]:
        """Which processes hold each of ``paths`` (as the processes see them,
        e.g. ``/dev/vfio/12``) open: ``{path: [{"pid", "comm"}, ...]}``.

        A path ``vfio-device:<bdf>`` stands for a legacy device fd (an
        ``anon_inode:[vfio-device]`` link, which names no device): since
        Linux 6.18 its fdinfo says ``vfio-device-syspath: /sys/devices/...``,
        which catches a process that closed the group fd but kept the device.

        Scans ``proc/*/fd`` once; processes we may not inspect are skipped
        (only root sees every process's fds).  The calling process counts
        like any other: if it holds the group itself, that is the answer."""
        found: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
        if not paths:
            return found
        want_device_fds = any(p.startswith(DEVICE_FD_PREFIX) for p in paths)
        proc = self.path("proc")
        for pid in list_dir(proc):
            if not pid.isdigit():
                continue
            fd_dir = f"{proc}/{pid}/fd"
            seen: set[str] = set()
            for fd in list_dir(fd_dir):
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if target == ANON_VFIO_DEVICE and want_device_fds:
                    target = DEVICE_FD_PREFIX + _fdinfo_device(f"{proc}/{pid}/fdinfo/{fd}")
                if target in found and target not in seen:
                    seen.add(target)
                    comm = read_str(f"{proc}/{pid}/comm") or "?"
                    found[target].append({"pid": int(pid), "comm": comm})
        return found


ANON_VFIO_DEVICE = "anon_inode:[vfio-device]"
DEVICE_FD_PREFIX = "vfio-device:"


def _fdinfo_device(path: str) -> str:
    """The PCI address in a vfio device fd's ``vfio-device-syspath`` fdinfo
    line, or ``""`` (kernels before 6.18 do not print it)."""
    for line in (read_str(path) or "").splitlines():
        if line.startswith("vfio-device-syspath:"):
            return line.split(":", 1)[1].strip().rstrip("/").rpartition("/")[2]
    return ""
