""":class:`Ioas`: an iommufd IO address space (``IOMMU_IOAS_*``), the
:class:`~pyvfio.device.DmaSpace` of iommufd devices.

Kernel: ``include/uapi/linux/iommufd.h``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from fcntl import ioctl as _fcntl_ioctl
from typing import Any

from pyvfio.device import DmaSpace, SharedMemory
from pyvfio.errors import ClosedError, IovaRangeError, KernelError, MemlockLimitError, UsageError
from pyvfio.kernel.iommufd._common import U64_MAX, IommufdHandle
from pyvfio.uapi import iommufd as U
from pyvfio.uapi.ioctl import ioctl

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

    def __init__(self, iommufd: IommufdHandle, ioas_id: int, *, owned: bool = True) -> None:
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

    def _map_batch(self, batch: list[tuple[int, SharedMemory]], readable: bool,
                   writable: bool) -> None:
        """Every entry's checks and struct first, then one IOMMU_IOAS_MAP each
        (it takes one range per call); rolled back on the kernel's error."""
        args = [self._map_arg(iova, memory, 0, None, readable, writable)
                for iova, memory in batch]
        fd = self._fd()
        done = 0
        try:
            for arg in args:
                _fcntl_ioctl(fd, _IOMMU_IOAS_MAP, arg)
                done += 1
        except OSError as exc:
            self._unmap_quietly([(int(a.iova), int(a.length)) for a in args[:done]])
            err = KernelError(exc.errno or errno.EIO, "IOMMU_IOAS_MAP", self.target)
            raise self._map_error(err, "IOMMU_IOAS_MAP", int(args[done].iova),
                                  int(args[done].length)) from None
        except BaseException:
            self._unmap_quietly([(int(a.iova), int(a.length)) for a in args[:done]])
            raise

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
