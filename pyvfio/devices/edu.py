"""QEMU's ``edu`` teaching device, emulated in Python and served over vfio-user.

Semantics follow qemu/qemu ``hw/misc/edu.c`` (and ``docs/specs/edu.rst``)
register by register, so the edu driver that runs against QEMU's device
(through kernel VFIO) runs unchanged against this one (through vfio-user):

========  ===================================================================
``0x00``  RO identification ``0x010000ed``
``0x04``  liveness: reads back the bitwise NOT of the last value written
``0x08``  factorial: write n, read n! (u32, wrapping) once computing is done
``0x20``  status: bit 0 computing (RO), bit 7 raise IRQ 0x1 when a factorial ends
``0x24``  interrupt status (RO)
``0x60``  raise interrupt: status |= value
``0x64``  acknowledge interrupt: status &= ~value
``0x80``  DMA source address
``0x88``  DMA destination address
``0x90``  DMA count
``0x98``  DMA command: bit 0 start (reads 1 while running), bit 1 direction
          (0: RAM to device, 1: device to RAM), bit 2 raise IRQ 0x100 when done
========  ===================================================================

Below 0x80 only 4-byte accesses work, from 0x80 4 or 8 bytes; anything else
reads as all ones and writes are ignored.  The DMA buffer is 4 KiB at device
address 0x40000; RAM addresses are masked to 28 bits (``dma_mask``).  A DMA
runs ``dma_delay`` seconds (QEMU: 100 ms of virtual time) after the start
command; factorials are computed by a worker thread, as in QEMU.

Where QEMU aborts the whole VM (a DMA range outside the device buffer:
``hw_error``), this model drops the transfer and carries on: a server must not
die of a guest's mistake.  A DMA to client memory that is not mapped is
dropped too (QEMU ignores the failed ``pci_dma_*`` as well); the interrupt
still fires, as in QEMU.

PCI identity: 1234:11e8 rev 0x10, class 0x00ff (PCI_CLASS_OTHERS), subsystem
1af4:1100 (QEMU's default), INTx pin A, one 64-bit MSI vector, no MSI-X,
BAR0 1 MiB 32-bit memory.  Like QEMU's, the model has no reset handler of its
own: a device reset returns config space to power-on values and lowers INTx
but keeps the registers.
"""

from __future__ import annotations

import logging
import struct
import threading

from pyvfio.devices.model import DmaFault, PciDeviceModel

__all__ = ["EduDevice"]

log = logging.getLogger("pyvfio.devices.edu")

EDU_ID = 0x010000ED
STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
DMA_RUN = 0x1
DMA_DIR_TO_RAM = 0x2
DMA_IRQ_ENABLE = 0x4
FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100
DMA_START = 0x40000
DMA_SIZE = 4096
BAR0_SIZE = 1 << 20
_STATE = struct.Struct("=IIIIQQQQ?")
_ONES = (1 << 64) - 1
_MASKS = {4: 0xFFFFFFFF, 8: _ONES}


class EduDevice(PciDeviceModel):
    """The edu device.  ``dma_delay`` (seconds) is how long after the start
    command a DMA happens; ``fact_delay`` stretches each factorial so tests
    can watch the computing bit; ``dma_bits`` is the DMA address width."""

    name = "edu"
    migration_pre_copy = False

    def __init__(self, *, dma_delay: float = 0.1, fact_delay: float = 0.0,
                 dma_bits: int = 28) -> None:
        super().__init__(vendor_id=0x1234, device_id=0x11E8, revision=0x10,
                         class_code=0x00FF00, subsystem_vendor_id=0x1AF4,
                         subsystem_id=0x1100, intx=True, msi_vectors=1)
        self.add_bar(0, BAR0_SIZE, access=self.mmio)
        self.dma_delay = dma_delay
        self.fact_delay = fact_delay
        self.dma_mask = (1 << dma_bits) - 1
        self.addr4 = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = 0
        self.dma_dst = 0
        self.dma_cnt = 0
        self.dma_cmd = 0
        self.dma_buf = bytearray(DMA_SIZE)
        self._dma_timer: threading.Timer | None = None
        self._fact_cond = threading.Condition(self.lock)
        self._fact_thread: threading.Thread | None = None
        self._stopping = False

    # ---- BAR0 ----

    def mmio(self, offset: int, data_or_size: bytes | int, is_write: bool) -> bytes | None:
        # Below 0x80 only 4-byte accesses work, from 0x80 4 or 8 bytes; others
        # read as all ones and are ignored when written (QEMU's edu_mmio_read
        # and edu_mmio_write).
        if not is_write:  # the read first: it is the hot path of the benchmarks
            size: int = data_or_size  # type: ignore[assignment]
            if size == 4 or (size == 8 and offset >= 0x80):
                return (self._read(offset, _ONES) & _MASKS[size]).to_bytes(size, "little")
            return b"\xff" * size
        data: bytes = data_or_size  # type: ignore[assignment]
        size = len(data)
        if size == 4 or (size == 8 and offset >= 0x80):
            self._write(offset, int.from_bytes(data, "little"))
        return None

    def _read(self, offset: int, default: int) -> int:
        if offset == 0x00:
            return EDU_ID
        if offset == 0x04:
            return self.addr4
        if offset == 0x08:
            return self.fact
        if offset == 0x20:
            return self.status
        if offset == 0x24:
            return self.irq_status
        if offset == 0x80:
            return self.dma_src
        if offset == 0x88:
            return self.dma_dst
        if offset == 0x90:
            return self.dma_cnt
        if offset == 0x98:
            return self.dma_cmd
        return default

    def _write(self, offset: int, val: int) -> None:
        if offset == 0x04:
            self.addr4 = ~val & 0xFFFFFFFF
        elif offset == 0x08:
            if self.status & STATUS_COMPUTING:
                return
            self.fact = val & 0xFFFFFFFF
            self.status |= STATUS_COMPUTING
            self._start_fact_thread()
            self._fact_cond.notify_all()
        elif offset == 0x20:
            if val & STATUS_IRQFACT:
                self.status |= STATUS_IRQFACT
            else:
                self.status &= ~STATUS_IRQFACT
        elif offset == 0x60:
            self.edu_raise_irq(val & 0xFFFFFFFF)
        elif offset == 0x64:
            self.edu_lower_irq(val & 0xFFFFFFFF)
        elif offset in (0x80, 0x88, 0x90):
            if self.dma_cmd & DMA_RUN:
                return
            if offset == 0x80:
                self.dma_src = val
            elif offset == 0x88:
                self.dma_dst = val
            else:
                self.dma_cnt = val
        elif offset == 0x98:
            if not val & DMA_RUN or self.dma_cmd & DMA_RUN:
                return
            self.dma_cmd = val
            self._arm_dma_timer()

    # ---- interrupts (edu_raise_irq / edu_lower_irq) ----

    def edu_raise_irq(self, val: int) -> None:
        self.irq_status |= val
        if self.irq_status:
            if self.msi_enabled():
                self.msi_notify(0)
            else:
                self.set_intx(True)

    def edu_lower_irq(self, val: int) -> None:
        self.irq_status &= ~val
        if not self.irq_status and not self.msi_enabled():
            self.set_intx(False)

    # ---- factorial worker (edu_fact_thread) ----

    def _start_fact_thread(self) -> None:
        if self._fact_thread is None:
            self._fact_thread = threading.Thread(target=self._fact_worker, name="edu factorial",
                                                 daemon=True)
            self._fact_thread.start()

    def _fact_worker(self) -> None:
        with self._fact_cond:
            while True:
                while not self.status & STATUS_COMPUTING and not self._stopping:
                    self._fact_cond.wait()
                if self._stopping:
                    return
                n = self.fact
                if self.fact_delay:
                    self._fact_cond.wait(self.fact_delay)
                ret = 1
                while n > 0:
                    ret = (ret * n) & 0xFFFFFFFF
                    n -= 1
                self.fact = ret
                self.status &= ~STATUS_COMPUTING
                if self.status & STATUS_IRQFACT:
                    self.edu_raise_irq(FACT_IRQ)

    # ---- DMA engine (edu_dma_timer) ----

    def _arm_dma_timer(self) -> None:
        if self._dma_timer is not None:
            self._dma_timer.cancel()
        self._dma_timer = threading.Timer(self.dma_delay, self._dma_fire)
        self._dma_timer.daemon = True
        self._dma_timer.start()

    def _dma_fire(self) -> None:
        with self.lock:
            self._dma_timer = None
            self.run_dma()

    def run_dma(self) -> None:
        """Do the programmed transfer now (what QEMU's timer callback does)."""
        if not self.dma_cmd & DMA_RUN:
            return
        cnt = self.dma_cnt
        try:
            if not self.dma_cmd & DMA_DIR_TO_RAM:
                dst = self.dma_dst
                if self._in_buffer(dst, cnt):
                    off = dst - DMA_START
                    self.dma_read_into(self.dma_dst_clamp(self.dma_src),
                                       memoryview(self.dma_buf)[off:off + cnt])
            else:
                src = self.dma_src
                if self._in_buffer(src, cnt):
                    off = src - DMA_START
                    self.dma_write(self.dma_dst_clamp(self.dma_dst),
                                   memoryview(self.dma_buf)[off:off + cnt])
        except DmaFault as exc:
            log.debug("edu: DMA failed: %s", exc)
        self.dma_cmd &= ~DMA_RUN
        if self.dma_cmd & DMA_IRQ_ENABLE:
            self.edu_raise_irq(DMA_IRQ)

    def _in_buffer(self, addr: int, cnt: int) -> bool:
        end = addr + cnt
        ok = DMA_START <= addr < DMA_START + DMA_SIZE and addr < end <= DMA_START + DMA_SIZE
        if not ok:
            log.warning("edu: DMA range %#x-%#x out of bounds (%#x-%#x); transfer dropped",
                        addr, end, DMA_START, DMA_START + DMA_SIZE)
        return ok

    def dma_dst_clamp(self, addr: int) -> int:
        """``edu_clamp_addr``: keep the low ``dma_bits`` bits of a RAM address."""
        return addr & self.dma_mask

    # ---- lifecycle ----

    def reset(self) -> None:
        # QEMU's edu has no reset handler: only config space and INTx reset.
        super().reset()

    def close(self) -> None:
        """Stop the worker thread and any pending DMA timer."""
        with self.lock:
            self._stopping = True
            self._fact_cond.notify_all()
            if self._dma_timer is not None:
                self._dma_timer.cancel()
                self._dma_timer = None

    # ---- migration ----

    def save_state(self) -> bytes:
        return _STATE.pack(self.addr4, self.fact, self.status, self.irq_status, self.dma_src,
                           self.dma_dst, self.dma_cnt, self.dma_cmd,
                           self.intx_level) + bytes(self.dma_buf)

    def load_state(self, data: bytes) -> None:
        if len(data) != _STATE.size + DMA_SIZE:
            raise ValueError(f"edu state is {_STATE.size + DMA_SIZE} bytes, got {len(data)}")
        (self.addr4, self.fact, self.status, self.irq_status, self.dma_src, self.dma_dst,
         self.dma_cnt, self.dma_cmd, level) = _STATE.unpack_from(data)
        self.dma_buf[:] = data[_STATE.size:]
        self._intx_level = level
        if self.status & STATUS_COMPUTING:
            self._start_fact_thread()
            self._fact_cond.notify_all()
        if self.dma_cmd & DMA_RUN:
            self._arm_dma_timer()

    def migration_state_changed(self, old: str, new: str) -> None:
        # A stopped device does not run its DMA engine: hold the timer while
        # stopped and re-arm it when running again.
        if new in ("STOP", "STOP_COPY", "RESUMING") and self._dma_timer is not None:
            self._dma_timer.cancel()
            self._dma_timer = None
        elif new == "RUNNING" and self.dma_cmd & DMA_RUN and self._dma_timer is None:
            self._arm_dma_timer()
