"""A server that one client cannot take down (issue 16): bad client memory,
fd exhaustion, state left by a previous client, a client that does not
answer the server's DMA requests.  The process-level cases run ``pyvfio
serve`` as its own process, since what is at stake is that process."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vfu_raw import RawClient, wait_until

from pyvfio.devices.edu import EduDevice
from pyvfio.devices.model import PciDeviceModel
from pyvfio.user import protocol as P

R, W = P.DmaMapFlag.READ, P.DmaMapFlag.WRITE
F = P.FeatureFlag
S = P.MigState
EDU_ID = 0x010000ED


def dma_map(c: RawClient, iova: int, size: int, fd: int | None = None, offset: int = 0
            ) -> P.Message:
    return c.call(P.Command.DMA_MAP, P.DmaMap(iova, size, R | W, offset).pack(),
                  [] if fd is None else [fd])


def edu_dma_to_ram(c: RawClient, iova: int, count: int = 64) -> None:
    """Program edu's DMA engine: device buffer -> RAM at ``iova``."""
    c.write64(0, 0x80, 0x40000)
    c.write64(0, 0x88, iova)
    c.write64(0, 0x90, count)
    c.write64(0, 0x98, 1 | 2)


def edu_dma_from_ram(c: RawClient, iova: int, count: int = 64) -> None:
    c.write64(0, 0x80, iova)
    c.write64(0, 0x88, 0x40000)
    c.write64(0, 0x90, count)
    c.write64(0, 0x98, 1)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], list[str]]]]:
    """``served(n, nofile=None) -> (process, socket paths)``: ``pyvfio serve
    edu`` on ``n`` sockets, optionally under RLIMIT_NOFILE ``nofile``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int = 2, nofile: int | None = None) -> tuple[subprocess.Popen[bytes], list[str]]:
        paths = [str(tmp_path / f"edu{i}.sock") for i in range(n)]
        argv = [sys.executable, "-m", "pyvfio", "serve", "edu", "--dma-delay", "0.01"]
        for p in paths:
            argv += ["--socket", p]

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=limit)
        procs.append(proc)
        deadline = time.monotonic() + 30
        while not all(os.path.exists(p) for p in paths):
            if proc.poll() is not None:
                pytest.fail(f"pyvfio serve exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return proc, paths

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _alive(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        err = proc.stderr.read().decode()  # type: ignore[union-attr]
        pytest.fail(f"the server died ({proc.returncode}): {err[-2000:]}")


# ---- one client's bad memory ----


@pytest.mark.parametrize("direction", ["to RAM", "from RAM"])
def test_truncated_unsealed_memfd_does_not_kill_the_server(served, direction):
    proc, (path_a, path_b) = served(2)
    a = RawClient(path_a)
    a.write32(0, 4, 0x1234)
    b = RawClient(path_b)
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)  # no seals at all
    os.ftruncate(fd, 1 << 20)
    assert not dma_map(b, 0x100000, 1 << 20, fd).is_error
    os.ftruncate(fd, 0)                               # the server's pages are gone
    (edu_dma_to_ram if direction == "to RAM" else edu_dma_from_ram)(b, 0x100000)
    time.sleep(0.3)                                   # the DMA timer has fired
    _alive(proc)
    assert a.read32(0, 0) == EDU_ID and a.read32(0, 4) == ~0x1234 & 0xFFFFFFFF
    assert b.read32(0, 0x98) & 1 == 0                  # the transfer ended (dropped)
    os.close(fd)
    a.close()
    b.close()


def test_unsealed_file_is_reached_without_mmap(serve):
    """An unsealed file still works (through pread/pwrite) while it holds
    the window; a sealed memfd keeps the mmap fast path."""
    edu = EduDevice(dma_delay=0.005)
    c = RawClient(serve(edu))
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8192)
    os.pwrite(fd, b"hello edu" + bytes(55), 4096)
    assert not dma_map(c, 0x200000, 4096, fd, offset=4096).is_error
    with edu.lock:
        assert edu.dma_read(0x200000, 9) == b"hello edu"
        edu.dma_write(0x200000 + 16, b"back")
        (window,) = edu._conn.dma.mappings  # type: ignore[union-attr]
        assert window.view is None            # not mmapped: truncation cannot SIGBUS us
    assert os.pread(fd, 4, 4096 + 16) == b"back"
    os.ftruncate(fd, 0)
    with edu.lock, pytest.raises(OSError) as exc:
        edu.dma_read(0x200000, 9)
    assert exc.value.errno == errno.EFAULT
    os.close(fd)
    sealed = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(sealed, 4096)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    assert not dma_map(c, 0x300000, 4096, sealed).is_error
    with edu.lock:
        fast = [w for w in edu._conn.dma.mappings if w.iova == 0x300000]  # type: ignore[union-attr]
        assert fast[0].view is not None
    os.close(sealed)
    c.close()
    edu.close()


# ---- fd exhaustion ----


def test_many_windows_of_one_memfd_hold_one_fd(served):
    proc, (path, _b) = served(2, nofile=1024)
    c = RawClient(path)
    assert c.server_caps is not None and c.server_caps.max_dma_maps >= 4096
    fd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096 * 4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    before = fd_count(proc.pid)
    limit = c.server_caps.max_dma_maps
    for i in range(limit):
        m = dma_map(c, 0x1000000 + i * 8192, 4096, fd, offset=i * 4096 % (4096 * 4096))
        assert not m.is_error, f"window {i}: errno {m.error}"
    assert fd_count(proc.pid) <= before + 2
    m = dma_map(c, 0x1000, 4096, fd)                  # one past max_dma_maps
    assert m.is_error and m.error == errno.ENOSPC
    edu_dma_to_ram(c, 0x1000000 + 100 * 8192)         # the windows work
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    _alive(proc)
    os.close(fd)
    c.close()


def test_emfile_in_accept_is_survived(served):
    proc, (path_a, path_b) = served(2, nofile=64)
    a = RawClient(path_a)
    fds = []
    failed = 0
    for i in range(80):                               # distinct files: one fd each
        fd = os.memfd_create(f"f{i}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        fds.append(fd)
        m = dma_map(a, 0x100000 + i * 4096, 4096, fd)
        failed += m.is_error
    assert failed > 0                                  # the server ran out, and said so
    # The server is out of fds: accepting more clients fails with EMFILE in
    # there.  They are turned away; the server and A live on.
    turned_away = 0
    others = []
    for _ in range(3):
        try:
            c = RawClient(path_b, timeout=3)
            c.read32(0, 0)
            others.append(c)
        except (ConnectionError, OSError, AssertionError):
            turned_away += 1
    assert turned_away > 0
    _alive(proc)
    assert a.read32(0, 0) == EDU_ID                    # A keeps its device
    for c in others:
        c.close()
    a.close()                                          # A's fds come back
    time.sleep(0.3)
    b = RawClient(path_b)
    assert b.read32(0, 0) == EDU_ID
    b.close()
    for fd in fds:
        os.close(fd)
    _alive(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert "Too many open files" in err and "turning it away" in err


# ---- state that outlives a connection ----


def test_new_connection_starts_running_with_registers_kept(serve):
    edu = EduDevice(dma_delay=0.005)
    path = serve(edu)
    a = RawClient(path)
    a.write32(0, 4, 0xCAFE)
    m = a.call(P.Command.DEVICE_FEATURE, P.DeviceFeature(
        F.SET | P.FeatureIndex.MIG_DEVICE_STATE, P.MigStateMsg(S.RESUMING).pack()).pack())
    assert not m.is_error
    a.close()
    b = RawClient(path)
    m = b.call(P.Command.DEVICE_FEATURE, P.DeviceFeature(
        F.GET | P.FeatureIndex.MIG_DEVICE_STATE, b"", 64).pack())
    state = P.MigStateMsg.unpack(P.DeviceFeature.unpack(m.payload, reply=True).data)
    assert state.device_state == S.RUNNING
    for target in (S.STOP, S.RUNNING):
        m = b.call(P.Command.DEVICE_FEATURE, P.DeviceFeature(
            F.SET | P.FeatureIndex.MIG_DEVICE_STATE, P.MigStateMsg(target).pack()).pack())
        assert not m.is_error
    assert b.read32(0, 4) == ~0xCAFE & 0xFFFFFFFF       # registers kept, as on a kernel open
    b.close()
    edu.close()


# ---- a wait that holds the device ----


def test_twin_socket_dma_does_not_hold_the_device(serve):
    edu = EduDevice(dma_delay=0.0)
    path = serve(edu, reply_timeout=1.5)
    c = RawClient(path, caps={"max_msg_fds": 8, "twin_socket": {"supported": True}})
    assert c.twin is not None
    assert not dma_map(c, 0x100000, 0x1000).is_error  # no fd: DMA goes by message
    edu_dma_from_ram(c, 0x100000)                       # the server sends DMA_READ on the twin
    twin_reader = P.MessageReader(c.twin, max_fds=0)
    request = twin_reader.read()                        # ... and we do not answer it
    assert request is not None and request.command == P.Command.DMA_READ
    t0 = time.monotonic()
    assert c.read32(0, 0) == EDU_ID                     # answered at once meanwhile
    assert time.monotonic() - t0 < 1.0
    # The unanswered request times out; the device carries on.
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0, timeout=10)
    assert c.read32(0, 0) == EDU_ID
    c.close()
    edu.close()


def test_twin_socket_dma_answered_works(serve):
    edu = EduDevice(dma_delay=0.0)
    path = serve(edu)
    c = RawClient(path, caps={"max_msg_fds": 8, "twin_socket": {"supported": True}})
    assert c.twin is not None
    assert not dma_map(c, 0x100000, 0x1000).is_error
    edu_dma_from_ram(c, 0x100000, 8)
    twin_reader = P.MessageReader(c.twin, max_fds=0)
    req = twin_reader.read()
    assert req is not None
    body = P.DmaAccess.unpack(req.payload, with_data=False)
    assert (body.address, body.count) == (0x100000, 8)
    P.send_message(c.twin, P.pack_message(req.msg_id, req.command,
                                          P.DmaAccess(0x100000, 8, b"ABCDEFGH").pack(),
                                          P.MsgFlag.REPLY))
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    assert bytes(edu.dma_buf[:8]) == b"ABCDEFGH"
    c.close()
    edu.close()




def test_a_client_that_never_negotiates_does_not_hold_the_device(serve):
    edu = EduDevice(dma_delay=0.005)
    path = serve(edu, reply_timeout=0.5)
    silent = RawClient(path, negotiate=False)          # connects, says nothing
    t0 = time.monotonic()
    b = RawClient(path, timeout=10)                     # waits its turn, then is served
    assert b.read32(0, 0) == EDU_ID
    assert time.monotonic() - t0 < 5
    with pytest.raises((ConnectionError, OSError)):
        silent.send(P.Command.VERSION, P.Version(0, 2).pack())
        silent.recv()                                   # dropped by the server
    b.close()
    silent.close()
    edu.close()


# ---- what a client can make the server hold ----


class _DmaInHandler(PciDeviceModel):
    """A BAR write does message DMA from the connection's own thread: the
    server then reads the socket for the reply and keeps commands for later."""

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1B36, device_id=0x0099)
        self.add_bar(0, 4096, access=self.bar0)

    def bar0(self, offset: int, data: bytes | int, is_write: bool) -> bytes | None:
        if is_write:
            self.dma_read(0x100000, 4)
            return None
        return bytes(int(data))  # type: ignore[call-overload]


def test_commands_kept_during_a_dma_wait_are_bounded(serve):
    c = RawClient(serve(_DmaInHandler()))
    assert not dma_map(c, 0x100000, 0x1000).is_error      # no fd: message DMA
    write_id = c.send(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 4) + b"\0" * 4)
    request = c.reader.read()
    assert request is not None and request.command == P.Command.DMA_READ
    flood = 400
    replies: list[P.Message] = []

    def collect() -> None:  # read while we send: a pipelining client must
        while len(replies) < flood + 1:
            m = c.reader.read()
            if m is None:
                return
            if m.is_reply:
                replies.append(m)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    ids = [c.send(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4)) for _ in range(flood)]
    reader.join(30)
    assert len(replies) == flood + 1
    # The DMA failed once the kept commands hit the bound; nothing was lost.
    assert replies[0].msg_id == write_id and replies[0].error == errno.ENOBUFS
    assert [m.msg_id for m in replies[1:]] == ids and not any(m.is_error for m in replies[1:])
    c.close()


def test_dirty_logging_granularity_is_at_least_a_page(serve, scratch):
    c = RawClient(serve(scratch))
    fd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 0x10000)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    assert not dma_map(c, 0x100000, 0x10000, fd).is_error
    ctl = P.DmaLoggingControl(1, (P.DmaLoggingRange(0x100000, 0x10000),))
    assert not c.call(P.Command.DEVICE_FEATURE, P.DeviceFeature(
        F.SET | P.FeatureIndex.DMA_LOGGING_START, ctl.pack()).pack()).is_error
    with scratch.lock:
        scratch.dma_write(0x100000 + 0x2000, b"z" * 4096)
        assert len(scratch._conn.dma.dirty) == 1  # type: ignore[union-attr]  # one page, not 4096 bytes
    rep = P.DmaLoggingReport(0x100000 + 0x1FF8, 16, 1)      # byte units around the page start
    m = c.call(P.Command.DEVICE_FEATURE, P.DeviceFeature(
        F.GET | P.FeatureIndex.DMA_LOGGING_REPORT, rep.pack(), 64).pack())
    out = P.DmaLoggingReport.unpack(P.DeviceFeature.unpack(m.payload, reply=True).data,
                                    reply=True)
    assert int.from_bytes(out.bitmap, "little") == 0xFF00  # the dirty page's 8 bytes, not before
    os.close(fd)
    c.close()



class _DmaAtZero(PciDeviceModel):
    """BAR0 is 4 KiB of memory; a write at offset 0 first DMA-reads 4 bytes
    of client memory at 0x100000 (from the connection's thread)."""

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1B36, device_id=0x0099)
        self.memory = bytearray(4096)
        self.add_bar(0, 4096, access=self.bar0)

    def bar0(self, offset: int, data: bytes | int, is_write: bool) -> bytes | None:
        if isinstance(data, int):
            return bytes(self.memory[offset:offset + data])
        if offset == 0:
            self.dma_read(0x100000, 4)
        self.memory[offset:offset + len(data)] = data
        return None


def _answer_dma_read(c: RawClient) -> bytes:
    request = c.reader.read()
    assert request is not None and request.command == P.Command.DMA_READ
    address, count = P.DMA_ACCESS.unpack_from(request.payload)
    assert (address, count) == (0x100000, 4)
    return P.pack_message(request.msg_id, P.Command.DMA_READ,
                          P.DMA_ACCESS.pack(address, count) + b"\x11" * 4, P.MsgFlag.REPLY)


def test_a_request_that_came_with_a_dma_reply_is_answered(serve):
    """The server answers plain region accesses in a fast loop of its own
    reads.  A model's DMA from the connection thread reads the socket through
    the message reader instead, and a REGION_READ that arrived in the same
    read as the DMA reply is then held by the reader: it is answered, in
    order, not left behind the next read of the socket."""
    c = RawClient(serve(_DmaAtZero()))
    assert not dma_map(c, 0x100000, 0x1000).is_error      # no fd: message DMA
    write_id = c.send(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 4) + b"\1" * 4)
    read_id = 0x4242
    read = P.pack_message(read_id, P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 8))
    c.send_raw(_answer_dma_read(c) + read)                # one read on the server side
    first, second = c.reader.read(), c.reader.read()      # the socket timeout bounds each
    assert first is not None and second is not None
    assert (first.msg_id, first.is_reply, first.is_error) == (write_id, True, False)
    assert (second.msg_id, second.is_reply, second.is_error) == (read_id, True, False)
    assert second.payload == P.REGION_ACCESS.pack(0, 0, 8) + b"\1" * 4 + bytes(4)
    assert c.read(0, 0, 4) == b"\1" * 4                   # and the fast loop goes on
    c.close()


def test_a_request_split_by_a_dma_reply_is_not_read_from_its_middle(serve):
    """The reader holds the first half of a REGION_WRITE that came with a DMA
    reply; the second half, read on its own, has the shape of a whole
    REGION_READ (its data was made so).  The server must complete the write
    from the reader, not answer that "read"."""
    c = RawClient(serve(_DmaAtZero()))
    assert not dma_map(c, 0x100000, 0x1000).is_error
    first_id = c.send(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 4) + b"\1" * 4)
    decoy = P.pack_message(0x5151, P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4))
    assert len(decoy) == 32
    split_id = 0x4343
    split = P.pack_message(split_id, P.Command.REGION_WRITE,
                           P.REGION_ACCESS.pack(64, 0, len(decoy)) + decoy)
    c.send_raw(_answer_dma_read(c) + split[:32])
    time.sleep(0.3)                   # the server's DMA wait takes these in one read
    c.send_raw(split[32:])
    replies = [c.reader.read(), c.reader.read()]
    assert [(m.msg_id, m.is_error) for m in replies if m is not None] == \
        [(first_id, False), (split_id, False)]
    assert c.read(0, 64, 32) == decoy                      # written whole, as data
    c.close()

