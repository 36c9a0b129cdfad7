"""The few sysfs facts the kernel backends need, read under a root.

Kept here (rather than importing :mod:`pyvfio.host`) so that opening a device
needs nothing but this package; the host package gives the full diagnosis.
"""

from __future__ import annotations

import os
from typing import Any

from pyvfio.errors import DeviceNotFound
from pyvfio.pci.address import PciAddress

# Drivers a group member may be bound to without making the group unusable
# (drivers/vfio/group.c, vfio_driver_allowed; bridges use driver-managed DMA).
_ALLOWED_DRIVERS = {"pci-stub", "pcieport"}


def normalize_bdf(text: str) -> str:
    """``00:03.0``, ``0000:00:03.0`` or ``10001:8a:00.0`` (VMD) -> the sysfs
    name (:class:`~pyvfio.pci.address.PciAddress`); UsageError otherwise."""
    return PciAddress.normalize(text)


def device_dir(root: str, bdf: str) -> str:
    return os.path.join(root, "sys/bus/pci/devices", bdf)


def require_device(root: str, bdf: str) -> None:
    if not os.path.isdir(device_dir(root, bdf)):
        raise DeviceNotFound(f"no PCI device {bdf} under {os.path.join(root, 'sys/bus/pci')}")


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path).rstrip("/"))
    except OSError:
        return None


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def iommu_group(root: str, bdf: str) -> int | None:
    name = _link_name(os.path.join(device_dir(root, bdf), "iommu_group"))
    return int(name) if name is not None and name.isdigit() else None


def driver(root: str, bdf: str) -> str | None:
    return _link_name(os.path.join(device_dir(root, bdf), "driver"))


def is_vfio_driver(root: str, name: str | None) -> bool:
    """vfio-pci or a variant driver built on vfio-pci-core (``mlx5_vfio_pci``...).
    Variant drivers are recognised by their module depending on vfio_pci_core."""
    if not name:
        return False
    if name.startswith("vfio") or name.endswith("vfio_pci") or name.endswith("vfio-pci"):
        return True
    module = _link_name(os.path.join(root, "sys/bus/pci/drivers", name, "module"))
    if module is None:
        return False
    holders = os.path.join(root, "sys/module/vfio_pci_core/holders")
    try:
        return module in os.listdir(holders)
    except OSError:
        return False


def cdev_name(root: str, bdf: str) -> str | None:
    """``vfioX`` when the device has a VFIO device cdev (Linux 6.6+, bound to vfio)."""
    try:
        names = os.listdir(os.path.join(device_dir(root, bdf), "vfio-dev"))
    except OSError:
        return None
    return next((n for n in sorted(names) if n.startswith("vfio")), None)


def _header_type(root: str, bdf: str) -> int | None:
    try:
        with open(os.path.join(device_dir(root, bdf), "config"), "rb") as f:
            f.seek(0x0E)
            b = f.read(1)
    except OSError:
        return None
    return b[0] & 0x7F if b else None


def group_blockers(root: str, group_id: int) -> list[dict[str, Any]]:
    """Members of a group bound to a host driver, as problem dicts."""
    members_dir = os.path.join(root, "sys/kernel/iommu_groups", str(group_id), "devices")
    try:
        members = sorted(os.listdir(members_dir))
    except OSError:
        return []
    problems = []
    for member in members:
        drv = driver(root, member)
        if drv is None or drv in _ALLOWED_DRIVERS or is_vfio_driver(root, drv):
            continue
        if _header_type(root, member) not in (0, None):  # bridges do not block
            continue
        problems.append({
            "device": member, "driver": drv, "kind": "host-driver",
            "reason": f"{member} in IOMMU group {group_id} is bound to host driver {drv}",
            "fix": f"unbind {member} from {drv} or bind it to vfio-pci too",
            "message": f"{member} in IOMMU group {group_id} is bound to host driver {drv}; "
                       f"fix: unbind it from {drv} or bind it to vfio-pci too",
        })
    return problems
