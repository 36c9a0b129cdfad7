"""The virtio-pci transport, virtio-rng and virtio-blk, driven in-process
through pyvfio's vfio-user client by a small spec-written driver
(``virtio_driver.py``).  The guest's own Linux drivers drive the same models
in ``tests/guest/test_virtio_guest.py``."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvfio.device import IrqIndex
from pyvfio.devices.virtio.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VirtioBlk
from pyvfio.devices.virtio.rng import SeededSource, VirtioRng
from pyvfio.errors import UsageError
from pyvfio.testing.virtio import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_ACCESS_PLATFORM,
    F_VERSION_1,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VirtioDriver,
    eventfd_count,
)
from pyvfio.user.client import VfioUserDevice, connect

SEED = 1234


@pytest.fixture
def rng(serve: Callable[..., str]) -> Iterator[tuple[VirtioRng, VfioUserDevice]]:
    model = VirtioRng(SeededSource(SEED))
    dev = connect(serve(model))
    yield model, dev
    dev.close()
    model.close()


def _ready(drv: VirtioDriver, **queue: int) -> None:
    assert drv.negotiate() & STATUS_FEATURES_OK
    drv.setup_queue(0, **queue)
    drv.driver_ok()


# ---- the transport ----


def test_pci_identity_and_capabilities(rng):
    _model, dev = rng
    cfg = dev.config
    assert (cfg.vendor_id, cfg.device_id, cfg.revision) == (0x1AF4, 0x1044, 1)
    assert cfg.read16(0x2C) == 0x1AF4 and cfg.read16(0x2E) >= 0x40
    drv = VirtioDriver(dev)
    assert sorted(drv.caps) == [1, 2, 3, 4, 5]            # common, notify, isr, device, pci
    for cfg_type, (bar, off, length, _pos) in drv.caps.items():
        if cfg_type != 5:
            assert bar == 4 and off % 4 == 0 and length > 0
            assert off + length <= dev.region_info(bar).size
    assert drv.notify_mult == 4
    assert dev.irq_info(IrqIndex.MSIX).count == 2          # one queue + config
    assert drv.c_read(0x12, 2) == 1                          # num_queues


def test_feature_negotiation(rng):
    _model, dev = rng
    drv = VirtioDriver(dev)
    offered = drv.device_features()
    assert offered & F_VERSION_1 and offered & F_ACCESS_PLATFORM
    # Without VERSION_1 a modern device refuses FEATURES_OK (section 6.1).
    assert not drv.negotiate(accept=offered & ~F_VERSION_1) & STATUS_FEATURES_OK
    # A bit the device never offered is refused too.
    assert not drv.negotiate(accept=offered | 1 << 40) & STATUS_FEATURES_OK
    assert drv.negotiate() & STATUS_FEATURES_OK
    # Once FEATURES_OK is set the driver features are fixed.
    drv.c_write(0x08, 4, 0)
    drv.c_write(0x0C, 4, 0)
    assert drv.c_read(0x0C, 4) == offered & 0xFFFFFFFF
    drv.reset()
    assert drv.c_read(0x0C, 4) == 0 and drv.status == 0


def test_queue_registers_and_bounds(rng):
    _model, dev = rng
    drv = VirtioDriver(dev)
    drv.negotiate()
    drv.c_write(0x16, 2, 0)
    assert drv.c_read(0x18, 2) == 64                          # max size
    drv.c_write(0x18, 2, 48)                                  # not a power of two: kept 64
    assert drv.c_read(0x18, 2) == 64
    drv.c_write(0x18, 2, 16)
    assert drv.c_read(0x18, 2) == 16
    drv.c_write(0x1A, 2, 7)                                   # no such MSI-X vector
    assert drv.c_read(0x1A, 2) == 0xFFFF
    drv.c_write(0x1A, 2, 0)
    assert drv.c_read(0x1A, 2) == 0
    drv.c_write(0x16, 2, 5)                                   # no queue 5: size reads 0
    assert drv.c_read(0x18, 2) == 0
    drv.c_write(0x10, 2, 1)
    assert drv.c_read(0x10, 2) == 1


def test_pci_cfg_access_window(rng):
    _model, dev = rng
    drv = VirtioDriver(dev)
    pos = drv.caps[5][3]
    cfg = dev.config
    cfg.write8(pos + 4, 4)                 # bar
    cfg.write32(pos + 8, 0x04)             # common cfg device_feature (select 0 after reset)
    cfg.write32(pos + 12, 4)               # length
    assert cfg.read32(pos + 16) == drv.device_features() & 0xFFFFFFFF
    cfg.write32(pos + 8, 0x14)             # device_status, a byte write through the window
    cfg.write32(pos + 12, 1)
    cfg.write32(pos + 16, 1)
    assert drv.status == 1


# ---- virtio-rng ----


def _post_rng(drv: VirtioDriver, sizes: list[int], head: int = 0) -> tuple[int, list[int]]:
    """One chain of writable buffers; returns (head, buffer iovas)."""
    q = drv.queues[0]
    buf = drv.dev.dma_alloc(4096 * len(sizes))
    addrs = []
    for i, n in enumerate(sizes):
        addr = buf.iova + 4096 * i
        addrs.append(addr)
        last = i == len(sizes) - 1
        q.write_desc(head + i, addr, n, DESC_F_WRITE | (0 if last else DESC_F_NEXT), head + i + 1)
    q.publish(head)
    drv._bufs = [*getattr(drv, "_bufs", []), buf]  # type: ignore[attr-defined]
    return head, addrs


def test_rng_fills_buffers_from_its_source(rng):
    model, dev = rng
    drv = VirtioDriver(dev)
    _ready(drv)
    head, _ = _post_rng(drv, [16, 40, 8])
    drv.notify(0)
    (used,) = drv.wait_used(drv.queues[0])
    assert used == (head, 64)
    buf = drv._bufs[-1]  # type: ignore[attr-defined]
    got = bytes(buf.view[0:16]) + bytes(buf.view[4096:4136]) + bytes(buf.view[8192:8200])
    assert got == SeededSource.stream_of(SEED, 64)
    assert model.bytes_served == 64


def test_rng_interrupts_msix_then_intx(rng):
    _model, dev = rng
    drv = VirtioDriver(dev)
    drv.negotiate()
    vectors = drv.enable_msix()
    drv.setup_queue(0, msix_vector=0)
    drv.driver_ok()
    _post_rng(drv, [32])
    drv.notify(0)
    drv.wait_used(drv.queues[0])
    assert vectors[0].wait(5) >= 1
    assert drv.read_isr() == 0               # MSI-X: the ISR is not used
    dev.disable_irq(IrqIndex.MSIX)
    (intx,) = dev.enable_irq(IrqIndex.INTX)
    _post_rng(drv, [32], head=1)
    drv.notify(0)
    drv.wait_used(drv.queues[0])
    assert intx.wait(5) >= 1
    assert drv.read_isr() == 1               # the queue bit, and reading clears it
    assert drv.read_isr() == 0


def test_rng_no_interrupt_flag_is_honoured(rng):
    _model, dev = rng
    drv = VirtioDriver(dev)
    drv.negotiate()
    (vec, _cfg) = drv.enable_msix()
    q = drv.setup_queue(0, msix_vector=0)
    drv.driver_ok()
    q.ring.view[q.avail - q.ring.iova:q.avail - q.ring.iova + 2] = struct.pack("<H", 1)
    _post_rng(drv, [8])
    drv.notify(0)
    drv.wait_used(q)
    time.sleep(0.05)
    assert eventfd_count(vec.fileno()) == 0


def test_rng_over_dma_messages(serve):
    """Guest RAM without fds (QEMU's plain -m RAM): every queue access is a
    DMA_READ/DMA_WRITE message to the client."""
    model = VirtioRng(SeededSource(SEED))
    dev = connect(serve(model), share_dma_fds=False)
    try:
        drv = VirtioDriver(dev)
        _ready(drv)
        _post_rng(drv, [100])
        drv.notify(0)
        assert drv.wait_used(drv.queues[0]) == [(0, 100)]
        assert bytes(drv._bufs[0].view[:100]) == SeededSource.stream_of(SEED, 100)  # type: ignore[attr-defined]
    finally:
        dev.close()
        model.close()


def test_indirect_chain(rng):
    _model, dev = rng
    drv = VirtioDriver(dev)
    _ready(drv)
    q = drv.queues[0]
    table = dev.dma_alloc(4096)
    data = dev.dma_alloc(4096)
    table.view[0:32] = struct.pack("<QIHHQIHH", data.iova, 10, DESC_F_WRITE | DESC_F_NEXT, 1,
                                   data.iova + 100, 22, DESC_F_WRITE, 0)
    q.write_desc(0, table.iova, 32, DESC_F_INDIRECT)
    q.publish(0)
    drv.notify(0)
    assert drv.wait_used(q) == [(0, 32)]
    stream = SeededSource.stream_of(SEED, 32)
    assert bytes(data.view[0:10]) + bytes(data.view[100:122]) == stream


@pytest.mark.parametrize("how", ["loop", "head out of table", "next out of table",
                                 "nested indirect", "unmapped buffer", "readable after writable"])
def test_hostile_chains_need_reset_and_recover(rng, how):
    model, dev = rng
    drv = VirtioDriver(dev)
    drv.negotiate()
    (_vq, cfg_vec) = drv.enable_msix()
    drv.c_write(0x10, 2, 1)                  # config changes on vector 1
    q = drv.setup_queue(0, size=8, msix_vector=0)
    drv.driver_ok()
    buf = dev.dma_alloc(4096)
    head = 0
    if how == "loop":
        q.write_desc(0, buf.iova, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
        q.write_desc(1, buf.iova, 8, DESC_F_WRITE | DESC_F_NEXT, 0)
    elif how == "head out of table":
        head = 9
    elif how == "next out of table":
        q.write_desc(0, buf.iova, 8, DESC_F_WRITE | DESC_F_NEXT, 8)
    elif how == "nested indirect":
        buf.view[0:16] = struct.pack("<QIHH", buf.iova, 16, DESC_F_INDIRECT, 0)
        q.write_desc(0, buf.iova, 16, DESC_F_INDIRECT)
    elif how == "unmapped buffer":
        q.write_desc(0, 0x7000_0000_0000, 8, DESC_F_WRITE)
    else:
        q.write_desc(0, buf.iova, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
        q.write_desc(1, buf.iova, 8, 0)
    q.publish(head)
    drv.notify(0)
    deadline = time.monotonic() + 5
    while not drv.status & STATUS_NEEDS_RESET:
        assert time.monotonic() < deadline, "the device never flagged DEVICE_NEEDS_RESET"
        time.sleep(0.01)
    assert cfg_vec.wait(5) >= 1
    assert q.used_idx() == 0
    # The server and the device live on: a reset and a clean request work.
    drv.reset()
    _ready(drv)
    _post_rng(drv, [8])
    drv.notify(0)
    assert drv.wait_used(drv.queues[0]) == [(0, 8)]
    assert model.requests_done >= 1


def test_reset_over_device_reset(rng):
    _model, dev = rng
    drv = VirtioDriver(dev)
    _ready(drv)
    assert drv.status & STATUS_DRIVER_OK
    dev.reset()
    assert drv.status == 0
    drv.c_write(0x16, 2, 0)
    assert drv.c_read(0x1C, 2) == 0


# ---- virtio-blk ----


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 * 64)  # 64 sectors
    return path


def _blk_request(drv: VirtioDriver, kind: int, sector: int, data: bytes | None = None,
                 read_len: int = 0) -> tuple[int, bytes, int]:
    """One request; returns (status, data read, used length)."""
    q = drv.queues[0]
    buf = drv.dev.dma_alloc(3 * 4096 + len(data or b"") + read_len)
    hdr, payload, status = buf.iova, buf.iova + 4096, buf.iova + 2 * 4096 + len(data or b"") + read_len
    buf.view[0:16] = struct.pack("<IIQ", kind, 0, sector)
    n = 0
    q.write_desc(n, hdr, 16, DESC_F_NEXT, n + 1)
    n += 1
    if data:
        buf.view[4096:4096 + len(data)] = data
        q.write_desc(n, payload, len(data), DESC_F_NEXT, n + 1)
        n += 1
    if read_len:
        q.write_desc(n, payload, read_len, DESC_F_WRITE | DESC_F_NEXT, n + 1)
        n += 1
    q.write_desc(n, status, 1, DESC_F_WRITE)
    q.publish(0)
    drv.notify(0)
    ((head, used_len),) = drv.wait_used(q)
    assert head == 0
    st = buf.view[status - buf.iova]
    got = bytes(buf.view[4096:4096 + read_len])
    buf.close()
    return st, got, used_len


def test_blk_read_write_flush_id(serve, disk):
    model = VirtioBlk(disk)
    dev = connect(serve(model))
    try:
        drv = VirtioDriver(dev)
        assert drv.device_features() & 1 << VIRTIO_BLK_F_FLUSH
        _ready(drv)
        assert drv.device_cfg(0, 8) == 64                     # capacity in sectors
        assert drv.device_cfg(20, 4) == 512                   # blk_size
        st, got, used = _blk_request(drv, 0, 2, read_len=1024)
        assert (st, used) == (0, 1025)
        assert got == disk.read_bytes()[1024:2048]
        payload = os.urandom(1536)
        st, _, used = _blk_request(drv, 1, 10, data=payload)
        assert (st, used) == (0, 1)
        assert disk.read_bytes()[5120:5120 + 1536] == payload
        assert _blk_request(drv, 4, 0)[0] == 0                # FLUSH
        st, ident, _ = _blk_request(drv, 8, 0, read_len=20)   # GET_ID
        assert st == 0 and ident.startswith(b"pyvfio-")
        assert _blk_request(drv, 0, 63, read_len=1024)[0] == 1   # past the end: IOERR
        assert _blk_request(drv, 0, 0, read_len=100)[0] == 1     # not whole sectors
        assert _blk_request(drv, 11, 0, data=b"\0" * 16)[0] == 2  # DISCARD: UNSUPP
        assert model.stats["flush"] == 1 and model.stats["out"] == 1
    finally:
        dev.close()
        model.close()


def test_blk_read_only(serve, disk):
    model = VirtioBlk(disk, read_only=True)
    dev = connect(serve(model))
    try:
        drv = VirtioDriver(dev)
        assert drv.device_features() & 1 << VIRTIO_BLK_F_RO
        _ready(drv)
        before = disk.read_bytes()
        assert _blk_request(drv, 1, 0, data=b"x" * 512)[0] == 1
        assert disk.read_bytes() == before
    finally:
        dev.close()
        model.close()


def test_blk_bad_files(tmp_path):
    with pytest.raises(UsageError, match=r"missing\.img.*truncate"):
        VirtioBlk(tmp_path / "missing.img")
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(UsageError, match="less than one"):
        VirtioBlk(tiny)
    with pytest.raises(UsageError, match="Is a directory"):
        VirtioBlk(tmp_path)
    with pytest.raises(UsageError, match="not a regular file"):
        VirtioBlk(tmp_path, read_only=True)


# ---- the command line ----


def test_serve_virtio_blk_cli(tmp_path, disk):
    import signal
    import subprocess
    import sys

    sock = str(tmp_path / "blk.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", "virtio-blk", "--file",
                             str(disk), "--socket", sock],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90  # a loaded machine starts Python slowly
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dev = connect(sock)
        try:
            drv = VirtioDriver(dev)
            assert dev.config.device_id == 0x1042
            _ready(drv)
            assert _blk_request(drv, 1, 3, data=b"\x5a" * 512)[0] == 0
        finally:
            dev.close()
        assert disk.read_bytes()[1536:2048] == b"\x5a" * 512
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not os.path.exists(sock)


@pytest.mark.parametrize(("argv", "message"), [
    (["virtio-blk", "--socket", "S"], "needs a backing file"),
    (["edu", "--file", "F", "--socket", "S"], "--file is for virtio-blk"),
    (["virtio-blk", "--file", "/nonexistent/disk.img", "--socket", "S"], "cannot open"),
])
def test_serve_virtio_cli_errors(argv, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pyvfio", "serve", *argv], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr


def test_docs_third_device_example(serve):
    """The 'a third device is a page' example of docs/vfio-user.md runs."""
    import re

    from pyvfio.devices.virtio.transport import VirtioPciDevice

    doc = (Path(__file__).resolve().parents[2] / "docs" / "vfio-user.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S)
                if "VirtioPciDevice" in b]
    namespace: dict = {"os": os, "VirtioPciDevice": VirtioPciDevice}
    exec(compile(block, "docs/vfio-user.md", "exec"), namespace)
    model = namespace["VirtioRng"](source=lambda n: b"\x42" * n)
    dev = connect(serve(model))
    try:
        drv = VirtioDriver(dev)
        _ready(drv)
        _post_rng(drv, [24])
        drv.notify(0)
        assert drv.wait_used(drv.queues[0]) == [(0, 24)]
        assert bytes(drv._bufs[0].view[:24]) == b"\x42" * 24  # type: ignore[attr-defined]
    finally:
        dev.close()
        model.close()


# ---- a hostile driver ----


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([0x0000, 0x1000, 0x2000, 0x3000]),
                          st.integers(0, 0x47), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, (1 << 64) - 1), st.booleans()),
                max_size=60))
def test_random_register_traffic_never_breaks_the_model(accesses):
    """Any sequence of reads and writes of any width to the transport's
    structures (BAR 4) leaves the model answering, and a reset (status 0)
    brings it back to its power-on registers.  With no client connected the
    queues' DMA fails: that may only flag DEVICE_NEEDS_RESET."""
    from pyvfio.devices.virtio.transport import VIRTIO_BAR

    model = VirtioRng(SeededSource(SEED))
    try:
        bar = model.regions[VIRTIO_BAR].access
        assert bar is not None
        with model.lock:
            for base, off, width, value, is_write in accesses:
                if is_write:
                    bar(base + off, (value & ((1 << 8 * width) - 1)).to_bytes(width, "little"),
                        True)
                else:
                    assert len(bar(base + off, width, False) or b"") == width
            bar(0x14, b"\0", True)                           # reset
            assert bar(0x14, 1, False) == b"\0"
            assert model.driver_features == 0 and not any(q.enabled for q in model.queues)
            assert bar(0x12, 2, False) == b"\1\0"            # num_queues
    finally:
        model.close()


def test_virtio_devices_through_the_control_socket(tmp_path, disk):
    """``pyvfio serve --control``: device-add a virtio-blk (its --file as an
    option) and a seeded virtio-rng into a running server, drive both, remove
    them."""
    import subprocess
    import sys

    from pyvfio.user.control import ControlClient

    control = tmp_path / "ctl.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", "--control", str(control)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not control.exists():
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with ControlClient(str(control)) as ctl:
            blk_sock, rng_sock = str(tmp_path / "blk.sock"), str(tmp_path / "rng.sock")
            ctl.execute("device-add", {"model": "virtio-blk", "socket": blk_sock, "id": "disk",
                                       "options": {"file": str(disk)}})
            ctl.execute("device-add", {"model": "virtio-rng", "socket": rng_sock, "id": "rng",
                                       "options": {"seed": str(SEED)}})
            with connect(blk_sock) as dev:
                drv = VirtioDriver(dev)
                _ready(drv)
                st, got, _ = _blk_request(drv, 0, 1, read_len=512)
                assert st == 0 and got == disk.read_bytes()[512:1024]
            with connect(rng_sock) as dev:
                drv = VirtioDriver(dev)
                _ready(drv)
                _post_rng(drv, [32])
                drv.notify(0)
                drv.wait_used(drv.queues[0])
                assert bytes(drv._bufs[0].view[:32]) == SeededSource.stream_of(SEED, 32)  # type: ignore[attr-defined]
            for dev_id in ("disk", "rng"):
                ctl.execute("device-remove", {"id": dev_id})
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
