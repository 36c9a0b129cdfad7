"""Run a device model in this process, without a socket: client memory is
plain memory here and interrupts are recorded.

For unit tests of models (and for trying one out in a REPL)::

    edu = EduDevice(dma_delay=0)
    client = InProcessTransport.attach(edu)
    ram = client.dma.map(0x10000, 4096)            # "client memory" at IOVA 0x10000
    client.region_write(0, 0x80, (0x10000).to_bytes(8, "little"))
    ...
    client.irqs.fired                               # [(IrqIndex.INTX, 0), ...]

It implements the protocols of :mod:`pyvfio.devices.transport`, as the
vfio-user server's connection does, and calls the model the way the server
does: every access with ``model.lock`` held, config space through
``config_access``, other regions through their callback or memory.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from pyvfio.device import IrqIndex, RegionIndex
from pyvfio.devices.model import PciDeviceModel
from pyvfio.devices.transport import DmaFault
from pyvfio.errors import UsageError

__all__ = ["InProcessTransport", "MemoryDma", "RecordedIrqs"]


@dataclass
class _Window:
    iova: int
    memory: bytearray
    writable: bool

    @property
    def end(self) -> int:
        return self.iova + len(self.memory)


class MemoryDma:
    """Client memory as windows of ``bytearray`` at IOVAs (the
    :class:`~pyvfio.devices.transport.DmaAccess` protocol).  An access must
    lie inside one window; anything else is a :class:`DmaFault` (``EFAULT``,
    or ``EACCES`` writing a read-only window) and touches nothing."""

    def __init__(self) -> None:
        self.windows: list[_Window] = []
        self.writes: list[tuple[int, int]] = []  # (iova, size) of every model write

    def map(self, iova: int, size: int, *, writable: bool = True) -> bytearray:
        """A new zeroed window of ``size`` bytes at ``iova``; returns its memory."""
        if size <= 0 or iova < 0:
            raise UsageError(f"DMA window {iova:#x}+{size:#x} is empty or negative")
        if any(w.iova < iova + size and iova < w.end for w in self.windows):
            raise UsageError(f"DMA window {iova:#x}+{size:#x} overlaps another")
        window = _Window(iova, bytearray(size), writable)
        self.windows.append(window)
        return window.memory

    def unmap(self, iova: int) -> None:
        self.windows = [w for w in self.windows if w.iova != iova]

    def _window(self, iova: int, size: int, write: bool) -> tuple[_Window, int]:
        for w in self.windows:
            if w.iova <= iova and iova + size <= w.end:
                if write and not w.writable:
                    raise DmaFault(errno.EACCES, f"DMA write to read-only {iova:#x}+{size:#x}")
                return w, iova - w.iova
        raise DmaFault(errno.EFAULT, f"DMA {iova:#x}+{size:#x} is outside every window")

    def read(self, iova: int, size: int) -> bytes:
        w, off = self._window(iova, size, False)
        return bytes(w.memory[off:off + size])

    def readinto(self, iova: int, buf: bytearray | memoryview) -> None:
        w, off = self._window(iova, len(buf), False)
        buf[:] = w.memory[off:off + len(buf)]

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        w, off = self._window(iova, len(data), True)
        w.memory[off:off + len(data)] = data
        self.writes.append((iova, len(data)))

    def view(self, iova: int, size: int, *, write: bool = False) -> memoryview:
        w, off = self._window(iova, size, write)
        return memoryview(w.memory)[off:off + size]


@dataclass
class RecordedIrqs:
    """Interrupt routing and a record of what fired (the
    :class:`~pyvfio.devices.transport.IrqTrigger` protocol).  ``routed``
    holds the IRQ indexes the "client" enabled (INTx by default)."""

    routed: set[int] = field(default_factory=lambda: {int(IrqIndex.INTX)})
    fired: list[tuple[int, int]] = field(default_factory=list)

    def enabled(self, index: int) -> bool:
        return int(index) in self.routed

    def fire(self, index: int, vector: int = 0) -> bool:
        if int(index) not in self.routed:
            return False
        self.fired.append((int(index), vector))
        return True

    def reset(self) -> None:
        self.routed = {int(IrqIndex.INTX)}


class InProcessTransport:
    """One in-process "client" of a model: :class:`MemoryDma` and
    :class:`RecordedIrqs`, plus region access as the server performs it."""

    def __init__(self, model: PciDeviceModel) -> None:
        self.model = model
        self._dma = MemoryDma()
        self._irqs = RecordedIrqs()

    @property
    def dma(self) -> MemoryDma:
        return self._dma

    @property
    def irqs(self) -> RecordedIrqs:
        return self._irqs

    @classmethod
    def attach(cls, model: PciDeviceModel) -> InProcessTransport:
        """Attach a new transport to ``model`` as the server does for a client
        (``finalize``, attach, ``on_connect``)."""
        transport = cls(model)
        with model.lock:
            model.finalize()
            model._attach(transport)
            model.on_connect()
        return transport

    def detach(self) -> None:
        """What a disconnect does: quiesce, detach, ``on_disconnect``."""
        with self.model.lock:
            self.model.quiesce()
            self.model._detach()
            self.model.on_disconnect()

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """REGION_READ of ``size`` bytes (config space is region 7)."""
        with self.model.lock:
            if index == RegionIndex.CONFIG:
                data = self.model.config_access(offset, size, False)
            else:
                spec = self.model.regions[index]
                if spec.access is not None:
                    data = spec.access(offset, size, False)
                else:
                    assert spec.memory is not None
                    data = bytes(spec.memory.view[offset:offset + size])
        assert data is not None
        return bytes(data)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """REGION_WRITE of ``data``."""
        with self.model.lock:
            if index == RegionIndex.CONFIG:
                self.model.config_access(offset, bytes(data), True)
                return
            spec = self.model.regions[index]
            if spec.access is not None:
                spec.access(offset, bytes(data), True)
            else:
                assert spec.memory is not None
                spec.memory.view[offset:offset + len(data)] = data
