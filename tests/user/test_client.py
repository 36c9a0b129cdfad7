"""The vfio-user client against the real pyvfio server.

A test device model (``Probe``) is served in-process by
:class:`pyvfio.user.server.Server`; the client talks to it over a real UNIX
socket, so every Device API call goes through the real codec, framing, fd
passing and server.  The model records what reached it (exact access widths,
resets, DMA) so that the tests can check both ends.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvfio.device import (
    DeviceFlag,
    IrqAction,
    IrqFlag,
    IrqIndex,
    RegionFlag,
    RegionIndex,
    SharedMemory,
    SparseArea,
)
from pyvfio.errors import ConnectionClosed, PeerError, UsageError
from pyvfio.user import protocol as P
from pyvfio.user.client import VfioUserDevice, connect
from pyvfio.user.protocol import Command

server_mod = pytest.importorskip("pyvfio.user.server", reason="the vfio-user server is not in yet")
model_mod = pytest.importorskip("pyvfio.devices.model", reason="the device framework is not in yet")
Server = server_mod.Server
PciDeviceModel = model_mod.PciDeviceModel

# BAR0 registers of the probe device
SCRATCH = 0x00       # 8 bytes of plain storage
IRQ_FIRE = 0x100     # write v: raise_irq(v)
DMA_SRC = 0x200      # DMA: read COUNT bytes at SRC, write them reversed at DST
DMA_DST = 0x208
DMA_COUNT = 0x210
DMA_GO = 0x218       # write 1: now (inside the write); 2: from a timer thread, 50 ms later
DMA_DONE = 0x220     # reads 1 once the last DMA finished (0xdead on a fault)
FAIL = 0x300         # any access fails with EACCES
HANG_UP = 0x400      # a read makes the server drop the connection
DOORBELL = 0x600     # offered as an ioeventfd (DEVICE_GET_REGION_IO_FDS)

BAR2_SIZE = 0x10000
BAR2_AREAS = ((0x1000, 0x2000), (0x8000, 0x1000))


class Probe(PciDeviceModel):
    name = "probe"

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1234, device_id=0xBEEF, class_code=0xFF0000, revision=7,
                         subsystem_vendor_id=0x1AF4, subsystem_id=0x1100, intx=True,
                         msi_vectors=2, pm=True, pcie=True)
        self.regs = bytearray(0x1000)
        self.accesses: list[tuple[int, int, bool]] = []
        self.resets = 0
        self.bar2 = SharedMemory(BAR2_SIZE, "probe-bar2")
        self.add_bar(0, 0x1000, access=self._bar0)
        self.add_bar(2, BAR2_SIZE, memory=self.bar2, mmap_areas=BAR2_AREAS)
        self.add_bar(4, 0x2000, access=lambda o, d, w: None if w else bytes(d))  # type: ignore[arg-type]
        self.add_msix(4, bar=4)
        self.add_ioeventfd(0, DOORBELL, 4)
        # region 9 reads back offset + size in each access (a recognisable value)
        self.add_region(9, 0x100, lambda o, d, w: None if w else (o + d).to_bytes(d, "little"),  # type: ignore[operator]
                        type=(0x8086, 3))
        self.hang_up: Callable[[], None] = lambda: None

    def _bar0(self, offset: int, data: bytes | int, is_write: bool) -> bytes | None:
        size = len(data) if isinstance(data, bytes) else data
        self.accesses.append((offset, size, is_write))
        if FAIL <= offset < FAIL + 8:
            raise OSError(errno.EACCES, "probe: this register refuses")
        if offset == HANG_UP and not is_write:
            self.hang_up()
            return bytes(size)
        if not is_write:
            return bytes(self.regs[offset:offset + size])
        assert isinstance(data, bytes)
        self.regs[offset:offset + size] = data
        if offset == IRQ_FIRE:
            self.raise_irq(int.from_bytes(data, "little"))
        elif offset == DMA_GO:
            go = int.from_bytes(data, "little")
            if go == 1:
                self._run_dma()
            elif go == 2:
                threading.Timer(0.05, self._dma_from_timer).start()
        return None

    def _reg(self, offset: int) -> int:
        return int.from_bytes(self.regs[offset:offset + 8], "little")

    def _run_dma(self) -> None:
        self.regs[DMA_DONE:DMA_DONE + 8] = bytes(8)
        try:
            data = self.dma_read(self._reg(DMA_SRC), self._reg(DMA_COUNT))
            self.dma_write(self._reg(DMA_DST), data[::-1])
            done = 1
        except OSError:
            done = 0xDEAD
        self.regs[DMA_DONE:DMA_DONE + 8] = done.to_bytes(8, "little")

    def _dma_from_timer(self) -> None:
        with self.lock:
            self._run_dma()

    def reset(self) -> None:
        super().reset()
        self.resets += 1
        self.regs[:] = bytes(len(self.regs))

    def save_state(self) -> bytes:
        return bytes(self.regs)

    def load_state(self, data: bytes) -> None:
        if len(data) != len(self.regs):
            raise ValueError("probe state has the wrong size")
        self.regs[:] = data


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., tuple[Probe, str]]]:
    server = Server()
    n = [0]

    def add(**limits: int) -> tuple[Probe, str]:
        probe = Probe()
        path = str(tmp_path / f"probe{n[0]}.sock")
        n[0] += 1
        server.add(probe, path, **limits)
        return probe, path

    server.start()
    yield add
    server.close()


@pytest.fixture
def probe(served: Callable[..., tuple[Probe, str]]) -> Iterator[tuple[Probe, VfioUserDevice]]:
    model, path = served()
    dev = connect(path, timeout=10)
    yield model, dev
    dev.close()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


# --- identity, regions, IRQ info --------------------------------------------------------------


def test_negotiated_capabilities(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    assert dev.backend == "vfio-user"
    assert dev.version[0] == 0
    assert dev.capabilities.max_msg_fds >= 1
    assert dev.capabilities.max_data_xfer_size >= 4096
    assert dev.connected


def test_device_info_and_describe(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    info = dev.info
    assert info.flags & DeviceFlag.PCI and info.flags & DeviceFlag.RESET
    assert info.num_regions == 10
    assert info.num_irqs == 5
    out = dev.describe()
    assert out["backend"] == "vfio-user"
    assert out["ids"] == {"vendor": "1234", "device": "beef", "subsystem_vendor": "1af4",
                          "subsystem_device": "1100", "class": "ff0000", "revision": "07"}
    assert len(out["regions"]) == 10 and len(out["irqs"]) == 5


def test_region_infos(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    bar0 = dev.region_info(0)
    assert bar0.size == 0x1000 and bar0.readable and bar0.writable and not bar0.mmappable
    bar2 = dev.region_info(2)
    assert bar2.size == BAR2_SIZE and bar2.mmappable
    assert bar2.flags & RegionFlag.MMAP
    assert bar2.mmap_areas == tuple(SparseArea(o, s) for o, s in BAR2_AREAS)
    assert dev.region_info(1).size == 0
    assert dev.region_info(RegionIndex.CONFIG).size == 4096
    assert bar2.caps == (1,)  # VFIO_REGION_INFO_CAP_SPARSE_MMAP
    assert dev.region_info(9).type == (0x8086, 3)
    assert dev.region_info(9).caps == (2,)  # VFIO_REGION_INFO_CAP_TYPE
    assert bar0.caps == ()
    with pytest.raises(UsageError):
        dev.region(10)


def test_irq_infos(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    intx, msi, msix, err, req = dev.irqs()
    assert intx.count == 1 and intx.flags & IrqFlag.AUTOMASKED and intx.flags & IrqFlag.EVENTFD
    assert msi.count == 2 and msix.count == 4
    assert err.count == 0 and req.count == 0


def test_config_space_capabilities(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    cfg = dev.config
    assert (cfg.vendor_id, cfg.device_id) == (0x1234, 0xBEEF)
    caps = {c.id for c in cfg.capabilities()}
    assert {0x01, 0x05, 0x10, 0x11} <= caps  # PM, MSI, PCIe, MSI-X


# --- region access -----------------------------------------------------------------------------


def test_exact_access_widths(probe: tuple[Probe, VfioUserDevice]) -> None:
    model, dev = probe
    bar = dev.bar(0)
    bar.write64(SCRATCH, 0x1122334455667788)
    assert bar.read64(SCRATCH) == 0x1122334455667788
    assert bar.read32(SCRATCH + 4) == 0x11223344
    assert bar.read16(SCRATCH + 2) == 0x5566
    assert bar.read8(SCRATCH + 1) == 0x77
    bar.write8(SCRATCH, 0xAA)
    bar.write16(SCRATCH + 2, 0xBBCC)
    bar.write32(SCRATCH + 4, 0xDDEEFF00)
    assert bar.read64(SCRATCH) == 0xDDEEFF00BBCC77AA
    assert model.accesses == [(0, 8, True), (0, 8, False), (4, 4, False), (2, 2, False),
                              (1, 1, False), (0, 1, True), (2, 2, True), (4, 4, True),
                              (0, 8, False)]


def test_transfers_split_at_the_servers_limit(served: Any) -> None:
    model, path = served(max_data_xfer_size=4096)
    with connect(path) as dev:
        assert dev.capabilities.max_data_xfer_size == 4096
        pattern = os.urandom(BAR2_SIZE)
        dev.bar(2).write(0, pattern)  # 16 REGION_WRITEs of 4 KiB
        assert bytes(model.bar2.view[:BAR2_SIZE]) == pattern
        assert dev.bar(2).read(0x123, 0x9000) == pattern[0x123:0x9123]


def test_mmap_of_sparse_areas(probe: tuple[Probe, VfioUserDevice]) -> None:
    model, dev = probe
    bar2 = dev.bar(2)
    with bar2.mmap(0x1000) as m:
        assert m.size == 0x2000
        m.write32(0x10, 0xFEEDF00D)
        m.write64(0x1ff8, 0x0123456789ABCDEF)
        assert model.bar2.view[0x1010:0x1014] == (0xFEEDF00D).to_bytes(4, "little")
        assert bar2.read32(0x1010) == 0xFEEDF00D  # the message path sees the same memory
        model.bar2.view[0x1020:0x1024] = b"\x01\x02\x03\x04"
        assert m.read32(0x20) == 0x04030201
    with bar2.mmap(0x8000) as m:
        assert m.size == 0x1000
    with pytest.raises(UsageError):
        bar2.mmap(0x4000)  # between the areas
    with pytest.raises(UsageError):
        bar2.mmap(0x1000, 0x3000)  # runs past the area
    with pytest.raises(UsageError):
        dev.bar(0).mmap()  # not mappable


def test_device_specific_region(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    assert dev.region(9).read32(0x10) == 0x14
    assert dev.region(9).read8(0x20) == 0x21


def test_out_of_range_access_is_refused_locally(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    with pytest.raises(UsageError):
        dev.bar(0).read32(0x1000)
    with pytest.raises(UsageError):
        dev.bar(1).read32(0)  # empty BAR


def test_write_multiple(probe: tuple[Probe, VfioUserDevice]) -> None:
    model, dev = probe
    assert dev.capabilities.write_multiple  # the pyvfio server offers REGION_WRITE_MULTI
    dev.write_multiple([(0, SCRATCH, b"\x01"), (0, SCRATCH + 1, b"\x02\x03"),
                        (0, SCRATCH + 4, (0x44332211).to_bytes(4, "little"))])
    assert model.accesses == [(0, 1, True), (1, 2, True), (4, 4, True)]  # in order, exact widths
    assert dev.bar(0).read64(SCRATCH) == 0x4433221100030201
    with pytest.raises(UsageError):
        dev.write_multiple([(0, 0, bytes(9))])


def test_region_io_fds(probe: tuple[Probe, VfioUserDevice]) -> None:
    """The doorbell the probe offers comes back as an ioeventfd sub-region;
    signalling its fd reaches the model as a write, without a message."""
    model, dev = probe
    subs, fds = dev.region_io_fds(0)
    try:
        assert [(s.offset, s.size, s.type) for s in subs] == [(DOORBELL, 4,
                                                                P.IoFdType.IOEVENTFD)]
        assert len(fds) == 1 and subs[0].fd_index == 0
        model.accesses.clear()
        os.eventfd_write(fds[subs[0].fd_index], 1)
        wait_until(lambda: any(a[:2] == (DOORBELL, 4) and a[2] for a in model.accesses))
    finally:
        for fd in fds:
            os.close(fd)
    assert dev.region_io_fds(2) == ([], [])


# --- errors from the server --------------------------------------------------------------------


def test_model_errno_reaches_the_client(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    with pytest.raises(PeerError) as info:
        dev.bar(0).read32(FAIL)
    assert info.value.errno == errno.EACCES
    with pytest.raises(PeerError) as info:
        dev.bar(0).write32(FAIL, 1)
    assert info.value.errno == errno.EACCES
    assert dev.bar(0).read32(SCRATCH) == 0  # still connected


@pytest.mark.parametrize(("command", "payload", "err"), [
    (Command.REGION_READ, P.REGION_ACCESS.pack(0, 20, 4), errno.EINVAL),       # no region 20
    (Command.REGION_READ, P.REGION_ACCESS.pack(0xFFE, 0, 4), errno.EINVAL),    # past the end
    (Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4) + b"x", errno.EINVAL),  # data on a read
    (Command.DEVICE_GET_IRQ_INFO, P.IrqInfoMsg(9).pack(), errno.EINVAL),
    (Command.DEVICE_GET_REGION_INFO, P.RegionInfoMsg(0).pack()[:20], errno.EINVAL),
    (Command.DMA_UNMAP, P.DmaUnmap(0x1000, 0x1000, 0x1).pack(), errno.EINVAL),  # bitmap, no logging
    (14, b"", errno.EINVAL),                           # the retired DIRTY_PAGES: unknown
])
def test_server_errors_keep_their_errno(probe: tuple[Probe, VfioUserDevice], command: int,
                                        payload: bytes, err: int) -> None:
    _, dev = probe
    with pytest.raises(PeerError) as info:
        dev._request(command, payload)
    assert info.value.errno == err
    assert dev.connected


def test_overlapping_dma_map_is_eexist_at_the_server(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    buf = dev.dma_alloc(0x2000, iova=0x100000)
    # behind the client's own bookkeeping, straight to the server:
    with pytest.raises(PeerError) as info:
        dev._request(Command.DMA_MAP, P.DmaMap(0x101000, 0x1000, 3).pack())
    assert info.value.errno == errno.EEXIST
    with pytest.raises(UsageError, match="overlaps"):
        dev.dma.map(0x101000, buf.memory, 0, 0x1000)  # type: ignore[union-attr]


def test_server_dropping_the_connection_mid_call(served: Any) -> None:
    model, path = served()
    dev = connect(path)

    def hang_up() -> None:
        conn = model._conn
        assert conn is not None
        conn.close()

    model.hang_up = hang_up
    with pytest.raises(ConnectionClosed):
        dev.bar(0).read32(HANG_UP)
    assert not dev.connected
    with pytest.raises(ConnectionClosed):
        dev.bar(0).read32(0)
    dev.close()


def test_server_process_killed(tmp_path: Path) -> None:
    """`pyvfio serve edu` killed between calls: the next call raises
    ConnectionClosed, close() is quiet."""
    path = str(tmp_path / "edu.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", "edu", "--socket", path],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dev = connect(path)
        assert dev.bar(0).read32(0) & 0xFF == 0xED
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with pytest.raises(ConnectionClosed):
            dev.bar(0).read32(0)
        dev.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- interrupts --------------------------------------------------------------------------------


def test_msi_eventfds_fire(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    v0, v1 = dev.enable_irq(IrqIndex.MSI, 2)
    dev.bar(0).write32(IRQ_FIRE, 1)
    assert v1.wait(2) == 1
    assert v0.read() == 0
    dev.bar(0).write32(IRQ_FIRE, 0)
    assert v0.wait(2) == 1
    dev.disable_irq(IrqIndex.MSI)
    assert dev.bar(0).read32(SCRATCH) == 0


def test_msix_eventfds_fire(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    fds = dev.enable_irq(IrqIndex.MSIX, 4)
    dev.bar(0).write32(IRQ_FIRE, 3)
    assert fds[3].wait(2) == 1
    assert [e.read() for e in fds[:3]] == [0, 0, 0]


def test_intx_is_automasked_until_unmask(probe: tuple[Probe, VfioUserDevice]) -> None:
    model, dev = probe
    (intx,) = dev.enable_irq(IrqIndex.INTX)
    dev.bar(0).write32(IRQ_FIRE, 0)
    assert intx.wait(2) == 1
    dev.bar(0).write32(IRQ_FIRE, 0)  # masked: nothing
    assert intx.wait(0.1) == 0
    dev.unmask_irq(IrqIndex.INTX)  # still asserted: delivered on unmask
    assert intx.wait(2) == 1
    with model.lock:
        model.set_intx(False)
    dev.unmask_irq(IrqIndex.INTX)
    assert intx.wait(0.1) == 0


def test_trigger_from_the_client(probe: tuple[Probe, VfioUserDevice]) -> None:
    """DATA_NONE|ACTION_TRIGGER and DATA_BOOL|ACTION_TRIGGER fire the eventfds."""
    _, dev = probe
    v0, v1 = dev.enable_irq(IrqIndex.MSI, 2)
    dev.set_irqs(IrqIndex.MSI, IrqAction.DATA_BOOL | IrqAction.ACTION_TRIGGER, 0, 2,
                 [False, True])
    assert v1.wait(2) == 1 and v0.read() == 0
    dev.set_irqs(IrqIndex.MSI, IrqAction.DATA_NONE | IrqAction.ACTION_TRIGGER, 0, 1)
    assert v0.wait(2) == 1


def test_deassigning_vectors_with_no_fds(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    v0, v1 = dev.enable_irq(IrqIndex.MSI, 2)
    dev.set_irqs(IrqIndex.MSI, IrqAction.DATA_EVENTFD | IrqAction.ACTION_TRIGGER, 1, 1, [-1])
    dev.bar(0).write32(IRQ_FIRE, 1)
    assert v1.wait(0.1) == 0
    with pytest.raises(UsageError):
        dev.set_irqs(IrqIndex.MSI, IrqAction.DATA_EVENTFD | IrqAction.ACTION_TRIGGER, 0, 2,
                     [v0.fd, -1])


# --- DMA ---------------------------------------------------------------------------------------


def _model_dma(dev: VfioUserDevice, src: int, dst: int, count: int, go: int) -> None:
    bar = dev.bar(0)
    bar.write64(DMA_SRC, src)
    bar.write64(DMA_DST, dst)
    bar.write64(DMA_COUNT, count)
    bar.write64(DMA_DONE, 0)
    bar.write32(DMA_GO, go)
    wait_until(lambda: bar.read64(DMA_DONE) != 0)
    assert bar.read64(DMA_DONE) == 1


@pytest.mark.parametrize("twin", [True, False], ids=["twin-socket", "one-socket"])
@pytest.mark.parametrize("fds", [True, False], ids=["fd", "messages"])
@pytest.mark.parametrize("go", [1, 2], ids=["inline", "timer"])
def test_model_dma(served: Any, twin: bool, fds: bool, go: int) -> None:
    """The model reads client memory and writes it back reversed: through the
    mmapped memfd, or through DMA_READ/DMA_WRITE messages that the client
    serves (inline while it waits, from the idle thread, or on the twin
    socket)."""
    model, path = served()
    with connect(path, share_dma_fds=fds, twin_socket=twin) as dev:
        buf = dev.dma_alloc(0x4000, below=1 << 32)
        data = os.urandom(0x1800)
        buf.write(data, 0x100)
        _model_dma(dev, buf.iova + 0x100, buf.iova + 0x2000, len(data), go)
        assert buf.read(0x2000, len(data)) == data[::-1]
        conn = model._conn
        assert conn is not None
        (window,) = conn.dma.mappings
        assert window.mapped == fds
        assert (window.iova, window.size) == (buf.iova, 0x4000)
        buf.close()
        assert conn.dma.mappings == []


def test_dma_outside_mappings_faults(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    buf = dev.dma_alloc(0x1000)
    bar = dev.bar(0)
    bar.write64(DMA_SRC, buf.iova + 0x800)
    bar.write64(DMA_DST, buf.iova)
    bar.write64(DMA_COUNT, 0x1000)  # runs past the window
    bar.write32(DMA_GO, 1)
    assert bar.read64(DMA_DONE) == 0xDEAD


def test_read_only_mapping(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    mem = SharedMemory(0x2000)
    dev.dma.map(0x200000, mem, writable=False)  # type: ignore[union-attr]
    bar = dev.bar(0)
    bar.write64(DMA_SRC, 0x200000)
    bar.write64(DMA_DST, 0x201000)
    bar.write64(DMA_COUNT, 16)
    bar.write32(DMA_GO, 1)
    assert bar.read64(DMA_DONE) == 0xDEAD  # the write half was refused
    dev.dma.unmap(0x200000, 0x2000)  # type: ignore[union-attr]
    mem.close()


def test_dirty_logging(probe: tuple[Probe, VfioUserDevice]) -> None:
    _, dev = probe
    buf = dev.dma_alloc(0x8000, iova=0x400000)
    assert dev.dma_logging_start(0x1000, [(0x400000, 0x8000)]) == 0x1000
    _model_dma(dev, 0x400000, 0x403000 + 0x800, 0x1000, 1)  # writes pages 3 and 4
    assert dev.dma_logging_report(0x400000, 0x8000, 0x1000) == [0x403000, 0x404000]
    assert dev.dma_logging_report(0x400000, 0x8000, 0x1000) == []  # reported pages cleared
    dev.dma_logging_stop()
    buf.close()


# --- reset, migration, reconnect, threads --------------------------------------------------------


def test_reset(probe: tuple[Probe, VfioUserDevice]) -> None:
    model, dev = probe
    dev.bar(0).write32(SCRATCH, 5)
    dev.reset()
    assert model.resets == 1
    assert dev.bar(0).read32(SCRATCH) == 0


def test_migration_between_two_servers(served: Any) -> None:
    _, src_path = served()
    _, dst_path = served()
    with connect(src_path) as src, connect(dst_path) as dst:
        assert src.migration_flags() & P.MigrationFlag.STOP_COPY
        assert src.get_mig_state() == P.MigState.RUNNING
        src.bar(0).write64(SCRATCH, 0xC0FFEE)
        src.config.write16(0x04, src.config.read16(0x04) | 0x6)  # memory + bus master
        assert src.set_mig_state(P.MigState.STOP) == P.MigState.STOP
        assert src.set_mig_state(P.MigState.STOP_COPY) == P.MigState.STOP_COPY
        blob = src.mig_data_read_all()
        assert blob
        assert dst.set_mig_state(P.MigState.STOP) == P.MigState.STOP
        assert dst.set_mig_state(P.MigState.RESUMING) == P.MigState.RESUMING
        dst.mig_data_write(blob)
        assert dst.set_mig_state(P.MigState.STOP) == P.MigState.STOP
        assert dst.set_mig_state(P.MigState.RUNNING) == P.MigState.RUNNING
        assert dst.bar(0).read64(SCRATCH) == 0xC0FFEE
        assert dst.config.read16(0x04) & 0x6 == 0x6
        with pytest.raises(PeerError):
            src.set_mig_state(P.MigState.PRE_COPY)  # STOP_COPY -> PRE_COPY is not an arc


def test_reconnect_keeps_device_state_not_dma(served: Any) -> None:
    model, path = served()
    with connect(path) as dev:
        dev.bar(0).write32(SCRATCH, 0x5A5A)
        dev.dma_alloc(0x1000)
        dev.enable_irq(IrqIndex.MSI, 1)
    wait_until(lambda: model._conn is None)
    with connect(path) as dev:
        assert dev.bar(0).read32(SCRATCH) == 0x5A5A
        conn = model._conn
        assert conn is not None and conn.dma.mappings == []
        assert not model.msi_enabled()


def test_second_client_waits_for_the_first(served: Any) -> None:
    """One client at a time: a second one is not answered (its connect times
    out) until the first goes; then it is served."""
    _, path = served()
    first = connect(path)
    with pytest.raises(ConnectionClosed, match="did not answer VERSION"):
        connect(path, timeout=0.3)
    result: dict[str, VfioUserDevice] = {}
    waiter = threading.Thread(target=lambda: result.setdefault("dev", connect(path, timeout=10)))
    waiter.start()
    time.sleep(0.2)
    assert "dev" not in result
    assert first.bar(0).read32(SCRATCH) == 0  # the first client is unaffected
    first.close()
    waiter.join(10)
    with result["dev"] as second:
        assert second.bar(0).read32(SCRATCH) == 0


def test_concurrent_threads_share_one_connection(probe: tuple[Probe, VfioUserDevice]) -> None:
    """A main thread and an 'interrupt thread' hammer the device at once: the
    request lock keeps every reply with its request."""
    _, dev = probe
    (intx,) = dev.enable_irq(IrqIndex.INTX)
    errors: list[BaseException] = []
    stop = threading.Event()

    def irq_thread() -> None:
        try:
            while not stop.is_set():
                dev.unmask_irq(IrqIndex.INTX)
                intx.read()
        except BaseException as exc:
            errors.append(exc)

    def reader(offset: int, value: int) -> None:
        try:
            bar = dev.bar(0)
            bar.write32(offset, value)
            for _ in range(500):
                assert bar.read32(offset) == value
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=irq_thread)] + [
        threading.Thread(target=reader, args=(0x500 + 4 * i, 0x1000 + i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert errors == []


def test_neutral_migrate_between_two_servers(served: Any) -> None:
    """pyvfio.migration.migrate() drives two vfio-user devices through the
    client's Migration (arc by arc) and the state arrives."""
    from pyvfio import migration

    _, src_path = served()
    _, dst_path = served()
    with connect(src_path) as src, connect(dst_path) as dst:
        src.bar(0).write64(SCRATCH + 8, 0xFACE)
        mig = src.migration()
        assert mig.flags & migration.MigFlag.STOP_COPY
        assert mig.get_state() == migration.MigState.RUNNING
        report = migration.migrate(src, dst)
        assert report.stop_copy_bytes > 0
        assert report.src_states[-1] == "STOP" and report.dst_states[-1] == "RUNNING"
        assert dst.bar(0).read64(SCRATCH + 8) == 0xFACE
        assert dst.migration().get_state() == migration.MigState.RUNNING
        assert src.migration().get_state() == migration.MigState.STOP
        # a combination transition walked arc by arc: STOP -> RUNNING -> ... is direct,
        # STOP_COPY from RUNNING needs STOP in between
        src.migration().set_state(migration.MigState.RUNNING)
        src.migration().set_state(migration.MigState.STOP_COPY)
        assert src.get_mig_state() == P.MigState.STOP_COPY
        state = src.migration().read_all()
        src.migration().set_state(migration.MigState.RUNNING)  # via STOP
        migration.load(dst, state)
        assert dst.migration().get_state() == migration.MigState.STOP


def test_save_and_load_refuses_garbage(served: Any) -> None:
    from pyvfio import migration

    _, path = served()
    with connect(path) as dev:
        with pytest.raises(migration.MigrationError):
            migration.load(dev, b"not a saved state")
        assert dev.migration().get_state() in (migration.MigState.ERROR,
                                                migration.MigState.RESUMING)


def test_use_after_close_is_closed_error(served: Any) -> None:
    from pyvfio.errors import ClosedError

    _, path = served()
    dev = connect(path)
    bar = dev.bar(0)
    read = bar.read32
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(ClosedError):
        read(0)
    with pytest.raises(ClosedError):
        bar.read(0, 4)
    with pytest.raises(ClosedError):
        dev.reset()
    assert not dev.connected
