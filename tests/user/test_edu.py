"""The edu model, driven through raw vfio-user messages (hw/misc/edu.c semantics)."""

from __future__ import annotations

import math
import os
import struct

import pytest
from vfu_raw import RawClient, wait_until

from pyvfio.device import IrqAction as A
from pyvfio.device import SharedMemory
from pyvfio.devices.edu import EduDevice
from pyvfio.pci.config import CapId, ConfigSpace
from pyvfio.user import protocol as P


def test_identity_and_config_space(edu_client):
    c = edu_client
    cfg = ConfigSpace(lambda o, n: c.read(7, o, n), size=256)
    hdr = c.read(7, 0, 0x40)
    vendor, device, _cmd, _status, rev = struct.unpack_from("<HHHHB", hdr)
    assert (vendor, device, rev) == (0x1234, 0x11E8, 0x10)
    assert int.from_bytes(hdr[9:12], "little") == 0x00FF00
    assert struct.unpack_from("<HH", hdr, 0x2C) == (0x1AF4, 0x1100)
    assert hdr[0x3D] == 1  # INTA
    assert [cap.id for cap in cfg.capabilities()] == [CapId.MSI]
    c.write32(7, 0x10, 0xFFFFFFFF)
    assert c.read32(7, 0x10) == 0xFFF00000  # BAR0: 1 MiB, 32-bit memory


def test_id_and_liveness(edu_client):
    assert edu_client.read32(0, 0) == 0x010000ED
    edu_client.write32(0, 4, 0x12345678)
    assert edu_client.read32(0, 4) == 0xEDCBA987


def test_access_widths(edu_client):
    c = edu_client
    assert c.read(0, 0, 2) == b"\xff\xff"         # below 0x80 only 4 bytes
    assert c.read(0, 0, 8) == b"\xff" * 8
    c.write(0, 4, b"\1\2")                        # ignored
    assert c.read32(0, 4) == 0                    # power-on value, untouched
    c.write64(0, 0x80, 0x1122334455667788)        # 8 bytes from 0x80
    assert c.read(0, 0x80, 8) == struct.pack("<Q", 0x1122334455667788)
    assert c.read32(0, 0x80) == 0x55667788
    assert c.read(0, 0x80, 2) == b"\xff\xff"
    assert c.read32(0, 0x200) == 0xFFFFFFFF       # no register


@pytest.mark.parametrize("n", [0, 1, 5, 12, 13, 20])
def test_factorial(edu_client, n):
    edu_client.write32(0, 8, n)
    assert wait_until(lambda: edu_client.read32(0, 0x20) & 1 == 0)
    assert edu_client.read32(0, 8) == math.factorial(n) & 0xFFFFFFFF


def test_computing_bit_and_fact_irq(serve):
    dev = EduDevice(fact_delay=0.2)
    c = RawClient(serve(dev))
    ev = os.eventfd(0, os.EFD_NONBLOCK)
    c.set_irqs(0, A.DATA_EVENTFD | A.ACTION_TRIGGER, 0, 1, [ev])
    c.write32(0, 0x20, 0x80)
    c.write32(0, 8, 6)
    assert c.read32(0, 0x20) & 1  # computing
    c.write32(0, 8, 3)            # ignored while computing
    assert wait_until(lambda: c.read32(0, 0x20) & 1 == 0)
    assert c.read32(0, 8) == 720
    assert c.read32(0, 0x24) == 1
    assert os.eventfd_read(ev) == 1
    c.close()
    os.close(ev)
    dev.close()


def test_raise_and_ack_with_intx(edu_client):
    c = edu_client
    ev = os.eventfd(0, os.EFD_NONBLOCK)
    c.set_irqs(0, A.DATA_EVENTFD | A.ACTION_TRIGGER, 0, 1, [ev])
    c.write32(0, 0x60, 0x40)
    assert c.read32(0, 0x24) == 0x40 and os.eventfd_read(ev) == 1
    c.write32(0, 0x60, 0x1)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(ev)  # automasked until unmask
    c.set_irqs(0, A.DATA_NONE | A.ACTION_UNMASK, 0, 1)
    assert os.eventfd_read(ev) == 1  # line still up: fires again
    c.write32(0, 0x64, 0x41)
    assert c.read32(0, 0x24) == 0
    assert not c.read(7, 6, 1)[0] & 0x8  # INTx status bit low
    c.set_irqs(0, A.DATA_NONE | A.ACTION_UNMASK, 0, 1)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(ev)
    os.close(ev)


def test_raise_with_msi(edu_client):
    c = edu_client
    ev = os.eventfd(0, os.EFD_NONBLOCK)
    c.set_irqs(1, A.DATA_EVENTFD | A.ACTION_TRIGGER, 0, 1, [ev])
    for _ in range(3):
        c.write32(0, 0x60, 0x2)
    assert os.eventfd_read(ev) == 3  # MSI is an edge per raise
    c.write32(0, 0x64, 0x2)
    os.close(ev)


def test_dma_both_directions_with_irq(edu_client, edu):
    c = edu_client
    mem = SharedMemory(8192)
    c.ok(P.Command.DMA_MAP, P.DmaMap(0x200000, 8192).pack(), [mem.fd])
    ev = os.eventfd(0, os.EFD_NONBLOCK)
    c.set_irqs(1, A.DATA_EVENTFD | A.ACTION_TRIGGER, 0, 1, [ev])
    mem.view[0:4096] = os.urandom(4096)
    for reg, val in ((0x80, 0x200000), (0x88, 0x40000), (0x90, 4096), (0x98, 1 | 4)):
        c.write64(0, reg, val)
    assert c.read32(0, 0x98) & 1  # running
    c.write64(0, 0x90, 1)          # ignored while running
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    assert c.read32(0, 0x24) == 0x100 and os.eventfd_read(ev) == 1
    c.write32(0, 0x64, 0x100)
    # back to RAM at another address, through the 28-bit mask
    for reg, val in ((0x80, 0x40000), (0x88, 0xF0201000), (0x90, 4096), (0x98, 1 | 2)):
        c.write64(0, reg, val)
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    assert bytes(mem.view[4096:8192]) == bytes(mem.view[0:4096])
    os.close(ev)
    mem.close()


def test_dma_outside_the_buffer_or_unmapped_does_not_kill_the_server(edu_client):
    c = edu_client
    for reg, val in ((0x80, 0x900000), (0x88, 0x40F00), (0x90, 0x200), (0x98, 1)):
        c.write64(0, reg, val)  # past the end of the 4 KiB buffer
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    for reg, val in ((0x80, 0x900000), (0x88, 0x40000), (0x90, 16), (0x98, 1 | 4)):
        c.write64(0, reg, val)  # unmapped RAM
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    assert c.read32(0, 0x24) == 0x100
    assert c.read32(0, 0) == 0x010000ED


def test_reset_keeps_registers_like_qemu(edu_client):
    c = edu_client
    c.write32(0, 4, 1)
    c.write(7, 4, b"\x06\x00")
    c.ok(P.Command.DEVICE_RESET)
    assert c.read32(0, 4) == 0xFFFFFFFE
    assert c.read(7, 4, 2) == b"\0\0"
