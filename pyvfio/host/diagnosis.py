"""Can this device be assigned, and if not, why not and what to do.

The rules (issue 2, seed 004):

- **viable**: every member of the device's IOMMU group is on a vfio driver,
  on ``pci-stub``, has no driver, or is a bridge on ``pcieport``/``shpchp``.
  Any other member is a problem named with its driver (libvirt's missed
  case 2).
- **in use**: the group node ``/dev/vfio/N`` or a member's cdev
  ``/dev/vfio/devices/vfioX`` is held open by a process (libvirt's case 1).
- **driver kind**: see :meth:`pyvfio.host.model.Host.driver_kind`; a variant is
  recognised by ``modules.alias`` and cross-checked against ``/dev/vfio/N``,
  which exists once any member is registered with vfio.  When the two
  disagree, the disagreement is a problem of its own.
- **vfio registration** is the kernel's own evidence and outranks
  ``modules.alias``: a device with ``.../<bdf>/vfio-dev/vfioX`` was
  registered with vfio by its driver (a variant or a vendor driver such as
  nvidia's vGPU VFs), whatever ``modules.alias`` says or whether it exists.
  On kernels without the device cdev (before 6.6), a group that vfio
  registered (``/sys/class/vfio/N``) with exactly one member on a driver
  names that member.
- **nodes** count only when they are the kernel's: ``/dev/vfio/N`` and
  ``/dev/vfio/devices/vfioX`` must be character devices whose ``st_rdev`` is
  the ``dev`` of ``/sys/class/vfio/N`` / ``/sys/class/vfio-dev/vfioX``
  (``stale-node`` otherwise; see :mod:`pyvfio.host.nodes`).
- **reserved regions**: a ``direct`` region (a firmware RMRR that is not
  relaxable) in the group's ``reserved_regions`` makes the kernel refuse DMA
  ownership of the group ("iommu: Prevent RESV_DIRECT devices from blocking
  domains"): ``reserved-direct``, never ready.  ``direct-relaxable`` is fine.
- **host use** (:mod:`pyvfio.host.usage`): netdevs with routes or
  addresses, mounted filesystems, swap, holders, the console, for the device
  and every member of its group, each its own problem kind.
- **ready**: viable, not in use, the device on a vfio driver, the node
  present and the kernel's, no ``direct`` region.

Each diagnosis lists the ``evidence`` it used: ``{"source", "says"}``
objects naming the file (or table) and what it said.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pyvfio.errors import (
    DeviceInUse,
    DeviceNotFound,
    HostStateError,
    NoIommu,
    NotBoundToVfio,
    NotViable,
)
from pyvfio.host.model import (
    ANON_VFIO_DEVICE,
    BRIDGE_DRIVERS,
    DEVICE_FD_PREFIX,
    KIND_BRIDGE,
    KIND_NONE,
    KIND_STUB,
    KIND_VARIANT,
    KIND_VFIO,
    VIABLE_KINDS,
    Host,
    PciDevice,
    normalize_bdf,
)
from pyvfio.host.nodes import NODE_OK, NODE_STALE, NODE_UNREGISTERED, cdev_node_check

VFIO_KINDS = (KIND_VFIO, KIND_VARIANT)

# Problem kinds (the "kind" field of each problem object).
P_HOST_DRIVER = "host-driver"  # a member is on a host driver: group not viable
P_NOT_VFIO = "not-vfio"  # the device itself is not on a vfio driver
P_BRIDGE = "bridge"  # the device is a bridge: nothing to assign
P_IN_USE = "in-use"  # a process holds the group or a cdev open
P_NO_NODE = "no-group-node"  # a vfio driver is bound, /dev/vfio/N is missing
P_DISAGREE = "variant-disagreement"  # /dev/vfio/N exists, modules.alias names no vfio driver
P_NO_GROUP = "no-iommu-group"
P_STALE_NODE = "stale-node"  # /dev/vfio/N or /dev/vfio/devices/vfioX is not the kernel's node
P_RESERVED_DIRECT = "reserved-direct"  # a firmware direct mapping: the kernel refuses DMA ownership
# Kinds that make a device not ready even when it is viable and on vfio.
BLOCKING_KINDS = (P_STALE_NODE, P_RESERVED_DIRECT)


@dataclass
class Problem:
    device: str
    driver: str | None
    reason: str
    fix: str
    kind: str
    evidence: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "driver": self.driver,
            "reason": self.reason,
            "fix": self.fix,
            "kind": self.kind,
            "evidence": list(self.evidence),
        }


@dataclass
class Member:
    device: str
    driver: str | None
    driver_kind: str
    is_bridge: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "driver": self.driver,
            "driver_kind": self.driver_kind,
            "is_bridge": self.is_bridge,
        }


@dataclass
class Diagnosis:
    """The ``pyvfio check`` verdict for one device."""

    device: str
    group: int | None
    driver: str | None
    driver_kind: str
    best_driver: str
    viable: bool
    in_use: list[dict[str, Any]]
    group_node: str | None
    vfio_cdev: str | None
    members: list[Member] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    noiommu: bool = False
    evidence: list[dict[str, str]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return (
            self.group is not None
            and self.viable
            and not self.in_use
            and self.driver_kind in VFIO_KINDS
            and self.group_node is not None
            and not any(p.kind in BLOCKING_KINDS for p in self.problems)
        )

    def note(self, source: str, says: str) -> None:
        """Record one piece of evidence: the file (or table) read and what it said."""
        self.evidence.append({"source": source, "says": says})

    def as_dict(self) -> dict[str, Any]:
        """The ``pyvfio check --json`` object."""
        return {
            "device": self.device,
            "group": self.group,
            "driver": self.driver,
            "driver_kind": self.driver_kind,
            "best_driver": self.best_driver,
            "viable": self.viable,
            "in_use": [dict(h) for h in self.in_use],
            "ready": self.ready,
            "problems": [p.as_dict() for p in self.problems],
            "group_node": self.group_node,
            # The same two forms as `ls --json`: the name, and the node's path.
            "vfio_cdev": self.vfio_cdev,
            "vfio_cdev_path": f"/dev/vfio/devices/{self.vfio_cdev}" if self.vfio_cdev else None,
            "noiommu": self.noiommu,
            "members": [m.as_dict() for m in self.members],
            "evidence": self.evidence,  # built once, never changed afterwards
        }

    def summary(self) -> str:
        """One line naming the first problem (and how many more)."""
        if not self.problems:
            return f"{self.device} is ready (group {self.group}, {self.driver})"
        first = self.problems[0]
        more = len(self.problems) - 1
        tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
        return f"{self.device} is not ready: {first.reason}; fix: {first.fix}{tail}"


def _drv(driver: str | None) -> str:
    return driver if driver else "no driver"


def _member_problem(host: Host, target: PciDevice, member: PciDevice, group: int) -> Problem:
    drv = member.driver or ""
    if member.address == target.address:
        best = host.best_driver(target)
        return Problem(
            member.address, drv,
            f"{member.address} is bound to the host driver {drv}, not to a vfio driver",
            f"bind {member.address} ({drv}) to {best}: pyvfio bind {member.address}",
            P_HOST_DRIVER,
        )
    if member.is_bridge:
        return Problem(
            member.address, drv,
            f"bridge {member.address} in IOMMU group {group} is bound to {drv}, "
            f"which is not a bridge driver ({', '.join(BRIDGE_DRIVERS)}), so the group is not viable",
            f"unbind {member.address} ({drv}): a bridge may stay driverless or on pcieport",
            P_HOST_DRIVER,
        )
    return Problem(
        member.address, drv,
        f"{member.address} in the same IOMMU group {group} is bound to the host driver {drv}, "
        "so the group is not viable",
        f"bind {member.address} ({drv}) to vfio-pci, or use --group",
        P_HOST_DRIVER,
    )


def diagnose_many(host: Host, addresses: Iterable[str]) -> list[Diagnosis]:
    """Diagnose several devices with one scan of ``/proc``."""
    targets = [host.device(a) for a in addresses]
    prepared = [_prepare(host, dev) for dev in targets]
    paths: set[str] = set()
    for _diag, wanted in prepared:
        paths |= wanted
    holders = host.holders(paths) if paths else {}
    for diag, wanted in prepared:
        seen: set[tuple[int, str]] = set()
        for path in sorted(wanted):
            shown = path
            if path.startswith(DEVICE_FD_PREFIX):  # a legacy device fd, named by its fdinfo
                shown = f"{ANON_VFIO_DEVICE} {path[len(DEVICE_FD_PREFIX):]}"
            for h in holders.get(path, []):
                if (h["pid"], path) in seen:
                    continue
                seen.add((h["pid"], path))
                diag.in_use.append({"pid": h["pid"], "comm": h["comm"], "path": shown})
        own = {f"/dev/vfio/devices/{diag.vfio_cdev}" if diag.vfio_cdev else None,
               ANON_VFIO_DEVICE + " " + diag.device}
        for h in diag.in_use:
            what = "the device" if h["path"] in own else f"IOMMU group {diag.group}"
            diag.problems.append(Problem(
                diag.device, diag.driver,
                f"{what} is in use: {h['path']} is held open by pid {h['pid']} ({h['comm']})",
                f"stop pid {h['pid']} ({h['comm']}) or wait until it closes {h['path']}",
                P_IN_USE,
            ))
    return [d for d, _ in prepared]


def diagnose(host: Host, address: str) -> Diagnosis:
    return diagnose_many(host, [address])[0]


def _usage_problems(host: Host, member: PciDevice, target: PciDevice) -> list[Problem]:
    """The host's uses of ``member`` as problems; for a member other than
    the target the reason says that ``--group`` would take it."""
    found = []
    for use in host.usage.uses(member.address, member.class_code):
        reason = use.reason
        if member.address != target.address:
            reason += f" (binding with --group would take it from the host along with {target.address})"
        found.append(Problem(member.address, member.driver, reason, use.fix, use.kind,
                             list(use.evidence)))
    return found


def _driver_evidence(host: Host, diag: Diagnosis, dev: PciDevice) -> None:
    base = f"/sys/bus/pci/devices/{dev.address}"
    diag.note(f"{base}/uevent", f"DRIVER={dev.driver}" if dev.driver else "no driver bound")
    if dev.vfio_cdev:
        diag.note(f"{base}/vfio-dev/{dev.vfio_cdev}",
                  f"{dev.driver or 'its driver'} registered the device with vfio")
    if dev.driver and dev.driver not in ("vfio-pci", "pci-stub"):
        aliases = host.aliases
        module = host.driver_module(dev.driver)
        if not aliases.patterns() and (aliases.path is None or not os.path.exists(aliases.path)):
            diag.note("modules.alias", "absent (no /lib/modules/<release>/modules.alias); not consulted")
        else:
            shown = _shown_path(aliases.path, host.root)
            if aliases.is_vfio_module(module):
                diag.note(shown, f"module {module} has vfio_pci: aliases (a vfio variant driver)")
            else:
                diag.note(shown, f"no vfio_pci: alias for module {module}")


@functools.lru_cache(maxsize=8)
def _shown_path(path: str | None, root: str) -> str:
    """A file under the root as a process on that host sees it, like the
    other evidence sources (computed once, not per device)."""
    return "/" + os.path.relpath(path, root) if path else "modules.alias"


@functools.lru_cache(maxsize=4096)
def _regions_text(regions: tuple[tuple[int, int, str], ...]) -> str:
    return ", ".join(f"{start:#x}-{end:#x} {kind}" for start, end, kind in regions) or "none"


def _registered_by_group(members: list[PciDevice], kinds: dict[str, str]) -> PciDevice | None:
    """On a kernel without device cdevs: the one member whose driver must have
    registered the group with vfio, when vfio registered it and no member is
    on a driver known to be vfio's."""
    if any(k in VFIO_KINDS for k in kinds.values()):
        return None
    candidates = [m for m in members if m.driver and kinds[m.address] not in (KIND_STUB, KIND_BRIDGE)]
    return candidates[0] if len(candidates) == 1 else None


def _prepare(host: Host, dev: PciDevice) -> tuple[Diagnosis, set[str]]:
    """Everything but the /proc scan; returns the device paths whose holders
    make the device in use."""
    kind = host.driver_kind(dev)
    diag = Diagnosis(
        device=dev.address,
        group=dev.iommu_group,
        driver=dev.driver,
        driver_kind=kind,
        best_driver=host.best_driver(dev),
        viable=False,
        in_use=[],
        group_node=None,
        vfio_cdev=dev.vfio_cdev,
    )
    _driver_evidence(host, diag, dev)
    wanted: set[str] = set()
    if dev.vfio_cdev:
        check = cdev_node_check(host.path(""), dev.vfio_cdev)
        for source, says in check.evidence:
            diag.note(source, says)
        if check.state == NODE_STALE:
            diag.problems.append(Problem(
                dev.address, dev.driver,
                f"stale vfio device node: {check.detail}",
                f"remove {check.path} and let udev recreate it (udevadm trigger), or mknod it "
                f"as c {(check.kernel_devnum or '?').replace(':', ' ')}",
                P_STALE_NODE, check.lines(),
            ))
    if dev.iommu_group is None:
        diag.note(f"/sys/bus/pci/devices/{dev.address}/iommu_group", "absent")
        if host.noiommu_enabled():
            diag.noiommu = True
            diag.problems.append(Problem(
                dev.address, dev.driver,
                f"{dev.address} has no IOMMU group yet: in vfio's no-IOMMU mode the group "
                "appears when the device binds to vfio-pci",
                f"pyvfio bind {dev.address}",
                P_NO_GROUP,
            ))
        elif not host.iommu_present():
            raise NoIommu(
                f"no IOMMU: {dev.address} has no IOMMU group and {host.path('sys/kernel/iommu_groups')} "
                "is empty; boot with intel_iommu=on (or amd_iommu=on) and enable VT-d/AMD-Vi in firmware"
            )
        else:
            diag.problems.append(Problem(
                dev.address, dev.driver,
                f"{dev.address} has no IOMMU group although an IOMMU is present, so vfio-pci "
                "cannot take it (its probe fails with EINVAL)",
                "check dmesg for why the IOMMU driver did not take the device (an IOMMU that "
                "does not cover its segment, a firmware table that leaves it out)",
                P_NO_GROUP,
            ))
        diag.problems.extend(_usage_problems(host, dev, dev))
        if dev.vfio_cdev:
            wanted.add(f"/dev/vfio/devices/{dev.vfio_cdev}")
        return diag, wanted

    number = dev.iommu_group
    group = host.group(number)
    diag.noiommu = group.noiommu
    node_check = host.group_node_check(number)
    diag.group_node = node_check.path if node_check is not None and node_check.state == NODE_OK else None
    if node_check is None:
        diag.note(f"/sys/class/vfio/{number}", "absent: vfio has not registered the group")
    else:
        for source, says in node_check.evidence:
            diag.note(source, says)
    registered = node_check is not None and node_check.state != NODE_UNREGISTERED \
        and node_check.kernel_devnum is not None
    wanted.add(diag.group_node or f"/dev/vfio/{number}")
    members: list[PciDevice] = []
    kinds: dict[str, str] = {}
    for address in group.devices:
        try:
            member = dev if address == dev.address else host.device(address)
        except DeviceNotFound:  # a member vanished between listing and reading
            continue
        members.append(member)
        kinds[member.address] = host.driver_kind(member)
    if registered:
        sole = _registered_by_group(members, kinds)
        if sole is not None:
            kinds[sole.address] = KIND_VARIANT
            diag.note(f"/sys/class/vfio/{number}",
                      f"vfio registered the group, and {sole.address} ({sole.driver}) is its only "
                      "member on a driver: that driver registered it")
            if sole.address == dev.address:
                kind = diag.driver_kind = KIND_VARIANT
                diag.best_driver = dev.driver or diag.best_driver
    member_problems: list[Problem] = []
    usage_problems: list[Problem] = []
    vfio_members: list[PciDevice] = []
    host_members: list[PciDevice] = []
    for member in members:
        mkind = kinds[member.address]
        diag.members.append(Member(member.address, member.driver, mkind, member.is_bridge))
        if member.vfio_cdev:
            wanted.add(f"/dev/vfio/devices/{member.vfio_cdev}")
        if mkind in VFIO_KINDS:
            wanted.add(DEVICE_FD_PREFIX + member.address)
            vfio_members.append(member)
        else:
            usage_problems.extend(_usage_problems(host, member, dev))
        if mkind not in VIABLE_KINDS:
            host_members.append(member)
            member_problems.append(_member_problem(host, dev, member, number))
    diag.viable = not member_problems
    # The device's own state first, then the rest of its group.
    member_problems.sort(key=lambda p: p.device != dev.address)
    diag.problems.extend(member_problems)
    if kind == KIND_BRIDGE or (dev.is_bridge and kind not in VFIO_KINDS):
        diag.problems.insert(0, Problem(
            dev.address, dev.driver,
            f"{dev.address} is a PCI bridge; vfio-pci does not take bridges",
            "assign the endpoints behind the bridge instead",
            P_BRIDGE,
        ))
    elif kind in (KIND_NONE, KIND_STUB):
        diag.problems.insert(0, Problem(
            dev.address, dev.driver,
            f"{dev.address} is not bound to a vfio driver ({_drv(dev.driver)})",
            f"bind it to {diag.best_driver}: pyvfio bind {dev.address}",
            P_NOT_VFIO,
        ))
    usage_problems.sort(key=lambda p: p.device != dev.address)
    diag.problems.extend(usage_problems)

    direct = [r for r in group.reserved_regions if r.type == "direct"]
    diag.note(f"/sys/kernel/iommu_groups/{number}/reserved_regions",
              _regions_text(tuple((r.start, r.end, r.type) for r in group.reserved_regions)))
    for region in direct:
        diag.problems.append(Problem(
            dev.address, dev.driver,
            f"IOMMU group {number} has a firmware direct mapping {region.start:#018x}-{region.end:#018x} "
            "(type direct: an RMRR that is not relaxable); the kernel refuses DMA ownership of "
            "such a group (EINVAL, \"iommu: Prevent RESV_DIRECT devices from blocking domains\"), "
            "so neither the legacy VFIO API nor iommufd can use it",
            "the firmware reserves this memory for the device (ACPI DMAR RMRR): a firmware setting "
            "or update that drops the RMRR (legacy USB, a shared iGPU buffer, a BMC) is the only fix; "
            "the kernel allows no override",
            P_RESERVED_DIRECT,
            [f"/sys/kernel/iommu_groups/{number}/reserved_regions"],
        ))

    # Cross-check modules.alias against the kernel's own word, /sys/class/vfio/N.
    node = f"/dev/vfio/{'noiommu-' if group.noiommu else ''}{number}"
    if node_check is not None and node_check.state == NODE_STALE:
        diag.problems.append(Problem(
            dev.address, dev.driver,
            f"stale vfio group node: {node_check.detail}",
            f"remove {node_check.path} and let udev recreate it (udevadm trigger)"
            + (f", or mknod it as c {node_check.kernel_devnum.replace(':', ' ')}"
               if node_check.kernel_devnum else ""),
            P_STALE_NODE, node_check.lines(),
        ))
    elif vfio_members and diag.group_node is None:
        for member in vfio_members:
            how = "vfio-pci" if member.driver == "vfio-pci" else "a vfio variant driver"
            diag.problems.append(Problem(
                member.address, member.driver,
                f"{member.address} is on {member.driver} ({how}) but {node} does not exist",
                "the driver did not register the device with vfio: check dmesg, or rebind "
                f"with pyvfio bind {member.address}",
                P_NO_NODE,
            ))
    elif not vfio_members and registered:
        suspects = host_members or [dev]
        for member in suspects:
            module = host.driver_module(member.driver) if member.driver else "?"
            diag.problems.append(Problem(
                member.address, member.driver,
                f"{node} exists, so a driver in group {number} registered with vfio, "
                f"but nothing says which: modules.alias lists no vfio_pci alias for "
                f"{_drv(member.driver)} (module {module}) and the kernel has no device cdev for it",
                f"if {_drv(member.driver)} is a vfio variant driver, its vfio_pci: aliases are "
                f"missing (run depmod; check modinfo {module}); otherwise the node is stale",
                P_DISAGREE,
            ))
    return diag, wanted


def require_ready(address: str, root: str = "/", host: Host | None = None) -> Diagnosis:
    """Return the diagnosis if the device is ready, else raise:
    :class:`NotBoundToVfio` (the device itself is not on a vfio driver),
    :class:`DeviceInUse` (a process holds its group or cdev),
    :class:`NotViable` (another member is on a host driver), or
    :class:`HostStateError` (the vfio node is missing or disputed).
    Each carries ``problems`` and names the offending device and driver."""
    host = host or Host(root)
    diag = diagnose(host, normalize_bdf(address))
    if diag.ready:
        return diag
    problems = [p.as_dict() for p in diag.problems]

    def message(kinds: tuple[str, ...]) -> str:
        chosen = next((p for p in diag.problems if p.kind in kinds), None)
        if chosen is None:
            return diag.summary()
        more = len(diag.problems) - 1
        tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
        return f"cannot use {diag.device}: {chosen.reason}; fix: {chosen.fix}{tail}"

    kinds = {p.kind for p in diag.problems}
    if diag.driver_kind not in VFIO_KINDS:
        raise NotBoundToVfio(message((P_HOST_DRIVER, P_NOT_VFIO, P_BRIDGE, P_NO_GROUP)), problems)
    if P_IN_USE in kinds:
        raise DeviceInUse(message((P_IN_USE,)), problems)
    if P_HOST_DRIVER in kinds or not diag.viable:
        raise NotViable(message((P_HOST_DRIVER,)), problems)
    raise HostStateError(message((P_NO_NODE, P_DISAGREE)), problems)
