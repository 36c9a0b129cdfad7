"""The one device API.

A :class:`Device` is a VFIO device as a userspace driver sees it, whatever
carries it: the kernel's legacy container/group API, iommufd with a device
cdev, a vfio-user connection, or fds handed over by the broker.  A driver
written against this module runs on all of them unchanged.

The split follows QEMU's ``hw/vfio``: this module is the backend-neutral core
and imports no backend.  A backend subclasses :class:`Device` and fills in the
few ``_primitive`` methods (get region info, read, write, mmap, IRQ info,
set IRQs, reset, close); everything a driver calls — typed register access
with exact widths, BAR mmap, config space, eventfd interrupts, DMA buffers —
is written once here on top of them.

DMA goes through a :class:`DmaSpace` (a legacy container, an iommufd IOAS, or
a vfio-user connection's view of client memory).  Buffers are memfd-backed so
that every backend can map them: by virtual address (type1, IOAS_MAP), by file
(IOAS_MAP_FILE) or by passing the fd (vfio-user DMA_MAP), and so that a
successor process can inherit them (handoff).

The core lives in :mod:`pyvfio.core`, one module per concept (``flags``,
``info``, ``eventfd``, ``dma``, ``region``, ``device``); this module is its
public face and re-exports every name, so ``from pyvfio.device import X``
is the import to use.
"""

from __future__ import annotations

from pyvfio.core.device import Device
from pyvfio.core.dma import PAGE_SIZE, DmaBuffer, DmaSpace, IovaAllocator, SharedMemory
from pyvfio.core.eventfd import EventFd
from pyvfio.core.flags import DeviceFlag, IrqAction, IrqFlag, IrqIndex, RegionFlag, RegionIndex
from pyvfio.core.info import DeviceInfo, IrqInfo, RegionInfo, SparseArea
from pyvfio.core.info import outside_region_error as outside_region_error
from pyvfio.core.region import _FORMATS as _FORMATS
from pyvfio.core.region import MappedRegion, Region
from pyvfio.core.region import RegionBackend as RegionBackend

__all__ = [
    "PAGE_SIZE",
    "Device",
    "DeviceFlag",
    "DeviceInfo",
    "DmaBuffer",
    "DmaSpace",
    "EventFd",
    "IovaAllocator",
    "IrqAction",
    "IrqFlag",
    "IrqIndex",
    "IrqInfo",
    "MappedRegion",
    "Region",
    "RegionFlag",
    "RegionIndex",
    "RegionInfo",
    "SharedMemory",
    "SparseArea",
]
