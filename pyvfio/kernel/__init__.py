"""Kernel VFIO: open a host device through the legacy container/group API or
through iommufd and the device cdev, and drive it with the one device API.

>>> from pyvfio.kernel import open_device
>>> with open_device("0000:00:03.0") as dev:      # doctest: +SKIP
...     print(dev.backend, dev.backend_reason)
...     print(hex(dev.bar(0).read32(0)))

``backend="auto"`` takes iommufd when ``/dev/iommu`` and the device's cdev
(``/sys/bus/pci/devices/BDF/vfio-dev/vfioX``) exist, else the legacy API,
and records why in ``device.backend_reason`` (seed 003: choose at run time
from what the host offers).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pyvfio.errors import UsageError
from pyvfio.kernel import _sysfs
from pyvfio.kernel.device import KernelDevice

if TYPE_CHECKING:
    from pyvfio.kernel.legacy import Container

__all__ = ["BACKENDS", "KernelDevice", "choose_backend", "open_device"]

BACKENDS = ("auto", "legacy", "iommufd")


def choose_backend(bdf: str, root: str = "/") -> tuple[str, str]:
    """``(backend, reason)`` that ``backend="auto"`` would take for ``bdf``."""
    bdf = _sysfs.normalize_bdf(bdf)
    has_iommu = os.path.exists(os.path.join(root, "dev/iommu"))
    cdev = _sysfs.cdev_name(root, bdf)
    cdev_node = os.path.join(root, "dev/vfio/devices", cdev) if cdev else None
    if has_iommu and cdev_node and os.path.exists(cdev_node):
        return "iommufd", f"/dev/iommu and the device cdev /dev/vfio/devices/{cdev} exist"
    if not has_iommu:
        return "legacy", "no /dev/iommu (kernel without iommufd, or module not loaded)"
    return "legacy", (f"/dev/iommu exists but {bdf} has no VFIO device cdev "
                      "(kernel before 6.6, CONFIG_VFIO_DEVICE_CDEV off, or not bound to vfio)")


def open_device(bdf: str, backend: str = "auto", *, root: str = "/",
                container: Container | None = None, **iommufd_args: Any) -> KernelDevice:
    """Open PCI device ``bdf`` through kernel VFIO.

    ``backend``: "auto", "legacy" or "iommufd".  ``container`` shares a legacy
    address space between devices; ``iommufd=``/``ioas=`` do the same for
    iommufd.  The returned device's ``backend``/``backend_reason`` say which
    backend was used and why.
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    bdf = _sysfs.normalize_bdf(bdf)
    _sysfs.require_device(root, bdf)
    if backend == "auto":
        backend, reason = choose_backend(bdf, root)
        if container is not None:
            backend, reason = "legacy", "a legacy container was passed in"
    else:
        reason = f"{backend} backend requested"
    if backend == "iommufd":
        # The iommufd backend is its own module (and engineer); imported
        # lazily so the legacy path works on kernels and trees without it.
        import importlib

        iommufd = importlib.import_module("pyvfio.kernel.iommufd")
        dev = iommufd.open_cdev_device(bdf, root=root, iommufd=iommufd_args.get("iommufd"),
                                       ioas=iommufd_args.get("ioas"))
        dev.backend = "iommufd"
        dev.backend_reason = reason
        return dev
    if iommufd_args:
        raise UsageError(f"{sorted(iommufd_args)} only apply to the iommufd backend")
    from pyvfio.kernel.legacy import open_legacy_device

    return open_legacy_device(bdf, root=root, container=container, reason=reason)
