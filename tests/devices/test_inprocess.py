"""Device models below the transport: a model runs in-process, without a
socket, against an in-memory DMA and a recorder of interrupts
(pyvfio.devices.inprocess), through the same protocols the vfio-user server
implements (pyvfio.devices.transport)."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pyvfio.device import IrqIndex, RegionIndex
from pyvfio.devices.edu import DMA_START, EDU_ID, EduDevice
from pyvfio.devices.inprocess import InProcessTransport, MemoryDma
from pyvfio.devices.transport import DmaFault

RAM = 0x10000
DMA_SRC, DMA_DST, DMA_CNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
IRQ_STATUS, IRQ_ACK = 0x24, 0x64
RUN, TO_RAM, IRQ = 0x1, 0x2, 0x4


@pytest.fixture
def edu() -> Iterator[EduDevice]:
    dev = EduDevice(dma_delay=0.0)
    yield dev
    dev.close()


def w64(t: InProcessTransport, offset: int, value: int) -> None:
    t.region_write(0, offset, value.to_bytes(8, "little"))


def r32(t: InProcessTransport, offset: int) -> int:
    return int.from_bytes(t.region_read(0, offset, 4), "little")


def dma(t: InProcessTransport, src: int, dst: int, count: int, cmd: int) -> None:
    w64(t, DMA_SRC, src)
    w64(t, DMA_DST, dst)
    w64(t, DMA_CNT, count)
    w64(t, DMA_CMD, cmd)
    deadline = time.monotonic() + 5
    while int.from_bytes(t.region_read(0, DMA_CMD, 8), "little") & RUN:
        assert time.monotonic() < deadline, "edu DMA did not finish"
        time.sleep(0.001)


def test_edu_dma_round_trip_through_memory(edu: EduDevice) -> None:
    t = InProcessTransport.attach(edu)
    assert r32(t, 0x00) == EDU_ID
    ram = t.dma.map(RAM, 0x2000)
    ram[:256] = bytes(range(256))
    dma(t, RAM, DMA_START, 256, RUN)                        # RAM -> device buffer
    assert bytes(edu.dma_buf[:256]) == bytes(range(256))
    dma(t, DMA_START, RAM + 0x1000, 256, RUN | TO_RAM)      # device buffer -> RAM
    assert bytes(ram[0x1000:0x1100]) == bytes(range(256))
    assert t.dma.writes == [(RAM + 0x1000, 256)]
    assert t.irqs.fired == []                               # no IRQ asked for


def test_edu_dma_interrupt_goes_where_the_client_routed_it(edu: EduDevice) -> None:
    t = InProcessTransport.attach(edu)
    t.dma.map(RAM, 0x1000)
    dma(t, RAM, DMA_START, 8, RUN | IRQ)
    assert t.irqs.fired == [(IrqIndex.INTX, 0)] and r32(t, IRQ_STATUS) == 0x100
    assert edu.intx_level
    t.region_write(0, IRQ_ACK, (0x100).to_bytes(4, "little"))
    assert not edu.intx_level and r32(t, IRQ_STATUS) == 0
    t.irqs.routed.add(IrqIndex.MSI)                         # the client enabled MSI
    t.region_write(RegionIndex.CONFIG, 0x04, (0x0006).to_bytes(2, "little"))
    dma(t, RAM, DMA_START, 8, RUN | IRQ)
    assert t.irqs.fired[-1] == (IrqIndex.MSI, 0)


def test_edu_dma_outside_client_memory_is_dropped_not_fatal(edu: EduDevice) -> None:
    t = InProcessTransport.attach(edu)
    ram = t.dma.map(RAM, 0x1000)
    edu.dma_buf[:4] = b"\xaa\xbb\xcc\xdd"
    dma(t, DMA_START, RAM + 0xFFE, 4, RUN | TO_RAM | IRQ)   # straddles the window's end
    assert ram[0xFFE:] == b"\0\0" and t.dma.writes == []
    assert t.irqs.fired == [(IrqIndex.INTX, 0)]             # QEMU raises it anyway
    ro = t.dma.map(0x20000, 0x1000, writable=False)
    with pytest.raises(DmaFault) as exc:
        edu.dma_write(0x20000, b"x")
    assert exc.value.errno == errno.EACCES and ro[0] == 0


def test_memory_dma_faults_touch_nothing() -> None:
    mem = MemoryDma()
    win = mem.map(0x1000, 0x100)
    with pytest.raises(DmaFault) as exc:
        mem.write(0x10F0, b"x" * 0x20)
    assert exc.value.errno == errno.EFAULT and bytes(win) == bytes(0x100)
    with pytest.raises(DmaFault):
        mem.read(0x0FFF, 2)
    mem.write(0x1010, b"ok")
    assert mem.read(0x1010, 2) == b"ok" and bytes(mem.view(0x1010, 2)) == b"ok"


def test_a_model_without_a_client_has_no_dma(edu: EduDevice) -> None:
    with pytest.raises(DmaFault) as exc:
        edu.dma_read(RAM, 4)
    assert exc.value.errno == errno.ENOTCONN and not edu.connected
    t = InProcessTransport.attach(edu)
    assert edu.connected
    t.detach()
    assert not edu.connected
    assert edu.raise_irq() is True and t.irqs.fired == []  # INTx asserted, nobody to tell


def test_models_import_nothing_of_the_vfio_user_package() -> None:
    code = ("import sys, pyvfio.devices.edu, pyvfio.devices.inprocess; "
            "print(sorted(m for m in sys.modules if m.startswith('pyvfio.user')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
