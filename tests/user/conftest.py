"""Fixtures for the vfio-user server tests: a running :class:`Server` with the
edu model or a test model, and raw protocol clients (``vfu_raw.RawClient``)
that send exact bytes so these tests do not depend on the pyvfio client."""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from vfu_raw import RawClient

from pyvfio.device import SharedMemory
from pyvfio.devices.edu import EduDevice
from pyvfio.devices.model import BarKind, PciDeviceModel
from pyvfio.user.server import Server


class ScratchDevice(PciDeviceModel):
    """A test model exercising the framework: a PCIe device with PM, MSI (2
    vectors) and MSI-X (4 vectors, table in BAR2), BAR0 = 16 KiB of shared
    memory whose first page is trapped (callback) and the rest mmap-able
    (sparse), BAR2 = a 64-bit callback BAR holding the MSI-X table, and a
    device-specific region 9 with a type capability.  Migrates its BAR0
    memory and a register."""

    name = "scratch"
    migration_pre_copy = True

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1B36, device_id=0x0042, class_code=0xFF0000, revision=1,
                         intx=True, msi_vectors=2, pm=True, pcie=True)
        self.ram = SharedMemory(16384, "scratch-bar0")
        self.add_bar(0, 16384, access=self.bar0, memory=self.ram,
                     mmap_areas=[(4096, 12288)])
        self.add_bar(2, 8192, access=self.bar2, kind=BarKind.MEM64)
        self.add_msix(4, bar=2)
        self.add_region(9, 64, self.special, type=(0x8086, 7))
        self.add_ioeventfd(0, 0x40, 4, datamatch=7)   # doorbells
        self.add_ioeventfd(0, 0x44, 4)
        self.add_error_irqs()
        self.reg = 0
        self.resets = 0
        self.quiesces = 0
        self.writes: list[tuple[int, bytes]] = []

    def bar0(self, offset: int, data: bytes | int, is_write: bool) -> bytes | None:
        if is_write:
            assert isinstance(data, bytes)
            self.writes.append((offset, data))
            if offset == 0 and len(data) == 4:
                self.reg = struct.unpack("<I", data)[0]
            elif offset == 8:
                # doorbell: raise vector `value` through whatever is enabled
                self.raise_irq(int.from_bytes(data, "little"))
            elif offset == 16:
                self.set_intx(bool(int.from_bytes(data, "little")))
            self.ram.view[offset:offset + len(data)] = data
            return None
        assert isinstance(data, int)
        if offset == 0 and data == 4:
            return struct.pack("<I", self.reg)
        if offset == 0x800:
            raise OSError(5, "this register fails")
        return bytes(self.ram.view[offset:offset + data])

    def bar2(self, offset: int, data: bytes | int, is_write: bool) -> bytes | None:
        return None if is_write else b"\0" * int(data)  # type: ignore[arg-type]

    def special(self, offset: int, data: bytes | int, is_write: bool) -> bytes | None:
        return None if is_write else bytes(range(offset, offset + int(data)))  # type: ignore[arg-type]

    def reset(self) -> None:
        super().reset()
        self.reg = 0
        self.resets += 1

    def quiesce(self) -> None:
        self.quiesces += 1

    def save_state(self) -> bytes:
        return struct.pack("<I", self.reg) + bytes(self.ram.view)

    def load_state(self, data: bytes) -> None:
        if len(data) != 4 + self.ram.size:
            raise ValueError("bad scratch state")
        self.reg = struct.unpack_from("<I", data)[0]
        self.ram.view[:] = data[4:]

    def close(self) -> None:
        self.ram.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``serve(model) -> socket path``: serve models on a fresh Server."""
    server = Server()
    server.start()
    count = [0]

    def add(model: PciDeviceModel, **limits: int) -> str:
        count[0] += 1
        path = str(tmp_path / f"dev{count[0]}.sock")
        server.add(model, path, **limits)
        return path

    add.server = server  # type: ignore[attr-defined]
    yield add
    server.close()


@pytest.fixture
def edu() -> Iterator[EduDevice]:
    dev = EduDevice(dma_delay=0.005)
    yield dev
    dev.close()


@pytest.fixture
def scratch() -> Iterator[ScratchDevice]:
    dev = ScratchDevice()
    yield dev
    dev.close()


@pytest.fixture
def edu_client(serve: Callable[..., str], edu: EduDevice) -> Iterator[RawClient]:
    c = RawClient(serve(edu))
    yield c
    c.close()


@pytest.fixture
def scratch_client(serve: Callable[..., str], scratch: ScratchDevice) -> Iterator[RawClient]:
    c = RawClient(serve(scratch))
    yield c
    c.close()
