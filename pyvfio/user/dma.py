"""A vfio-user server's view of one client's DMA memory.

Each client connection owns one :class:`DmaTable`: the windows the client
mapped with ``VFIO_USER_DMA_MAP``.  A window that came with an fd is mmapped
here and device models read and write it directly (memcpy speed); a window
without an fd is reached through ``VFIO_USER_DMA_READ``/``DMA_WRITE``
messages to the client, which the table sends through the ``port`` the
connection provides.  Any access that is not wholly inside mapped windows,
or that the window's protection forbids, raises :class:`DmaFault` and touches
nothing.

Dirty-page logging (``VFIO_DEVICE_FEATURE_DMA_LOGGING_*`` and the
``GET_DIRTY_BITMAP`` flag of ``DMA_UNMAP``) records the pages that the
*model's* writes touched; it is kept per table, i.e. per client.

Rules taken from libvfio-user's ``lib/dma.c`` and the spec: a map over an
existing window fails with ``EEXIST``; an unmap must match a window exactly
(``ENOENT`` otherwise); a disconnect unmaps everything.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from pyvfio.device import PAGE_SIZE
from pyvfio.devices.transport import DmaFault
from pyvfio.user.protocol import DmaMapFlag

__all__ = ["DmaFault", "DmaMapping", "DmaTable", "MessagePort"]


MessagePort = tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]]
"""``(read(iova, size) -> bytes, write(iova, data))`` through DMA_READ/WRITE."""


@dataclass
class DmaMapping:
    """One window: ``[iova, iova + size)`` with ``flags`` (DmaMapFlag), mapped
    at ``view`` when the client passed an fd, else reached by messages."""

    iova: int
    size: int
    flags: int
    offset: int = 0
    mm: mmap.mmap | None = None
    view: memoryview | None = None

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def mapped(self) -> bool:
        return self.view is not None

    def close(self) -> bool:
        """Unmap; ``False`` when a model still holds a view into it (the
        memory then stays mapped until that view is gone)."""
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                return False
            self.mm = None
        return True


class DmaTable:
    """The DMA windows of one client, sorted by IOVA."""

    def __init__(self, *, max_maps: int = 65535, port: MessagePort | None = None) -> None:
        self.max_maps = max_maps
        self.port = port
        self._starts: list[int] = []
        self._maps: list[DmaMapping] = []
        self._lingering: list[DmaMapping] = []  # unmapped while a view was held
        self.log_page_size = 0  # 0: dirty logging off
        self.dirty: set[int] = set()  # page numbers (iova // log_page_size)

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def mappings(self) -> list[DmaMapping]:
        return list(self._maps)

    # ---- map / unmap ----

    def add(self, iova: int, size: int, flags: int, fd: int = -1, offset: int = 0) -> DmaMapping:
        """Add a window; with an fd, mmap it (the fd is *not* closed here).
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
            if offset % PAGE_SIZE:
                raise OSError(errno.EINVAL, f"DMA_MAP: fd offset {offset:#x} is not page aligned")
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
                # Touching pages past the end of a file would SIGBUS this process.
                raise OSError(errno.EINVAL, f"DMA_MAP: {offset:#x}+{size:#x} runs past the end "
                              f"of the {st.st_size:#x}-byte file")
            prot = (mmap.PROT_READ if flags & DmaMapFlag.READ else 0) | \
                (mmap.PROT_WRITE if flags & DmaMapFlag.WRITE else 0)
            mapping.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot or mmap.PROT_READ,
                                   offset=offset)
            mapping.view = memoryview(mapping.mm)
        self._starts.insert(i, iova)
        self._maps.insert(i, mapping)
        return mapping

    def remove(self, iova: int, size: int) -> DmaMapping:
        """Remove the window that is exactly ``[iova, iova + size)``."""
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._maps) or self._starts[i] != iova or self._maps[i].size != size:
            raise OSError(errno.ENOENT, f"DMA_UNMAP: no window {iova:#x}+{size:#x}")
        mapping = self._maps.pop(i)
        del self._starts[i]
        if not mapping.close():
            self._lingering.append(mapping)
        self._reap()
        return mapping

    def remove_all(self) -> None:
        for mapping in self._maps:
            if not mapping.close():
                self._lingering.append(mapping)
        self._maps.clear()
        self._starts.clear()
        self._reap()

    def _reap(self) -> None:
        self._lingering = [m for m in self._lingering if not m.close()]

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
            else:
                view[pos:pos + n] = self._port_read(m.iova + off, n)
            pos += n

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for m, off, n in self._segments(iova, len(src), True):
            if m.view is not None:
                m.view[off:off + n] = src[pos:pos + n]
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
