""":class:`Device`: the backend-neutral device a driver uses, written once on top
of the few primitives a backend fills in.
"""

from __future__ import annotations

import abc
import mmap
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvfio.core.dma import DmaBuffer, DmaSpace
from pyvfio.core.eventfd import EventFd
from pyvfio.core.flags import DeviceFlag, IrqAction, IrqIndex, RegionIndex
from pyvfio.core.info import DeviceInfo, IrqInfo, RegionInfo, _irq_name
from pyvfio.core.region import Region
from pyvfio.errors import ClosedError, UsageError

if TYPE_CHECKING:
    from pyvfio.pci.config import ConfigSpace

# --- the device ------------------------------------------------------------------------------


@dataclass
class _IrqState:
    eventfds: list[EventFd] = field(default_factory=list)


class Device(abc.ABC):
    """A VFIO device, backend-neutral.  Use as a context manager.

    Attributes: ``name`` (a PCI address for kernel devices, the socket path
    for vfio-user), ``backend`` ("legacy", "iommufd", "vfio-user"),
    ``backend_reason`` (why that backend was chosen), ``dma`` (the
    :class:`DmaSpace` the device's DMA goes through, or ``None``).
    """

    backend: str = "?"
    backend_reason: str = ""

    def __init__(self, name: str, dma: DmaSpace | None = None) -> None:
        self.name = name
        self.dma = dma
        self._info: DeviceInfo | None = None
        self._regions: dict[int, Region] = {}
        self._irqs: dict[int, _IrqState] = {}
        self._buffers: list[DmaBuffer] = []
        self._config: ConfigSpace | None = None
        self._closed = False

    # ---- what a backend implements ----

    @abc.abstractmethod
    def _get_info(self) -> DeviceInfo: ...

    @abc.abstractmethod
    def _get_region_info(self, index: int) -> RegionInfo: ...

    @abc.abstractmethod
    def _region_read(self, index: int, offset: int, size: int) -> bytes: ...

    @abc.abstractmethod
    def _region_write(self, index: int, offset: int, data: bytes) -> None: ...

    @abc.abstractmethod
    def _region_mmap(self, info: RegionInfo, offset: int, size: int) -> mmap.mmap: ...

    def _region_accessors(self, info: RegionInfo
                          ) -> tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]]:
        """``(read(offset, size), write(offset, data))`` for one region, used by
        :class:`Region`'s fast register accessors.  A backend may return
        closures with its per-region state bound (the kernel backend binds
        the fd and the region's offset); the default goes through
        ``_region_read``/``_region_write``."""
        index = info.index

        def read(offset: int, size: int) -> bytes:
            return self._region_read(index, offset, size)

        def write(offset: int, data: bytes) -> None:
            self._region_write(index, offset, data)

        return read, write

    def _region_read_block(self, index: int, offset: int, count: int, width: int) -> bytes:
        """``count`` accesses of exactly ``width`` bytes at consecutive offsets,
        their bytes concatenated (checked by the caller).  The default makes
        one :meth:`_region_read` each; a backend overrides it to do them in one
        system call or one round trip, never as wider accesses: a device may
        answer a register only at its own width."""
        read = self._region_read
        return b"".join(read(index, offset + i * width, width) for i in range(count))

    def _region_write_block(self, index: int, offset: int, data: bytes, width: int) -> None:
        """``len(data) // width`` writes of exactly ``width`` bytes (see
        :meth:`_region_read_block`)."""
        for start in range(0, len(data), width):
            self._region_write(index, offset + start, data[start:start + width])

    def _region_int_accessors(self, info: RegionInfo
                              ) -> dict[int, tuple[Callable[[int], int],
                                                   Callable[[int, int], None]]] | None:
        """Optionally, complete ``{width: (read_n(offset), write_n(offset, value))}``
        register accessors for one region (bounds checks included), for a
        backend that can do an access in a single Python frame.  None (the
        default): :class:`Region` builds them on :meth:`_region_accessors`."""
        return None

    @abc.abstractmethod
    def _get_irq_info(self, index: int) -> IrqInfo: ...

    @abc.abstractmethod
    def _set_irqs(self, index: int, flags: IrqAction, start: int, count: int,
                  data: Sequence[int] | Sequence[bool] | None) -> None:
        """``VFIO_DEVICE_SET_IRQS``: ``data`` is a list of fds (-1 to tear one
        down) for DATA_EVENTFD, a list of bools for DATA_BOOL, else None."""

    @abc.abstractmethod
    def _reset(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the backend's fds.  Called once, after the core has torn
        down IRQs and DMA buffers."""

    # ---- public API ----

    def _ensure_open(self) -> None:
        if self._closed:
            raise ClosedError(f"device {self.name} is closed")

    @property
    def info(self) -> DeviceInfo:
        self._ensure_open()
        if self._info is None:
            self._info = self._get_info()
        return self._info

    def region_info(self, index: int) -> RegionInfo:
        return self.region(index).info

    def region(self, index: int) -> Region:
        self._ensure_open()
        region = self._regions.get(index)
        if region is None:
            if not 0 <= index < self.info.num_regions:
                raise UsageError(f"{self.name} has regions 0..{self.info.num_regions - 1}, "
                                 f"not {index}")
            region = Region(self, self._get_region_info(index))
            self._regions[index] = region
        return region

    def regions(self) -> list[RegionInfo]:
        """Info of every region the device reports (including empty ones)."""
        return [self.region(i).info for i in range(self.info.num_regions)]

    def bar(self, n: int) -> Region:
        if not 0 <= n <= 5:
            raise UsageError(f"BAR number must be 0..5, not {n}")
        return self.region(n)

    @property
    def config(self) -> ConfigSpace:
        """PCI config space (region 7) with capability walking."""
        if self._config is None:
            from pyvfio.pci.config import ConfigSpace

            region = self.region(RegionIndex.CONFIG)
            self._config = ConfigSpace(region.read, region.write, size=region.size,
                                       name=self.name)
        return self._config

    def irq_info(self, index: int) -> IrqInfo:
        self._ensure_open()
        if not 0 <= index < self.info.num_irqs:
            raise UsageError(f"{self.name} has IRQ indexes 0..{self.info.num_irqs - 1}, not {index}")
        return self._get_irq_info(index)

    def irqs(self) -> list[IrqInfo]:
        return [self._get_irq_info(i) for i in range(self.info.num_irqs)]

    def set_irqs(self, index: int, flags: IrqAction, start: int = 0, count: int = 0,
                 data: Sequence[int] | Sequence[bool] | None = None) -> None:
        """Raw ``VFIO_DEVICE_SET_IRQS``, for what the helpers below do not cover."""
        self._ensure_open()
        self._set_irqs(index, IrqAction(flags), start, count, data)

    def enable_irq(self, index: int, count: int = 1) -> list[EventFd]:
        """Route ``count`` vectors of IRQ ``index`` to new eventfds and return them.
        For MSI/MSI-X this enables the vectors; for INTx remember to
        :meth:`unmask_irq` after handling each interrupt (INTx is auto-masked)."""
        info = self.irq_info(index)
        if count < 1 or count > info.count:
            raise UsageError(f"IRQ index {_irq_name(index)} of {self.name} has {info.count} "
                             f"vector(s); cannot enable {count}")
        self.disable_irq(index)
        fds = [EventFd() for _ in range(count)]
        try:
            self._set_irqs(index, IrqAction.DATA_EVENTFD | IrqAction.ACTION_TRIGGER, 0, count,
                           [e.fd for e in fds])
        except BaseException:
            for e in fds:
                e.close()
            raise
        self._irqs[index] = _IrqState(fds)
        return fds

    def disable_irq(self, index: int) -> None:
        """Tear down all vectors of IRQ ``index`` (DATA_NONE|TRIGGER, count 0)."""
        state = self._irqs.pop(index, None)
        if state is None:
            return
        try:
            self._set_irqs(index, IrqAction.DATA_NONE | IrqAction.ACTION_TRIGGER, 0, 0, None)
        finally:
            for e in state.eventfds:
                e.close()

    def unmask_irq(self, index: int = IrqIndex.INTX, vector: int = 0) -> None:
        self._set_irqs(index, IrqAction.DATA_NONE | IrqAction.ACTION_UNMASK, vector, 1, None)

    def mask_irq(self, index: int = IrqIndex.INTX, vector: int = 0) -> None:
        self._set_irqs(index, IrqAction.DATA_NONE | IrqAction.ACTION_MASK, vector, 1, None)

    def dma_alloc(self, size: int, *, iova: int | None = None,
                  below: int | None = None) -> DmaBuffer:
        """Allocate a DMA buffer mapped into the device's IOVA space.  It is
        unmapped when closed, at the latest when the device closes."""
        self._ensure_open()
        if self.dma is None:
            raise UsageError(f"{self.name} has no DMA address space")
        buf = self.dma.alloc_buffer(size, iova=iova, below=below)
        self._buffers.append(buf)
        return buf

    def reset(self) -> None:
        self._ensure_open()
        self._reset()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Disable IRQs, unmap this device's DMA buffers, then release the
        backend.  Idempotent."""
        if self._closed:
            return
        try:
            for index in list(self._irqs):
                try:
                    self.disable_irq(index)
                except OSError:
                    pass
            for buf in self._buffers:
                try:
                    buf.close()
                except OSError:
                    pass
            self._buffers.clear()
        finally:
            self._closed = True
            self._close()

    # ---- handing a live device to another process ----

    @property
    def irq_eventfds(self) -> dict[int, list[EventFd]]:
        """The eventfds of each enabled IRQ index (what the kernel signals)."""
        return {index: list(state.eventfds) for index, state in self._irqs.items()}

    @property
    def dma_buffers(self) -> list[DmaBuffer]:
        """The DMA buffers allocated through :meth:`dma_alloc` and not closed."""
        return [b for b in self._buffers if not b.closed]

    def adopt_irq(self, index: int, eventfds: Sequence[EventFd]) -> None:
        """Take over eventfds already routed to IRQ ``index`` (by a previous
        owner of the device): no SET_IRQS call, the vectors stay as they are."""
        self._ensure_open()
        if index in self._irqs:
            raise UsageError(f"IRQ index {_irq_name(index)} of {self.name} is already enabled")
        self._irqs[index] = _IrqState(list(eventfds))

    def adopt_buffer(self, buffer: DmaBuffer) -> None:
        """Take over a buffer that is already mapped (a handed-over memfd):
        it is unmapped when the device closes, like one from :meth:`dma_alloc`."""
        self._ensure_open()
        self._buffers.append(buffer)

    def release(self) -> None:
        """Close this process's fds *without* the teardown :meth:`close` does:
        no IRQ disable, no DMA unmap, no reset.  For a device handed over to
        another process, whose copies of the fds keep the device, its vectors
        and its mappings live.  Idempotent."""
        if self._closed:
            return
        for buf in self._buffers:
            buf.release()
        self._buffers.clear()
        for state in self._irqs.values():
            for e in state.eventfds:
                e.close()
        self._irqs.clear()
        self._closed = True
        self._close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """What ``pyvfio info --json`` prints: backend, IDs, regions, IRQs."""
        out: dict[str, Any] = {"device": self.name, "backend": self.backend,
                               "backend_reason": self.backend_reason,
                               "info": self.info.as_dict()}
        if self.info.flags & DeviceFlag.PCI and self.info.num_regions > RegionIndex.CONFIG:
            hdr = self.region(RegionIndex.CONFIG).read(0, 64)
            vendor, device, _cmd, _sts, rev = struct.unpack_from("<HHHHB", hdr)
            class_code = int.from_bytes(hdr[9:12], "little")
            svid, sdid = struct.unpack_from("<HH", hdr, 0x2C)
            out["ids"] = {"vendor": f"{vendor:04x}", "device": f"{device:04x}",
                          "subsystem_vendor": f"{svid:04x}", "subsystem_device": f"{sdid:04x}",
                          "class": f"{class_code:06x}", "revision": f"{rev:02x}"}
        out["regions"] = [r.as_dict() for r in self.regions()]
        out["irqs"] = [i.as_dict() for i in self.irqs()]
        return out

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.backend
        return f"<{type(self).__name__} {self.name} ({state})>"
