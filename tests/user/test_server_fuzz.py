"""Live-socket robustness: hostile clients never crash the server, never
disturb another connection, never leak an fd (counted in /proc/self/fd: the
server runs in this process)."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vfu_raw import RawClient, wait_until

from pyvfio.device import SharedMemory
from pyvfio.devices.edu import EduDevice
from pyvfio.testing.fds import fd_numbers as open_fds
from pyvfio.user import protocol as P
from pyvfio.user.server import Server


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two edu devices on one server; a well-behaved client on the second
    stays connected throughout and must never notice the abuse of the first."""
    tmp = tmp_path_factory.mktemp("fuzz")
    victim_dev, bystander_dev = EduDevice(dma_delay=0.001), EduDevice(dma_delay=0.001)
    server = Server()
    victim = str(tmp / "victim.sock")
    bystander = str(tmp / "bystander.sock")
    server.add(victim_dev, victim)
    server.add(bystander_dev, bystander)
    server.start()
    good = RawClient(bystander)
    good.write32(0, 4, 0x5A5A5A5A)
    yield server, victim, good, victim_dev
    good.close()
    server.close()
    victim_dev.close()
    bystander_dev.close()


def settled(world) -> None:
    """After a hostile client is gone: the victim is free again, the bystander
    is fine, and every fd the hostile client brought is closed."""
    server, victim, good, _victim_dev = world
    assert wait_until(lambda: not server.devices[0].busy)
    assert good.read32(0, 4) == 0xA5A5A5A5
    assert good.read32(0, 0) == 0x010000ED
    c = RawClient(victim)  # the victim accepts a new client and works
    assert c.read32(0, 0) == 0x010000ED
    c.close()
    assert wait_until(lambda: not server.devices[0].busy)


@pytest.fixture
def baseline(world):
    settled(world)
    before = open_fds()
    yield world
    settled(world)
    assert wait_until(lambda: open_fds() == before), \
        f"leaked fds: {sorted(open_fds() - before)}"


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def efds(n: int) -> list[int]:
    return [os.eventfd(0) for _ in range(n)]


def test_vanish_mid_header(baseline):
    s = connect(baseline[1])
    s.sendall(b"\1\0\1\0")
    s.close()


def test_vanish_mid_payload_with_fds(baseline):
    c = RawClient(baseline[1])
    fds = efds(3)
    P.send_message(c.sock, P.pack_message(5, P.Command.DEVICE_SET_IRQS,
                                          P.IrqSet(0, 0x24, 0, 3).pack())[:20], fds)
    for f in fds:
        os.close(f)
    c.close()


def test_oversized_claim_then_vanish(baseline):
    c = RawClient(baseline[1])
    c.send_raw(P.HEADER.pack(9, P.Command.REGION_WRITE, 1 << 30, 0, 0) + b"x" * 1000)
    c.close()


def test_oversized_message_gets_e2big_and_the_connection_survives(baseline):
    c = RawClient(baseline[1])
    n = (1 << 20) + 8192
    c.send(P.Command.REGION_WRITE, P.RegionAccess(0, 0, n, b"\0" * n).pack())
    m = c.recv()
    assert m.is_error and m.error == 7  # E2BIG
    assert c.read32(0, 0) == 0x010000ED
    c.close()


def test_size_smaller_than_header_drops_only_that_client(baseline):
    c = RawClient(baseline[1])
    c.send_raw(P.HEADER.pack(1, P.Command.REGION_READ, 4, 0, 0))
    with pytest.raises((ConnectionError, OSError)):
        c.recv()
    c.close()


def test_too_many_fds(baseline):
    c = RawClient(baseline[1])
    fds = efds(40)
    m = c.call(P.Command.DEVICE_SET_IRQS, P.IrqSet(2, 0x24, 0, 40).pack(), fds)
    for f in fds:
        os.close(f)
    assert m.is_error
    c.close()


def test_fds_where_none_belong(baseline):
    c = RawClient(baseline[1])
    fds = efds(2)
    for cmd, payload in ((P.Command.REGION_READ, P.RegionAccess(0, 0, 4).pack()),
                         (P.Command.DEVICE_GET_INFO, P.DeviceInfoMsg().pack()),
                         (P.Command.DEVICE_RESET, b""),
                         (P.Command.DMA_UNMAP, P.DmaUnmap(0, 4096).pack())):
        m = c.call(cmd, payload, fds)
        assert m.is_error and m.error == 22
    for f in fds:
        os.close(f)
    c.close()


def test_bogus_dma_maps_and_client_leaves_them_mapped(baseline):
    """Each hostile map gets the reply the spec and the server's rules call
    for, and only the good window is mapped afterwards."""
    c = RawClient(baseline[1])
    mem = SharedMemory(16 * 4096)
    for iova, size, off, err in (
            (0x1000, 0x4000, 0, 0),                 # a good window
            (0x2000, 0x1000, 0, errno.EEXIST),      # inside it: "must be failed ... EEXIST"
            (0x1000, 0x4000, 0, errno.EEXIST),      # the same again
            (0x0000, 0x2000, 0, errno.EEXIST),      # overlapping its start
            (0x10000, 0x100000, 0, errno.EINVAL),   # past the end of the 64 KiB memfd
            (0x20000, 0x1000, 4095, errno.EINVAL),  # fd offset not page aligned
            (2**64 - 4096, 8192, 0, errno.EINVAL),  # wraps past 2**64
            (0x30000, 0x1000, 0x10000, errno.EINVAL),  # offset at the end of the memfd
            (0x40000, 0, 0, errno.EINVAL)):         # empty window
        m = c.call(P.Command.DMA_MAP, P.DmaMap(iova, size, 3, off).pack(), [mem.fd])
        assert (m.command, m.is_reply, m.payload, m.fds) == (P.Command.DMA_MAP, True, b"", [])
        assert (m.is_error, m.error) == (bool(err), err), (hex(iova), hex(size), off)
    # only the good window is there: its neighbours are free, its inside is not
    assert c.errno_of(P.Command.DMA_MAP, P.DmaMap(0x4000, 0x1000, 3).pack()) == errno.EEXIST
    c.ok(P.Command.DMA_MAP, P.DmaMap(0x5000, 0x1000, 3).pack())
    c.ok(P.Command.DMA_MAP, P.DmaMap(0x0, 0x1000, 3).pack())
    # an unmap must name a window exactly; the reply echoes the entry
    assert c.errno_of(P.Command.DMA_UNMAP, P.DmaUnmap(0x1000, 0x1000).pack()) == errno.ENOENT
    m = c.ok(P.Command.DMA_UNMAP, P.DmaUnmap(0x1000, 0x4000).pack())
    assert m.payload == P.DmaUnmap(0x1000, 0x4000).pack()
    c.ok(P.Command.DMA_MAP, P.DmaMap(0x2000, 0x1000, 3).pack(), [mem.fd])
    mem.close()
    c.close()  # vanish with windows mapped: the server unmaps them


def test_out_of_range_and_unknown_commands(baseline):
    c = RawClient(baseline[1])
    for region, off, n in ((0, 1 << 20, 4), (0, (1 << 64) - 2, 4), (42, 0, 4), (7, 255, 2)):
        assert c.call(P.Command.REGION_READ, P.RegionAccess(region, off, n).pack()).is_error
    for cmd in (0, 14, 19, 200, 0xFFFF):
        assert c.call(cmd, b"\0" * 16).error == 22
    # replies and odd flags from the client are ignored, not answered
    c.send(P.Command.REGION_READ, P.RegionAccess(0, 0, 4).pack(), flags=P.MsgFlag.REPLY)
    assert c.read32(0, 0) == 0x010000ED
    c.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(st.tuples(st.sampled_from([*list(P.Command), 0, 14, 99]),
                               st.binary(max_size=64), st.integers(0, 3),
                               st.sampled_from([0, 0x10, 0x1, 0x20, 0xF])),
                     min_size=1, max_size=12),
       seed=st.integers(0, 2**32))
def test_random_message_sequences(world, msgs, seed):
    before = open_fds()
    server, victim, good, _victim_dev = world
    c = RawClient(victim)
    rnd = random.Random(seed)
    for command, payload, nfds, flags in msgs:
        if command == P.Command.VERSION:
            continue
        if command in (P.Command.REGION_READ, P.Command.REGION_WRITE) and rnd.random() < 0.5:
            payload = struct.pack("=QII", rnd.choice([0, 4, 0x80, 1 << 20]), rnd.choice([0, 7]),
                                  rnd.choice([0, 4, 8])) + payload[:8]
        fds = efds(nfds)
        try:
            c.send(command, payload, fds, flags)
        except OSError:
            break
        finally:
            for f in fds:
                os.close(f)
    c.close()
    assert wait_until(lambda: not server.devices[0].busy)
    assert good.read32(0, 0) == 0x010000ED
    assert wait_until(lambda: open_fds() == before), sorted(open_fds() - before)


def test_a_second_client_waits_for_the_first(baseline):
    c = RawClient(baseline[1])
    s = connect(baseline[1])
    s.settimeout(0.3)
    s.sendall(P.pack_message(1, P.Command.VERSION, P.Version(0, 2).pack()))
    with pytest.raises(TimeoutError):
        s.recv(16)  # queued: not served while the first client is there
    assert c.read32(0, 0) == 0x010000ED  # and the first one is unaffected
    c.close()
    s.settimeout(5)
    assert len(s.recv(4096)) > 16  # now it gets its VERSION reply
    s.close()


def test_clients_beyond_the_queue_are_turned_away(baseline):
    c = RawClient(baseline[1])
    waiting = [connect(baseline[1]) for _ in range(4)]
    extra = connect(baseline[1])
    assert extra.recv(16) == b""  # closed at once
    assert c.read32(0, 0) == 0x010000ED
    for s in [extra, *waiting]:
        s.close()
    c.close()


def test_isolation_of_dma_spaces(tmp_path):
    """Two devices, two clients, the same IOVA: each device sees its own client's memory."""
    a, b = EduDevice(dma_delay=0.001), EduDevice(dma_delay=0.001)
    with Server() as server:
        server.add(a, str(tmp_path / "a.sock"))
        server.add(b, str(tmp_path / "b.sock"))
        server.start()
        ca, cb = RawClient(str(tmp_path / "a.sock")), RawClient(str(tmp_path / "b.sock"))
        ma, mb = SharedMemory(4096), SharedMemory(4096)
        ma.view[:3], mb.view[:3] = b"AAA", b"BBB"
        ca.ok(P.Command.DMA_MAP, P.DmaMap(0x10000, 4096).pack(), [ma.fd])
        cb.ok(P.Command.DMA_MAP, P.DmaMap(0x10000, 4096).pack(), [mb.fd])
        with a.lock:
            assert a.dma_read(0x10000, 3) == b"AAA"
        with b.lock:
            assert b.dma_read(0x10000, 3) == b"BBB"
        ca.close()
        assert wait_until(lambda: not a.connected)
        with b.lock:
            assert b.dma_read(0x10000, 3) == b"BBB"  # b is unaffected by a's client leaving
        cb.close()
        ma.close()
        mb.close()
    a.close()
    b.close()
