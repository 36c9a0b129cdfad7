"""A VFIO device fd from the kernel, whichever backend opened it.

:class:`KernelDevice` is the kernel implementation of :class:`pyvfio.device.Device`:
regions are reached by ``pread``/``pwrite``/``mmap`` on the device fd at the
region's offset, interrupts through ``VFIO_DEVICE_SET_IRQS`` with eventfds.
It does not know whether a group/container (legacy) or an iommufd opened the
fd: the backend hands it a :class:`~pyvfio.device.DmaSpace` and the objects
that keep the fd usable (``owners``), which it closes after the device fd,
in the order given.  The order is the kernel's: the device fd goes before
its group (the group cannot leave its container while a device is open);
an iommufd device is detached before its IOAS is destroyed.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pyvfio.device import (
    _FORMATS,
    Device,
    DeviceFlag,
    DeviceInfo,
    DmaSpace,
    IrqAction,
    IrqFlag,
    IrqInfo,
    RegionFlag,
    RegionInfo,
    SparseArea,
    outside_region_error,
)
from pyvfio.errors import KernelError, UsageError
from pyvfio.kernel.migration import KernelMigration
from pyvfio.uapi import vfio as V
from pyvfio.uapi.ioctl import call_with_argsz, ioctl, iter_caps

__all__ = ["DependentDevice", "FdOwner", "KernelDevice"]


class FdOwner(Protocol):
    """An object a :class:`KernelDevice` keeps open and closes after itself
    (a legacy group, an iommufd binding)."""

    def close(self) -> None: ...

    def fds(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class DependentDevice:
    """One entry of ``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO``: a device a hot reset
    of this one would also reset.  ``group_id`` is a devid for cdev devices
    (``devid`` flag set)."""

    segment: int
    bus: int
    devfn: int
    group_id: int

    @property
    def address(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7}"


class KernelDevice(Device):
    """A device fd from kernel VFIO.

    Build one with :func:`pyvfio.kernel.open_device`, or from fds handed over
    by a management process with :meth:`from_fd` /
    :func:`pyvfio.kernel.legacy.device_from_fds`.
    """

    def __init__(self, name: str, fd: int, dma: DmaSpace | None = None,
                 owners: Sequence[FdOwner] = (), *, backend: str = "legacy",
                 backend_reason: str = "") -> None:
        super().__init__(name, dma)
        self.fd = fd
        self.owners = list(owners)
        self.backend = backend
        self.backend_reason = backend_reason
        # Region offsets in the device fd, cached because every register
        # access needs one (the hot path of pread-based drivers).
        self._offsets: dict[int, int] = {}

    @classmethod
    def from_fd(cls, fd: int, name: str, *, dma: DmaSpace | None = None,
                owners: Sequence[FdOwner] = (), backend: str = "legacy",
                backend_reason: str = "device fd passed in") -> KernelDevice:
        """Wrap a device fd someone else opened.  The device takes ownership of
        ``fd`` (and of ``owners``): closing the device closes them."""
        if fd < 0:
            raise UsageError(f"not a file descriptor: {fd}")
        os.fstat(fd)  # EBADF now rather than at the first access
        return cls(name, fd, dma, owners, backend=backend, backend_reason=backend_reason)

    def fds(self) -> dict[str, int]:
        """The fds this device is made of, by role ("device", "group",
        "container", "iommufd", ...), e.g. to pass them over SCM_RIGHTS.
        They stay owned by this object."""
        self._ensure_open()
        out: dict[str, int] = {}
        for owner in reversed(self.owners):
            out.update(owner.fds())
        out["device"] = self.fd
        return out

    @property
    def target(self) -> str:
        return f"device {self.name}"

    # ---- primitives ----

    def _get_info(self) -> DeviceInfo:
        info, _buf = call_with_argsz(self.fd, V.VFIO_DEVICE_GET_INFO, V.vfio_device_info,
                                     op="VFIO_DEVICE_GET_INFO", target=self.target,
                                     caps_flag=V.VFIO_DEVICE_FLAGS_CAPS)
        return DeviceInfo(DeviceFlag(info.flags), int(info.num_regions), int(info.num_irqs))

    def _get_region_info(self, index: int) -> RegionInfo:
        def fill(s: V.vfio_region_info) -> None:
            s.index = index

        try:
            info, buf = call_with_argsz(self.fd, V.VFIO_DEVICE_GET_REGION_INFO,
                                        V.vfio_region_info, fill,
                                        op="VFIO_DEVICE_GET_REGION_INFO",
                                        target=f"{self.target} region {index}",
                                        caps_flag=V.VFIO_REGION_INFO_FLAG_CAPS)
        except KernelError as exc:
            # vfio-pci counts the VGA region in num_regions for every device
            # but answers EINVAL for it unless the device is a VGA device
            # (vfio_pci_ioctl_get_region_info): report it as absent, size 0.
            if exc.errno == errno.EINVAL and index == V.VFIO_PCI_VGA_REGION_INDEX:
                return RegionInfo(index, RegionFlag(0), 0)
            raise
        flags = RegionFlag(info.flags)
        size, offset = int(info.size), int(info.offset)
        sparse: tuple[SparseArea, ...] | None = None
        region_type: tuple[int, int] | None = None
        cap_ids: tuple[int, ...] = ()
        if flags & RegionFlag.CAPS:
            sparse, region_type = decode_region_caps(buf, int(info.cap_offset), size)
            cap_ids = tuple(c[0] for c in iter_caps(buf, int(info.cap_offset),
                                                    min_offset=ctypes.sizeof(V.vfio_region_info)))
        if sparse is not None:
            areas = sparse
        elif flags & RegionFlag.MMAP and size:
            areas = (SparseArea(0, size),)
        else:
            areas = ()
        self._offsets[index] = offset
        return RegionInfo(index, flags, size, offset, areas, region_type, cap_ids)

    def _offset(self, index: int) -> int:
        base = self._offsets.get(index)
        if base is None:
            base = self.region(index).info.offset
        return base

    def _region_read(self, index: int, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self.fd, size, self._offset(index) + offset)
        except OSError as exc:
            raise KernelError.from_oserror(exc, "pread", f"{self.target} region {index}",
                                           f"{size} bytes at {offset:#x}") from None
        if len(data) != size:
            raise KernelError(errno.EIO, "pread", f"{self.target} region {index}",
                              f"short read: {len(data)} of {size} bytes at {offset:#x}")
        return data

    def _region_read_block(self, index: int, offset: int, count: int, width: int) -> bytes:
        """One ``preadv`` of ``count`` iovecs of ``width`` bytes: the device
        file has no ``read_iter``, so the kernel reads each iovec with its own
        ``vfio_device_fops_read`` (``do_loop_readv_writev``), one access of
        exactly that width each."""
        buf = bytearray(count * width)
        view = memoryview(buf)
        try:
            done = os.preadv(self.fd, [view[i:i + width] for i in range(0, len(buf), width)],
                             self._offset(index) + offset)
        except OSError as exc:
            raise KernelError.from_oserror(exc, "preadv", f"{self.target} region {index}",
                                           f"{count} x {width} bytes at {offset:#x}") from None
        if done != len(buf):
            raise KernelError(errno.EIO, "preadv", f"{self.target} region {index}",
                              f"short read: {done} of {len(buf)} bytes at {offset:#x}")
        return bytes(buf)

    def _region_write_block(self, index: int, offset: int, data: bytes, width: int) -> None:
        """One ``pwritev`` of ``width``-byte iovecs (see :meth:`_region_read_block`)."""
        view = memoryview(data)
        try:
            done = os.pwritev(self.fd, [view[i:i + width] for i in range(0, len(data), width)],
                              self._offset(index) + offset)
        except OSError as exc:
            raise KernelError.from_oserror(exc, "pwritev", f"{self.target} region {index}",
                                           f"{len(data)} bytes at {offset:#x}") from None
        if done != len(data):
            raise KernelError(errno.EIO, "pwritev", f"{self.target} region {index}",
                              f"short write: {done} of {len(data)} bytes at {offset:#x}")

    def _region_write(self, index: int, offset: int, data: bytes) -> None:
        try:
            done = os.pwrite(self.fd, data, self._offset(index) + offset)
        except OSError as exc:
            raise KernelError.from_oserror(exc, "pwrite", f"{self.target} region {index}",
                                           f"{len(data)} bytes at {offset:#x}") from None
        if done != len(data):
            raise KernelError(errno.EIO, "pwrite", f"{self.target} region {index}",
                              f"short write: {done} of {len(data)} bytes at {offset:#x}")

    def _region_accessors(self, info: RegionInfo
                          ) -> tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]]:
        """pread/pwrite closures with the fd and the region's offset bound:
        the register-access hot path is then one Python frame around the
        system call (see benchmarks/kernel_bench.py)."""
        fd, base, index = self.fd, info.offset, info.index
        pread, pwrite = os.pread, os.pwrite
        target = f"{self.target} region {index}"

        def read(offset: int, size: int) -> bytes:
            try:
                data = pread(fd, size, base + offset)
            except OSError as exc:
                raise KernelError.from_oserror(exc, "pread", target,
                                               f"{size} bytes at {offset:#x}") from None
            if len(data) != size:
                raise KernelError(errno.EIO, "pread", target,
                                  f"short read: {len(data)} of {size} bytes at {offset:#x}")
            return data

        def write(offset: int, data: bytes) -> None:
            try:
                done = pwrite(fd, data, base + offset)
            except OSError as exc:
                raise KernelError.from_oserror(exc, "pwrite", target,
                                               f"{len(data)} bytes at {offset:#x}") from None
            if done != len(data):
                raise KernelError(errno.EIO, "pwrite", target,
                                  f"short write: {done} of {len(data)} bytes at {offset:#x}")

        return read, write

    def _region_int_accessors(self, info: RegionInfo
                              ) -> dict[int, tuple[Callable[[int], int],
                                                   Callable[[int, int], None]]]:
        """``read32(offset)`` and friends as one closure each around
        ``os.pread``/``os.pwrite`` of exactly that width: one Python frame per
        register access (the pread goal of benchmarks/kernel_bench.py).  A
        ``struct`` unpack both converts and rejects a short read, so the frame
        holds a range test, the system call and one conversion."""
        fd, base, index, size = self.fd, info.offset, info.index, info.size
        pread, pwrite = os.pread, os.pwrite
        target = f"{self.target} region {index}"

        def fail(op: str, offset: int, width: int, exc: OSError | None) -> Exception:
            if not 0 <= offset <= size - width:
                return outside_region_error(self.name, index, size, offset, width)
            if exc is not None:
                return KernelError.from_oserror(exc, op, target, f"{width} bytes at {offset:#x}")
            return KernelError(errno.EIO, op, target,
                               f"short {op}: fewer than {width} bytes at {offset:#x}")

        def make(width: int) -> tuple[Callable[[int], int], Callable[[int, int], None]]:
            limit = size - width
            mask = (1 << (8 * width)) - 1
            codec = struct.Struct("<" + _FORMATS[width])  # little-endian registers
            unpack, pack = codec.unpack, codec.pack

            def read_n(offset: int) -> int:
                if offset > limit or offset < 0:
                    raise fail("pread", offset, width, None)
                try:
                    return unpack(pread(fd, width, base + offset))[0]
                except OSError as exc:
                    raise fail("pread", offset, width, exc) from None
                except struct.error:  # a short read
                    raise fail("pread", offset, width, None) from None

            def write_n(offset: int, value: int) -> None:
                if offset > limit or offset < 0:
                    raise fail("pwrite", offset, width, None)
                try:
                    done = pwrite(fd, pack(value & mask), base + offset)
                except OSError as exc:
                    raise fail("pwrite", offset, width, exc) from None
                if done != width:
                    raise fail("pwrite", offset, width, None)

            return read_n, write_n

        return {width: make(width) for width in (1, 2, 4, 8)}

    def _region_mmap(self, info: RegionInfo, offset: int, size: int) -> mmap.mmap:
        prot = 0
        if info.flags & RegionFlag.READ:
            prot |= mmap.PROT_READ
        if info.flags & RegionFlag.WRITE:
            prot |= mmap.PROT_WRITE
        try:
            return mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot, offset=info.offset + offset)
        except OSError as exc:
            raise KernelError.from_oserror(exc, "mmap", f"{self.target} region {info.index}",
                                           f"{size:#x} bytes at {offset:#x}") from None

    def _get_irq_info(self, index: int) -> IrqInfo:
        info = V.vfio_irq_info(argsz=ctypes.sizeof(V.vfio_irq_info), index=index)
        try:
            ioctl(self.fd, V.VFIO_DEVICE_GET_IRQ_INFO, info, op="VFIO_DEVICE_GET_IRQ_INFO",
                  target=f"{self.target} IRQ index {index}")
        except KernelError as exc:
            # num_irqs counts every index the bus type defines, but a device
            # answers EINVAL for those it does not implement: vfio-pci for the
            # ERR index of a conventional (non-PCIe) device, mtty for MSI-X.
            # Such an index has no vectors.
            if exc.errno == errno.EINVAL:
                return IrqInfo(index, 0, IrqFlag(0))
            raise
        return IrqInfo(index, int(info.count), IrqFlag(info.flags))

    def _set_irqs(self, index: int, flags: IrqAction, start: int, count: int,
                  data: Sequence[int] | Sequence[bool] | None) -> None:
        payload = b""
        if flags & IrqAction.DATA_EVENTFD:
            if data is None or len(data) != count:
                raise UsageError(f"DATA_EVENTFD needs {count} fds, got {data!r}")
            payload = struct.pack(f"<{count}i", *[int(fd) for fd in data])
        elif flags & IrqAction.DATA_BOOL:
            if data is None or len(data) != count:
                raise UsageError(f"DATA_BOOL needs {count} values, got {data!r}")
            payload = bytes(1 if v else 0 for v in data)
        buf = V.irq_set_buffer(int(flags), index, start, count, payload)
        ioctl(self.fd, V.VFIO_DEVICE_SET_IRQS, buf, op="VFIO_DEVICE_SET_IRQS",
              target=f"{self.target} IRQ index {index} ({IrqAction(flags)!r}, "
                     f"start {start}, count {count})")

    def _reset(self) -> None:
        ioctl(self.fd, V.VFIO_DEVICE_RESET, 0, op="VFIO_DEVICE_RESET", target=self.target)

    def _close(self) -> None:
        try:
            os.close(self.fd)
        finally:
            self.fd = -1
            for owner in self.owners:
                owner.close()

    # ---- kernel-only extras ----

    def hot_reset_info(self) -> list[DependentDevice]:
        """``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO``: the devices a bus/slot reset
        would take along.  The kernel answers ENOSPC with the real ``count``
        when the array does not fit; we retry once with that size."""
        self._ensure_open()
        head = ctypes.sizeof(V.vfio_pci_hot_reset_info)
        entry = ctypes.sizeof(V.vfio_pci_dependent_device)
        count = 8
        for _ in range(2):
            buf = bytearray(head + count * entry)
            struct.pack_into("<III", buf, 0, len(buf), 0, 0)
            try:
                ioctl(self.fd, V.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf,
                      op="VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", target=self.target)
            except KernelError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                count = struct.unpack_from("<I", buf, 8)[0]
                continue
            n = min(struct.unpack_from("<I", buf, 8)[0], count)
            out = []
            for i in range(n):
                d = V.vfio_pci_dependent_device.from_buffer_copy(buf, head + i * entry)
                out.append(DependentDevice(int(d.segment), int(d.bus), int(d.devfn),
                                           int(d.group_id)))
            return out
        raise KernelError(errno.ENOSPC, "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", self.target)

    def feature(self, feature: int, flags: int, payload: bytes | ctypes.Structure = b"",
                reply_size: int = 0) -> bytes:
        """Raw ``VFIO_DEVICE_FEATURE``: ``flags`` is GET/SET/PROBE; returns the
        ``data[]`` the kernel wrote back (``reply_size`` bytes for GET)."""
        self._ensure_open()
        data = bytes(payload)
        if len(data) < reply_size:
            data = data.ljust(reply_size, b"\0")
        buf = V.feature_buffer(flags | (feature & V.VFIO_DEVICE_FEATURE_MASK), data)
        ioctl(self.fd, V.VFIO_DEVICE_FEATURE, buf, op="VFIO_DEVICE_FEATURE",
              target=f"{self.target} feature {feature}")
        return bytes(buf[ctypes.sizeof(V.vfio_device_feature):])

    def has_feature(self, feature: int, flags: int = V.VFIO_DEVICE_FEATURE_GET) -> bool:
        """Probe a feature (``VFIO_DEVICE_FEATURE_PROBE``); False when the kernel
        says it is unsupported (ENOTTY/EINVAL/EOPNOTSUPP)."""
        try:
            self.feature(feature, V.VFIO_DEVICE_FEATURE_PROBE | flags)
        except KernelError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise
        return True

    def migration_flags(self) -> int:
        """``VFIO_DEVICE_FEATURE_MIGRATION``: ``VFIO_MIGRATION_*`` flags, 0 when
        the device cannot migrate."""
        if not self.has_feature(V.VFIO_DEVICE_FEATURE_MIGRATION):
            return 0
        reply = self.feature(V.VFIO_DEVICE_FEATURE_MIGRATION, V.VFIO_DEVICE_FEATURE_GET,
                             reply_size=ctypes.sizeof(V.vfio_device_feature_migration))
        return int(V.vfio_device_feature_migration.from_buffer_copy(reply).flags)

    def mig_state(self) -> int:
        """The current ``enum vfio_device_mig_state``."""
        reply = self.feature(V.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, V.VFIO_DEVICE_FEATURE_GET,
                             reply_size=ctypes.sizeof(V.vfio_device_feature_mig_state))
        return int(V.vfio_device_feature_mig_state.from_buffer_copy(reply).device_state)

    def set_mig_state(self, state: int) -> int | None:
        """Move to ``state``; returns the migration data fd when the arc opens a
        data transfer session (caller owns it), else None."""
        req = V.vfio_device_feature_mig_state(device_state=state, data_fd=-1)
        reply = self.feature(V.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, V.VFIO_DEVICE_FEATURE_SET,
                             req)
        fd = int(V.vfio_device_feature_mig_state.from_buffer_copy(reply).data_fd)
        return fd if fd >= 0 else None

    def migration(self) -> KernelMigration:
        """This device's migration v2 interface (:mod:`pyvfio.migration`); the
        caller closes it (it owns the migration data fd while a session is open)."""
        return KernelMigration(self)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        try:
            out["migration_flags"] = self.migration_flags()
        except KernelError:
            out["migration_flags"] = None
        return out


def decode_region_caps(buf: bytes | bytearray, first: int, region_size: int
                       ) -> tuple[tuple[SparseArea, ...] | None, tuple[int, int] | None]:
    """Decode a region info capability chain: the sparse mmap areas (None when
    there is no SPARSE_MMAP capability) and the ``(type, subtype)`` pair.

    Lengths come from the kernel but are still checked: an area count that
    runs past the buffer, or an area outside the region, is dropped rather
    than trusted.
    """
    sparse: tuple[SparseArea, ...] | None = None
    region_type: tuple[int, int] | None = None
    fixed = ctypes.sizeof(V.vfio_region_info)
    for cap_id, _version, off in iter_caps(buf, first, min_offset=fixed):
        if cap_id == V.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            head = ctypes.sizeof(V.vfio_region_info_cap_sparse_mmap)
            if off + head > len(buf):
                continue
            cap = V.vfio_region_info_cap_sparse_mmap.from_buffer_copy(buf, off)
            esize = ctypes.sizeof(V.vfio_region_sparse_mmap_area)
            n = min(int(cap.nr_areas), (len(buf) - off - head) // esize)
            areas = []
            for i in range(n):
                a = V.vfio_region_sparse_mmap_area.from_buffer_copy(buf, off + head + i * esize)
                if a.size and a.offset + a.size <= region_size:
                    areas.append(SparseArea(int(a.offset), int(a.size)))
            sparse = tuple(areas)
        elif (cap_id == V.VFIO_REGION_INFO_CAP_TYPE
              and off + ctypes.sizeof(V.vfio_region_info_cap_type) <= len(buf)):
            t = V.vfio_region_info_cap_type.from_buffer_copy(buf, off)
            region_type = (int(t.type), int(t.subtype))
    return sparse, region_type
