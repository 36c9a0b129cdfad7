"""The framework for emulated PCI devices served over vfio-user.

A device model subclasses :class:`PciDeviceModel`, declares its identity and
config-space capabilities in ``__init__``, adds BARs (each handled by one
access callback, libvfio-user style, or backed by shared memory the client may
mmap), and overrides the lifecycle hooks it cares about (``reset``,
``quiesce``, ``save_state``/``load_state``).  The framework owns config space,
DMA and interrupt plumbing: the model calls :meth:`~PciDeviceModel.dma_read`,
:meth:`~PciDeviceModel.dma_write`, :meth:`~PciDeviceModel.raise_irq`,
:meth:`~PciDeviceModel.set_intx` and never sees a socket.  Those go to the
:class:`~pyvfio.devices.transport.ModelTransport` the model is attached to:
the vfio-user server's connection, or an in-process one
(:mod:`pyvfio.devices.inprocess`) for tests.

Concurrency: the server calls every hook and callback with ``self.lock``
held; a model's own threads (timers) take the same lock around their work.
Message-based DMA (a client that gave no fd) waits for the client with that
lock released, so the connection keeps serving requests meanwhile.

Life across clients: the model lives as long as the server; a client
disconnect drops that client's DMA windows and eventfds but not device
state, and the next client finds the device as it was left.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvfio.device import IrqIndex, RegionFlag, RegionIndex, SharedMemory
from pyvfio.devices.transport import DmaAccess, DmaFault, ModelTransport
from pyvfio.errors import UsageError
from pyvfio.pci.emulated import BarKind, BarSpec, EmulatedConfig

__all__ = [
    "AccessCallback",
    "BarKind",
    "DmaFault",
    "IoEventFd",
    "MigrationUnsupported",
    "MsixTable",
    "PciDeviceModel",
    "RegionSpec",
]

AccessCallback = Callable[[int, "bytes | int", bool], "bytes | None"]
"""``access(offset, data_or_size, is_write)``: for a write, ``data`` (bytes of
exactly the access width) and return ``None``; for a read, the ``size`` and
return exactly that many bytes.  Raise ``OSError(errno, ...)`` to fail the
access with that errno."""


class MigrationUnsupported(UsageError):
    """Raised by the default ``save_state``: the model cannot migrate."""


class MsixTable:
    """The MSI-X table (16 bytes per vector: address, data, vector control)
    and Pending Bit Array of a model.

    Vectors start *unmasked*, unlike on hardware: a VFIO client turns MSI-X
    on with SET_IRQS alone (QEMU emulates the table for its guest and masks
    through SET_IRQS), so a table that starts masked would swallow every
    interrupt.  Masks a client does write here are honoured."""

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.table = bytearray(16 * vectors)
        self.pending = bytearray(8 * ((vectors + 63) // 64))

    def masked(self, vector: int) -> bool:
        return bool(self.table[16 * vector + 12] & 1)

    def set_pending(self, vector: int) -> None:
        self.pending[vector // 8] |= 1 << (vector % 8)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.table[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            pos = offset + i
            if pos % 16 in (13, 14, 15):
                continue  # reserved bits of Vector Control
            self.table[pos] = (b & 1) if pos % 16 == 12 else b

    def read_pba(self, offset: int, size: int) -> bytes:
        return bytes(self.pending[offset:offset + size]).ljust(size, b"\0")

    def take_deliverable(self) -> list[int]:
        """Pending vectors that are no longer masked; their bits are cleared."""
        out = []
        for v in range(self.vectors):
            if self.pending[v // 8] & (1 << (v % 8)) and not self.masked(v):
                self.pending[v // 8] &= ~(1 << (v % 8)) & 0xFF
                out.append(v)
        return out


@dataclass
class IoEventFd:
    """A write-notification sub-region (DEVICE_GET_REGION_IO_FDS): a write of
    ``size`` bytes at ``offset`` (matching ``datamatch`` when given) may be
    delivered by signalling an eventfd instead of a REGION_WRITE message; the
    server turns each signal into a write of ``datamatch`` (or zeros) through
    the region's access callback."""

    offset: int
    size: int
    datamatch: int | None = None


@dataclass
class RegionSpec:
    """One region: size, flags, and how it is reached.

    ``access`` handles REGION_READ/WRITE; without it, ``memory`` is read and
    written directly.  With ``memory`` the region is mmap-able: wholly, or only
    in ``mmap_areas`` (``(offset, size)`` pairs, page aligned: the sparse mmap
    capability).  ``type`` is ``(type, subtype)`` for device-specific regions."""

    index: int
    size: int
    flags: RegionFlag = RegionFlag.READ | RegionFlag.WRITE
    access: AccessCallback | None = None
    memory: SharedMemory | None = None
    mmap_areas: tuple[tuple[int, int], ...] | None = None
    type: tuple[int, int] | None = None
    bar: BarSpec | None = None
    ioeventfds: list[IoEventFd] = field(default_factory=list)

    @property
    def mappable(self) -> bool:
        return self.memory is not None


class PciDeviceModel:
    """Base class of device models.  See the module docstring.

    Constructor arguments set the PCI identity; ``pcie=True`` gives a 4 KiB
    config space with a PCI Express capability (and FLR);
    ``intx``/``msi_vectors``/``msix_vectors`` size the IRQ indexes and add
    the MSI capability (MSI-X needs :meth:`add_msix`, which places the table
    and PBA in a BAR)."""

    name = "device"

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int = 0,
                 revision: int = 0, subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 intx: bool = True, msi_vectors: int = 0, pm: bool = False,
                 pcie: bool = False) -> None:
        self.lock = threading.RLock()
        self.config = EmulatedConfig(
            vendor_id, device_id, class_code=class_code, revision=revision,
            subsystem_vendor_id=subsystem_vendor_id, subsystem_id=subsystem_id,
            interrupt_pin=1 if intx else 0, size=4096 if pcie else 256)
        self.regions: dict[int, RegionSpec] = {}
        self.irq_counts = [1 if intx else 0, msi_vectors, 0, 0, 0]
        if pm:
            self.config.add_pm()
        if msi_vectors:
            self.config.add_msi(msi_vectors)
        if pcie:
            self.config.add_pcie()
            self.config.on_flr(self._flr)
        self._intx_level = False
        self.msix_table: MsixTable | None = None
        self._conn: ModelTransport | None = None  # the client (see devices.transport)
        self._initial_config: bytes | None = None

    # ---- declaring the device (in __init__) ----

    def add_bar(self, index: int, size: int, *, access: AccessCallback | None = None,
                memory: SharedMemory | None = None,
                mmap_areas: Sequence[tuple[int, int]] | None = None,
                kind: BarKind = BarKind.MEM32, prefetchable: bool = False,
                readable: bool = True, writable: bool = True) -> RegionSpec:
        """Declare BAR ``index``.  Give ``access`` (a callback), ``memory``
        (client-mappable shared memory of at least ``size`` bytes), or both
        (the callback serves messages, the memory serves mmap)."""
        if access is None and memory is None:
            raise UsageError(f"BAR{index} needs an access callback or memory")
        if memory is not None and memory.size < size:
            raise UsageError(f"BAR{index} memory is {memory.size:#x} bytes, BAR is {size:#x}")
        bar = BarSpec(index, size, kind, prefetchable)
        self.config.add_bar(bar)
        flags = (RegionFlag.READ if readable else RegionFlag(0)) | \
            (RegionFlag.WRITE if writable else RegionFlag(0))
        areas = None
        if memory is not None:
            flags |= RegionFlag.MMAP
            if mmap_areas is not None:
                areas = tuple((int(o), int(s)) for o, s in mmap_areas)
                for o, s in areas:
                    if o % 4096 or s % 4096 or s <= 0 or o + s > size:
                        raise UsageError(f"BAR{index} mmap area {o:#x}+{s:#x} must be page "
                                         "aligned and inside the BAR")
        spec = RegionSpec(index, size, flags, access, memory, areas, bar=bar)
        self.regions[index] = spec
        return spec

    def add_region(self, index: int, size: int, access: AccessCallback, *,
                   type: tuple[int, int] | None = None, readable: bool = True,
                   writable: bool = True) -> RegionSpec:
        """A device-specific region (index 9 and up), with a type capability."""
        if index <= RegionIndex.VGA:
            raise UsageError(f"device-specific regions start at index 9, not {index}")
        flags = (RegionFlag.READ if readable else RegionFlag(0)) | \
            (RegionFlag.WRITE if writable else RegionFlag(0))
        spec = RegionSpec(index, size, flags, access, type=type)
        self.regions[index] = spec
        return spec

    def add_ioeventfd(self, index: int, offset: int, size: int,
                      datamatch: int | None = None) -> None:
        """Offer an ioeventfd for writes at ``offset`` of region ``index`` (a
        doorbell): a client (or KVM for it) signals it instead of sending
        REGION_WRITE.  The region needs an access callback."""
        spec = self.regions.get(index)
        if spec is None or spec.access is None:
            raise UsageError(f"region {index} has no access callback to deliver ioeventfds to")
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > spec.size:
            raise UsageError(f"ioeventfd {offset:#x}+{size} does not fit region {index}")
        spec.ioeventfds.append(IoEventFd(offset, size, datamatch))

    def add_msix(self, vectors: int, bar: int, table_offset: int = 0,
                 pba_offset: int | None = None) -> None:
        """MSI-X with ``vectors`` vectors; table and PBA in BAR ``bar``, which
        must already be declared with an access callback.  The framework
        serves the table and PBA there (the model's callback sees the rest of
        the BAR) and honours the per-vector and function masks: a masked
        vector that fires sets its PBA bit and is delivered on unmask."""
        spec = self.regions.get(bar)
        if spec is None or spec.access is None:
            raise UsageError(f"declare BAR{bar} (with an access callback) before MSI-X in it")
        if pba_offset is None:
            pba_offset = table_offset + ((16 * vectors + 4095) & ~4095)
        table_end, pba_end = table_offset + 16 * vectors, pba_offset + 8 * ((vectors + 63) // 64)
        if max(table_end, pba_end) > spec.size or (table_offset < pba_end
                                                    and pba_offset < table_end):
            raise UsageError(f"MSI-X table/PBA do not fit BAR{bar} without overlapping")
        cap = self.config.add_msix(vectors, bar, table_offset, bar, pba_offset)
        self.irq_counts[IrqIndex.MSIX] = vectors
        self.msix_table = MsixTable(vectors)
        inner = spec.access
        table = self.msix_table

        def access(offset: int, data_or_size: bytes | int, is_write: bool) -> bytes | None:
            size = len(data_or_size) if isinstance(data_or_size, bytes) else data_or_size
            if table_offset <= offset and offset + size <= table_end:
                if is_write:
                    assert isinstance(data_or_size, bytes)
                    table.write(offset - table_offset, data_or_size)
                    self._msix_deliver_pending()
                    return None
                return table.read(offset - table_offset, size)
            if pba_offset <= offset and offset + size <= pba_end:
                return None if is_write else table.read_pba(offset - pba_offset, size)
            return inner(offset, data_or_size, is_write)

        spec.access = access
        self.config.add_write_hook(cap + 2, 2, lambda _o, _s: self._msix_deliver_pending())

    def _msix_deliver_pending(self) -> None:
        table = self.msix_table
        if table is None or self.config.msix_function_masked:
            return
        for vector in table.take_deliverable():
            conn = self._conn
            if conn is not None:
                conn.irqs.fire(IrqIndex.MSIX, vector)

    def add_error_irqs(self, err: bool = True, req: bool = True) -> None:
        """Offer the ERR and REQ IRQ indexes (one vector each)."""
        self.irq_counts[IrqIndex.ERR] = int(err)
        self.irq_counts[IrqIndex.REQ] = int(req)

    @property
    def num_regions(self) -> int:
        return max([RegionIndex.VGA + 1, *(i + 1 for i in self.regions)])

    def finalize(self) -> None:
        """Called by the server before the first client: records the
        power-on config space that a reset returns to."""
        if self._initial_config is None:
            self._initial_config = self.config.snapshot()

    # ---- hooks a model overrides ----

    def reset(self) -> None:
        """Device reset (DEVICE_RESET, FLR).  The default resets config space;
        a model extends it and calls ``super().reset()``."""
        if self._initial_config is not None:
            self.config.reset_state(self._initial_config)
        self._intx_level = False

    def quiesce(self) -> None:
        """Stop touching DMA: called before a DMA window goes away, before a
        reset and when the client disconnects.  Default: nothing."""

    def on_connect(self) -> None:
        """A client finished negotiation."""

    def on_disconnect(self) -> None:
        """The client went away (its DMA and eventfds are already gone)."""

    def config_access(self, offset: int, data_or_size: bytes | int, is_write: bool
                      ) -> bytes | None:
        """Config space region access; default goes to :attr:`config`."""
        if is_write:
            assert isinstance(data_or_size, bytes)
            self.config.write(offset, data_or_size)
            return None
        assert isinstance(data_or_size, int)
        return self.config.read(offset, data_or_size)

    # migration: a model that can migrate overrides these three.
    migration_pre_copy = False
    """Set to True when the model supports the PRE_COPY state."""

    def supports_migration(self) -> bool:
        return type(self).save_state is not PciDeviceModel.save_state

    def save_state(self) -> bytes:
        """The device state to migrate (config space is added by the
        framework).  Called on entering STOP_COPY (and PRE_COPY)."""
        raise MigrationUnsupported(f"{self.name} cannot migrate")

    def load_state(self, data: bytes) -> None:
        """Restore what :meth:`save_state` produced.  Raise ``ValueError`` (or
        ``OSError``) on data that does not fit; the client's SET then fails."""
        raise MigrationUnsupported(f"{self.name} cannot migrate")

    def migration_state_changed(self, old: str, new: str) -> None:
        """Called after each migration arc, with state names ("RUNNING",
        "STOP", "STOP_COPY", "RESUMING", "PRE_COPY")."""

    # ---- what a model calls ----

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def dma_read(self, iova: int, size: int) -> bytes:
        """Read client memory at ``iova``; raises :class:`DmaFault`."""
        return self._dma().read(iova, size)

    def dma_read_into(self, iova: int, buf: bytearray | memoryview) -> None:
        self._dma().readinto(iova, buf)

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Write client memory at ``iova`` (logged as dirty when logging)."""
        self._dma().write(iova, data)

    def dma_view(self, iova: int, size: int, *, write: bool = False) -> memoryview:
        """Zero-copy view of fd-mapped client memory; release it promptly."""
        return self._dma().view(iova, size, write=write)

    def _dma(self) -> DmaAccess:
        conn = self._conn
        if conn is None:
            raise DmaFault(errno.ENOTCONN, f"{self.name}: no client connected, no DMA memory")
        return conn.dma

    def msi_enabled(self) -> bool:
        """The client routed MSI vectors to eventfds (VFIO's notion of 'MSI on')."""
        conn = self._conn
        return conn is not None and conn.irqs.enabled(IrqIndex.MSI)

    def msix_enabled(self) -> bool:
        conn = self._conn
        return conn is not None and conn.irqs.enabled(IrqIndex.MSIX)

    def msi_notify(self, vector: int = 0) -> bool:
        conn = self._conn
        return conn is not None and conn.irqs.fire(IrqIndex.MSI, vector)

    def msix_notify(self, vector: int = 0) -> bool:
        """Signal MSI-X ``vector``; with the table masking it (vector or
        function mask), set its pending bit instead."""
        table = self.msix_table
        if table is not None and (self.config.msix_function_masked or table.masked(vector)):
            table.set_pending(vector)
            return False
        conn = self._conn
        return conn is not None and conn.irqs.fire(IrqIndex.MSIX, vector)

    def set_intx(self, level: bool) -> None:
        """Drive the INTx line.  Asserting delivers the interrupt unless INTx
        is disabled in the Command register or masked (then it is delivered
        on unmask while still asserted)."""
        self._intx_level = bool(level)
        self.config.set_interrupt_status(self._intx_level)
        if level and not self.config.intx_disabled:
            conn = self._conn
            if conn is not None:
                conn.irqs.fire(IrqIndex.INTX, 0)

    @property
    def intx_level(self) -> bool:
        return self._intx_level and not self.config.intx_disabled

    def raise_irq(self, vector: int = 0) -> bool:
        """Signal an interrupt through whatever the client enabled: MSI-X,
        else MSI, else a pulse on INTx (asserted; the model lowers it with
        ``set_intx(False)`` when the cause is acknowledged)."""
        if self.msix_enabled():
            return self.msix_notify(vector)
        if self.msi_enabled():
            return self.msi_notify(vector)
        self.set_intx(True)
        return True

    def request_release(self) -> bool:
        """Ask the client to let go of the device (the REQ index, as vfio-pci
        signals when the host wants the device back); needs
        :meth:`add_error_irqs`."""
        conn = self._conn
        return conn is not None and conn.irqs.fire(IrqIndex.REQ, 0)

    def report_error(self) -> bool:
        """Signal an unrecoverable device error (the ERR index, AER-style)."""
        conn = self._conn
        return conn is not None and conn.irqs.fire(IrqIndex.ERR, 0)

    # ---- used by the server ----

    def _flr(self) -> None:
        self.quiesce()
        self.reset()
        conn = self._conn
        if conn is not None:
            conn.irqs.reset()

    def _attach(self, conn: ModelTransport) -> None:
        """Give the model its client (the server's connection, or
        :class:`pyvfio.devices.inprocess.InProcessTransport`)."""
        self._conn = conn

    def _detach(self) -> None:
        self._conn = None
