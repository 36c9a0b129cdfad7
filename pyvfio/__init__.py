"""pyvfio: the VFIO device-assignment stack in Python.

Public surface (pinned by ``tests/test_public_api.py``):

- :mod:`pyvfio.device` — the one device API (:class:`Device`, regions, IRQs, DMA).
- :mod:`pyvfio.host` — the host as sysfs shows it: devices, groups, diagnosis, binding.
- :mod:`pyvfio.kernel` — kernel VFIO backends (legacy container/group, iommufd).
- :mod:`pyvfio.user` — vfio-user protocol, server framework and client.
- :mod:`pyvfio.broker` — privilege separation: fd broker and device handoff.
- :mod:`pyvfio.errors` — the exception tree.
- :class:`PciAddress` — a PCI address, parsed and printed the way sysfs names devices.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from pyvfio.pci.address import PciAddress

# Loaded on first use (PEP 562): every ``pyvfio`` command imports this package,
# and most of them need neither the device core nor ctypes.
_LAZY = {
    "Device": "pyvfio.device", "DmaBuffer": "pyvfio.device", "EventFd": "pyvfio.device",
    "IrqIndex": "pyvfio.device", "RegionIndex": "pyvfio.device",
    "BrokerRefused": "pyvfio.errors", "DeviceInUse": "pyvfio.errors",
    "DeviceNotFound": "pyvfio.errors", "KernelError": "pyvfio.errors",
    "NotBoundToVfio": "pyvfio.errors", "NotViable": "pyvfio.errors",
    "ProtocolError": "pyvfio.errors", "PyvfioError": "pyvfio.errors",
    "PciAddress": "pyvfio.pci.address",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvfio' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
    "PciAddress",
    "ProtocolError",
    "PyvfioError",
    "RegionIndex",
    "__version__",
]
