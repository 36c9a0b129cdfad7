"""pyvfio: the VFIO device-assignment stack in Python.

Public surface (pinned by ``tests/test_public_api.py``):

- :mod:`pyvfio.device` — the one device API (:class:`Device`, regions, IRQs, DMA).
- :mod:`pyvfio.host` — the host as sysfs shows it: devices, groups, diagnosis, binding.
- :mod:`pyvfio.kernel` — kernel VFIO backends (legacy container/group, iommufd).
- :mod:`pyvfio.user` — vfio-user protocol, server framework and client.
- :mod:`pyvfio.broker` — privilege separation: fd broker and device handoff.
- :mod:`pyvfio.errors` — the exception tree.
"""

from pyvfio.device import Device, DmaBuffer, EventFd, IrqIndex, RegionIndex
from pyvfio.errors import (
    BrokerRefused,
    DeviceInUse,
    DeviceNotFound,
    KernelError,
    NotBoundToVfio,
    NotViable,
    ProtocolError,
    PyvfioError,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerRefused",
    "Device",
    "DeviceInUse",
    "DeviceNotFound",
    "DmaBuffer",
    "EventFd",
    "IrqIndex",
    "KernelError",
    "NotBoundToVfio",
    "NotViable",
    "ProtocolError",
    "PyvfioError",
    "RegionIndex",
    "__version__",
]
