"""What a device model needs from whatever carries it to a client: DMA access to
the client's memory and a way to trigger interrupts.

The model framework (:mod:`pyvfio.devices.model`) depends on these protocols
only.  The vfio-user server (:mod:`pyvfio.user.server`) implements them with
one client's DMA table (:class:`pyvfio.user.dma.DmaTable`) and interrupt state
(:class:`pyvfio.user.irq.IrqState`); :mod:`pyvfio.devices.inprocess` implements
them over plain memory, so a model runs in-process without a socket.  So
``user/`` uses ``devices/`` and never the reverse.
"""

from __future__ import annotations

from typing import Protocol

from pyvfio.errors import DmaError

__all__ = ["DmaAccess", "DmaFault", "IrqTrigger", "ModelTransport"]


class DmaFault(DmaError, OSError):
    """Raised when a model's DMA hits memory the client did not map (or
    mapped without the needed permission), or when message-based DMA failed.
    ``errno`` is ``EFAULT`` for unmapped addresses, ``EACCES`` for a
    protection mismatch, ``ENOTCONN`` with no client, or the client's error."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class DmaAccess(Protocol):
    """The client's memory as a model reaches it, by IOVA (bytes).  Every call
    raises :class:`DmaFault` for a range that is not wholly mapped or whose
    protection forbids the access, and then touches nothing."""

    def read(self, iova: int, size: int) -> bytes:
        """``size`` bytes at ``iova``."""
        ...

    def readinto(self, iova: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` from ``iova``."""
        ...

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``iova`` (recorded as dirty while logging)."""
        ...

    def view(self, iova: int, size: int, *, write: bool = False) -> memoryview:
        """A zero-copy view of ``size`` bytes at ``iova`` (memory the client
        shared, not message-based DMA); release it promptly."""
        ...


class IrqTrigger(Protocol):
    """The client's interrupt routing, by VFIO IRQ index
    (:class:`pyvfio.device.IrqIndex`: INTX 0, MSI 1, MSIX 2, ERR 3, REQ 4)."""

    def enabled(self, index: int) -> bool:
        """Whether the client routed this index to eventfds."""
        ...

    def fire(self, index: int, vector: int = 0) -> bool:
        """Signal ``vector`` of ``index``; False when it is not routed (or masked)."""
        ...

    def reset(self) -> None:
        """Forget the routing (a device reset or FLR)."""
        ...


class ModelTransport(Protocol):
    """One client of a model, as the model sees it: ``dma`` and ``irqs``.
    A model is attached to at most one at a time (``PciDeviceModel._attach``)."""

    @property
    def dma(self) -> DmaAccess: ...

    @property
    def irqs(self) -> IrqTrigger: ...
