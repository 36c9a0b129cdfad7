"""Device cdevs (``/dev/vfio/devices/vfioX``): finding one from sysfs, and the
VFIO ioctls that bind it to an iommufd and attach it to an IOAS or HWPT.

Kernel: ``include/uapi/linux/vfio.h`` (``VFIO_DEVICE_BIND_IOMMUFD``,
``VFIO_DEVICE_ATTACH_IOMMUFD_PT``); ``Documentation/driver-api/vfio.rst``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass

from pyvfio.errors import DeviceInUse, DeviceNotFound, KernelError, NotBoundToVfio, UsageError
from pyvfio.host.sysfs import device_cdev, device_driver, is_vfio_driver, read_link_name
from pyvfio.kernel.iommufd._common import IommufdUnavailable, _path
from pyvfio.kernel.iommufd.iommufd import Iommufd
from pyvfio.pci.address import PciAddress
from pyvfio.uapi import vfio_cdev as C
from pyvfio.uapi.ioctl import ioctl

# --- device cdevs ----------------------------------------------------------------------------

_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class CdevInfo:
    """Where a device's VFIO cdev is: ``name`` (``vfioX``) and the node path."""

    device: str
    name: str
    path: str


def sysfs_device_dir(device: str, root: str = "/") -> str:
    """``/sys/bus/pci/devices/BDF`` or, for an mdev (a UUID), ``/sys/bus/mdev/devices/UUID``."""
    if PciAddress.is_address(device):
        return _path(root, f"sys/bus/pci/devices/{PciAddress.normalize(device)}")
    if _UUID.match(device):
        return _path(root, f"sys/bus/mdev/devices/{device.lower()}")
    raise UsageError(f"not a PCI address (DDDD:BB:DD.F, or BB:DD.F) or mdev UUID: {device!r}")


def cdev_for(device: str, root: str = "/") -> CdevInfo:
    """Find the VFIO cdev of a device through ``<sysfs device>/vfio-dev/vfioX``.

    Raises :class:`DeviceNotFound`, :class:`NotBoundToVfio` (bound to another
    driver or none) or :class:`IommufdUnavailable` (vfio driver but no cdev:
    kernel without ``CONFIG_VFIO_DEVICE_CDEV``)."""
    base = sysfs_device_dir(device, root)
    if not os.path.isdir(base):
        raise DeviceNotFound(f"no device {device} ({base} does not exist)")
    name = device_cdev(base)
    if name is None:
        driver = device_driver(base)
        if not is_vfio_driver(root, driver, mdev=not PciAddress.is_address(device)):
            raise NotBoundToVfio(
                f"{device} is bound to {driver or 'no driver'}, not a vfio driver, so it has "
                "no VFIO cdev", [{"device": device, "driver": driver,
                                  "problem": "not bound to vfio"}])
        raise IommufdUnavailable(
            f"{device} is bound to {driver} but has no {base}/vfio-dev/: this kernel has no "
            "VFIO device cdevs (Linux 6.6+ with CONFIG_VFIO_DEVICE_CDEV)")
    if not os.path.exists(os.path.join(base, "vfio-dev", name, "dev")) and is_noiommu(device, root):
        # vfio_device_add: "cdev does not support noiommu device" - the vfio
        # device is registered, but with no character device behind it.
        raise IommufdUnavailable(
            f"{device} is in vfio's no-IOMMU mode, where vfio gives devices no cdev "
            f"(only {base}/vfio-dev/{name} without a device node); open it through its "
            "/dev/vfio/noiommu-N group")
    return CdevInfo(device, name, _path(root, f"dev/vfio/devices/{name}"))


def bind_iommufd(device_fd: int, iommufd: Iommufd | int, target: str = "") -> int:
    """``VFIO_DEVICE_BIND_IOMMUFD``; returns the device's ID in the iommufd.
    Pass ``-1`` as iommufd for a no-IOMMU device."""
    iommufd_fd = iommufd if isinstance(iommufd, int) else iommufd.fileno()
    arg = C.vfio_device_bind_iommufd(argsz=ctypes.sizeof(C.vfio_device_bind_iommufd),
                                     iommufd=iommufd_fd)
    try:
        ioctl(device_fd, C.VFIO_DEVICE_BIND_IOMMUFD, arg, target=target)
    except KernelError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceInUse(f"VFIO_DEVICE_BIND_IOMMUFD on {target}: the device is in use "
                              "(opened through its group, or bound by another iommufd)"
                              ) from None
        raise
    return int(arg.out_devid)


def attach_pt(device_fd: int, pt_id: int, target: str = "") -> int:
    """``VFIO_DEVICE_ATTACH_IOMMUFD_PT`` to an IOAS or HWPT; returns the HWPT
    the device ended up attached to (the kernel picks or makes one for an IOAS).
    Attaching again replaces the attachment."""
    arg = C.vfio_device_attach_iommufd_pt(argsz=ctypes.sizeof(C.vfio_device_attach_iommufd_pt),
                                          pt_id=pt_id)
    ioctl(device_fd, C.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg, target=target)
    return int(arg.pt_id)


def detach_pt(device_fd: int, target: str = "") -> None:
    """``VFIO_DEVICE_DETACH_IOMMUFD_PT``: the device loses DMA until attached again."""
    arg = C.vfio_device_detach_iommufd_pt(argsz=ctypes.sizeof(C.vfio_device_detach_iommufd_pt))
    ioctl(device_fd, C.VFIO_DEVICE_DETACH_IOMMUFD_PT, arg, target=target)


def is_noiommu(device: str, root: str = "/") -> bool:
    """Whether ``device`` sits in a vfio no-IOMMU group: usable without DMA
    isolation, and without DMA mapping.  vfio names such a group's node
    ``noiommu-N`` (the group of an emulated device such as an mdev is also
    called "vfio-noiommu" in sysfs, but its node is plain ``N``)."""
    link = read_link_name(os.path.join(sysfs_device_dir(device, root), "iommu_group"))
    if link is None:
        return False
    return any(os.path.exists(_path(root, p)) for p in
               (f"dev/vfio/noiommu-{link}", f"sys/class/vfio/noiommu-{link}"))


def _open_cdev(bdf: str, root: str) -> int:
    cdev = cdev_for(bdf, root)
    try:
        return os.open(cdev.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceInUse(f"open {cdev.path} ({bdf}): the device is already open "
                              "(through its cdev or its group)") from None
        raise KernelError.from_oserror(exc, "open", cdev.path) from None
