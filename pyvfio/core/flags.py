"""The flag and index values of ``linux/vfio.h`` a device reports (device, region
and IRQ info, ``VFIO_IRQ_SET_*``); the vfio-user protocol reuses them.
"""

from __future__ import annotations

import enum

# --- the values below are vfio.h's; the vfio-user protocol reuses them ----------------------


class DeviceFlag(enum.IntFlag):
    """``VFIO_DEVICE_FLAGS_*``."""

    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


class RegionFlag(enum.IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionIndex(enum.IntEnum):
    """``VFIO_PCI_*_REGION_INDEX``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class IrqFlag(enum.IntFlag):
    """``VFIO_IRQ_INFO_*``."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqIndex(enum.IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqAction(enum.IntFlag):
    """``VFIO_IRQ_SET_DATA_*`` | ``VFIO_IRQ_SET_ACTION_*``."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5
