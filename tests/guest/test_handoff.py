"""Handing edu to a successor process in the middle of work, without a reset.

The predecessor opens edu, turns on MSI and bus mastering, computes a
factorial, writes the liveness register, maps two buffers, starts a
device-to-RAM DMA with an interrupt - and, without waiting for it, hands
everything to a successor and lets go of its own copies.  The successor
sees the DMA land in the handed-over memory and the interrupt arrive on the
handed-over eventfd, finds the device state a reset would have cleared
(bus master and MSI enable in config space, edu's registers) unchanged, and
runs DMA of its own through the same mappings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pyvfio.broker.handoff import send_devices
from pyvfio.drivers import edu as E
from pyvfio.kernel import open_device
from pyvfio.testing import kconfig
from pyvfio.testing.fds import fd_targets
from pyvfio.testing.topology import EDU

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = pytest.mark.guest

PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(2048))
LIVENESS = 0x12345678

_SUCCESSOR = r"""
import json, os, socket, sys, time
from pyvfio.broker.handoff import receive_devices
from pyvfio.device import IrqIndex
from pyvfio.drivers import edu as E
sock = socket.socket(fileno=int(sys.argv[1]))
(dev,), (src, dst) = receive_devices(sock)
out = {"backend": dev.backend, "reason": dev.backend_reason, "iovas": [src.iova, dst.iova]}
# State a reset (or a close and reopen) would have cleared: read before touching anything.
out["command"] = dev.config.read16(4)
# vfio virtualizes the MSI control register, so ask the kernel whether the
# host-side MSI vector still exists (vfio tears it down on close/reset).
out["msi_irqs"] = os.listdir(f"/sys/bus/pci/devices/{dev.name}/msi_irqs")
bar = dev.bar(0)
out["liveness"] = bar.read32(E.REG_LIVENESS)
out["factorial"] = bar.read32(E.REG_FACTORIAL)
# The predecessor's DMA: its interrupt comes on the handed-over eventfd and
# its data lands in the handed-over memory, through the mapping it made.
irq = dev._irqs[IrqIndex.MSI].eventfds[0]
out["irq_count"] = irq.wait(10)
out["irq_status"] = bar.read32(E.REG_IRQ_STATUS)
bar.write32(E.REG_IRQ_ACK, out["irq_status"])
out["dst_matches"] = dst.read(0, 2048) == bytes.fromhex(sys.argv[2])
# Work of its own through the same mappings, plus a fresh buffer.
edu = E.Edu(dev)
edu._irq, edu._irq_index = irq, IrqIndex.MSI
fresh = dev.dma_alloc(4096, below=E.DMA_ADDR_LIMIT)
out["fresh_iova"] = fresh.iova
fresh.write(b"successor" * 100)
edu.dma_to_device(fresh, 900, interrupt=True)
edu.dma_from_device(src, 900, interrupt=True)
out["own_dma"] = src.read(0, 900) == b"successor" * 100
out["factorial_now"] = edu.factorial(8, interrupt=True)
out["fds"] = sorted(os.readlink(f"/proc/self/fd/{n}") for n in dev.fds().values())
dev.close()
print(json.dumps(out))
"""


def vfio_fds_of_this_process() -> list[str]:
    out = []
    for entry in fd_targets():
        target = entry.split(":", 1)[1]
        if target.startswith(("/dev/vfio", "/dev/iommu")) or "vfio" in target \
                or "iommufd" in target:
            out.append(target)
    return out


@pytest.mark.parametrize("backend", ["legacy", "iommufd"])
def test_handoff_in_the_middle_of_dma_without_reset(backend: str) -> None:
    if backend == "iommufd":
        kconfig.require_feature(os.path.exists("/dev/iommu"), "CONFIG_IOMMUFD",
                                feature="iommufd, /dev/iommu")
    before = vfio_fds_of_this_process()
    with helpers.vfio_bound(EDU):
        dev = open_device(EDU, backend)
        edu = E.Edu(dev)  # enables bus mastering
        edu.enable_interrupts("msi")
        assert edu.liveness(LIVENESS) == ~LIVENESS & 0xFFFFFFFF
        assert edu.factorial(10) == 3628800
        src = dev.dma_alloc(4096, below=E.DMA_ADDR_LIMIT)
        dst = dev.dma_alloc(4096, below=E.DMA_ADDR_LIMIT)
        src.write(PATTERN)
        edu.dma_to_device(src, len(PATTERN))
        src.write(bytes(4096))  # so only the successor's own DMA can refill it
        parent, child = socket.socketpair()
        with parent, child:
            proc = subprocess.Popen([sys.executable, "-c", _SUCCESSOR, str(child.fileno()),
                                     PATTERN.hex()], pass_fds=[child.fileno()],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # Start device -> RAM DMA with an interrupt, and do not wait for it.
            bar = dev.bar(0)
            bar.write32(E.REG_DMA_SRC, E.DMA_BUFFER_ADDR)
            bar.write32(E.REG_DMA_DST, dst.iova)
            bar.write32(E.REG_DMA_COUNT, len(PATTERN))
            bar.write32(E.REG_DMA_CMD, E.DMA_START | E.DMA_TO_RAM | E.DMA_IRQ)
            send_devices(parent, [dev], [src, dst])
            # The predecessor holds nothing of the device any more.
            assert dev.closed
            assert vfio_fds_of_this_process() == before
            out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    data = json.loads(out.strip().splitlines()[-1])
    assert data["backend"] == backend and data["reason"] == "handed over by another process"
    assert data["iovas"] == [src.iova, dst.iova]
    # No reset, no close/reopen: bus master (command bit 2) and the MSI vector survive...
    assert data["command"] & 0x4, f"bus master cleared: command {data['command']:#x}"
    assert data["msi_irqs"], "the MSI vector was torn down"
    # ...and so do the device's registers.
    assert data["liveness"] == ~LIVENESS & 0xFFFFFFFF
    assert data["factorial"] == 3628800
    # The DMA started before the handoff completed into the successor's hands.
    assert data["irq_count"] >= 1 and data["irq_status"] & E.IRQ_DMA
    assert data["dst_matches"] is True
    # And the successor's own DMA works, through the inherited mappings and a new one.
    assert data["fresh_iova"] not in data["iovas"]
    assert data["own_dma"] is True
    assert data["factorial_now"] == 40320
    if backend == "legacy":
        assert "/dev/vfio/vfio" in data["fds"]
    else:
        assert "/dev/iommu" in data["fds"]
