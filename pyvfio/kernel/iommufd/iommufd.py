""":class:`Iommufd`: an open ``/dev/iommu`` and the objects it allocates (IOAS,
HWPT, options, HW info, the self-test's mock domains).

Kernel: ``include/uapi/linux/iommufd.h``;
``Documentation/userspace-api/iommufd.rst``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from typing import Any

from pyvfio.errors import ClosedError, KernelError, UsageError
from pyvfio.host.sysfs import list_dir
from pyvfio.kernel.iommufd._common import IommufdUnavailable, _bitmap, _path
from pyvfio.kernel.iommufd.hwpt import _NO_HWPT_FLAGS, HwInfo, Hwpt
from pyvfio.kernel.iommufd.ioas import Ioas
from pyvfio.kernel.iommufd.mock import MockDevice
from pyvfio.uapi import iommufd as U
from pyvfio.uapi.ioctl import ioctl

# --- /dev/iommu ------------------------------------------------------------------------------


class Iommufd:
    """An open ``/dev/iommu``.  Use as a context manager; ``close()`` is idempotent.

    ``owned`` says whether :meth:`close` closes the fd.  An iommufd handed in
    by a management layer is usually owned by the receiver (it got its own
    copy over SCM_RIGHTS); pass ``owned=False`` to keep using the fd after.
    """

    def __init__(self, fd: int, *, owned: bool = True, name: str = "/dev/iommu") -> None:
        self.fd = fd
        self.owned = owned
        self.name = name

    @classmethod
    def open(cls, root: str = "/") -> Iommufd:
        path = _path(root, "dev/iommu")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise IommufdUnavailable(
                f"{path} does not exist: this kernel has no iommufd (it needs Linux 6.2+ "
                "built with CONFIG_IOMMUFD; Debian's own kernels, 6.1 and 6.12, are built "
                "without it and offer only the legacy container/group API)") from None
        except OSError as exc:
            raise KernelError.from_oserror(exc, "open", path) from None
        return cls(fd, name=path)

    @classmethod
    def from_fd(cls, fd: int, *, owned: bool = True) -> Iommufd:
        """Wrap an iommufd fd handed in by another process.

        The fd is checked to really be an iommufd: ``IOMMU_DESTROY`` of object
        0 answers ENOENT on an iommufd (no object has ID 0) and ENOTTY on any
        other file, without side effects.
        """
        if not isinstance(fd, int) or fd < 0:
            raise UsageError(f"iommufd fd must be a non-negative int, not {fd!r}")
        arg = U.new(U.iommu_destroy, id=0)
        try:
            ioctl(fd, U.IOMMU_DESTROY, arg, target=f"fd {fd}")
        except KernelError as exc:
            if exc.errno != errno.ENOENT:
                raise UsageError(f"fd {fd} is not an iommufd (IOMMU_DESTROY answered "
                                 f"{errno.errorcode.get(exc.errno or 0, exc.errno)})") from None
        return cls(fd, owned=owned, name=f"iommufd fd {fd}")

    def fileno(self) -> int:
        if self.fd < 0:
            raise ClosedError(f"{self.name} is closed")
        return self.fd

    def _ioctl(self, request: int, arg: Any, target: str = "") -> int:
        return ioctl(self.fileno(), request, arg, target=target or self.name)

    # ---- objects ----

    def alloc_ioas(self) -> Ioas:
        """``IOMMU_IOAS_ALLOC``: a new, empty IO address space (destroyed on close)."""
        arg = U.new(U.iommu_ioas_alloc)
        self._ioctl(U.IOMMU_IOAS_ALLOC, arg)
        return Ioas(self, int(arg.out_ioas_id), owned=True)

    def ioas(self, ioas_id: int, *, owned: bool = False) -> Ioas:
        """An IOAS that already exists in this iommufd (e.g. allocated by the
        process that handed the fd over).  Not destroyed on close unless ``owned``."""
        return Ioas(self, ioas_id, owned=owned)

    def destroy(self, object_id: int) -> None:
        """``IOMMU_DESTROY``: destroy any object (IOAS, HWPT, ...) by ID."""
        self._ioctl(U.IOMMU_DESTROY, U.new(U.iommu_destroy, id=object_id),
                    f"object {object_id} of {self.name}")

    def get_option(self, option: U.OptionId, object_id: int = 0) -> int:
        arg = U.new(U.iommu_option, option_id=option, op=U.OptionOp.GET, object_id=object_id)
        self._ioctl(U.IOMMU_OPTION, arg)
        return int(arg.val64)

    def set_option(self, option: U.OptionId, value: int, object_id: int = 0) -> None:
        arg = U.new(U.iommu_option, option_id=option, op=U.OptionOp.SET, object_id=object_id,
                    val64=value)
        self._ioctl(U.IOMMU_OPTION, arg)

    def vfio_compat_ioas(self, op: U.VfioIoasOp = U.VfioIoasOp.GET, ioas_id: int = 0) -> int:
        """``IOMMU_VFIO_IOAS``: get, set or clear the IOAS the VFIO container
        compatibility layer (``/dev/vfio/vfio`` served by iommufd) uses."""
        arg = U.new(U.iommu_vfio_ioas, op=op, ioas_id=ioas_id)
        self._ioctl(U.IOMMU_VFIO_IOAS, arg)
        return int(arg.ioas_id)

    def hw_info(self, dev_id: int) -> HwInfo:
        """``IOMMU_GET_HW_INFO`` for a device bound to this iommufd."""
        data = (ctypes.c_uint8 * 256)()
        arg = U.new(U.iommu_hw_info, dev_id=dev_id, data_len=ctypes.sizeof(data),
                    data_uptr=ctypes.addressof(data))
        self._ioctl(U.IOMMU_GET_HW_INFO, arg, f"device {dev_id} of {self.name}")
        length = min(int(arg.data_len), ctypes.sizeof(data))
        return HwInfo(type=int(arg.out_data_type),
                      capabilities=U.HwCapability(int(arg.out_capabilities)),
                      max_pasid_log2=int(arg.out_max_pasid_log2),
                      data=bytes(data)[:length])

    def alloc_hwpt(self, dev_id: int, pt_id: int, *,
                   flags: U.HwptAllocFlag = _NO_HWPT_FLAGS) -> Hwpt:
        """``IOMMU_HWPT_ALLOC``: a kernel-managed HW page table for device
        ``dev_id`` holding the mappings of IOAS ``pt_id``.  With
        ``HwptAllocFlag.DIRTY_TRACKING`` the IOMMU must support dirty tracking
        (EOPNOTSUPP otherwise; check :attr:`HwInfo.dirty_tracking` first)."""
        arg = U.new(U.iommu_hwpt_alloc, flags=flags, dev_id=dev_id, pt_id=pt_id,
                    data_type=U.HwptDataType.NONE)
        try:
            self._ioctl(U.IOMMU_HWPT_ALLOC, arg, f"device {dev_id} of {self.name}")
        except KernelError as exc:
            if exc.errno == errno.EOPNOTSUPP and flags & U.HwptAllocFlag.DIRTY_TRACKING:
                raise KernelError(exc.errno or errno.EOPNOTSUPP, "IOMMU_HWPT_ALLOC",
                                  f"device {dev_id}",
                                  "the IOMMU does not support dirty tracking") from None
            raise
        return Hwpt(self, int(arg.out_hwpt_id), dev_id=dev_id, pt_id=pt_id, flags=flags)

    # ---- iommufd's self-test interface (CONFIG_IOMMUFD_TEST) ----

    def _test_cmd(self, op: U.IommuTestOp, object_id: int) -> U.iommu_test_cmd:
        cmd = U.new(U.iommu_test_cmd, op=op, id=object_id)
        return cmd

    def mock_domain(self, pt_id: int, *, dev_flags: int = 0) -> MockDevice:
        """``IOMMU_TEST_OP_MOCK_DOMAIN(_FLAGS)``: create a mock device bound to
        this iommufd and attached to ``pt_id`` (an IOAS or HWPT).  Raises
        :class:`IommufdUnavailable` when the kernel lacks ``CONFIG_IOMMUFD_TEST``."""
        op = U.IommuTestOp.MOCK_DOMAIN_FLAGS if dev_flags else U.IommuTestOp.MOCK_DOMAIN
        cmd = self._test_cmd(op, pt_id)
        cmd.mock_domain.dev_flags = dev_flags
        try:
            self._ioctl(U.IOMMU_TEST_CMD, cmd, f"IOAS/HWPT {pt_id} of {self.name}")
        except KernelError as exc:
            if exc.errno == errno.ENOTTY:
                raise IommufdUnavailable(
                    "IOMMU_TEST_CMD answered ENOTTY: the kernel is built without "
                    "CONFIG_IOMMUFD_TEST, so iommufd mock domains are not reachable") from None
            others = [n for n in list_dir("/sys/class/iommu")
                      if not n.startswith("iommufd_selftest")]
            if exc.errno == errno.EINVAL and others:
                # 6.12's iommu core probes a device without firmware data with
                # the ops of the first IOMMU registered: with a real one (VT-d's
                # dmar0) the mock device is offered to that driver, which
                # refuses it, and binding it to iommufd then fails.
                raise IommufdUnavailable(
                    "IOMMU_TEST_CMD(MOCK_DOMAIN) answered EINVAL: the mock device was "
                    f"probed by the real IOMMU ({', '.join(others)}) instead of the mock "
                    "one; iommufd mock domains need a kernel without another IOMMU "
                    "driver active") from None
            raise
        return MockDevice(self, stdev_id=int(cmd.mock_domain.out_stdev_id),
                          hwpt_id=int(cmd.mock_domain.out_hwpt_id),
                          idev_id=int(cmd.mock_domain.out_idev_id))

    def mock_set_dirty(self, hwpt_id: int, iova: int, length: int, page_size: int,
                       pages: Iterable[int]) -> int:
        """``IOMMU_TEST_OP_DIRTY``: mark pages of a mock domain dirty, as a
        device writing them would.  ``pages`` are page indexes from ``iova``.
        Returns how many pages the mock domain marked."""
        bitmap = _bitmap(length // page_size, pages)
        cmd = self._test_cmd(U.IommuTestOp.DIRTY, hwpt_id)
        cmd.dirty.iova = iova
        cmd.dirty.length = length
        cmd.dirty.page_size = page_size
        cmd.dirty.uptr = ctypes.addressof(bitmap)
        self._ioctl(U.IOMMU_TEST_CMD, cmd, f"HWPT {hwpt_id} of {self.name}")
        return int(cmd.dirty.out_nr_dirty)

    # ---- lifetime ----

    def close(self) -> None:
        if self.fd >= 0:
            if self.owned:
                os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> Iommufd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Iommufd {self.name} fd={self.fd}>"
