"""A vfio-user server's view of one client's DMA memory.

Each client connection owns one :class:`DmaTable`: the windows the client
mapped with ``VFIO_USER_DMA_MAP``.  A window that came with the fd of a
size-sealed file (a memfd with ``F_SEAL_SHRINK``) is a view into one shared
mapping of that file, and device models read and write it directly (memcpy
speed); a window of a file that can shrink is reached with ``pread``/``pwrite``
(a truncation becomes a :class:`DmaFault`, never SIGBUS); a window without an
fd is reached through ``VFIO_USER_DMA_READ``/``DMA_WRITE`` messages to the
client, which the table sends through the ``port`` the connection provides.
Any access that is not wholly inside mapped windows, or that the window's
protection forbids, raises :class:`DmaFault` and touches nothing.

Dirty-page logging (``VFIO_DEVICE_FEATURE_DMA_LOGGING_*`` and the
``GET_DIRTY_BITMAP`` flag of ``DMA_UNMAP``) records the pages that the
*model's* writes touched; it is kept per table, i.e. per client.

Rules taken from libvfio-user's ``lib/dma.c`` and the spec: a map over an
existing window fails with ``EEXIST``; an unmap must match a window exactly
(``ENOENT`` otherwise; the server answers an unmap that touches no window at
all as the kernel's type1 does, see :mod:`pyvfio.user.server.dma`); a
disconnect unmaps everything.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from pyvfio.device import PAGE_SIZE
from pyvfio.devices.transport import DmaFault
from pyvfio.user.protocol import DmaMapFlag

__all__ = ["MAX_DMA_FILES", "DmaFault", "DmaFile", "DmaMapping", "DmaTable", "MessagePort"]

MAX_DMA_FILES = 256
"""Distinct files one client's windows may hold (one fd or mapping each).
QEMU maps a few RAM blocks; 256 leaves room and keeps a client from using up
the server's fds."""


MessagePort = tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]]
"""``(read(iova, size) -> bytes, write(iova, data))`` through DMA_READ/WRITE."""


class DmaFile:
    """One client file the server reaches memory through, shared by every
    window of that file (same ``st_dev``/``st_ino``, same access).

    A file whose size is sealed (``F_SEAL_SHRINK``, as QEMU's
    ``memory-backend-memfd`` seals by default) is mmapped once, whole, and
    its windows are views into that mapping.  A file that can shrink is
    never mmapped: a client that truncated it would turn our next access
    into SIGBUS and kill every device of the process.  Such a file is read
    and written with ``pread``/``pwrite`` through one duplicate fd, and a
    truncated range is a :class:`DmaFault`.  Either way the file costs one
    fd however many windows use it (libvfio-user holds 6 fds for 4096
    windows of one file)."""

    def __init__(self, key: tuple[int, int, bool, bool], fd: int, size: int,
                 writable: bool, sealed: bool) -> None:
        self.key = key
        self.size = size
        self.refs = 0
        self.mm: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.fd = -1
        if sealed:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
            self.view = memoryview(self.mm)
        else:
            self.fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)

    def pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise DmaFault(errno.EFAULT, f"DMA read of file offset {offset:#x}+{size:#x}: the "
                           "client's file is shorter now")
        return data

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        # pwrite past the end would grow the client's file: check first.
        if offset + len(data) > os.fstat(self.fd).st_size:
            raise DmaFault(errno.EFAULT, f"DMA write of file offset {offset:#x}+{len(data):#x}:"
                           " the client's file is shorter now")
        if os.pwrite(self.fd, data, offset) != len(data):
            raise DmaFault(errno.EFAULT, f"DMA write of file offset {offset:#x}: short write")

    def close(self) -> bool:
        """Unmap / close; ``False`` when a model still holds a view into the
        mapping (it then stays mapped until that view is gone)."""
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                return False
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return True


@dataclass
class DmaMapping:
    """One window: ``[iova, iova + size)`` with ``flags`` (DmaMapFlag); with a
    ``file``, at ``offset`` in it (``view`` when that file is mmapped), else
    reached by messages."""

    iova: int
    size: int
    flags: int
    offset: int = 0
    file: DmaFile | None = None
    view: memoryview | None = None

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def mapped(self) -> bool:
        return self.view is not None


class DmaTable:
    """The DMA windows of one client, sorted by IOVA.

    Bounded: at most ``max_maps`` windows (advertised as ``max_dma_maps`` in
    VERSION) and at most ``max_files`` distinct files behind them (each
    holds one fd or one mapping)."""

    def __init__(self, *, max_maps: int = 65535, port: MessagePort | None = None,
                 max_files: int = MAX_DMA_FILES) -> None:
        self.max_maps = max_maps
        self.max_files = max_files
        self.port = port
        self._starts: list[int] = []
        self._maps: list[DmaMapping] = []
        self._files: dict[tuple[int, int, bool, bool], DmaFile] = {}
        self._file_count = 0  # files with windows, including superseded ones
        self._lingering: list[DmaFile] = []  # unmapped while a view was held
        self.log_page_size = 0  # 0: dirty logging off
        self.dirty: set[int] = set()  # page numbers (iova // log_page_size)

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def mappings(self) -> list[DmaMapping]:
        return list(self._maps)

    @property
    def files(self) -> int:
        """How many client files the windows hold open (one fd or mapping each)."""
        return self._file_count

    # ---- map / unmap ----

    def add(self, iova: int, size: int, flags: int, fd: int = -1, offset: int = 0) -> DmaMapping:
        """Add a window; with an fd, reach the file through a shared
        :class:`DmaFile` (the fd itself is *not* kept or closed here).
        Raises ``OSError`` with the errno to answer."""
        if flags & ~int(DmaMapFlag.READ | DmaMapFlag.WRITE):
            raise OSError(errno.EINVAL, f"DMA_MAP: unknown flags {flags:#x}")
        if size == 0 or iova + size > 1 << 64:
            raise OSError(errno.EINVAL, f"DMA_MAP: bad window {iova:#x}+{size:#x}")
        if len(self._maps) >= self.max_maps:
            raise OSError(errno.ENOSPC, f"DMA_MAP: already {len(self._maps)} windows "
                          f"(max_dma_maps {self.max_maps})")
        i = bisect.bisect_right(self._starts, iova)
        if (i > 0 and self._maps[i - 1].end > iova) or (i < len(self._maps)
                                                        and self._starts[i] < iova + size):
            raise OSError(errno.EEXIST, f"DMA_MAP: {iova:#x}+{size:#x} overlaps a mapped window")
        mapping = DmaMapping(iova, size, flags, offset)
        if fd >= 0:
            dfile = self._file_for(fd, offset, size, bool(flags & DmaMapFlag.WRITE))
            dfile.refs += 1
            mapping.file = dfile
            if dfile.view is not None:
                mapping.view = dfile.view[offset:offset + size]
        self._starts.insert(i, iova)
        self._maps.insert(i, mapping)
        return mapping

    def _file_for(self, fd: int, offset: int, size: int, writable: bool) -> DmaFile:
        if offset % PAGE_SIZE:
            raise OSError(errno.EINVAL, f"DMA_MAP: fd offset {offset:#x} is not page aligned")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "DMA_MAP: the fd is not a regular file (a memfd, or a "
                          "file on tmpfs or hugetlbfs)")
        if offset + size > st.st_size:
            raise OSError(errno.EINVAL, f"DMA_MAP: {offset:#x}+{size:#x} runs past the end "
                          f"of the {st.st_size:#x}-byte file")
        try:
            sealed = bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
        except OSError:
            sealed = False  # a file that cannot be sealed can always shrink
        key = (st.st_dev, st.st_ino, writable, sealed)
        dfile = self._files.get(key)
        if dfile is not None and (not sealed or offset + size <= dfile.size):
            return dfile
        if self._file_count >= self.max_files:
            raise OSError(errno.ENOSPC, f"DMA_MAP: windows already hold {self._file_count} "
                          f"files (at most {self.max_files} per client)")
        # A grown file gets a new mapping; the old one lives on with its windows.
        dfile = DmaFile(key, fd, st.st_size, writable, sealed)
        self._files[key] = dfile
        self._file_count += 1
        return dfile

    def _release(self, mapping: DmaMapping) -> None:
        if mapping.view is not None:
            mapping.view.release()
            mapping.view = None
        dfile = mapping.file
        mapping.file = None
        if dfile is None:
            return
        dfile.refs -= 1
        if dfile.refs == 0:
            if self._files.get(dfile.key) is dfile:
                del self._files[dfile.key]
            self._file_count -= 1
            if not dfile.close():
                self._lingering.append(dfile)

    def remove(self, iova: int, size: int) -> DmaMapping:
        """Remove the window that is exactly ``[iova, iova + size)``."""
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._maps) or self._starts[i] != iova or self._maps[i].size != size:
            raise OSError(errno.ENOENT, f"DMA_UNMAP: no window {iova:#x}+{size:#x}")
        mapping = self._maps.pop(i)
        del self._starts[i]
        self._release(mapping)
        self._reap()
        return mapping

    def overlaps(self, iova: int, size: int) -> bool:
        """Whether any window intersects ``[iova, iova + size)``."""
        i = bisect.bisect_right(self._starts, iova)
        return (i > 0 and self._maps[i - 1].end > iova) or (
            i < len(self._maps) and self._starts[i] < iova + size)

    def remove_all(self) -> None:
        for mapping in self._maps:
            self._release(mapping)
        self._maps.clear()
        self._starts.clear()
        self._reap()

    def _reap(self) -> None:
        self._lingering = [f for f in self._lingering if not f.close()]

    # ---- lookup ----

    def _segments(self, iova: int, size: int, write: bool) -> list[tuple[DmaMapping, int, int]]:
        """Split an access into ``(mapping, offset in it, length)`` pieces over
        adjacent windows, or raise :class:`DmaFault`."""
        if size < 0 or iova < 0 or iova + size > 1 << 64:
            raise DmaFault(errno.EFAULT, f"DMA {iova:#x}+{size:#x} is not a valid range")
        out: list[tuple[DmaMapping, int, int]] = []
        need = errno.EACCES
        i = bisect.bisect_right(self._starts, iova) - 1
        pos, end = iova, iova + size
        while pos < end:
            if i < 0 or i >= len(self._maps) or not (self._maps[i].iova <= pos
                                                     < self._maps[i].end):
                raise DmaFault(errno.EFAULT, f"DMA {'write' if write else 'read'} of "
                               f"{iova:#x}+{size:#x}: {pos:#x} is not mapped")
            m = self._maps[i]
            if not m.flags & (DmaMapFlag.WRITE if write else DmaMapFlag.READ):
                raise DmaFault(need, f"DMA {'write' if write else 'read'} of {iova:#x}: window "
                               f"{m.iova:#x}+{m.size:#x} does not allow it")
            n = min(end, m.end) - pos
            out.append((m, pos - m.iova, n))
            pos += n
            i += 1
        return out

    def contains(self, iova: int, size: int) -> bool:
        try:
            self._segments(iova, size, False)
        except DmaFault:
            return False
        return True

    # ---- access ----

    def read(self, iova: int, size: int) -> bytes:
        segs = self._segments(iova, size, False)
        if len(segs) == 1 and segs[0][0].view is not None:
            m, off, n = segs[0]
            assert m.view is not None
            return bytes(m.view[off:off + n])
        out = bytearray(size)
        self.readinto(iova, out)
        return bytes(out)

    def readinto(self, iova: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        pos = 0
        for m, off, n in self._segments(iova, len(view), False):
            if m.view is not None:
                view[pos:pos + n] = m.view[off:off + n]
            elif m.file is not None:
                view[pos:pos + n] = m.file.pread(m.offset + off, n)
            else:
                view[pos:pos + n] = self._port_read(m.iova + off, n)
            pos += n

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for m, off, n in self._segments(iova, len(src), True):
            if m.view is not None:
                m.view[off:off + n] = src[pos:pos + n]
            elif m.file is not None:
                m.file.pwrite(m.offset + off, src[pos:pos + n])
            else:
                self._port_write(m.iova + off, bytes(src[pos:pos + n]))
            pos += n
        if self.log_page_size:
            self.mark_dirty(iova, len(src))

    def view(self, iova: int, size: int, *, write: bool = False) -> memoryview:
        """A zero-copy view of mapped client memory (one fd-backed window).
        Writes through it are logged as dirty when the view is taken; release
        it before the client may unmap the window."""
        segs = self._segments(iova, size, write)
        if len(segs) != 1 or segs[0][0].view is None:
            raise DmaFault(errno.EFAULT, f"DMA {iova:#x}+{size:#x} is not inside one "
                           "fd-mapped window")
        m, off, n = segs[0]
        assert m.view is not None
        if write and self.log_page_size:
            self.mark_dirty(iova, size)
        return m.view[off:off + n]

    def _port_read(self, iova: int, size: int) -> bytes:
        if self.port is None:
            raise DmaFault(errno.EFAULT, f"DMA read of {iova:#x}: window has no fd and no "
                           "message channel")
        return self.port[0](iova, size)

    def _port_write(self, iova: int, data: bytes) -> None:
        if self.port is None:
            raise DmaFault(errno.EFAULT, f"DMA write of {iova:#x}: window has no fd and no "
                           "message channel")
        self.port[1](iova, data)

    # ---- dirty logging ----

    def start_logging(self, page_size: int) -> None:
        self.log_page_size = page_size
        self.dirty = set()

    def stop_logging(self) -> None:
        self.log_page_size = 0
        self.dirty = set()

    def mark_dirty(self, iova: int, size: int) -> None:
        ps = self.log_page_size
        if ps and size > 0:
            first, last = iova // ps, (iova + size - 1) // ps
            if first == last:
                self.dirty.add(first)
            else:
                self.dirty.update(range(first, last + 1))

    def dirty_bitmap(self, iova: int, length: int, page_size: int, *, clear: bool = True) -> bytes:
        """Bitmap of dirty ``page_size`` units in ``[iova, iova + length)``,
        one bit per unit in u64 words (bit i = unit i), then clear them."""
        pages = -(-length // page_size)
        words = -(-pages // 64)
        bits = 0
        ps = self.log_page_size
        if ps and self.dirty:
            end = iova + length
            hit = [p for p in self.dirty if p * ps < end and (p + 1) * ps > iova]
            for p in hit:
                lo = max(p * ps, iova)
                hi = min((p + 1) * ps, end)
                first, last = (lo - iova) // page_size, (hi - 1 - iova) // page_size
                bits |= ((1 << (last - first + 1)) - 1) << first
            if clear:
                # Only whole log pages inside the range are forgotten.
                self.dirty.difference_update(p for p in hit if p * ps >= iova
                                             and (p + 1) * ps <= end)
        return bits.to_bytes(words * 8, "little")
