"""The device-model example of docs/vfio-user.md works as documented."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from vfu_raw import RawClient

from pyvfio.device import IrqAction, SharedMemory
from pyvfio.user import protocol as P

DOC = Path(__file__).resolve().parents[2] / "docs" / "vfio-user.md"


@pytest.fixture(scope="module")
def checksum_class():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
              if "class Checksum" in b]
    assert len(blocks) == 1
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    return namespace["Checksum"]


def test_checksum_device(serve, checksum_class):
    dev = checksum_class()
    c = RawClient(serve(dev))
    assert c.read32(0, 0) == 0xC0FFEE
    info = P.RegionInfoMsg.unpack(c.ok(P.Command.DEVICE_GET_REGION_INFO,
                                       P.RegionInfoMsg(2, argsz=256).pack()).payload, reply=True)
    assert info.sparse_areas == ((4096, 61440),)
    mem = SharedMemory(8192)
    mem.view[100:104] = bytes([1, 2, 3, 250])
    c.ok(P.Command.DMA_MAP, P.DmaMap(0x40000, 8192).pack(), [mem.fd])
    ev = os.eventfd(0, os.EFD_NONBLOCK)
    c.set_irqs(1, IrqAction.DATA_EVENTFD | IrqAction.ACTION_TRIGGER, 0, 1, [ev])
    c.write64(0, 0x8, 0x40000 + 100)
    c.write64(0, 0x10, 4)
    c.write64(0, 0x18, 1)
    assert c.read32(0, 0x20) == 256
    assert os.eventfd_read(ev) == 1
    c.write64(0, 0x8, 0x90000)  # not mapped: reported, not fatal
    c.write64(0, 0x18, 1)
    assert c.read32(0, 0x20) == 0xFFFFFFFF
    c.close()
    os.close(ev)
    mem.close()
    dev.scratch.close()
