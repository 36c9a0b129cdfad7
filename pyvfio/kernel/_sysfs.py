"""The sysfs questions the kernel backends ask before opening a device, on the
shared reader (:mod:`pyvfio.host.sysfs`) under a root.

The kernel backends read device facts through the same functions as host
management and do not import the diagnosis (:mod:`pyvfio.host.diagnosis`,
which builds on them); :func:`group_blockers` is the short explanation a
refused open carries.
"""

from __future__ import annotations

import os
from typing import Any

from pyvfio.errors import DeviceNotFound
from pyvfio.host.sysfs import (
    device_cdev,
    device_driver,
    device_header_type,
    device_iommu_group,
    is_vfio_driver,
    list_dir,
    pci_device_dir,
    read_str,
)
from pyvfio.pci.address import PciAddress

__all__ = ["cdev_name", "device_dir", "driver", "group_blockers", "iommu_group",
           "is_vfio_driver", "normalize_bdf", "read_text", "require_device"]

# Drivers a group member may be bound to without making the group unusable
# (drivers/vfio/group.c, vfio_driver_allowed; bridges use driver-managed DMA).
_ALLOWED_DRIVERS = {"pci-stub", "pcieport"}

read_text = read_str


def normalize_bdf(text: str) -> str:
    """``00:03.0``, ``0000:00:03.0`` or ``10001:8a:00.0`` (VMD) -> the sysfs
    name (:class:`~pyvfio.pci.address.PciAddress`); UsageError otherwise."""
    return PciAddress.normalize(text)


def device_dir(root: str, bdf: str) -> str:
    return pci_device_dir(root, bdf)


def require_device(root: str, bdf: str) -> None:
    if not os.path.isdir(device_dir(root, bdf)):
        raise DeviceNotFound(f"no PCI device {bdf} under {os.path.join(root, 'sys/bus/pci')}")


def iommu_group(root: str, bdf: str) -> int | None:
    return device_iommu_group(device_dir(root, bdf))


def driver(root: str, bdf: str) -> str | None:
    return device_driver(device_dir(root, bdf))


def cdev_name(root: str, bdf: str) -> str | None:
    """``vfioX`` when the device has a VFIO device cdev (Linux 6.6+, bound to vfio)."""
    return device_cdev(device_dir(root, bdf))


def group_blockers(root: str, group_id: int) -> list[dict[str, Any]]:
    """Members of a group bound to a host driver, as problem dicts (the
    shape of ``pyvfio check --json``'s problems)."""
    members = sorted(list_dir(os.path.join(root, "sys/kernel/iommu_groups", str(group_id),
                                           "devices")))
    problems = []
    for member in members:
        drv = driver(root, member)
        if drv is None or drv in _ALLOWED_DRIVERS or is_vfio_driver(root, drv):
            continue
        if device_header_type(device_dir(root, member)) not in (0, None):  # bridges do not block
            continue
        problems.append({
            "device": member, "driver": drv, "kind": "host-driver",
            "reason": f"{member} in IOMMU group {group_id} is bound to host driver {drv}",
            "fix": f"unbind {member} from {drv} or bind it to vfio-pci too",
            "message": f"{member} in IOMMU group {group_id} is bound to host driver {drv}; "
                       f"fix: unbind it from {drv} or bind it to vfio-pci too",
        })
    return problems
