"""Device regions (BARs, ROM, config space): :class:`Region` (one access of
exactly the given width through the backend) and :class:`MappedRegion` (an
mmapped region, one load or store per access).
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from pyvfio.core.flags import RegionFlag
from pyvfio.core.info import RegionInfo, _region_name, outside_region_error
from pyvfio.errors import UsageError

# --- regions ---------------------------------------------------------------------------------

_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}
# memoryview casts use the host's byte order; PCI registers are little-endian.
_LITTLE = sys.byteorder == "little"


class RegionBackend(Protocol):
    """The backend primitives a :class:`Region` goes through: what every
    :class:`~pyvfio.core.device.Device` has (see there for what each does)."""

    name: str

    def _region_read(self, index: int, offset: int, size: int) -> bytes: ...

    def _region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def _region_mmap(self, info: RegionInfo, offset: int, size: int) -> mmap.mmap: ...

    def _region_accessors(self, info: RegionInfo
                          ) -> tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]]: ...

    def _region_int_accessors(self, info: RegionInfo
                              ) -> dict[int, tuple[Callable[[int], int],
                                                   Callable[[int, int], None]]] | None: ...

    def _region_read_block(self, index: int, offset: int, count: int, width: int) -> bytes: ...

    def _region_write_block(self, index: int, offset: int, data: bytes, width: int) -> None: ...


class Region:
    """One region of a device (a BAR, the ROM, config space).

    ``read``/``write`` go through the backend (pread/pwrite on the device fd,
    or REGION_READ/REGION_WRITE messages) as *one* access of exactly the
    given size, which is what device registers need.  ``mmap()`` maps the
    region (or a sparse area of it) for direct loads and stores.
    """

    def __init__(self, device: RegionBackend, info: RegionInfo) -> None:
        self.device = device
        self.info = info
        self.index = info.index
        self.size = info.size
        self._install_fast_paths()

    def _install_fast_paths(self) -> None:
        """Give this instance its own ``read8``..``write64``: one closure with a
        bounds test around the backend's reader/writer for this region
        (:meth:`Device._region_accessors`).  Register access is the hot path
        of a driver, and in CPython every call layer costs about as much as
        the ``pread`` itself; the methods below stay as the reference
        behaviour (and the fallback for subclasses)."""
        size, index, name = self.size, self.index, self.device.name
        native = self.device._region_int_accessors(self.info)
        if native is not None:
            for width, (read_n, write_n) in native.items():
                setattr(self, f"read{8 * width}", read_n)
                setattr(self, f"write{8 * width}", write_n)
            return
        reader, writer = self.device._region_accessors(self.info)
        from_bytes = int.from_bytes

        def bad(offset: int, width: int) -> UsageError:
            return outside_region_error(name, index, size, offset, width)

        def make(width: int) -> tuple[Callable[[int], int], Callable[[int, int], None]]:
            limit = size - width
            mask = (1 << (8 * width)) - 1

            def read_n(offset: int) -> int:
                if offset > limit or offset < 0:
                    raise bad(offset, width)
                return from_bytes(reader(offset, width), "little")

            def write_n(offset: int, value: int) -> None:
                if offset > limit or offset < 0:
                    raise bad(offset, width)
                writer(offset, (value & mask).to_bytes(width, "little"))

            return read_n, write_n

        for width in (1, 2, 4, 8):
            read_n, write_n = make(width)
            setattr(self, f"read{8 * width}", read_n)
            setattr(self, f"write{8 * width}", write_n)

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise outside_region_error(self.device.name, self.index, self.size, offset, size)

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return self.device._region_read(self.index, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.device._region_write(self.index, offset, bytes(data))

    def read_int(self, offset: int, width: int) -> int:
        fmt = _FORMATS.get(width)
        if fmt is None:
            raise UsageError(f"access width must be 1, 2, 4 or 8 bytes, not {width}")
        return int.from_bytes(self.read(offset, width), "little")

    def write_int(self, offset: int, width: int, value: int) -> None:
        if width not in _FORMATS:
            raise UsageError(f"access width must be 1, 2, 4 or 8 bytes, not {width}")
        self.write(offset, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))

    def read8(self, offset: int) -> int:
        return self.read_int(offset, 1)

    def read16(self, offset: int) -> int:
        return self.read_int(offset, 2)

    def read32(self, offset: int) -> int:
        return self.read_int(offset, 4)

    def read64(self, offset: int) -> int:
        return self.read_int(offset, 8)

    def write8(self, offset: int, value: int) -> None:
        self.write_int(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        self.write_int(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        self.write_int(offset, 4, value)

    def write64(self, offset: int, value: int) -> None:
        self.write_int(offset, 8, value)

    def _check_block(self, offset: int, count: int, width: int) -> str:
        fmt = _FORMATS.get(width)
        if fmt is None:
            raise UsageError(f"access width must be 1, 2, 4 or 8 bytes, not {width}")
        if offset % width:
            raise UsageError(f"a block of {width}-byte registers must start at a multiple of "
                             f"{width}, not {offset:#x}")
        if count < 0:
            raise UsageError(f"register count must be >= 0, not {count}")
        if count:
            self._check(offset, count * width)
        return fmt

    def read_block(self, offset: int, count: int, width: int = 4) -> list[int]:
        """Read ``count`` consecutive ``width``-byte little-endian registers
        starting at byte ``offset``, each as one access of exactly ``width``
        bytes, in address order, all in **one** call to the backend: one
        ``preadv`` system call on a kernel device (the vfio device file has
        no ``read_iter``, so the kernel makes one ``read`` per iovec:
        ``do_loop_readv_writev``), one round trip of pipelined REGION_READs on
        vfio-user.  Not one wide ``pread``: a newer vfio-pci (the 6.12 guest
        kernel, not Debian's 6.1) turns an aligned 8-byte stretch of a
        ``pread`` into one 8-byte access (``vfio_pci_core_do_io_rw``), which a
        device with 4-byte registers (QEMU's edu, below 0x80) answers with all
        ones (tests/guest/test_register_batch.py).

        Returns a list of ``count`` ints.  Raises :class:`UsageError` for a
        bad width, a misaligned ``offset`` or a block outside the region
        (before any access), and the backend's error (``KernelError``,
        ``PeerError``, ``ProtocolError``) for a failed access.
        """
        fmt = self._check_block(offset, count, width)
        if not count:
            return []
        data = self.device._region_read_block(self.index, offset, count, width)
        view = memoryview(data).cast(fmt)  # type: ignore[call-overload]
        return view.tolist() if _LITTLE else [int.from_bytes(data[i:i + width], "little")
                                              for i in range(0, len(data), width)]

    def write_block(self, offset: int, values: Sequence[int], width: int = 4) -> None:
        """Write ``values`` to consecutive ``width``-byte little-endian
        registers starting at byte ``offset``, one access of exactly ``width``
        bytes each, in address order, in one backend call (one ``pwritev``;
        pipelined REGION_WRITEs).  Each value is masked to ``width`` bytes.
        Errors as :meth:`read_block`; nothing is written when the block is
        refused."""
        self._check_block(offset, len(values), width)
        if not values:
            return
        mask = (1 << (8 * width)) - 1
        data = b"".join((v & mask).to_bytes(width, "little") for v in values)
        self.device._region_write_block(self.index, offset, data, width)

    def mmap(self, offset: int = 0, size: int | None = None) -> MappedRegion:
        """Map ``size`` bytes at ``offset`` (default: the first mmap area)."""
        areas = self.info.mmap_areas
        if not (self.info.flags & RegionFlag.MMAP) or not areas:
            raise UsageError(f"region {self.index} of {self.device.name} cannot be mmapped")
        if size is None:
            area = next((a for a in areas if a.offset <= offset < a.offset + a.size), None)
            if area is None:
                raise UsageError(f"offset {offset:#x} is in no mmap area of region {self.index}")
            size = area.offset + area.size - offset
        if not any(a.offset <= offset and offset + size <= a.offset + a.size for a in areas):
            raise UsageError(f"{offset:#x}+{size:#x} is not inside one mmap area of region "
                             f"{self.index}: {[(a.offset, a.size) for a in areas]}")
        return MappedRegion(self, offset, self.device._region_mmap(self.info, offset, size))

    def __repr__(self) -> str:
        return f"<Region {_region_name(self.index)} size={self.size:#x} flags={self.info.flags!r}>"


class MappedRegion:
    """A region mapped into this process.  ``read32``/``write32`` (and the 8-,
    16- and 64-bit forms) each compile to one load or store of that width,
    because they go through a memoryview cast to that item size.

    The typed register views :attr:`u8`, :attr:`u16`, :attr:`u32` and
    :attr:`u64` are those memoryviews themselves: ``bar.u32[i]`` reads the
    32-bit register at byte offset ``4 * i`` and ``bar.u32[i] = v`` writes it,
    each one load or store and no Python frame, so a register access costs
    exactly the builtin subscript (``benchmarks/kernel_bench.py``).  Their
    index is the register number, not the byte offset; an index outside the
    mapping raises ``IndexError`` (negative ones count from the end, as for
    every Python sequence), and a value that does not fit raises
    ``ValueError`` (the builtin's checks).  They exist only on little-endian
    hosts, where the native layout is the PCI layout.
    """

    def __init__(self, region: Region, offset: int, mapping: mmap.mmap) -> None:
        self.region = region
        self.offset = offset
        self.mmap = mapping
        self.size = len(mapping)
        raw = memoryview(mapping)
        self._views: dict[int, memoryview] = {
            w: raw.cast(f) for w, f in _FORMATS.items() if self.size % w == 0  # type: ignore[call-overload]
        }
        self._raw = raw
        # Per-instance accessors: one alignment/bounds test and one memoryview
        # item access, no helper call -- a mapped register read is a single
        # load, and the Python around it is the whole cost (benchmarks/).
        for width, view in self._views.items():
            read_n, write_n = self._accessors(view, width)
            setattr(self, f"read{8 * width}", read_n)
            setattr(self, f"write{8 * width}", write_n)

    def _accessors(self, view: memoryview, width: int
                   ) -> tuple[Callable[[int], int], Callable[[int, int], None]]:
        shift = width.bit_length() - 1
        misaligned = width - 1
        limit = self.size - width
        mask = (1 << (8 * width)) - 1

        def bad(offset: int) -> UsageError:
            return UsageError(f"unaligned or out-of-range {width}-byte access at {offset:#x}")

        if self.size & (self.size - 1) == 0:
            # BARs are powers of two: then one AND finds a misaligned, negative
            # (Python ints have infinite sign bits) or too large offset.  A
            # register read is one Python frame, so every test in it counts.
            invalid = ~(self.size - 1) | misaligned

            def read_n(offset: int) -> int:
                if offset & invalid:
                    raise bad(offset)
                return view[offset >> shift]

            def write_n(offset: int, value: int) -> None:
                if offset & invalid:
                    raise bad(offset)
                view[offset >> shift] = value & mask

            return read_n, write_n

        def read_any(offset: int) -> int:
            if offset & misaligned or not 0 <= offset <= limit:
                raise bad(offset)
            return view[offset >> shift]

        def write_any(offset: int, value: int) -> None:
            if offset & misaligned or not 0 <= offset <= limit:
                raise bad(offset)
            view[offset >> shift] = value & mask

        return read_any, write_any

    def _typed(self, width: int) -> memoryview:
        if not _LITTLE:
            raise UsageError("typed register views need a little-endian host; "
                             "use read32/write32")
        view = self._views.get(width)
        if view is None:
            if self.mmap.closed:
                raise UsageError("the mapping is closed")
            raise UsageError(f"a {self.size:#x}-byte mapping has no whole {width}-byte registers")
        return view

    @property
    def u8(self) -> memoryview:
        """The mapping as 8-bit registers (see the class docstring)."""
        return self._typed(1)

    @property
    def u16(self) -> memoryview:
        """The mapping as 16-bit registers, ``u16[i]`` at byte ``2 * i``."""
        return self._typed(2)

    @property
    def u32(self) -> memoryview:
        """The mapping as 32-bit registers, ``u32[i]`` at byte ``4 * i``."""
        return self._typed(4)

    @property
    def u64(self) -> memoryview:
        """The mapping as 64-bit registers, ``u64[i]`` at byte ``8 * i``."""
        return self._typed(8)

    def _view(self, offset: int, width: int) -> memoryview:
        if offset % width or offset < 0 or offset + width > self.size:
            raise UsageError(f"unaligned or out-of-range {width}-byte access at {offset:#x}")
        return self._views[width]

    def read8(self, offset: int) -> int:
        return int(self._view(offset, 1)[offset])

    def read16(self, offset: int) -> int:
        return int(self._view(offset, 2)[offset >> 1])

    def read32(self, offset: int) -> int:
        return int(self._view(offset, 4)[offset >> 2])

    def read64(self, offset: int) -> int:
        return int(self._view(offset, 8)[offset >> 3])

    def write8(self, offset: int, value: int) -> None:
        self._view(offset, 1)[offset] = value & 0xFF

    def write16(self, offset: int, value: int) -> None:
        self._view(offset, 2)[offset >> 1] = value & 0xFFFF

    def write32(self, offset: int, value: int) -> None:
        self._view(offset, 4)[offset >> 2] = value & 0xFFFFFFFF

    def write64(self, offset: int, value: int) -> None:
        self._view(offset, 8)[offset >> 3] = value & 0xFFFFFFFFFFFFFFFF

    def close(self) -> None:
        for v in self._views.values():
            v.release()
        self._views.clear()
        self._raw.release()
        self.mmap.close()

    def __enter__(self) -> MappedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
