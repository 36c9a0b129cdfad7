"""The modern virtio-pci transport (virtio 1.x, section 4.1) for device models.

:class:`VirtioPciDevice` is a :class:`~pyvfio.devices.model.PciDeviceModel`
that presents itself the way a VIRTIO 1.x PCI device does, so the guest's own
``virtio_pci`` driver binds it and hands it to the device driver
(``virtio_rng``, ``virtio_blk``, ...):

- PCI identity ``1af4:(0x1040 + device id)``, revision 1 (non-transitional);
- vendor-specific capabilities (``struct virtio_pci_cap``, cap ID 0x09) in
  config space for the common configuration, notifications, ISR status,
  device configuration and the PCI configuration access window;
- one 64-bit memory BAR (:data:`VIRTIO_BAR`) that holds the four structures
  (:data:`COMMON_OFFSET`, :data:`ISR_OFFSET`, :data:`DEVICE_OFFSET`,
  :data:`NOTIFY_OFFSET`), like QEMU's virtio-pci;
- MSI-X with one vector per queue plus one for configuration changes, its
  table in BAR 1; INTx with the ISR as the fallback;
- feature negotiation (``VIRTIO_F_VERSION_1`` is required of the driver; a
  driver that accepts a feature the device did not offer does not get
  ``FEATURES_OK``), device status, reset by writing 0;
- split virtqueues (:mod:`pyvfio.devices.virtio.queue`) read and written
  through the model's DMA access.

A device is a subclass that sets the device ID, queue sizes, its feature
bits and its configuration structure, and implements
:meth:`VirtioPciDevice.handle_request`; see :mod:`pyvfio.devices.virtio.rng`
(a page) and :mod:`pyvfio.devices.virtio.blk`.

Requests are processed on a worker thread, not in the notify write: a
driver's doorbell write returns at once (as on hardware) and the device then
reads the queue by DMA, which over vfio-user may be DMA_READ messages to a
client that is itself waiting for the doorbell's reply.

Sources: the VIRTIO 1.2 specification (sections 2.1 device status, 2.2
feature bits, 2.7 split virtqueues, 4.1 virtio over PCI), Linux
``include/uapi/linux/virtio_pci.h`` and ``drivers/virtio/virtio_pci_modern_dev.c``.
"""

from __future__ import annotations

import logging
import struct
import threading

from pyvfio.devices.model import BarKind, DmaFault, PciDeviceModel
from pyvfio.devices.virtio.queue import DescriptorChain, SplitQueue, VirtqueueError

__all__ = [
    "COMMON_OFFSET",
    "DEVICE_OFFSET",
    "ISR_OFFSET",
    "NOTIFY_MULTIPLIER",
    "NOTIFY_OFFSET",
    "VIRTIO_BAR",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_RING_EVENT_IDX",
    "VIRTIO_F_RING_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_MSI_NO_VECTOR",
    "VIRTIO_PCI_VENDOR_ID",
    "CfgType",
    "Status",
    "VirtioPciDevice",
]

log = logging.getLogger("pyvfio.devices.virtio")

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040  # PCI device ID = 0x1040 + virtio device ID
PCI_CAP_ID_VNDR = 0x09

# Feature bits (section 6, "Reserved Feature Bits").
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# The BAR layout: each structure on its own page, as QEMU lays them out.
VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
STRUCT_SIZE = 0x1000
NOTIFY_MULTIPLIER = 4
COMMON_CFG_SIZE = 0x3C  # struct virtio_pci_modern_common_cfg, through queue_reset


class Status:
    """Device status bits (section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class CfgType:
    """``cfg_type`` of ``struct virtio_pci_cap`` (VIRTIO_PCI_CAP_*)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


# struct virtio_pci_common_cfg: name -> (offset, size, writable).
_COMMON_FIELDS: dict[str, tuple[int, int, bool]] = {
    "device_feature_select": (0x00, 4, True),
    "device_feature": (0x04, 4, False),
    "driver_feature_select": (0x08, 4, True),
    "driver_feature": (0x0C, 4, True),
    "config_msix_vector": (0x10, 2, True),
    "num_queues": (0x12, 2, False),
    "device_status": (0x14, 1, True),
    "config_generation": (0x15, 1, False),
    "queue_select": (0x16, 2, True),
    "queue_size": (0x18, 2, True),
    "queue_msix_vector": (0x1A, 2, True),
    "queue_enable": (0x1C, 2, True),
    "queue_notify_off": (0x1E, 2, False),
    "queue_desc": (0x20, 8, True),
    "queue_driver": (0x28, 8, True),
    "queue_device": (0x30, 8, True),
    "queue_notify_data": (0x38, 2, False),
    "queue_reset": (0x3A, 2, True),
}
_CAP = struct.Struct("<BBBBBBxxII")  # vndr, next, len, cfg_type, bar, id, pad, offset, length


class _DmaMemory:
    """The queue's view of guest memory: the model's DMA access."""

    def __init__(self, device: PciDeviceModel) -> None:
        self.read = device.dma_read
        self.write = device.dma_write


class VirtioPciDevice(PciDeviceModel):
    """Base class of virtio devices over the modern PCI transport.

    ``virtio_id`` is the virtio device ID (section 5: 2 block, 4 entropy);
    ``queue_sizes`` the maximum size of each virtqueue (powers of two);
    ``features`` the device-specific feature bits offered besides
    ``VIRTIO_F_VERSION_1``, ``VIRTIO_F_ACCESS_PLATFORM`` (the device's DMA
    goes through the platform's IOMMU: for vfio-user, the client's DMA
    windows) and ``VIRTIO_F_RING_INDIRECT_DESC``; ``class_code`` the PCI
    class.  Subclasses implement :meth:`handle_request` and, if they have
    one, :meth:`device_config`.
    """

    name = "virtio"

    def __init__(self, *, virtio_id: int, queue_sizes: list[int], features: int = 0,
                 class_code: int = 0xFF0000, event_idx: bool = False) -> None:
        super().__init__(vendor_id=VIRTIO_PCI_VENDOR_ID,
                         device_id=VIRTIO_PCI_MODERN_DEVICE_BASE + virtio_id,
                         class_code=class_code, revision=1,
                         subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
                         subsystem_id=0x40 + virtio_id, intx=True)
        self.virtio_id = virtio_id
        self.device_features = (features | 1 << VIRTIO_F_VERSION_1
                                | 1 << VIRTIO_F_ACCESS_PLATFORM
                                | 1 << VIRTIO_F_RING_INDIRECT_DESC
                                | (1 << VIRTIO_F_RING_EVENT_IDX if event_idx else 0))
        self.queues = [SplitQueue(i, size) for i, size in enumerate(queue_sizes)]
        self.add_bar(MSIX_BAR, MSIX_BAR_SIZE, access=self._msix_bar)
        self.add_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, access=self._virtio_bar,
                     kind=BarKind.MEM64, prefetchable=True)
        self.add_msix(len(self.queues) + 1, bar=MSIX_BAR, table_offset=0, pba_offset=0x800)
        self._add_cap(CfgType.COMMON, COMMON_OFFSET, STRUCT_SIZE)
        self._add_cap(CfgType.ISR, ISR_OFFSET, STRUCT_SIZE)
        self._add_cap(CfgType.DEVICE, DEVICE_OFFSET, STRUCT_SIZE)
        notify = self._add_cap(CfgType.NOTIFY, NOTIFY_OFFSET, STRUCT_SIZE, extra=4)
        self.config.set(notify + 16, 4, NOTIFY_MULTIPLIER)
        self._pci_cfg = self._add_cap(CfgType.PCI, 0, 0, extra=4)
        # The PCI access window: bar, offset, length and data are the driver's.
        self.config._mask(self._pci_cfg + 4, 1, 0xFF)
        self.config._mask(self._pci_cfg + 8, 4, 0xFFFFFFFF)
        self.config._mask(self._pci_cfg + 12, 4, 0xFFFFFFFF)
        self.config._mask(self._pci_cfg + 16, 4, 0xFFFFFFFF)
        self._mem = _DmaMemory(self)
        self._work = threading.Condition(self.lock)
        self._kicked: set[int] = set()
        self._worker: threading.Thread | None = None
        self._stopping = False
        self.requests_done = 0
        self._virtio_reset()

    def _add_cap(self, cfg_type: int, offset: int, length: int, extra: int = 0) -> int:
        size = _CAP.size + extra
        off = self.config.add_capability(PCI_CAP_ID_VNDR, size)
        self.config.set(off + 2, 1, size)
        self.config.set(off + 3, 1, cfg_type)
        self.config.set(off + 4, 1, VIRTIO_BAR if cfg_type != CfgType.PCI else 0)
        self.config.set(off + 8, 4, offset)
        self.config.set(off + 12, 4, length)
        return off

    # ---- what a virtio device implements ----

    def device_config(self) -> bytes:
        """The device-specific configuration structure (little-endian)."""
        return b""

    def write_device_config(self, offset: int, data: bytes) -> None:
        """A driver write into the device configuration; ignored by default."""

    def features_negotiated(self, features: int) -> None:
        """Called when the driver sets FEATURES_OK with ``features`` accepted."""

    def handle_request(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        """Serve one request; return the bytes written into the chain's
        writable buffers.  Runs on the worker thread with :attr:`lock` held.
        Raise :class:`VirtqueueError` (or ``OSError`` from DMA) for a request
        the device cannot make sense of: it then needs a reset."""
        raise NotImplementedError

    def process_queue(self, queue: SplitQueue) -> None:
        """Serve every available request of ``queue``, then interrupt the
        driver if it wants one.  Override for devices that answer later."""
        done = 0
        while True:
            chain = queue.pop(self._mem)
            if chain is None:
                break
            written = self.handle_request(queue, chain)
            queue.push(self._mem, chain, written)
            done += 1
        self.requests_done += done
        if done and queue.needs_interrupt(self._mem):
            self.notify_queue(queue)

    # ---- state ----

    def _virtio_reset(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()
        self._kicked.clear()

    def reset(self) -> None:
        super().reset()
        self._virtio_reset()

    @property
    def negotiated(self) -> int:
        """The features both sides agreed on (valid from FEATURES_OK on)."""
        return self.driver_features if self.status & Status.FEATURES_OK else 0

    # ---- interrupts ----

    def notify_queue(self, queue: SplitQueue) -> None:
        """Interrupt the driver for ``queue``: its MSI-X vector, else the ISR
        queue bit and INTx."""
        if self.msix_enabled():
            if queue.msix_vector != VIRTIO_MSI_NO_VECTOR:
                self.msix_notify(queue.msix_vector)
            return
        self.isr |= 1
        self.set_intx(True)

    def notify_config(self) -> None:
        """Tell the driver the configuration (or status) changed."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.msix_enabled():
            if self.config_msix_vector != VIRTIO_MSI_NO_VECTOR:
                self.msix_notify(self.config_msix_vector)
            return
        self.isr |= 2
        self.set_intx(True)

    def needs_reset(self, why: str) -> None:
        """Stop serving the queues until the driver resets the device
        (DEVICE_NEEDS_RESET, section 2.1.2)."""
        log.warning("%s: device needs reset: %s", self.name, why)
        if not self.status & Status.DEVICE_NEEDS_RESET:
            self.status |= Status.DEVICE_NEEDS_RESET
            if self.status & Status.DRIVER_OK:
                self.notify_config()

    # ---- BAR 1 (the MSI-X table; the framework serves it) and BAR 4 ----

    def _msix_bar(self, offset: int, data_or_size: bytes | int, is_write: bool) -> bytes | None:
        return None if is_write else bytes(int(data_or_size))

    def _virtio_bar(self, offset: int, data_or_size: bytes | int, is_write: bool
                    ) -> bytes | None:
        size = len(data_or_size) if isinstance(data_or_size, bytes) else data_or_size
        base = offset & ~(STRUCT_SIZE - 1)
        inner = offset - base
        if inner + size > STRUCT_SIZE:
            return None if is_write else bytes(size)  # an access across two structures
        if base == COMMON_OFFSET:
            if is_write:
                assert isinstance(data_or_size, bytes)
                self._common_write(inner, data_or_size)
                return None
            return self._common_image()[inner:inner + size].ljust(size, b"\0")
        if base == ISR_OFFSET:
            if is_write:
                return None
            value = self.isr if inner == 0 else 0
            if inner == 0:
                # Reading the ISR acknowledges it and de-asserts INTx (4.1.4.5).
                self.isr = 0
                self.set_intx(False)
            return value.to_bytes(1, "little").ljust(size, b"\0")
        if base == DEVICE_OFFSET:
            if is_write:
                assert isinstance(data_or_size, bytes)
                self.write_device_config(inner, data_or_size)
                return None
            return self.device_config()[inner:inner + size].ljust(size, b"\0")
        if base == NOTIFY_OFFSET:
            if is_write and inner % NOTIFY_MULTIPLIER == 0:
                self.kick(inner // NOTIFY_MULTIPLIER)
            return None if is_write else bytes(size)
        return None if is_write else bytes(size)

    # ---- common configuration ----

    def _selected(self) -> SplitQueue | None:
        i = self.queue_select
        return self.queues[i] if i < len(self.queues) else None

    def _field_value(self, name: str) -> int:
        q = self._selected()
        if name == "device_feature":
            sel = self.device_feature_select
            return (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if name == "driver_feature":
            sel = self.driver_feature_select
            return (self.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.status
        if name == "config_generation":
            return self.config_generation
        if name.startswith("queue_") and name != "queue_select":
            if q is None:
                return VIRTIO_MSI_NO_VECTOR if name == "queue_msix_vector" else 0
            return {
                "queue_size": q.size, "queue_msix_vector": q.msix_vector,
                "queue_enable": int(q.enabled), "queue_notify_off": q.index,
                "queue_desc": q.desc, "queue_driver": q.driver, "queue_device": q.device,
                "queue_notify_data": q.index, "queue_reset": 0,
            }[name]
        return int(getattr(self, name))

    def _common_image(self) -> bytes:
        image = bytearray(COMMON_CFG_SIZE)
        for name, (off, size, _w) in _COMMON_FIELDS.items():
            image[off:off + size] = self._field_value(name).to_bytes(size, "little")
        return bytes(image)

    def _common_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > COMMON_CFG_SIZE:
            return
        image = bytearray(self._common_image())
        image[offset:end] = data
        for name, (off, size, writable) in _COMMON_FIELDS.items():
            if writable and off < end and offset < off + size:
                self._set_field(name, int.from_bytes(image[off:off + size], "little"))

    def _vector_ok(self, vector: int) -> int:
        return vector if vector < len(self.queues) + 1 else VIRTIO_MSI_NO_VECTOR

    def _set_field(self, name: str, value: int) -> None:
        q = self._selected()
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            sel = self.driver_feature_select
            if sel < 2 and not self.status & Status.FEATURES_OK:
                mask = 0xFFFFFFFF << (32 * sel)
                self.driver_features = (self.driver_features & ~mask) | (value << (32 * sel))
        elif name == "config_msix_vector":
            self.config_msix_vector = self._vector_ok(value)
        elif name == "device_status":
            self._set_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif q is None or name == "queue_reset":
            return
        elif name == "queue_msix_vector":
            q.msix_vector = self._vector_ok(value)
        elif q.enabled:
            return  # size and addresses are fixed while the queue is enabled
        elif name == "queue_size":
            if 0 < value <= q.max_size and not value & (value - 1):
                q.size = value
        elif name == "queue_enable":
            if value == 1:
                q.event_idx = bool(self.negotiated >> VIRTIO_F_RING_EVENT_IDX & 1)
                q.enabled = True
        elif name == "queue_desc":
            q.desc = value
        elif name == "queue_driver":
            q.driver = value
        elif name == "queue_device":
            q.device = value

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.quiesce()
            self._virtio_reset()
            self.set_intx(False)
            return
        old = self.status
        if value & Status.FEATURES_OK and not old & Status.FEATURES_OK:
            unknown = self.driver_features & ~self.device_features
            if unknown or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                log.info("%s: driver features %#x refused (offered %#x)", self.name,
                         self.driver_features, self.device_features)
                value &= ~Status.FEATURES_OK
            else:
                self.features_negotiated(self.driver_features)
        # DEVICE_NEEDS_RESET is the device's bit: the driver cannot clear it.
        self.status = value | (old & Status.DEVICE_NEEDS_RESET)
        if self.status & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            self._kicked.update(q.index for q in self.queues if q.enabled)
            if self._kicked:
                self._start_worker()
                self._work.notify_all()

    # ---- notifications and the worker ----

    def kick(self, index: int) -> None:
        """The driver notified queue ``index`` (a doorbell write)."""
        if index >= len(self.queues):
            return
        with self._work:
            self._kicked.add(index)
            self._start_worker()
            self._work.notify_all()

    def _start_worker(self) -> None:
        if self._worker is None and not self._stopping:
            self._worker = threading.Thread(target=self._work_loop, daemon=True,
                                            name=f"virtio {self.name} queues")
            self._worker.start()

    def _work_loop(self) -> None:
        with self._work:
            while True:
                while not self._kicked and not self._stopping:
                    self._work.wait()
                if self._stopping:
                    return
                kicked = sorted(self._kicked)
                self._kicked.clear()
                for index in kicked:
                    self._serve_queue(self.queues[index])

    def _serve_queue(self, queue: SplitQueue) -> None:
        ready = Status.DRIVER_OK | Status.FEATURES_OK
        if self.status & ready != ready or self.status & (Status.DEVICE_NEEDS_RESET
                                                          | Status.FAILED):
            return
        if not queue.enabled or not self.connected:
            return
        try:
            self.process_queue(queue)
        except VirtqueueError as exc:
            self.needs_reset(str(exc))
        except DmaFault as exc:
            if self.connected:
                self.needs_reset(f"queue {queue.index}: DMA failed: {exc}")
        except Exception:
            log.exception("%s: queue %d failed", self.name, queue.index)
            self.needs_reset(f"queue {queue.index}: internal error")

    def close(self) -> None:
        """Stop the worker thread."""
        with self._work:
            self._stopping = True
            self._work.notify_all()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(5)

    # ---- the PCI configuration access capability (VIRTIO_PCI_CAP_PCI_CFG) ----

    def config_access(self, offset: int, data_or_size: bytes | int, is_write: bool
                      ) -> bytes | None:
        data_at = self._pci_cfg + 16
        size = len(data_or_size) if isinstance(data_or_size, bytes) else data_or_size
        touches = offset < data_at + 4 and data_at < offset + size
        if is_write:
            assert isinstance(data_or_size, bytes)
            self.config.write(offset, data_or_size)
            if touches:
                self._pci_cfg_access(True)
            return None
        if touches:
            self._pci_cfg_access(False)
        return self.config.read(offset, size)

    def _pci_cfg_access(self, is_write: bool) -> None:
        cap = self._pci_cfg
        bar = self.config.get(cap + 4, 1)
        offset = self.config.get(cap + 8, 4)
        length = self.config.get(cap + 12, 4)
        spec = self.regions.get(bar)
        if length not in (1, 2, 4) or offset % length or spec is None or spec.access is None \
                or offset + length > spec.size:
            return
        if is_write:
            spec.access(offset, self.config.read(cap + 16, length), True)
        else:
            data = spec.access(offset, length, False) or bytes(length)
            self.config.set(cap + 16, 4, int.from_bytes(data[:length], "little"))
