"""The device-cdev part of ``include/uapi/linux/vfio.h`` (Linux 6.6+).

A device cdev (``/dev/vfio/devices/vfioX``) is opened directly, without a
group or container.  Until it is bound to an iommufd it can do nothing but
``VFIO_DEVICE_BIND_IOMMUFD``; after binding it is attached to an IOAS or HWPT
with ``VFIO_DEVICE_ATTACH_IOMMUFD_PT`` and from then on is an ordinary VFIO
device fd (regions, IRQs, reset, features).  These three ioctls are kept apart
from :mod:`pyvfio.uapi.vfio` because only the iommufd backend uses them.
"""

from __future__ import annotations

import ctypes

from pyvfio.uapi.ioctl import _IO, register_names

__all__ = [
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    "VFIO_NOIOMMU_IOMMU",
    "vfio_device_attach_iommufd_pt",
    "vfio_device_bind_iommufd",
    "vfio_device_detach_iommufd_pt",
]

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    return _IO(VFIO_TYPE, VFIO_BASE + nr)


VFIO_DEVICE_BIND_IOMMUFD = _io(18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _io(20)

#: ``#define VFIO_NOIOMMU_IOMMU 8``: the container IOMMU type of no-IOMMU mode.
VFIO_NOIOMMU_IOMMU = 8


class vfio_device_bind_iommufd(ctypes.Structure):
    """``struct vfio_device_bind_iommufd``::

        __u32 argsz; __u32 flags; __s32 iommufd; __u32 out_devid;

    ``iommufd`` is an fd of ``/dev/iommu`` (or -1 to bind a no-IOMMU device);
    ``out_devid`` is the device's object ID inside that iommufd, used by
    ``IOMMU_GET_HW_INFO`` and ``IOMMU_HWPT_ALLOC``.
    """

    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("iommufd", ctypes.c_int32), ("out_devid", ctypes.c_uint32))


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    """``struct vfio_device_attach_iommufd_pt { __u32 argsz; __u32 flags; __u32 pt_id; };``

    ``pt_id`` is an IOAS (the kernel then picks or creates a HWPT, and
    returns that HWPT's ID in ``pt_id``) or an explicit HWPT.
    """

    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("pt_id", ctypes.c_uint32))


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    """``struct vfio_device_detach_iommufd_pt { __u32 argsz; __u32 flags; };``"""

    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


register_names(globals(), ("VFIO_DEVICE_",))
