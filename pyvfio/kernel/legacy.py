"""The legacy VFIO backend: a container (``/dev/vfio/vfio``) and groups
(``/dev/vfio/$GROUP``).

The order of operations is the kernel's (Documentation/driver-api/vfio.rst):
open the container and check the API version; open the group and check that
it is viable; attach the group to the container; pick the IOMMU model
(type1v2) once the first group is in; get device fds from the group; map DMA
on the container.  One :class:`Container` is one IOVA address space and is
shared by every group attached to it (``open_device(..., container=c)``).

Teardown runs the other way: device fds first (a group cannot leave its
container while one of its devices is open), then groups, and the container
when its last group is gone (if it was created for them).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
from typing import Any

from pyvfio.device import PAGE_SIZE, DmaSpace, SharedMemory
from pyvfio.errors import (
    ClosedError,
    DeviceInUse,
    IovaRangeError,
    KernelError,
    MemlockLimitError,
    NotBoundToVfio,
    NotViable,
    UsageError,
)
from pyvfio.kernel import _sysfs
from pyvfio.kernel.device import KernelDevice
from pyvfio.uapi import vfio as V
from pyvfio.uapi.ioctl import call_with_argsz, ioctl, iter_caps

_STRUCT_CACHE = 256  # prebuilt map/unmap structs per container (see Container.__init__)
_fcntl_ioctl = fcntl.ioctl  # module globals: one lookup less on the hot path
_VFIO_IOMMU_MAP_DMA = V.VFIO_IOMMU_MAP_DMA
_VFIO_IOMMU_UNMAP_DMA = V.VFIO_IOMMU_UNMAP_DMA

__all__ = ["Container", "Group", "device_from_fds", "open_legacy_device"]

DMA_ENTRY_LIMIT_PATH = "sys/module/vfio_iommu_type1/parameters/dma_entry_limit"


class Container(DmaSpace):
    """``/dev/vfio/vfio``: one IOVA address space for one or more groups.

    ``Container(root=...)`` opens a new one; :meth:`from_fd` wraps one passed
    in.  The IOMMU model (type1v2 by default) is set when the first group is
    attached, because the kernel only allows ``VFIO_SET_IOMMU`` then.
    """

    def __init__(self, *, root: str = "/", fd: int | None = None,
                 iommu_type: int = V.VFIO_TYPE1v2_IOMMU) -> None:
        self.root = root
        self.iommu_type = iommu_type
        self.groups: list[Group] = []
        self._info: dict[str, Any] | None = None
        self._ranges: list[tuple[int, int]] = []
        self._iova_allocator = None  # see DmaSpace
        self._closed = False
        if fd is None:
            path = os.path.join(root, "dev/vfio/vfio")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise KernelError(errno.ENOENT, "open", path,
                                  "the vfio module is not loaded") from None
            except OSError as exc:
                raise KernelError.from_oserror(exc, "open", path) from None
        self.fd = fd
        try:
            version = ioctl(fd, V.VFIO_GET_API_VERSION, 0, op="VFIO_GET_API_VERSION",
                            target=self.target)
            if version != V.VFIO_API_VERSION:
                raise KernelError(errno.EPROTO, "VFIO_GET_API_VERSION", self.target,
                                  f"kernel speaks VFIO API {version}, pyvfio knows "
                                  f"{V.VFIO_API_VERSION}")
            # A container handed over with groups already in it has its IOMMU
            # set; GET_INFO works only then.
            self.iommu_set = self._probe_iommu_set()
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        # map+unmap is the DMA hot path (benchmarks/kernel_bench.py): each
        # Python step of it costs about as much as the ioctl's own overhead.
        # So checked structs are kept per (address, size, IOVA, access), and a
        # repeat of the last call (identity and a few comparisons) goes straight
        # to fcntl.ioctl.  close() forgets the last calls, so a closed
        # container always takes the checked path.
        self._maps: dict[tuple[int, int, int, int], V.vfio_iommu_type1_dma_map] = {}
        self._unmaps: dict[tuple[int, int], V.vfio_iommu_type1_dma_unmap] = {}
        self._forget_last_calls()

    @classmethod
    def from_fd(cls, fd: int, *, root: str = "/") -> Container:
        """Wrap a container fd passed in (e.g. by a broker).  Takes ownership."""
        return cls(root=root, fd=fd)

    @property
    def target(self) -> str:
        return f"container fd {self.fd}"

    def _probe_iommu_set(self) -> bool:
        info = V.vfio_iommu_type1_info(argsz=ctypes.sizeof(V.vfio_iommu_type1_info))
        try:
            ioctl(self.fd, V.VFIO_IOMMU_GET_INFO, info, op="VFIO_IOMMU_GET_INFO")
        except KernelError:
            return False
        return True

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("VFIO container is closed")

    # ---- extensions and IOMMU model ----

    def check_extension(self, extension: int) -> bool:
        self._check()
        return ioctl(self.fd, V.VFIO_CHECK_EXTENSION, extension, op="VFIO_CHECK_EXTENSION",
                     target=self.target) > 0

    def extensions(self) -> dict[str, bool]:
        """Every extension ``VFIO_CHECK_EXTENSION`` knows, by name."""
        return {name: self.check_extension(ext) for ext, name in V.EXTENSION_NAMES.items()}

    def set_iommu(self, iommu_type: int | None = None) -> None:
        """``VFIO_SET_IOMMU``; needs a group attached.  Done by :class:`Group`."""
        self._check()
        iommu_type = self.iommu_type if iommu_type is None else iommu_type
        if not self.check_extension(iommu_type):
            name = V.EXTENSION_NAMES.get(iommu_type, str(iommu_type))
            raise KernelError(errno.ENODEV, "VFIO_CHECK_EXTENSION", self.target,
                              f"IOMMU model {name} is not supported by this kernel")
        ioctl(self.fd, V.VFIO_SET_IOMMU, iommu_type, op="VFIO_SET_IOMMU", target=self.target)
        self.iommu_type = iommu_type
        self.iommu_set = True
        self._info = None

    # ---- type1 info ----

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """``VFIO_IOMMU_GET_INFO`` decoded: page sizes, IOVA ranges (inclusive),
        DMA mappings still available, dirty-tracking (migration) capability."""
        self._check()
        if self._info is not None and not refresh:
            return self._info
        if not self.iommu_set:
            raise UsageError("the container has no IOMMU yet: attach a group first")
        info, buf = call_with_argsz(self.fd, V.VFIO_IOMMU_GET_INFO, V.vfio_iommu_type1_info,
                                    op="VFIO_IOMMU_GET_INFO", target=self.target,
                                    caps_flag=V.VFIO_IOMMU_INFO_CAPS)
        out: dict[str, Any] = {
            "page_sizes": int(info.iova_pgsizes) if info.flags & V.VFIO_IOMMU_INFO_PGSIZES
            else PAGE_SIZE,
            "iova_ranges": None, "dma_avail": None, "migration": None,
        }
        if info.flags & V.VFIO_IOMMU_INFO_CAPS:
            fixed = ctypes.sizeof(V.vfio_iommu_type1_info)
            for cap_id, _ver, off in iter_caps(buf, int(info.cap_offset), min_offset=fixed):
                if cap_id == V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                    head = ctypes.sizeof(V.vfio_iommu_type1_info_cap_iova_range)
                    cap = V.vfio_iommu_type1_info_cap_iova_range.from_buffer_copy(buf, off)
                    esize = ctypes.sizeof(V.vfio_iova_range)
                    n = min(int(cap.nr_iovas), (len(buf) - off - head) // esize)
                    out["iova_ranges"] = [
                        (int(r.start), int(r.end)) for r in
                        (V.vfio_iova_range.from_buffer_copy(buf, off + head + i * esize)
                         for i in range(n))]
                elif cap_id == V.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
                    out["dma_avail"] = int(
                        V.vfio_iommu_type1_info_dma_avail.from_buffer_copy(buf, off).avail)
                elif cap_id == V.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
                    m = V.vfio_iommu_type1_info_cap_migration.from_buffer_copy(buf, off)
                    out["migration"] = {"flags": int(m.flags),
                                        "pgsize_bitmap": int(m.pgsize_bitmap),
                                        "max_dirty_bitmap_size": int(m.max_dirty_bitmap_size)}
        if out["iova_ranges"] is None:  # kernels before 5.4: the whole 64-bit space
            out["iova_ranges"] = [(0, (1 << 64) - 1)]
        self._info = out
        return out

    @property
    def iova_ranges(self) -> list[tuple[int, int]]:
        return list(self.info()["iova_ranges"])

    @property
    def page_sizes(self) -> int:
        """Bitmap of the IOMMU page sizes."""
        return int(self.info()["page_sizes"])

    @property
    def page_size(self) -> int:
        sizes = self.page_sizes
        return sizes & -sizes if sizes else PAGE_SIZE

    @property
    def dma_avail(self) -> int | None:
        """How many more DMA mappings the kernel accepts (``dma_entry_limit``
        minus those in use); None on kernels without the capability."""
        avail = self.info(refresh=True)["dma_avail"]
        return None if avail is None else int(avail)

    # ---- DMA ----

    def _forget_last_calls(self) -> None:
        self._last_memory = None
        self._last_iova = self._last_unmap_iova = self._last_unmap_size = -1
        self._last_map = self._new_map(0, 0, 0, 0)
        self._last_unmap = self._new_unmap(0, 0)

    @staticmethod
    def _new_map(flags: int, vaddr: int, iova: int, size: int) -> V.vfio_iommu_type1_dma_map:
        return V.vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_map),
                                          flags=flags, vaddr=vaddr, iova=iova, size=size)

    @staticmethod
    def _new_unmap(iova: int, size: int) -> V.vfio_iommu_type1_dma_unmap:
        return V.vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_unmap),
                                            iova=iova, size=size)

    def map(self, iova: int, memory: SharedMemory, offset: int = 0, size: int | None = None,
            readable: bool = True, writable: bool = True) -> None:
        """``VFIO_IOMMU_MAP_DMA`` of ``memory[offset:offset+size]`` (by its
        virtual address: type1 pins the pages) at ``iova``."""
        if (memory is self._last_memory and iova == self._last_iova and offset == 0
                and size is None and readable and writable):
            arg = self._last_map  # the hot path (see __init__)
        else:
            arg = self._map_arg(iova, memory, offset, size, readable, writable)
        try:
            _fcntl_ioctl(self.fd, _VFIO_IOMMU_MAP_DMA, arg)
        except OSError as exc:
            err = KernelError(exc.errno or errno.EIO, "VFIO_IOMMU_MAP_DMA", self.target)
            raise self._map_error(err, iova, int(arg.size)) from None

    def _map_batch(self, batch: list[tuple[int, SharedMemory]], readable: bool,
                   writable: bool) -> None:
        """Every entry's checks and struct first, then one VFIO_IOMMU_MAP_DMA
        each (type1 takes one range per call); rolled back on a kernel error."""
        args = [self._map_arg(iova, memory, 0, None, readable, writable)
                for iova, memory in batch]
        fd = self.fd
        done = 0
        try:
            for arg in args:
                _fcntl_ioctl(fd, _VFIO_IOMMU_MAP_DMA, arg)
                done += 1
        except OSError as exc:
            self._unmap_quietly([(int(a.iova), int(a.size)) for a in args[:done]])
            err = KernelError(exc.errno or errno.EIO, "VFIO_IOMMU_MAP_DMA", self.target)
            raise self._map_error(err, int(args[done].iova), int(args[done].size)) from None
        except BaseException:
            self._unmap_quietly([(int(a.iova), int(a.size)) for a in args[:done]])
            raise

    def _map_arg(self, iova: int, memory: SharedMemory, offset: int, size: int | None,
                 readable: bool, writable: bool) -> V.vfio_iommu_type1_dma_map:
        """The checked struct for this map, built or found, and remembered as
        the last call when it maps a whole buffer."""
        if self._closed:
            raise ClosedError("VFIO container is closed")
        if memory.closed:  # its address may belong to another mapping by now
            raise ClosedError("DMA map of closed memory")
        whole = size is None and offset == 0
        size = memory.size - offset if size is None else size
        if offset < 0 or size <= 0 or offset + size > memory.size:
            raise UsageError(f"{offset:#x}+{size:#x} is outside the {memory.size:#x}-byte memory")
        for start, last in self._ranges or self._load_ranges():
            if start <= iova and iova + size - 1 <= last:
                break
        else:
            raise IovaRangeError(f"IOVA {iova:#x}+{size:#x} is outside the ranges the IOMMU "
                                 f"translates: {self.allocator.ranges_text()}")
        flags = (V.VFIO_DMA_MAP_FLAG_READ if readable else 0) | (
            V.VFIO_DMA_MAP_FLAG_WRITE if writable else 0)
        key = (memory.address + offset, size, iova, flags)
        arg = self._maps.get(key)
        if arg is None:
            if len(self._maps) >= _STRUCT_CACHE:
                self._maps.clear()
            arg = self._maps[key] = self._new_map(flags, key[0], iova, size)
        if whole and readable and writable:
            self._remember_memory(memory)
            self._last_iova, self._last_map = iova, arg
        return arg

    def _load_ranges(self) -> list[tuple[int, int]]:
        # The allocator's view: page 0 excluded, aligned to the IOMMU page.
        self._ranges = self.allocator.ranges
        return self._ranges

    def _map_error(self, exc: KernelError, iova: int, size: int) -> KernelError:
        where = f"{self.target} IOVA {iova:#x}+{size:#x}"
        if exc.errno in (errno.ENOMEM, errno.EDQUOT):
            soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
            return MemlockLimitError(
                exc.errno, "VFIO_IOMMU_MAP_DMA", where,
                f"pinning {size} more bytes would exceed RLIMIT_MEMLOCK ({limit}); raise it "
                "(ulimit -l, systemd LimitMEMLOCK=, or run with CAP_IPC_LOCK)")
        if exc.errno == errno.ENOSPC:
            limit_text = _sysfs.read_text(os.path.join(self.root, DMA_ENTRY_LIMIT_PATH))
            return MemlockLimitError(
                exc.errno, "VFIO_IOMMU_MAP_DMA", where,
                f"the container reached vfio_iommu_type1's dma_entry_limit "
                f"({limit_text or 'unknown'} mappings); unmap some or raise the module "
                "parameter dma_entry_limit")
        if exc.errno == errno.EEXIST:
            return IovaRangeErrorWithErrno(exc, f"IOVA {iova:#x}+{size:#x} is already mapped")
        return exc

    def unmap(self, iova: int, size: int) -> None:
        """``VFIO_IOMMU_UNMAP_DMA``; unpins the pages."""
        if iova == self._last_unmap_iova and size == self._last_unmap_size:
            arg = self._last_unmap  # the hot path (see __init__)
        else:
            arg = self._unmap_arg(iova, size)
        try:
            _fcntl_ioctl(self.fd, _VFIO_IOMMU_UNMAP_DMA, arg)
        except OSError as exc:
            raise KernelError(exc.errno or errno.EIO, "VFIO_IOMMU_UNMAP_DMA",
                              f"{self.target} IOVA {iova:#x}+{size:#x}") from None
        if arg.size != size:  # in/out: the kernel returns the bytes unmapped here
            done, arg.size = int(arg.size), size  # put the request back for the next use
            raise KernelError(errno.EINVAL, "VFIO_IOMMU_UNMAP_DMA", self.target,
                              f"unmapped {done:#x} of {size:#x} bytes at {iova:#x}")

    def _unmap_arg(self, iova: int, size: int) -> V.vfio_iommu_type1_dma_unmap:
        if self._closed:
            raise ClosedError("VFIO container is closed")
        arg = self._unmaps.get((iova, size))
        if arg is None:
            if len(self._unmaps) >= _STRUCT_CACHE:
                self._unmaps.clear()
            arg = self._unmaps[iova, size] = self._new_unmap(iova, size)
        self._last_unmap_iova, self._last_unmap_size, self._last_unmap = iova, size, arg
        return arg

    def unmap_all(self) -> int:
        """Unmap everything (``VFIO_DMA_UNMAP_FLAG_ALL``); returns bytes unmapped."""
        self._check()
        u = V.vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_unmap),
                                         flags=V.VFIO_DMA_UNMAP_FLAG_ALL)
        ioctl(self.fd, V.VFIO_IOMMU_UNMAP_DMA, u, op="VFIO_IOMMU_UNMAP_DMA", target=self.target)
        return int(u.size)

    # ---- groups, fds, lifetime ----

    def fds(self) -> dict[str, int]:
        return {"container": self.fd}

    def _release(self, group: Group) -> None:
        if group in self.groups:
            self.groups.remove(group)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the container fd.  Groups still attached lose their DMA mappings
        when their last reference goes; close devices and groups first."""
        if self._closed:
            return
        self._closed = True
        self._forget_last_calls()  # the map/unmap fast paths now fail over to the checks
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Container fd={self.fd} groups={[g.id for g in self.groups]}>"


class IovaRangeErrorWithErrno(IovaRangeError, KernelError):
    """An IOVA conflict the kernel reported (EEXIST): both an IovaRangeError and
    a KernelError carrying the errno."""

    def __init__(self, exc: KernelError, message: str) -> None:
        KernelError.__init__(self, exc.errno or errno.EEXIST, exc.op, exc.target, message)


class Group:
    """``/dev/vfio/$GROUP``: the unit of ownership.

    ``Group(n, root=...)`` opens the group node; :meth:`from_fd` wraps one
    passed in.  :meth:`attach` checks viability (raising :class:`NotViable`
    with the host's diagnosis naming the devices in the way) and puts the
    group into a container.
    """

    def __init__(self, group_id: int, *, root: str = "/", fd: int | None = None) -> None:
        self.id = group_id
        self.root = root
        self.container: Container | None = None
        self._owns_container = False
        self._closed = False
        self._refs = 1
        self.noiommu = False
        if fd is None:
            path = os.path.join(root, "dev/vfio", str(group_id))
            noiommu_path = os.path.join(root, "dev/vfio", f"noiommu-{group_id}")
            if not os.path.exists(path) and os.path.exists(noiommu_path):
                # vfio's no-IOMMU mode names the node noiommu-N; its container
                # takes only VFIO_NOIOMMU_IOMMU, which maps no DMA.
                path, self.noiommu = noiommu_path, True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotBoundToVfio(
                    f"{path} does not exist: no device of IOMMU group {group_id} is bound to "
                    "a vfio driver (bind it first: pyvfio bind BDF)") from None
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise DeviceInUse(
                        f"IOMMU group {group_id} is already open in another process "
                        f"({path}: {os.strerror(exc.errno)})",
                        [{"group": group_id, "problem": "group-in-use"}]) from None
                raise KernelError.from_oserror(exc, "open", path) from None
        self.fd = fd

    @classmethod
    def from_fd(cls, fd: int, group_id: int = -1, *, root: str = "/",
                container: Container | None = None) -> Group:
        """Wrap a group fd passed in.  If the group is already in a container,
        pass that container so the device's DMA goes through it."""
        group = cls(group_id, root=root, fd=fd)
        if container is not None:
            group.container = container
            container.groups.append(group)
        return group

    @property
    def target(self) -> str:
        return f"group {self.id}" if self.id >= 0 else f"group fd {self.fd}"

    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.target} is closed")

    def status(self) -> int:
        """``VFIO_GROUP_GET_STATUS`` flags (``VFIO_GROUP_FLAGS_*``)."""
        self._check()
        st = V.vfio_group_status(argsz=ctypes.sizeof(V.vfio_group_status))
        ioctl(self.fd, V.VFIO_GROUP_GET_STATUS, st, op="VFIO_GROUP_GET_STATUS",
              target=self.target)
        return int(st.flags)

    @property
    def viable(self) -> bool:
        return bool(self.status() & V.VFIO_GROUP_FLAGS_VIABLE)

    @property
    def container_set(self) -> bool:
        return bool(self.status() & V.VFIO_GROUP_FLAGS_CONTAINER_SET)

    def require_viable(self, bdf: str | None = None) -> None:
        """Raise :class:`NotViable` carrying the host diagnosis unless viable."""
        if self.viable:
            return
        problems = diagnose_group(self.root, self.id, bdf)
        names = "; ".join(str(p.get("message") or f"{p.get('device')} is bound to "
                              f"{p.get('driver')}") for p in problems)
        raise NotViable(f"IOMMU group {self.id} is not viable: "
                        f"{names or 'a device of the group is bound to a host driver'}",
                        problems)

    def attach(self, container: Container, *, owns_container: bool = False,
               bdf: str | None = None) -> None:
        """Check viability, ``VFIO_GROUP_SET_CONTAINER``, and set the IOMMU model
        if this is the container's first group."""
        self._check()
        self.require_viable(bdf)
        fd_arg = bytearray(ctypes.c_int32(container.fd))
        try:
            ioctl(self.fd, V.VFIO_GROUP_SET_CONTAINER, fd_arg, op="VFIO_GROUP_SET_CONTAINER",
                  target=self.target)
        except KernelError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceInUse(f"{exc}: the group is already in a container",
                                  [{"group": self.id, "problem": "group-in-use"}]) from None
            raise
        self.container = container
        self._owns_container = owns_container
        container.groups.append(self)
        if not container.iommu_set:
            try:
                container.set_iommu()
            except BaseException:
                self.detach()
                raise

    def detach(self) -> None:
        """``VFIO_GROUP_UNSET_CONTAINER`` (all device fds must be closed)."""
        self._check()
        if self.container is None:
            return
        ioctl(self.fd, V.VFIO_GROUP_UNSET_CONTAINER, 0, op="VFIO_GROUP_UNSET_CONTAINER",
              target=self.target)
        self.container._release(self)
        self.container = None

    def get_device_fd(self, bdf: str) -> int:
        """``VFIO_GROUP_GET_DEVICE_FD``: a new device fd for ``bdf`` (ours to close)."""
        self._check()
        name = bytearray(bdf.encode() + b"\0")
        try:
            return ioctl(self.fd, V.VFIO_GROUP_GET_DEVICE_FD, name, op="VFIO_GROUP_GET_DEVICE_FD",
                         target=f"{self.target} device {bdf}")
        except KernelError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceInUse(f"{exc}: the device is already open",
                                  [{"device": bdf, "problem": "device-in-use"}]) from None
            raise

    def fds(self) -> dict[str, int]:
        out = self.container.fds() if self.container is not None else {}
        out["group"] = self.fd
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def acquire(self) -> Group:
        """One more user (a second device of the group); each calls close()."""
        self._check()
        self._refs += 1
        return self

    def close(self) -> None:
        """Close the group fd once its last user closes it (the kernel takes it
        out of its container), then the container if it was created for this
        group and is now unused."""
        if self._closed:
            return
        self._refs -= 1
        if self._refs > 0:
            return
        self._closed = True
        os.close(self.fd)
        self.fd = -1
        container, self.container = self.container, None
        if container is not None:
            container._release(self)
            if self._owns_container and not container.groups:
                container.close()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Group {self.id} fd={self.fd}>"


def diagnose_group(root: str, group_id: int, bdf: str | None = None) -> list[dict[str, Any]]:
    """Why a group is not viable, as problem dicts (as ``pyvfio check --json``
    prints them), each naming a device and its driver, read through the
    shared sysfs reader (the full diagnosis is :mod:`pyvfio.host.diagnosis`,
    a layer above the kernel backends)."""
    return _sysfs.group_blockers(root, group_id)


def _group_of(root: str, bdf: str) -> int:
    group = _sysfs.iommu_group(root, bdf)
    if group is None:
        from pyvfio.errors import NoIommu

        raise NoIommu(f"{bdf} has no IOMMU group: the host has no IOMMU enabled "
                      "(intel_iommu=on / amd_iommu) and vfio no-IOMMU mode is off")
    return group


def open_legacy_device(bdf: str, *, root: str = "/", container: Container | None = None,
                       reason: str = "") -> KernelDevice:
    """Open ``bdf`` through a container and its group.

    ``container``: share an existing address space (its groups stay in it);
    by default a new container is made for this device's group and closed
    with it.  Raises :class:`NotBoundToVfio`, :class:`NotViable`,
    :class:`DeviceInUse` with a diagnosis instead of a bare errno.
    """
    bdf = _sysfs.normalize_bdf(bdf)
    _sysfs.require_device(root, bdf)
    group_id = _group_of(root, bdf)
    driver = _sysfs.driver(root, bdf)
    if not _sysfs.is_vfio_driver(root, driver):
        problems = [{"device": bdf, "driver": driver, "kind": "not-vfio",
                     "reason": f"{bdf} is bound to {driver or 'no driver'}",
                     "fix": f"pyvfio bind {bdf}"}]
        raise NotBoundToVfio(
            f"cannot open {bdf}: it is bound to {driver or 'no driver'}, not to a vfio driver; "
            f"fix: pyvfio bind {bdf}", problems)
    own_container = container is None
    if container is not None:
        existing = next((g for g in container.groups if g.id == group_id and not g.closed), None)
        if existing is not None:
            # Another device of this group is open in this container: the
            # kernel allows one group fd, so share it (refcounted).
            existing.acquire()
            try:
                fd = existing.get_device_fd(bdf)
            except BaseException:
                existing.close()
                raise
            return KernelDevice(bdf, fd, container, [existing], backend="legacy",
                                backend_reason=reason or "legacy container/group API")
    group = Group(group_id, root=root)
    try:
        if container is None:
            container = Container(root=root, iommu_type=V.VFIO_NOIOMMU_IOMMU if group.noiommu
                                  else V.VFIO_TYPE1v2_IOMMU)
        try:
            group.attach(container, owns_container=own_container, bdf=bdf)
        except BaseException:
            if own_container:
                container.close()
            raise
        fd = group.get_device_fd(bdf)
    except BaseException:
        group.close()
        raise
    if group.noiommu:
        return KernelDevice(bdf, fd, None, [group], backend="legacy", backend_reason=(
            (reason or "legacy container/group API")
            + f"; UNSAFE no-IOMMU mode (/dev/vfio/noiommu-{group_id}): no DMA isolation, "
            "no DMA mapping"))
    return KernelDevice(bdf, fd, container, [group], backend="legacy",
                        backend_reason=reason or "legacy container/group API")


def device_from_fds(device_fd: int, name: str, *, group_fd: int | None = None,
                    container_fd: int | None = None, group_id: int = -1,
                    root: str = "/") -> KernelDevice:
    """Rebuild a legacy device from fds another process opened (a broker, or
    a predecessor handing over).  All fds become owned by the device."""
    container = Container.from_fd(container_fd, root=root) if container_fd is not None else None
    owners: list[Group | _ContainerOwner] = []
    if group_fd is not None:
        group = Group.from_fd(group_fd, group_id, root=root, container=container)
        group._owns_container = container is not None
        owners.append(group)
    elif container is not None:
        owners.append(_ContainerOwner(container))
    return KernelDevice.from_fd(device_fd, name, dma=container, owners=owners,
                                backend="legacy", backend_reason="device fd passed in")


class _ContainerOwner:
    """Lets a device own a container directly (fds passed without a group)."""

    def __init__(self, container: Container) -> None:
        self.container = container

    def fds(self) -> dict[str, int]:
        return self.container.fds()

    def close(self) -> None:
        self.container.close()
