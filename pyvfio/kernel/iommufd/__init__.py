"""The iommufd backend: ``/dev/iommu``, IO address spaces, HW page tables and
device cdevs.

One :class:`Iommufd` (one open ``/dev/iommu``) serves every device of a VM
(seed 003: QEMU's ``-object iommufd,fd=N``).  Inside it live objects named by
IDs: an :class:`Ioas` (an IOVA -> memory map, the :class:`~pyvfio.device.DmaSpace`
devices DMA through), HW page tables (:class:`Hwpt`, the IOMMU driver's
domain, which can track dirty pages), and bound devices.  A device is reached
through its cdev ``/dev/vfio/devices/vfioX`` (found from
``/sys/bus/pci/devices/BDF/vfio-dev/``), bound to the iommufd and attached to
an IOAS or HWPT; then it is an ordinary VFIO device fd.

The sequence (``Documentation/userspace-api/iommufd.rst``)::

    open /dev/iommu -> IOMMU_IOAS_ALLOC -> open /dev/vfio/devices/vfioX
    -> VFIO_DEVICE_BIND_IOMMUFD (device ID) -> VFIO_DEVICE_ATTACH_IOMMUFD_PT(IOAS)
    -> IOMMU_IOAS_IOVA_RANGES -> IOMMU_IOAS_MAP ...

Teardown runs the other way: the device fd is closed first (that detaches
and unbinds it), then the IOAS is destroyed (its mappings are unpinned), then
``/dev/iommu`` is closed.  Every object can be built from fds handed in by a
management process (seeds 000, 003): :meth:`Iommufd.from_fd` and
``device_fd=`` of :func:`open_cdev_device`.

Also here: iommufd's self-test interface (``CONFIG_IOMMUFD_TEST``), which
creates *mock domains* - software IOMMU domains with dirty tracking - so
dirty tracking can be exercised where no hardware IOMMU offers it.

One module per kernel object (as rust-vmm's ``vfio-ioctls`` keeps them):
:mod:`.iommufd` (``/dev/iommu``), :mod:`.ioas`, :mod:`.hwpt` (and
``IOMMU_GET_HW_INFO``), :mod:`.mock` (the self-test's mock device),
:mod:`.cdev` (finding, binding and attaching a device cdev) and
:mod:`.device` (:class:`IommufdDevice` and the ways to open one).  This package
re-exports every name, so ``from pyvfio.kernel.iommufd import X`` is unchanged.

"""

from __future__ import annotations

from pyvfio.kernel.iommufd._common import U64_MAX as U64_MAX
from pyvfio.kernel.iommufd._common import IommufdHandle as IommufdHandle
from pyvfio.kernel.iommufd._common import IommufdUnavailable
from pyvfio.kernel.iommufd._common import _bitmap as _bitmap
from pyvfio.kernel.iommufd.cdev import (
    CdevInfo,
    attach_pt,
    bind_iommufd,
    cdev_for,
    detach_pt,
    is_noiommu,
)
from pyvfio.kernel.iommufd.cdev import sysfs_device_dir as sysfs_device_dir
from pyvfio.kernel.iommufd.device import (
    IommufdBinding,
    IommufdDevice,
    device_from_fds,
    open_cdev_device,
)
from pyvfio.kernel.iommufd.hwpt import HwInfo, Hwpt
from pyvfio.kernel.iommufd.ioas import Ioas, IoasRangeError
from pyvfio.kernel.iommufd.iommufd import Iommufd
from pyvfio.kernel.iommufd.mock import MockDevice

__all__ = [
    "CdevInfo",
    "HwInfo",
    "Hwpt",
    "Ioas",
    "IoasRangeError",
    "Iommufd",
    "IommufdBinding",
    "IommufdDevice",
    "IommufdUnavailable",
    "MockDevice",
    "attach_pt",
    "bind_iommufd",
    "cdev_for",
    "detach_pt",
    "device_from_fds",
    "is_noiommu",
    "open_cdev_device",
]
