"""VFIO_USER_DMA_MAP / DMA_UNMAP, and a model's DMA through the table."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from vfu_raw import RawClient, wait_until

from pyvfio.device import SharedMemory
from pyvfio.testing.fds import fd_numbers as open_fds
from pyvfio.user import protocol as P

R, W = P.DmaMapFlag.READ, P.DmaMapFlag.WRITE


def dma_map(c: RawClient, iova: int, size: int, fd: int | None = None, flags: int = R | W,
            offset: int = 0) -> P.Message:
    return c.call(P.Command.DMA_MAP, P.DmaMap(iova, size, flags, offset).pack(),
                  [] if fd is None else [fd])


@pytest.fixture
def mem():
    m = SharedMemory(4 * 4096)
    yield m
    m.close()


def test_map_with_fd_and_model_reads_it(scratch_client, scratch, mem):
    mem.view[0:4] = b"abcd"
    assert not dma_map(scratch_client, 0x100000, mem.size, mem.fd).is_error
    with scratch.lock:
        assert scratch.dma_read(0x100000, 4) == b"abcd"
        scratch.dma_write(0x100000 + 4096, b"xyz")
    assert bytes(mem.view[4096:4099]) == b"xyz"


def test_unmap_releases_everything_the_map_took(scratch_client, scratch, mem):
    before = open_fds()
    assert not dma_map(scratch_client, 0x100000, mem.size, mem.fd).is_error
    # CPython's mmap keeps a dup of the fd while mapped; the passed fd is closed.
    assert len(open_fds() - before) == 1
    scratch_client.ok(P.Command.DMA_UNMAP, P.DmaUnmap(0x100000, mem.size).pack())
    assert open_fds() == before


@pytest.mark.parametrize("payload", [
    b"",
    P.DmaMap(0x1000, 0x1000).pack()[:-1],                                  # short
    P.DmaMap(0x1000, 0x1000).pack() + b"\0",                               # long
    struct.pack("=IIQQQ", 31, 3, 0, 0x1000, 0x1000),                        # argsz < 32
    struct.pack("=IIQQQ", 32, 0x8 | 3, 0, 0x1000, 0x1000),                  # unknown flag
    struct.pack("=IIQQQ", 32, 3, 0, 0x1000, 0),                             # size 0
    struct.pack("=IIQQQ", 32, 3, 0, 2**64 - 4096, 8192),                    # wraps
])
def test_bad_map_is_einval(scratch_client, payload):
    assert scratch_client.errno_of(P.Command.DMA_MAP, payload) == errno.EINVAL


def test_overlapping_map_is_eexist(scratch_client, mem):
    assert not dma_map(scratch_client, 0x10000, 0x4000, mem.fd).is_error
    for iova, size in ((0x10000, 0x4000), (0xF000, 0x2000), (0x13000, 0x1000), (0x8000, 0x10000)):
        m = dma_map(scratch_client, iova, size, mem.fd)
        assert m.is_error and m.error == errno.EEXIST
    # adjacent is fine
    assert not dma_map(scratch_client, 0x14000, 0x1000).is_error


def test_fd_offset_must_be_page_aligned(scratch_client, mem):
    m = dma_map(scratch_client, 0x10000, 0x1000, mem.fd, offset=100)
    assert m.is_error and m.error == errno.EINVAL


def test_map_past_end_of_file_is_refused(scratch_client, mem):
    m = dma_map(scratch_client, 0x10000, 0x8000, mem.fd, offset=0x2000)
    assert m.is_error and m.error == errno.EINVAL


def test_map_of_a_socket_fd_fails_cleanly(scratch_client):
    a, b = os.pipe()
    try:
        m = dma_map(scratch_client, 0x10000, 0x1000, a)
        assert m.is_error and m.error in (errno.ENODEV, errno.EACCES, errno.EINVAL)
    finally:
        os.close(a)
        os.close(b)
    assert scratch_client.read(0, 4096, 4) is not None


def test_two_fds_are_refused(scratch_client, mem):
    m = scratch_client.call(P.Command.DMA_MAP, P.DmaMap(0x10000, 0x1000).pack(), [mem.fd, mem.fd])
    assert m.is_error and m.error == errno.EINVAL


def test_max_dma_maps(serve, scratch):
    c = RawClient(serve(scratch, max_dma_maps=3))
    for i in range(3):
        assert not dma_map(c, 0x1000 * (i + 1), 0x1000).is_error
    m = dma_map(c, 0x10000, 0x1000)
    assert m.is_error and m.error == errno.ENOSPC
    c.close()


def test_unmap_must_match_exactly(scratch_client, mem):
    assert not dma_map(scratch_client, 0x10000, 0x4000, mem.fd).is_error
    for iova, size in ((0x10000, 0x1000), (0x11000, 0x3000), (0xF000, 0x2000)):
        m = scratch_client.call(P.Command.DMA_UNMAP, P.DmaUnmap(iova, size).pack())
        assert m.is_error and m.error == errno.ENOENT
    m = scratch_client.ok(P.Command.DMA_UNMAP, P.DmaUnmap(0x10000, 0x4000).pack())
    assert P.DmaUnmap.unpack(m.payload, reply=True).address == 0x10000


@pytest.mark.parametrize("payload", [
    b"",
    P.DmaUnmap(0x1000, 0x1000).pack()[:-1],
    struct.pack("=IIQQ", 23, 0, 0x1000, 0x1000),                 # argsz < 24
    struct.pack("=IIQQ", 24, 0x4, 0x1000, 0x1000),               # unknown flag
    struct.pack("=IIQQ", 24, 0x2, 0x1000, 0),                    # ALL with an address
    struct.pack("=IIQQ", 24, 0x1, 0x1000, 0x1000),               # bitmap flag, no bitmap
    struct.pack("=IIQQQQ", 24, 0x1, 0x1000, 0x1000, 4096, 8),    # argsz too small for bitmap
])
def test_bad_unmap_is_einval(scratch_client, payload):
    assert scratch_client.errno_of(P.Command.DMA_UNMAP, payload) == errno.EINVAL


def test_unmap_all(scratch_client, scratch, mem):
    assert not dma_map(scratch_client, 0x10000, 0x1000, mem.fd).is_error
    assert not dma_map(scratch_client, 0x20000, 0x1000).is_error
    scratch_client.ok(P.Command.DMA_UNMAP, struct.pack("=IIQQ", 24, P.DmaUnmapFlag.ALL, 0, 0))
    with scratch.lock:
        assert not scratch._dma().contains(0x10000, 1)
    assert not dma_map(scratch_client, 0x10000, 0x1000, mem.fd).is_error


def test_unmap_while_model_holds_a_view(scratch_client, scratch, mem):
    mem.view[0] = 7
    assert not dma_map(scratch_client, 0x10000, 0x1000, mem.fd).is_error
    with scratch.lock:
        view = scratch.dma_view(0x10000, 16)
    scratch_client.ok(P.Command.DMA_UNMAP, P.DmaUnmap(0x10000, 0x1000).pack())
    assert view[0] == 7  # still mapped: no crash, memory stays valid
    view.release()
    with scratch.lock, pytest.raises(OSError) as exc:
        scratch.dma_read(0x10000, 1)
    assert exc.value.errno == errno.EFAULT


def test_accesses_outside_mappings_fail_cleanly(scratch_client, scratch, mem):
    assert not dma_map(scratch_client, 0x10000, 0x2000, mem.fd, flags=R).is_error
    assert not dma_map(scratch_client, 0x12000, 0x2000, mem.fd, flags=R | W,
                       offset=0x2000).is_error
    with scratch.lock:
        for iova, size in ((0xF000, 0x10), (0x13FF0, 0x20), (0x20000, 1)):
            with pytest.raises(OSError) as exc:
                scratch.dma_read(iova, size)
            assert exc.value.errno == errno.EFAULT
        with pytest.raises(OSError) as exc:
            scratch.dma_write(0x10000, b"x")
        assert exc.value.errno == errno.EACCES
        # an access spanning the two adjacent windows works
        mem.view[0x1FFE:0x2002] = b"ABCD"
        assert scratch.dma_read(0x11FFE, 4) == b"ABCD"


def test_dma_without_a_client_fails(scratch):
    with scratch.lock, pytest.raises(OSError) as exc:
        scratch.dma_read(0x1000, 4)
    assert exc.value.errno == errno.ENOTCONN


def test_message_based_dma_from_the_connection_thread_and_a_timer(serve, edu):
    """A window mapped without an fd is reached by DMA_READ/DMA_WRITE messages
    to the client; the edu DMA engine runs on a timer thread."""
    memory = bytearray(0x2000)
    memory[0x100:0x108] = b"msgdma!!"
    seen = []

    def handler(command: int, payload: bytes) -> bytes:
        seen.append(command)
        if command == P.Command.DMA_READ:
            req = P.DmaAccess.unpack(payload, with_data=False)
            off = req.address - 0x10000
            return P.DmaAccess(req.address, req.count,
                               bytes(memory[off:off + req.count])).pack()
        req = P.DmaAccess.unpack(payload, with_data=True)
        off = req.address - 0x10000
        memory[off:off + req.count] = req.data
        return P.DmaAccess(req.address, req.count).pack()

    c = RawClient(serve(edu))
    c.dma_handler = handler
    assert not dma_map(c, 0x10000, 0x2000).is_error
    c.write64(0, 0x80, 0x10100)
    c.write64(0, 0x88, 0x40000)
    c.write64(0, 0x90, 8)
    c.write64(0, 0x98, 1)
    # keep the connection busy with reads while the timer's DMA_READ arrives
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    c.write64(0, 0x80, 0x40000)
    c.write64(0, 0x88, 0x10200)
    c.write64(0, 0x90, 8)
    c.write64(0, 0x98, 3)
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    assert bytes(memory[0x200:0x208]) == b"msgdma!!"
    assert P.Command.DMA_READ in seen and P.Command.DMA_WRITE in seen
    c.close()


def test_message_based_dma_over_the_twin_socket(serve, edu):
    import threading
    memory = bytearray(0x1000)
    memory[:4] = b"twin"
    c = RawClient(serve(edu), negotiate=False)
    c.negotiate({"twin_socket": {"supported": True}, "max_msg_fds": 2})
    assert c.twin is not None
    stop = threading.Event()

    def twin_server() -> None:
        reader = P.MessageReader(c.twin)
        while not stop.is_set():
            try:
                m = reader.read()
            except OSError:
                return
            if m is None:
                return
            req = P.DmaAccess.unpack(m.payload, with_data=m.command == P.Command.DMA_WRITE)
            off = req.address - 0x20000
            if m.command == P.Command.DMA_READ:
                body = P.DmaAccess(req.address, req.count, bytes(memory[off:off + req.count]))
            else:
                memory[off:off + req.count] = req.data
                body = P.DmaAccess(req.address, req.count)
            P.send_message(c.twin, P.pack_message(m.msg_id, m.command, body.pack(),
                                                  P.MsgFlag.REPLY))

    t = threading.Thread(target=twin_server, daemon=True)
    t.start()
    assert not dma_map(c, 0x20000, 0x1000).is_error
    for reg, val in ((0x80, 0x20000), (0x88, 0x40000), (0x90, 4), (0x98, 1)):
        c.write64(0, reg, val)
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    for reg, val in ((0x80, 0x40000), (0x88, 0x20800), (0x90, 4), (0x98, 3)):
        c.write64(0, reg, val)
    assert wait_until(lambda: c.read32(0, 0x98) & 1 == 0)
    assert wait_until(lambda: bytes(memory[0x800:0x804]) == b"twin")
    stop.set()
    c.close()


def test_disconnect_unmaps_everything_and_keeps_device_state(serve, scratch, mem):
    path = serve(scratch)
    c = RawClient(path)
    assert not dma_map(c, 0x10000, mem.size, mem.fd).is_error
    c.write32(0, 0, 0xCAFE)
    c.close()
    assert wait_until(lambda: not scratch.connected)
    c = RawClient(path)
    assert c.read32(0, 0) == 0xCAFE  # device state kept
    with scratch.lock, pytest.raises(OSError):
        scratch.dma_read(0x10000, 1)  # but the old client's memory is gone
    c.close()
