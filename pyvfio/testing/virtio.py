"""A minimal virtio-pci driver over pyvfio's Device API, for tests and
benchmarks: written from the VIRTIO 1.x spec (3.1 device initialization, 2.7
split virtqueues, 4.1 PCI), it finds the transport through the vendor
capabilities in config space (not through a model's constants), negotiates,
sets up split queues in DMA memory and submits chains.  It drives a virtio
device served over vfio-user (``pyvfio.devices.virtio``) or, through kernel
VFIO, a real one.  The real-driver proof is a guest's Linux
(``tests/vmm/test_virtio_guest.py``); this one lets the host tests reach every
corner in-process.

Offsets are those of ``struct virtio_pci_common_cfg`` (Linux
``include/uapi/linux/virtio_pci.h``)."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from pyvfio.device import Device, DmaBuffer, EventFd, IrqIndex

__all__ = ["Queue", "VirtioDriver", "eventfd_count"]

STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8
STATUS_NEEDS_RESET = 64
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4


@dataclass
class Queue:
    """One split queue the driver set up: descriptor table, avail and used
    rings in one DMA buffer."""

    index: int
    size: int
    ring: DmaBuffer  # descriptors, then avail, then used (page aligned)
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    last_used: int = 0

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        off = self.desc - self.ring.iova + 16 * i
        self.ring.view[off:off + 16] = struct.pack("<QIHH", addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        base = self.avail - self.ring.iova
        slot = self.avail_idx % self.size
        self.ring.view[base + 4 + 2 * slot:base + 6 + 2 * slot] = struct.pack("<H", head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ring.view[base + 2:base + 4] = struct.pack("<H", self.avail_idx)

    def used_idx(self) -> int:
        base = self.used - self.ring.iova
        return int(struct.unpack_from("<H", self.ring.view, base + 2)[0])

    def take_used(self) -> list[tuple[int, int]]:
        base = self.used - self.ring.iova
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            out.append(struct.unpack_from("<II", self.ring.view, base + 4 + 8 * slot))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class VirtioDriver:
    """Drive the virtio-pci device ``dev`` (any pyvfio Device)."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        cfg = dev.config
        self.caps: dict[int, tuple[int, int, int, int]] = {}  # type -> (bar, offset, length, pos)
        self.notify_mult = 0
        for cap in cfg.capabilities():
            if cap.id != 0x09:
                continue
            cfg_type = cfg.read8(cap.offset + 3)
            bar = cfg.read8(cap.offset + 4)
            off = cfg.read32(cap.offset + 8)
            length = cfg.read32(cap.offset + 12)
            self.caps.setdefault(cfg_type, (bar, off, length, cap.offset))
            if cfg_type == 2:
                self.notify_mult = cfg.read32(cap.offset + 16)
        cfg.enable_bus_master()
        bar, off, _l, _p = self.caps[1]
        self.common_bar = dev.bar(bar)
        self.common = off
        self.queues: dict[int, Queue] = {}

    # common config helpers
    def c_read(self, field_off: int, width: int) -> int:
        return self.common_bar.read_int(self.common + field_off, width)

    def c_write(self, field_off: int, width: int, value: int) -> None:
        self.common_bar.write_int(self.common + field_off, width, value)

    @property
    def status(self) -> int:
        return self.c_read(0x14, 1)

    def device_features(self) -> int:
        self.c_write(0x00, 4, 0)
        lo = self.c_read(0x04, 4)
        self.c_write(0x00, 4, 1)
        return lo | self.c_read(0x04, 4) << 32

    def reset(self) -> None:
        self.c_write(0x14, 1, 0)
        assert self.status == 0

    def negotiate(self, accept: int | None = None) -> int:
        """Reset, ACK, DRIVER, features (all offered unless ``accept``),
        FEATURES_OK; return the status read back."""
        self.reset()
        self.c_write(0x14, 1, STATUS_ACK)
        self.c_write(0x14, 1, STATUS_ACK | STATUS_DRIVER)
        feats = self.device_features() if accept is None else accept
        self.c_write(0x08, 4, 0)
        self.c_write(0x0C, 4, feats & 0xFFFFFFFF)
        self.c_write(0x08, 4, 1)
        self.c_write(0x0C, 4, feats >> 32)
        self.c_write(0x14, 1, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK)
        return self.status

    def setup_queue(self, index: int, size: int | None = None, msix_vector: int = 0xFFFF
                    ) -> Queue:
        self.c_write(0x16, 2, index)
        max_size = self.c_read(0x18, 2)
        size = size or max_size
        self.c_write(0x18, 2, size)
        ring = self.dev.dma_alloc(3 * 4096 + 16 * size + 8 * size)
        desc = ring.iova
        avail = desc + ((16 * size + 4095) & ~4095)
        used = avail + ((6 + 2 * size + 4095) & ~4095)
        self.c_write(0x20, 8, desc)
        self.c_write(0x28, 8, avail)
        self.c_write(0x30, 8, used)
        self.c_write(0x1A, 2, msix_vector)
        self.c_write(0x1C, 2, 1)
        q = Queue(index, size, ring, desc, avail, used)
        self.queues[index] = q
        return q

    def driver_ok(self) -> None:
        self.c_write(0x14, 1, self.status | STATUS_DRIVER_OK)

    def notify(self, index: int) -> None:
        bar, off, _l, _p = self.caps[2]
        self.c_write(0x16, 2, index)
        notify_off = self.c_read(0x1E, 2)
        self.dev.bar(bar).write16(off + notify_off * self.notify_mult, index)

    def wait_used(self, q: Queue, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += q.take_used()
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {q.index}: {len(got)} of {count} used")
            time.sleep(0.002)
        return got

    def read_isr(self) -> int:
        bar, off, _l, _p = self.caps[3]
        return self.dev.bar(bar).read8(off)

    def device_cfg(self, offset: int, width: int) -> int:
        bar, off, _l, _p = self.caps[4]
        return self.dev.bar(bar).read_int(off + offset, width)

    def enable_msix(self) -> list[EventFd]:
        return self.dev.enable_irq(IrqIndex.MSIX, self.dev.irq_info(IrqIndex.MSIX).count)


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
