""":class:`IommufdDevice`: a VFIO device opened through its cdev and bound to an
iommufd, and the ways to get one: :func:`open_cdev_device` and
:func:`device_from_fds` (fds handed in by a management process).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from pyvfio.errors import KernelError
from pyvfio.kernel.device import KernelDevice
from pyvfio.kernel.iommufd.cdev import _open_cdev, attach_pt, bind_iommufd, detach_pt
from pyvfio.kernel.iommufd.hwpt import _NO_HWPT_FLAGS, HwInfo, Hwpt
from pyvfio.kernel.iommufd.ioas import Ioas
from pyvfio.kernel.iommufd.iommufd import Iommufd
from pyvfio.uapi import iommufd as U


class IommufdBinding:
    """What keeps an iommufd device's DMA working, owned by the device and
    closed after its fd (closing the device fd detaches and unbinds it): the
    IOAS if it was made for this device, then ``/dev/iommu`` if it was opened
    for this device.  Shared ones are left to their owner."""

    def __init__(self, iommufd: Iommufd, ioas: Ioas, *, own_ioas: bool,
                 own_iommufd: bool) -> None:
        self.iommufd = iommufd
        self.ioas = ioas
        self.own_ioas = own_ioas
        self.own_iommufd = own_iommufd

    def fds(self) -> dict[str, int]:
        return {"iommufd": self.iommufd.fileno()}

    def close(self) -> None:
        try:
            if self.own_ioas:
                self.ioas.close()
        finally:
            if self.own_iommufd:
                self.iommufd.close()


class IommufdDevice(KernelDevice):
    """A :class:`KernelDevice` opened through its cdev and an iommufd.

    ``dev_id`` is its ID in the iommufd (for :meth:`hw_info` and HWPT
    allocation), ``pt_id`` the HWPT it is attached to (0 when detached),
    ``ioas`` its :class:`Ioas` (also ``dma``).
    """

    def __init__(self, name: str, fd: int, binding: IommufdBinding, dev_id: int,
                 pt_id: int, *, backend_reason: str = "") -> None:
        super().__init__(name, fd, binding.ioas, [binding], backend="iommufd",
                         backend_reason=backend_reason or "iommufd and the device cdev")
        self.binding = binding
        self.iommufd = binding.iommufd
        self.ioas = binding.ioas
        self.dev_id = dev_id
        self.pt_id = pt_id

    def _require_ioas(self, what: str) -> Ioas:
        self._ensure_open()
        return self.ioas

    def hw_info(self) -> HwInfo:
        """``IOMMU_GET_HW_INFO``: the IOMMU behind this device (type, VT-d
        registers, whether it can track dirty pages)."""
        self._require_ioas("IOMMU_GET_HW_INFO")
        return self.iommufd.hw_info(self.dev_id)

    def alloc_hwpt(self, *, dirty_tracking: bool = False,
                   flags: U.HwptAllocFlag = _NO_HWPT_FLAGS) -> Hwpt:
        """A HW page table for this device over its IOAS (attach it with
        :meth:`attach`).  ``dirty_tracking`` asks for
        ``IOMMU_HWPT_ALLOC_DIRTY_TRACKING``; it is refused with a clear error
        when :meth:`hw_info` does not report the capability."""
        ioas = self._require_ioas("IOMMU_HWPT_ALLOC")
        if dirty_tracking:
            info = self.hw_info()
            if not info.dirty_tracking:
                raise KernelError(errno.EOPNOTSUPP, "IOMMU_HWPT_ALLOC", self.target,
                                  f"the {info.type_name} IOMMU reports no dirty tracking "
                                  f"(capabilities {int(info.capabilities):#x})")
            flags |= U.HwptAllocFlag.DIRTY_TRACKING
        return self.iommufd.alloc_hwpt(self.dev_id, ioas.id, flags=flags)

    def attach(self, pt: Ioas | Hwpt | int) -> int:
        """Attach (or re-attach, replacing) to an IOAS or HWPT; returns the HWPT ID."""
        ioas = self._require_ioas("VFIO_DEVICE_ATTACH_IOMMUFD_PT")
        pt_id = pt if isinstance(pt, int) else pt.id
        self.pt_id = attach_pt(self.fd, pt_id, self.target)
        ioas.ranges_changed()
        return self.pt_id

    def detach(self) -> None:
        """Detach from the IOAS/HWPT; the device cannot DMA until attached again."""
        ioas = self._require_ioas("VFIO_DEVICE_DETACH_IOMMUFD_PT")
        detach_pt(self.fd, self.target)
        self.pt_id = 0
        ioas.ranges_changed()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        info: dict[str, Any] = {"dev_id": self.dev_id, "pt_id": self.pt_id,
                                "ioas_id": self.ioas.id}
        try:
            info["hw_info"] = self.hw_info().as_dict()
        except KernelError as exc:
            info["hw_info"] = {"error": str(exc)}
        out["iommufd"] = info
        return out


def open_cdev_device(bdf: str, root: str = "/", iommufd: Iommufd | int | None = None,
                     ioas: Ioas | int | None = None, *,
                     device_fd: int | None = None) -> IommufdDevice:
    """Open a device through iommufd and its cdev.

    ``bdf`` is a PCI address or an mdev UUID.  ``iommufd``: an
    :class:`Iommufd` to share (left open with the device), an fd handed in
    (wrapped, left open), or ``None`` to open ``/dev/iommu`` for this device
    alone.  ``ioas``: an :class:`Ioas` to share, the ID of one already in the
    iommufd, or ``None`` for a new one the device owns.  ``device_fd``: an
    unbound cdev fd handed in, instead of opening the node found through
    sysfs; the device owns it once this returns (on failure it is left open,
    still the caller's).

    Sequence: BIND_IOMMUFD -> (IOAS_ALLOC) -> ATTACH_IOMMUFD_PT.
    """
    own_iommufd = iommufd is None
    ifd = (Iommufd.open(root) if iommufd is None
           else Iommufd.from_fd(iommufd, owned=False) if isinstance(iommufd, int) else iommufd)
    space: Ioas | None = None
    fd = -1
    try:
        fd = _open_cdev(bdf, root) if device_fd is None else device_fd
        target = f"device {bdf}"
        dev_id = bind_iommufd(fd, ifd, target)
        if ioas is None:
            space = ifd.alloc_ioas()
        elif isinstance(ioas, int):
            space = ifd.ioas(ioas)
        else:
            space = ioas
        pt_id = attach_pt(fd, space.id, target)
        space.ranges_changed()
        binding = IommufdBinding(ifd, space, own_ioas=ioas is None, own_iommufd=own_iommufd)
        device = IommufdDevice(bdf, fd, binding, dev_id, pt_id)
    except BaseException:
        if fd >= 0 and device_fd is None:  # a handed-in fd stays the caller's on failure
            os.close(fd)
        if space is not None and ioas is None:
            space.close()
        if own_iommufd:
            ifd.close()
        raise
    return device


def device_from_fds(iommufd_fd: int, device_fd: int, name: str = "", *,
                    ioas: Ioas | int | None = None) -> IommufdDevice:
    """A device from fds a management process handed over (seed 003's
    ``-object iommufd,fd=N`` + ``vfio-pci,fd=M``): an iommufd and an unbound
    cdev fd.  The device owns ``device_fd``; the iommufd stays the caller's,
    to share between devices."""
    return open_cdev_device(name or f"cdev fd {device_fd}", iommufd=iommufd_fd, ioas=ioas,
                            device_fd=device_fd)
