"""What the device plugin advertises: one kubelet device per IOMMU group.

kubelet may allocate any advertised device IDs to any pod; it does not group
them, and ``GetPreferredAllocation`` is only a hint it may ignore.  If every
PCI function were its own ID, two functions of one IOMMU group could land in
two pods, and the second pod's VMM could never open its group (VFIO gives a
group one owner; seed 002).  So the plugin advertises **one ID per IOMMU
group**: the ID is the lowest selected PCI address of the group, and
allocating it hands over every selected function of that group.  Nothing
kubelet can do then splits a group between pods.

Health comes from :meth:`pyvfio.host.Host.diagnose` on every selected function
of the group: the ID is ``Healthy`` only when each is ready (viable, not in
use, on a vfio driver, its group node present) and, when the resource's
backend is ``iommufd``, each has its vfio cdev and ``/dev/iommu`` exists.

"In use" needs care: once a pod's VMM opens the device, the diagnosis says it
is held.  A group this plugin allocated is therefore not made Unhealthy by
being held; once it was seen held and is then seen free again (the pod ended),
the allocation is forgotten and "in use" counts again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pyvfio.k8s.config import PluginConfig, ResourceConfig, env_name

__all__ = ["GroupDevice", "Inventory", "Scan", "allocation_for"]

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


@dataclass(frozen=True)
class GroupDevice:
    """One advertised kubelet device: the selected functions of one IOMMU group.

    ``id``: the lowest selected PCI address; ``group``: the IOMMU group number
    (``None`` for a device without one, which is never healthy);
    ``numa_nodes``: the distinct ``numa_node`` values (>= 0) of the functions;
    ``reason``: why it is unhealthy, ``""`` when healthy."""

    id: str
    resource: str
    group: int | None
    addresses: tuple[str, ...]
    numa_nodes: tuple[int, ...]
    healthy: bool
    reason: str = ""
    held: bool = False  # a process holds the group or a cdev open

    @property
    def health(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "resource": self.resource, "iommu_group": self.group,
                "devices": list(self.addresses), "numa_nodes": list(self.numa_nodes),
                "health": self.health, "reason": self.reason or None}


@dataclass
class Scan:
    """One look at the host: resource name -> device ID -> :class:`GroupDevice`,
    plus the conflicts found (groups claimed by two resources)."""

    devices: dict[str, dict[str, GroupDevice]]
    conflicts: list[str] = field(default_factory=list)


class Inventory:
    """Selects devices for the configured resources and diagnoses them.

    ``root``: the host root whose sysfs, /dev and /proc are read (``/`` in
    production).  Thread-safe for one scanner thread plus readers of
    :attr:`last` (a scan replaces it whole)."""

    def __init__(self, config: PluginConfig, root: str = "/") -> None:
        self.config = config
        self.root = root
        # Device IDs handed out by Allocate -> "allocated" or "held" (seen in use since).
        self.allocations: dict[str, str] = {}
        self.last: Scan = Scan({r.name: {} for r in config.resources})

    def resource(self, name: str) -> ResourceConfig:
        for r in self.config.resources:
            if r.name == name:
                return r
        raise KeyError(name)

    def scan(self) -> Scan:
        """Select and diagnose every device now; updates :attr:`last`."""
        from pyvfio.host import Host

        host = Host(self.root)
        claimed: dict[int, str] = {}  # IOMMU group -> the resource that has it
        members: dict[str, dict[Any, list[Any]]] = {r.name: {} for r in self.config.resources}
        conflicts: list[str] = []
        for dev in host.devices():
            if dev.is_bridge:
                continue
            for res in self.config.resources:
                if not res.matches(address=dev.address, vendor_id=dev.vendor_id,
                                   device_id=dev.device_id, class_code=dev.class_code,
                                   driver=dev.driver):
                    continue
                key: Any = dev.iommu_group if dev.iommu_group is not None else dev.address
                owner = claimed.setdefault(dev.iommu_group, res.name) \
                    if dev.iommu_group is not None else res.name
                if owner != res.name:
                    conflicts.append(f"{dev.address} (IOMMU group {dev.iommu_group}) is selected "
                                     f"by {res.name} but its group belongs to {owner}, which "
                                     "comes first in the config: not advertised for "
                                     f"{res.name}")
                else:
                    members[res.name].setdefault(key, []).append(dev)
                break
        devices: dict[str, dict[str, GroupDevice]] = {}
        for res in self.config.resources:
            devices[res.name] = {}
            for key, devs in members[res.name].items():
                gd = self._diagnose(host, res, key if isinstance(key, int) else None, devs)
                devices[res.name][gd.id] = gd
        self.last = Scan(devices, conflicts)
        return self.last

    def recheck(self, resource: str, ids: list[str]) -> dict[str, GroupDevice]:
        """Diagnose only the advertised devices ``ids`` of ``resource`` again
        (what Allocate needs: a whole scan costs ~0.1 ms of CPU per host
        device); updates them in :attr:`last`.  IDs never advertised are
        left out of the result."""
        from pyvfio.errors import DeviceNotFound
        from pyvfio.host import Host

        host = Host(self.root)
        res = self.resource(resource)
        known = self.last.devices.get(resource, {})
        out: dict[str, GroupDevice] = {}
        for i in ids:
            old = known.get(i)
            if old is None or i in out:
                continue
            try:
                devs = [host.device(a) for a in old.addresses]
            except DeviceNotFound as exc:
                out[i] = GroupDevice(i, resource, old.group, old.addresses, old.numa_nodes,
                                     False, f"gone from the host: {exc}")
                continue
            out[i] = self._diagnose(host, res, old.group, devs)
        self.last = Scan({**self.last.devices, resource: {**known, **out}}, self.last.conflicts)
        return out

    def _diagnose(self, host: Any, res: ResourceConfig, group: int | None,
                  devs: list[Any]) -> GroupDevice:
        addresses = tuple(sorted(d.address for d in devs))
        device_id = addresses[0]
        numa = tuple(sorted({d.numa_node for d in devs
                             if d.numa_node is not None and d.numa_node >= 0}))
        reasons: list[str] = []
        held = False
        if group is None:
            reasons.append(f"{device_id} has no IOMMU group (no IOMMU, or the IOMMU is off "
                           "for it): VFIO cannot assign it")
        else:
            for address in addresses:
                diag = host.diagnose(address)
                if diag.in_use:
                    held = True
                ready_but_held = (diag.group is not None and diag.viable
                                  and diag.driver_kind in ("vfio", "vfio-variant")
                                  and diag.group_node is not None)
                if diag.ready:
                    continue
                if ready_but_held and self.allocations.get(device_id):
                    continue  # held by the pod it was allocated to
                problems = [p.reason for p in diag.problems]  # each names its device
                reasons.append("; ".join(problems) if problems else diag.summary())
            if not reasons and res.backend == "iommufd":
                reasons.extend(_iommufd_missing(host, addresses))
        state = self.allocations.get(device_id)
        if state == "allocated" and held:
            self.allocations[device_id] = "held"
        elif state == "held" and not held:
            del self.allocations[device_id]  # the pod that had it is gone
        return GroupDevice(device_id, res.name, group, addresses, numa, not reasons,
                           "; ".join(reasons), held)


def _iommufd_missing(host: Any, addresses: tuple[str, ...]) -> list[str]:
    if not os.path.exists(host.path("dev/iommu")):
        return ["backend iommufd: /dev/iommu is missing (kernel before 6.2, or iommufd "
                "not loaded)"]
    out = []
    for address in addresses:
        cdev = host.device(address).vfio_cdev
        if cdev is None or not os.path.exists(host.path(f"dev/vfio/devices/{cdev}")):
            out.append(f"backend iommufd: {address} has no vfio device cdev "
                       "(kernel before 6.6 or CONFIG_VFIO_DEVICE_CDEV off)")
    return out


@dataclass(frozen=True)
class Allocation:
    """What one container gets for its devices of one resource."""

    backend: str
    backend_reason: str
    device_nodes: tuple[str, ...]  # host paths, as the host (and the container) sees them
    envs: dict[str, str]


def allocation_for(root: str, res: ResourceConfig, devices: list[GroupDevice]) -> Allocation:
    """The device nodes and environment for ``devices`` (all of ``res``).

    The backend is ``res.backend``, or with ``auto`` the one
    :func:`pyvfio.kernel.choose_backend` picks for every function (iommufd only
    when all of them have a cdev and ``/dev/iommu`` exists, else legacy).
    Legacy gives ``/dev/vfio/vfio`` and each group node; iommufd gives
    ``/dev/iommu`` and each function's ``/dev/vfio/devices/vfioX``.  The
    environment is ``PCI_RESOURCE_<NAME>`` (see
    :func:`pyvfio.k8s.config.env_name`) with the comma-separated addresses.
    Raises :class:`pyvfio.errors.HostStateError` when a node is missing."""
    from pyvfio.errors import HostStateError
    from pyvfio.host import Host
    from pyvfio.kernel import choose_backend

    host = Host(root)
    addresses = [a for d in devices for a in d.addresses]
    backend = res.backend
    reason = f"backend {backend} configured for {res.name}"
    if backend == "auto":
        choices = [choose_backend(a, root) for a in addresses]
        legacy = [(a, why) for a, (b, why) in zip(addresses, choices, strict=True)
                  if b != "iommufd"]
        if legacy:
            backend, reason = "legacy", f"{legacy[0][0]}: {legacy[0][1]}"
        else:
            backend, reason = "iommufd", choices[0][1] if choices else "no devices"
    nodes: list[str] = []
    if backend == "legacy":
        nodes.append("/dev/vfio/vfio")
        for d in devices:
            node = host.group_node(d.group) if d.group is not None else None
            if node is None:
                raise HostStateError(f"{d.id}: IOMMU group {d.group} has no /dev/vfio node "
                                     "(is the device still on a vfio driver?)")
            nodes.append(node)
    else:
        nodes.append("/dev/iommu")
        for a in addresses:
            cdev = host.device(a).vfio_cdev
            if cdev is None:
                raise HostStateError(f"{a}: no vfio device cdev for the iommufd backend")
            nodes.append(f"/dev/vfio/devices/{cdev}")
    for node in nodes:
        if not os.path.exists(host.path(node)):
            raise HostStateError(f"{node} does not exist on the host ({backend} backend)")
    return Allocation(backend, reason, tuple(nodes), {env_name(res.name): ",".join(addresses)})
