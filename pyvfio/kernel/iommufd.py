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
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fcntl import ioctl as _fcntl_ioctl
from typing import Any

from pyvfio.device import PAGE_SIZE, DmaSpace, SharedMemory
from pyvfio.errors import (
    ClosedError,
    DeviceInUse,
    DeviceNotFound,
    IovaRangeError,
    KernelError,
    MemlockLimitError,
    NotBoundToVfio,
    PyvfioError,
    UsageError,
)
from pyvfio.host.sysfs import list_dir, read_link_name
from pyvfio.kernel.device import KernelDevice
from pyvfio.uapi import iommufd as U
from pyvfio.uapi import vfio_cdev as C
from pyvfio.uapi.ioctl import ioctl

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

U64_MAX = (1 << 64) - 1
_STRUCT_CACHE = 256  # prebuilt map/unmap structs per IOAS (see Ioas.__init__)
_IOMMU_IOAS_MAP = U.IOMMU_IOAS_MAP  # module globals: one lookup less on the hot path
_IOMMU_IOAS_UNMAP = U.IOMMU_IOAS_UNMAP
# (readable, writable, fixed IOVA) -> IOMMU_IOAS_MAP flags, as plain ints:
# IntFlag arithmetic is slow enough to show in the map+unmap benchmark.
_MAP_FLAGS = {
    (r, w, f): (int(U.IoasMapFlag.READABLE) if r else 0)
    | (int(U.IoasMapFlag.WRITEABLE) if w else 0)
    | (int(U.IoasMapFlag.FIXED_IOVA) if f else 0)
    for r in (False, True) for w in (False, True) for f in (False, True)
}
_NO_HWPT_FLAGS = U.HwptAllocFlag(0)


class IommufdUnavailable(PyvfioError):
    """Raised when the running kernel has no iommufd (``/dev/iommu`` is missing:
    Linux before 6.2, or built without ``CONFIG_IOMMUFD``, like Debian 12's),
    or the device has no cdev (Linux before 6.6, or no ``CONFIG_VFIO_DEVICE_CDEV``)."""


def _path(root: str, relative: str) -> str:
    return os.path.join(root, relative.lstrip("/"))


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
                "built with CONFIG_IOMMUFD; Debian 12's 6.1 kernel has only the legacy "
                "container/group API)") from None
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


def _bitmap(bits: int, pages: Iterable[int]) -> ctypes.Array[ctypes.c_uint64]:
    words = (ctypes.c_uint64 * max(1, -(-bits // 64)))()
    for page in pages:
        if not 0 <= page < bits:
            raise UsageError(f"page {page} is outside the {bits}-page range")
        words[page // 64] |= 1 << (page % 64)
    return words


@dataclass(frozen=True)
class HwInfo:
    """What ``IOMMU_GET_HW_INFO`` says about the IOMMU behind a device."""

    type: int
    capabilities: U.HwCapability
    max_pasid_log2: int
    data: bytes

    @property
    def type_name(self) -> str:
        try:
            return U.HwInfoType(self.type).name
        except ValueError:
            return f"{self.type:#x}"

    @property
    def dirty_tracking(self) -> bool:
        return bool(self.capabilities & U.HwCapability.DIRTY_TRACKING)

    @property
    def vtd(self) -> U.iommu_hw_info_vtd | None:
        """The VT-d registers (``struct iommu_hw_info_vtd``) for an Intel IOMMU."""
        if self.type != U.HwInfoType.INTEL_VTD or len(self.data) < ctypes.sizeof(U.iommu_hw_info_vtd):
            return None
        return U.iommu_hw_info_vtd.from_buffer_copy(self.data)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_name, "capabilities": int(self.capabilities),
                               "dirty_tracking": self.dirty_tracking,
                               "max_pasid_log2": self.max_pasid_log2}
        vtd = self.vtd
        if vtd is not None:
            out["vtd"] = {"flags": int(vtd.flags), "cap_reg": f"{vtd.cap_reg:#x}",
                          "ecap_reg": f"{vtd.ecap_reg:#x}"}
        return out


# --- IO address spaces -----------------------------------------------------------------------


class Ioas(DmaSpace):
    """An iommufd IO address space: the IOVA -> memory map devices attached to it
    DMA through.  ``close()`` destroys it when owned (which unmaps and unpins
    everything still mapped); it must come after the devices' detach.

    ``map`` (the :class:`DmaSpace` method) maps a :class:`SharedMemory` at a
    fixed IOVA by virtual address; :meth:`map_user`, :meth:`map_file` and
    :meth:`copy_from` are the other ways iommufd offers, and can let the
    kernel choose the IOVA.
    """

    def __init__(self, iommufd: Iommufd, ioas_id: int, *, owned: bool = True) -> None:
        self.iommufd = iommufd
        self.id = ioas_id
        self.owned = owned
        self._closed = False
        self.target = f"IOAS {ioas_id}"
        self._iova_allocator = None  # see DmaSpace
        # map+unmap is the hot path (a driver maps and unmaps per I/O), and
        # in CPython each step of it costs about as much as the ioctl's own
        # Python overhead (20x more under TCG).  So the structs for fixed-IOVA
        # maps and for unmaps are built once per (address, length, IOVA,
        # access) and kept; a repeat of the last call is recognised by
        # identity and a few comparisons and goes straight to fcntl.ioctl
        # (benchmarks/iommufd_bench.py).  close() clears the "last call"
        # fields, so a destroyed IOAS always takes the checked slow path.
        self._map_cache: dict[tuple[int, int, int, int], U.iommu_ioas_map] = {}
        self._fixed_maps: dict[tuple[int, int | None, int, int, bool, bool],
                               U.iommu_ioas_map] = {}
        self._unmap_cache: dict[tuple[int, int], U.iommu_ioas_unmap] = {}
        self._forget_last_calls()

    def _forget_last_calls(self) -> None:
        self._last_memory = None
        self._last_iova = -1
        self._last_arg = U.new(U.iommu_ioas_map)
        self._last_unmap_iova = self._last_unmap_size = -1
        self._last_unmap = U.new(U.iommu_ioas_unmap)

    def _fd(self) -> int:
        if self._closed:
            raise ClosedError(f"{self.target} is destroyed")
        return self.iommufd.fileno()

    def _ioctl(self, request: int, arg: Any) -> int:
        return ioctl(self._fd(), request, arg, target=self.target)

    # ---- ranges ----

    def query_ranges(self) -> tuple[list[tuple[int, int]], int]:
        """``IOMMU_IOAS_IOVA_RANGES``: the inclusive ``(start, last)`` ranges the
        attached devices can all reach, and the IOVA alignment.  The ranges
        narrow as devices attach; query again after attach/detach."""
        count = 8
        while True:
            ranges = (U.iommu_iova_range * count)()
            arg = U.new(U.iommu_ioas_iova_ranges, ioas_id=self.id, num_iovas=count,
                        allowed_iovas=ctypes.addressof(ranges))
            try:
                self._ioctl(U.IOMMU_IOAS_IOVA_RANGES, arg)
            except KernelError as exc:
                # EMSGSIZE: the array was too small; num_iovas holds the count needed.
                if exc.errno == errno.EMSGSIZE and int(arg.num_iovas) > count:
                    count = int(arg.num_iovas)
                    if count > 4096:
                        raise
                    continue
                raise
            n = int(arg.num_iovas)
            return ([(int(r.start), int(r.last)) for r in ranges[:n]],
                    int(arg.out_iova_alignment))

    @property
    def iova_ranges(self) -> list[tuple[int, int]]:
        return self.query_ranges()[0]

    @property
    def iova_alignment(self) -> int:
        return self.query_ranges()[1]

    def ranges_changed(self) -> None:
        """Forget the IOVA allocator's view of the ranges (after an attach or
        detach changed them), if it has handed nothing out yet."""
        alloc = self._iova_allocator
        if alloc is not None and alloc._free == alloc._ranges:
            self._iova_allocator = None

    def allow_iovas(self, ranges: Sequence[tuple[int, int]]) -> None:
        """``IOMMU_IOAS_ALLOW_IOVAS``: promise these inclusive ranges stay
        usable; attaching a device that cannot reach them then fails.  Replaces
        the whole allowed list (an empty list clears it)."""
        array = (U.iommu_iova_range * max(1, len(ranges)))()
        for slot, (start, last) in zip(array, ranges, strict=False):
            if last < start:
                raise UsageError(f"IOVA range [{start:#x}-{last:#x}] ends before it starts")
            slot.start, slot.last = start, last
        arg = U.new(U.iommu_ioas_allow_iovas, ioas_id=self.id, num_iovas=len(ranges),
                    allowed_iovas=ctypes.addressof(array))
        self._ioctl(U.IOMMU_IOAS_ALLOW_IOVAS, arg)

    def set_huge_pages(self, enabled: bool) -> None:
        """``IOMMU_OPTION_HUGE_PAGES`` for this IOAS (on by default)."""
        self.iommufd.set_option(U.OptionId.HUGE_PAGES, int(enabled), self.id)

    # ---- mapping ----

    @staticmethod
    def _flags(readable: bool, writable: bool, iova: int | None) -> int:
        return _MAP_FLAGS[bool(readable), bool(writable), iova is not None]

    def _map_error(self, exc: KernelError, op: str, iova: int | None, length: int) -> Exception:
        where = f"{iova:#x}+{length:#x}" if iova is not None else f"{length:#x} bytes"
        if exc.errno == errno.ENOMEM:
            import resource

            soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
            return MemlockLimitError(
                errno.ENOMEM, op, self.target,
                f"pinning {where} failed: RLIMIT_MEMLOCK is {limit}; iommufd charges pinned "
                "pages to it (raise it with `ulimit -l` or prlimit)")
        if exc.errno == errno.EEXIST:
            return IoasRangeError(exc, f"IOVA {where} is already mapped")
        if exc.errno == errno.EINVAL and iova is not None:
            # iopt_check_iova: EINVAL for a reserved or misaligned IOVA.
            ranges = self.iova_ranges
            if not any(s <= iova and iova + length - 1 <= e for s, e in ranges):
                return IoasRangeError(exc, f"IOVA {where} is outside the usable ranges "
                                           f"{_ranges_text(ranges)}")
        return exc

    def map_user(self, user_va: int, length: int, iova: int | None = None, *,
                 readable: bool = True, writable: bool = True) -> int:
        """``IOMMU_IOAS_MAP``: map ``length`` bytes of this process's memory at
        ``user_va``; at ``iova`` if given, else where the kernel chooses.
        Returns the IOVA."""
        flags = _MAP_FLAGS[bool(readable), bool(writable), iova is not None]
        if iova is None:
            arg = U.new(U.iommu_ioas_map, flags=flags, ioas_id=self.id, user_va=user_va,
                        length=length)
        else:
            key = (user_va, length, iova, flags)
            cached = self._map_cache.get(key)
            if cached is None:
                if len(self._map_cache) >= _STRUCT_CACHE:
                    self._map_cache.clear()
                cached = self._map_cache[key] = U.new(
                    U.iommu_ioas_map, flags=flags, ioas_id=self.id, user_va=user_va,
                    length=length, iova=iova)
            arg = cached
        if self._closed or self.iommufd.fd < 0:
            self._fd()  # raises ClosedError
        try:
            _fcntl_ioctl(self.iommufd.fd, _IOMMU_IOAS_MAP, arg)
        except OSError as exc:
            err = KernelError(exc.errno or errno.EIO, "IOMMU_IOAS_MAP", self.target)
            raise self._map_error(err, "IOMMU_IOAS_MAP", iova, length) from None
        return int(arg.iova)

    def map(self, iova: int, memory: SharedMemory, offset: int = 0, size: int | None = None,
            readable: bool = True, writable: bool = True) -> None:
        # The hot path (see __init__): the same whole buffer at the same IOVA
        # as last time is an identity test and four comparisons.
        if (memory is self._last_memory and iova == self._last_iova and offset == 0
                and size is None and readable and writable):
            arg = self._last_arg
        else:
            arg = self._map_arg(iova, memory, offset, size, readable, writable)
        try:
            _fcntl_ioctl(self.iommufd.fd, _IOMMU_IOAS_MAP, arg)
        except (OSError, ValueError) as exc:  # ValueError: fcntl refuses fd -1
            if self.iommufd.fd < 0:  # the iommufd was closed (its fd is -1)
                self._fd()  # raises ClosedError
            err = KernelError(getattr(exc, "errno", None) or errno.EIO, "IOMMU_IOAS_MAP",
                              self.target)
            raise self._map_error(err, "IOMMU_IOAS_MAP", iova, int(arg.length)) from None

    def _map_arg(self, iova: int, memory: SharedMemory, offset: int, size: int | None,
                 readable: bool, writable: bool) -> U.iommu_ioas_map:
        """The struct for this fixed-IOVA map, checked, built or found in the
        cache, and remembered as the last call when it maps a whole buffer."""
        if self._closed:  # first: iommufd reuses a destroyed object's ID
            self._fd()  # raises ClosedError
        if memory.closed:  # its address may belong to another mapping by now
            raise ClosedError("DMA map of closed memory")
        key = (memory.address + offset, size, memory.size, iova, readable, writable)
        arg = self._fixed_maps.get(key) or self._fixed_map(key, memory, offset, size)
        if offset == 0 and size is None and readable and writable:
            self._remember_memory(memory)
            self._last_iova, self._last_arg = iova, arg
        return arg

    def _fixed_map(self, key: tuple[int, int | None, int, int, bool, bool], memory: SharedMemory,
                   offset: int, size: int | None) -> U.iommu_ioas_map:
        user_va, _size, _total, iova, readable, writable = key
        if size is None:
            size = memory.size - offset
        if offset < 0 or size <= 0 or offset + size > memory.size:
            raise UsageError(f"{offset:#x}+{size:#x} is outside the {memory.size:#x}-byte memory")
        if len(self._fixed_maps) >= _STRUCT_CACHE:
            self._fixed_maps.clear()
        arg = self._fixed_maps[key] = U.new(
            U.iommu_ioas_map, flags=_MAP_FLAGS[bool(readable), bool(writable), True],
            ioas_id=self.id, user_va=user_va, length=size, iova=iova)
        return arg

    def map_file(self, fd: int | SharedMemory, length: int, start: int = 0,
                 iova: int | None = None, *, readable: bool = True,
                 writable: bool = True) -> int:
        """``IOMMU_IOAS_MAP_FILE`` (Linux 6.13+): map ``length`` bytes of a memfd
        from byte ``start`` without mapping it into this process.  Returns the
        IOVA.  Older kernels raise :class:`KernelError` with ENOTTY."""
        if isinstance(fd, SharedMemory):
            start += fd.fd_offset
            fd = fd.fd
        arg = U.new(U.iommu_ioas_map_file, flags=self._flags(readable, writable, iova),
                    ioas_id=self.id, fd=fd, start=start, length=length,
                    iova=0 if iova is None else iova)
        try:
            self._ioctl(U.IOMMU_IOAS_MAP_FILE, arg)
        except KernelError as exc:
            if exc.errno == errno.ENOTTY:
                raise KernelError(errno.ENOTTY, "IOMMU_IOAS_MAP_FILE", self.target,
                                  f"not in Linux {os.uname().release}; it was added in 6.13"
                                  ) from None
            raise self._map_error(exc, "IOMMU_IOAS_MAP_FILE", iova, length) from None
        return int(arg.iova)

    def copy_from(self, src: Ioas, src_iova: int, length: int, iova: int | None = None, *,
                  readable: bool = True, writable: bool = True) -> int:
        """``IOMMU_IOAS_COPY``: map into this IOAS the same pages ``src`` maps at
        ``src_iova``, pinned once for both.  The header asks for exactly one
        earlier map; 6.12 takes any range the source's mappings cover (ENOENT
        otherwise).  Both IOAS must live in the same iommufd.  Returns the IOVA."""
        if src.iommufd.fileno() != self.iommufd.fileno():
            raise UsageError(f"{src.target} and {self.target} belong to different iommufds")
        arg = U.new(U.iommu_ioas_copy, flags=self._flags(readable, writable, iova),
                    dst_ioas_id=self.id, src_ioas_id=src.id, length=length,
                    src_iova=src_iova, dst_iova=0 if iova is None else iova)
        try:
            self._ioctl(U.IOMMU_IOAS_COPY, arg)
        except KernelError as exc:
            if exc.errno == errno.ENOENT:
                raise IoasRangeError(exc, f"{src_iova:#x}+{length:#x} is not covered by "
                                          f"mappings of {src.target}") from None
            raise self._map_error(exc, "IOMMU_IOAS_COPY", iova, length) from None
        return int(arg.dst_iova)

    def unmap(self, iova: int, size: int) -> int:  # type: ignore[override]
        """``IOMMU_IOAS_UNMAP``: unmap whole earlier mappings covering
        ``iova..iova+size``.  Returns the bytes unmapped."""
        if iova == self._last_unmap_iova and size == self._last_unmap_size:  # see map
            arg = self._last_unmap
        else:
            arg = self._unmap_arg(iova, size)
        try:
            _fcntl_ioctl(self.iommufd.fd, _IOMMU_IOAS_UNMAP, arg)
        except (OSError, ValueError) as exc:  # ValueError: fcntl refuses fd -1
            if self.iommufd.fd < 0:
                self._fd()  # raises ClosedError (see map)
            err = KernelError(getattr(exc, "errno", None) or errno.EIO, "IOMMU_IOAS_UNMAP",
                              self.target)
            if err.errno == errno.ENOENT:
                raise IoasRangeError(
                    err, f"no mapping lies wholly inside {iova:#x}+{size:#x} (an unmap must "
                    "cover whole earlier mappings)") from None
            raise err from None
        done: int = arg.length  # in/out: the kernel returns the bytes unmapped here
        if done != size:
            arg.length = size  # put the request back for the next use
        return done

    def _unmap_arg(self, iova: int, size: int) -> U.iommu_ioas_unmap:
        if self._closed:  # see _map_arg
            self._fd()
        arg = self._unmap_cache.get((iova, size))
        if arg is None:
            if len(self._unmap_cache) >= _STRUCT_CACHE:
                self._unmap_cache.clear()
            arg = self._unmap_cache[iova, size] = U.new(
                U.iommu_ioas_unmap, ioas_id=self.id, iova=iova, length=size)
        self._last_unmap_iova, self._last_unmap_size, self._last_unmap = iova, size, arg
        return arg

    def unmap_all(self) -> int:
        """Unmap everything (IOVA 0, length U64_MAX); returns the bytes unmapped."""
        arg = U.new(U.iommu_ioas_unmap, ioas_id=self.id, iova=0, length=U64_MAX)
        try:
            self._ioctl(U.IOMMU_IOAS_UNMAP, arg)
        except KernelError as exc:
            if exc.errno == errno.ENOENT:  # nothing was mapped
                return 0
            raise
        return int(arg.length)

    # ---- lifetime ----

    def close(self) -> None:
        """Destroy the IOAS if we own it (EBUSY while a device is still attached)."""
        if self._closed:
            return
        if self.owned and not self.iommufd.closed:
            self.iommufd.destroy(self.id)
        self._closed = True
        self._forget_last_calls()  # the map/unmap fast paths now fail over to the checks

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Ioas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Ioas {self.id} of {self.iommufd.name}>"


class IoasRangeError(IovaRangeError, KernelError):
    """An IOVA problem the kernel reported (EEXIST, ENOENT, a reserved IOVA):
    an :class:`IovaRangeError` that also keeps the errno and the operation."""

    def __init__(self, exc: KernelError, message: str) -> None:
        KernelError.__init__(self, exc.errno or errno.EINVAL, exc.op, exc.target, message)


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{s:#x}-{e:#x}]" for s, e in ranges) or "(none)"


# --- HW page tables --------------------------------------------------------------------------


class Hwpt:
    """A HW page table (an IOMMU domain) allocated with ``IOMMU_HWPT_ALLOC``.
    Devices attach to it instead of to the IOAS; it mirrors the IOAS's
    mappings.  With dirty tracking, :meth:`read_dirty` reports which pages
    devices wrote."""

    def __init__(self, iommufd: Iommufd, hwpt_id: int, *, dev_id: int = 0, pt_id: int = 0,
                 flags: U.HwptAllocFlag = _NO_HWPT_FLAGS, owned: bool = True) -> None:
        self.iommufd = iommufd
        self.id = hwpt_id
        self.dev_id = dev_id
        self.pt_id = pt_id
        self.flags = flags
        self.owned = owned
        self._closed = False

    @property
    def target(self) -> str:
        return f"HWPT {self.id}"

    def set_dirty_tracking(self, enabled: bool) -> None:
        """``IOMMU_HWPT_SET_DIRTY_TRACKING``."""
        arg = U.new(U.iommu_hwpt_set_dirty_tracking, hwpt_id=self.id,
                    flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enabled else 0)
        ioctl(self.iommufd.fileno(), U.IOMMU_HWPT_SET_DIRTY_TRACKING, arg, target=self.target)

    def dirty_bitmap(self, iova: int, length: int, page_size: int = PAGE_SIZE, *,
                     clear: bool = True) -> bytes:
        """``IOMMU_HWPT_GET_DIRTY_BITMAP``: the raw bitmap, bit ``n`` for the page
        at ``iova + n * page_size``.  Reading clears the dirty bits unless
        ``clear=False``."""
        if page_size <= 0 or page_size & (page_size - 1) or iova % page_size or length % page_size:
            raise UsageError(f"IOVA {iova:#x}+{length:#x} must be aligned to a power-of-two "
                             f"page size, not {page_size:#x}")
        bitmap = _bitmap(length // page_size, ())
        arg = U.new(U.iommu_hwpt_get_dirty_bitmap, hwpt_id=self.id, iova=iova, length=length,
                    page_size=page_size, data=ctypes.addressof(bitmap),
                    flags=0 if clear else U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR)
        ioctl(self.iommufd.fileno(), U.IOMMU_HWPT_GET_DIRTY_BITMAP, arg, target=self.target)
        return bytes(bitmap)

    def read_dirty(self, iova: int, length: int, page_size: int = PAGE_SIZE, *,
                   clear: bool = True) -> list[int]:
        """The IOVAs of the dirty pages in ``iova..iova+length``."""
        bitmap = self.dirty_bitmap(iova, length, page_size, clear=clear)
        pages = length // page_size
        return [iova + n * page_size for n in range(pages) if bitmap[n // 8] >> (n % 8) & 1]

    def close(self) -> None:
        if self._closed:
            return
        if self.owned and not self.iommufd.closed:
            self.iommufd.destroy(self.id)
        self._closed = True

    def __enter__(self) -> Hwpt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Hwpt {self.id} flags={self.flags!r}>"


@dataclass
class MockDevice:
    """A mock device from ``IOMMU_TEST_OP_MOCK_DOMAIN``: ``stdev_id`` is the
    self-test device object (destroying it detaches and unbinds), ``hwpt_id``
    the domain it attached to, ``idev_id`` its bound-device ID (what a real
    device's ``VFIO_DEVICE_BIND_IOMMUFD`` returns)."""

    iommufd: Iommufd
    stdev_id: int
    hwpt_id: int
    idev_id: int

    def close(self) -> None:
        if self.stdev_id and not self.iommufd.closed:
            self.iommufd.destroy(self.stdev_id)
        self.stdev_id = 0


# --- device cdevs ----------------------------------------------------------------------------

_BDF = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class CdevInfo:
    """Where a device's VFIO cdev is: ``name`` (``vfioX``) and the node path."""

    device: str
    name: str
    path: str


def sysfs_device_dir(device: str, root: str = "/") -> str:
    """``/sys/bus/pci/devices/BDF`` or, for an mdev (a UUID), ``/sys/bus/mdev/devices/UUID``."""
    if _BDF.match(device):
        return _path(root, f"sys/bus/pci/devices/{device.lower()}")
    if _UUID.match(device):
        return _path(root, f"sys/bus/mdev/devices/{device.lower()}")
    raise UsageError(f"not a PCI address (DDDD:BB:DD.F) or mdev UUID: {device!r}")


def cdev_for(device: str, root: str = "/") -> CdevInfo:
    """Find the VFIO cdev of a device through ``<sysfs device>/vfio-dev/vfioX``.

    Raises :class:`DeviceNotFound`, :class:`NotBoundToVfio` (bound to another
    driver or none) or :class:`IommufdUnavailable` (vfio driver but no cdev:
    kernel without ``CONFIG_VFIO_DEVICE_CDEV``)."""
    base = sysfs_device_dir(device, root)
    if not os.path.isdir(base):
        raise DeviceNotFound(f"no device {device} ({base} does not exist)")
    names = [n for n in list_dir(os.path.join(base, "vfio-dev")) if n.startswith("vfio")]
    if not names:
        driver = read_link_name(os.path.join(base, "driver"))
        if driver is None or ("vfio" not in driver and driver != "mtty"):
            raise NotBoundToVfio(
                f"{device} is bound to {driver or 'no driver'}, not a vfio driver, so it has "
                "no VFIO cdev", [{"device": device, "driver": driver,
                                  "problem": "not bound to vfio"}])
        raise IommufdUnavailable(
            f"{device} is bound to {driver} but has no {base}/vfio-dev/: this kernel has no "
            "VFIO device cdevs (Linux 6.6+ with CONFIG_VFIO_DEVICE_CDEV)")
    name = sorted(names)[0]
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
