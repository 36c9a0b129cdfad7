"""The vfio-user client against a hostile (or broken) server.

A tiny scripted server runs in a thread: it answers VERSION as told, then
hands each message it receives to the test's ``handler``, which returns the
raw bytes (and fds) to send back.  That lets a test send what no correct
server would: wrong ids, wrong sizes, absurd counts, capability loops, fds
where none belong, a close in the middle of a message.  Each test checks the
client raises the documented error, that the connection is then dropped, and
that no fd leaked.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvfio.device import IrqAction, IrqIndex, SharedMemory
from pyvfio.errors import ConnectionClosed, FdsTruncated, PeerError, ProtocolError, UsageError
from pyvfio.testing.fds import fd_numbers as open_fds
from pyvfio.user import protocol as P
from pyvfio.user.client import connect
from pyvfio.user.protocol import HEADER, Command, Message, MessageReader, send_message

REPLY = 1
ERROR = 0x20

Reply = bytes | tuple[bytes, list[int]] | None
Handler = Callable[[Message], Reply]


def reply_to(msg: Message, payload: bytes = b"", *, flags: int = REPLY, error: int = 0,
             msg_id: int | None = None, command: int | None = None,
             size: int | None = None) -> bytes:
    """A reply to ``msg``; any header field can be forced to a wrong value."""
    return HEADER.pack(msg.msg_id if msg_id is None else msg_id,
                       msg.command if command is None else command,
                       16 + len(payload) if size is None else size, flags, error) + payload


def version_reply(msg: Message, caps: dict[str, Any] | None = None, major: int = 0,
                  minor: int = 2) -> bytes:
    body = struct.pack("=HH", major, minor)
    if caps is not None:
        body += json.dumps({"capabilities": caps}).encode() + b"\0"
    return reply_to(msg, body)


class FakeServer:
    """One connection, answered by ``handler`` (VERSION by ``version``)."""

    def __init__(self, path: Path, handler: Handler,
                 version: Callable[[Message], Reply] | None = None) -> None:
        self.path = str(path)
        self.handler = handler
        self.version = version or (lambda m: version_reply(m, {"max_msg_fds": 8}))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.received: list[Message] = []
        self.conn: socket.socket | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, out: Reply) -> None:
        assert self.conn is not None
        if out is None:
            return
        data, fds = out if isinstance(out, tuple) else (out, [])
        if data:
            send_message(self.conn, data, fds)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            self.conn = conn
            reader = MessageReader(conn, max_msg_size=(2 << 20), max_fds=64)
            first = True
            while True:
                msg = reader.read()
                if msg is None:
                    return
                self.received.append(msg)
                out = self.version(msg) if first else self.handler(msg)
                first = False
                if out == b"CLOSE":
                    conn.close()
                    return
                self._send(out)
        except OSError:
            pass
        except BaseException as exc:  # surfaced by close()
            self.error = exc

    def close(self) -> None:
        self.listener.close()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(timeout=5)
        if self.conn is not None:
            self.conn.close()
        for m in self.received:
            m.close_fds()
        if self.error is not None:
            raise self.error


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []
    before = open_fds()

    def start(handler: Handler, version: Callable[[Message], Reply] | None = None) -> FakeServer:
        s = FakeServer(tmp_path / f"s{len(servers)}.sock", handler, version)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {leaked}"


def good_region_info(index: int, size: int = 0x1000, flags: int = 3) -> bytes:
    return P.RegionInfoMsg(index, flags=flags, size=size).pack()


def basic(msg: Message) -> Reply:
    """A correct minimal device: 9 regions of 4 KiB, 5 IRQ indexes."""
    if msg.command == Command.DEVICE_GET_INFO:
        return reply_to(msg, P.DeviceInfoMsg(16, 3, 9, 5).pack())
    if msg.command == Command.DEVICE_GET_REGION_INFO:
        index = struct.unpack_from("=I", msg.payload, 8)[0]
        return reply_to(msg, good_region_info(index))
    if msg.command == Command.REGION_READ:
        count = P.REGION_ACCESS.unpack_from(msg.payload)[2]
        return reply_to(msg, msg.payload[:16] + bytes(range(count)))
    return reply_to(msg)


# --- negotiation -------------------------------------------------------------------------------


def test_no_server_is_connection_closed(tmp_path: Path) -> None:
    with pytest.raises(ConnectionClosed, match="no such socket"):
        connect(str(tmp_path / "nothing.sock"))


def test_server_closing_during_version(serve: Any) -> None:
    s = serve(basic, version=lambda m: b"CLOSE")
    with pytest.raises(ConnectionClosed, match="during VERSION"):
        connect(s.path)


def test_version_wrong_major_is_protocol_error(serve: Any) -> None:
    s = serve(basic, version=lambda m: version_reply(m, {}, major=1))
    with pytest.raises(ProtocolError, match=r"protocol 1\.2"):
        connect(s.path)


def test_version_higher_minor_than_proposed_is_refused(serve: Any) -> None:
    s = serve(basic, version=lambda m: version_reply(m, {}, minor=P.VERSION_MINOR + 1))
    with pytest.raises(ProtocolError):
        connect(s.path)


def test_version_error_reply_is_peer_error(serve: Any) -> None:
    s = serve(basic, version=lambda m: reply_to(m, flags=REPLY | ERROR, error=errno.ENOTSUP))
    with pytest.raises(PeerError) as info:
        connect(s.path)
    assert info.value.errno == errno.ENOTSUP


@pytest.mark.parametrize("body", [
    b"\0\0\2\0{not json}\0",
    b"\0\0\2\0" + b'{"capabilities": {"max_msg_fds": "many"}}\0',
    b"\0\0\2\0" + b'{"capabilities": {"max_data_xfer_size": 0}}\0',
    b"\0\0\2\0" + b'{"capabilities": []}\0',
    b"\0\0\2\0" + b'{"capabilities": {}}',  # no NUL
    b"\0",  # shorter than major/minor
])
def test_version_malformed_capabilities(serve: Any, body: bytes) -> None:
    s = serve(basic, version=lambda m: reply_to(m, body))
    with pytest.raises(ProtocolError):
        connect(s.path)


def test_version_reply_with_wrong_command(serve: Any) -> None:
    s = serve(basic, version=lambda m: reply_to(m, b"\0\0\2\0", command=Command.DEVICE_GET_INFO))
    with pytest.raises(ProtocolError):
        connect(s.path)


def test_twin_socket_enabled_without_fd_is_refused(serve: Any) -> None:
    """Spec: supported=true without a valid fd_index is inconsistent: abort."""
    s = serve(basic, version=lambda m: version_reply(m, {"twin_socket": {"supported": True}}))
    with pytest.raises(ProtocolError, match="twin"):
        connect(s.path)


def test_twin_fd_that_is_not_a_socket_is_refused_and_closed(serve: Any) -> None:
    r, w = os.pipe()

    def version(m: Message) -> Reply:
        return (version_reply(m, {"twin_socket": {"supported": True, "fd_index": 0}}), [r])

    s = serve(basic, version=version)
    with pytest.raises(ProtocolError, match="not a UNIX stream socket"):
        connect(s.path)
    os.close(r)
    os.close(w)


def test_silent_server_times_out(serve: Any) -> None:
    s = serve(basic, version=lambda m: None)
    with pytest.raises(ConnectionClosed, match=r"did not answer VERSION within 0\.3s"):
        connect(s.path, timeout=0.3)


def test_server_without_json_gets_defaults(serve: Any) -> None:
    s = serve(basic, version=lambda m: reply_to(m, struct.pack("=HH", 0, 1)))
    with connect(s.path) as dev:
        assert dev.version == (0, 1)
        assert dev.capabilities.max_msg_fds == 1
        assert dev.capabilities.max_data_xfer_size == 1 << 20


# --- replies -----------------------------------------------------------------------------------


def _read_handler(fn: Callable[[Message], Reply]) -> Handler:
    def handler(msg: Message) -> Reply:
        if msg.command == Command.REGION_READ:
            return fn(msg)
        return basic(msg)
    return handler


@pytest.mark.parametrize("bad", [
    pytest.param(lambda m: reply_to(m, m.payload[:16] + b"\1\2"), id="short-data"),
    pytest.param(lambda m: reply_to(m, m.payload[:16] + b"\1\2\3\4\5"), id="long-data"),
    pytest.param(lambda m: reply_to(m, P.REGION_ACCESS.pack(8, 0, 4) + b"abcd"), id="other-offset"),
    pytest.param(lambda m: reply_to(m, P.REGION_ACCESS.pack(0, 1, 4) + b"abcd"), id="other-region"),
    pytest.param(lambda m: reply_to(m, m.payload[:16] + b"abcd", msg_id=m.msg_id + 1),
                 id="wrong-id"),
    pytest.param(lambda m: reply_to(m, m.payload[:16] + b"abcd", command=Command.REGION_WRITE),
                 id="wrong-command"),
    pytest.param(lambda m: reply_to(m, b""), id="empty"),
])
def test_malformed_read_reply_drops_the_connection(serve: Any, bad: Handler) -> None:
    s = serve(_read_handler(bad))
    dev = connect(s.path, timeout=2)
    bar = dev.bar(0)
    with pytest.raises(ProtocolError):
        bar.read32(0)
    assert not dev.connected
    with pytest.raises(ConnectionClosed):
        bar.read32(0)
    dev.close()


@pytest.mark.parametrize("bad", [
    pytest.param(lambda m: reply_to(m, m.payload[:16] + b"abcd", msg_id=m.msg_id + 1),
                 id="wrong-id"),
    pytest.param(lambda m: reply_to(m, m.payload[:16] + b"abcd", command=Command.REGION_WRITE),
                 id="wrong-command"),
    pytest.param(lambda m: reply_to(m, flags=REPLY | ERROR, error=5), id="error"),
    pytest.param(lambda m: reply_to(m, m.payload[:16] + b"abcd"), id="good-reply"),
])
def test_every_fd_of_an_unexpected_reply_is_closed(serve: Any, bad: Handler) -> None:
    """Whatever the client makes of the reply, each fd that came with it is
    closed: none is kept, none leaks (the check is exact)."""
    before = open_fds()
    pipes = [os.pipe() for _ in range(2)]
    sent = [fd for pair in pipes for fd in pair]
    s = serve(_read_handler(lambda m: (bad(m), sent)))
    dev = connect(s.path, timeout=2)
    try:
        dev.bar(0).read32(0)
    except (ProtocolError, PeerError):
        pass
    dev.close()
    for fd in sent:
        os.close(fd)
    s.close()
    assert open_fds() == before


def test_huge_msg_size_is_not_allocated(serve: Any) -> None:
    """A header claiming 4 GiB: the client refuses it without buffering it."""
    s = serve(_read_handler(lambda m: reply_to(m, b"x" * 100, size=0xFFFF_FFF0)))
    dev = connect(s.path, timeout=1)
    with pytest.raises((ProtocolError, ConnectionClosed)):
        dev.bar(0).read32(0)
    assert not dev.connected
    dev.close()


def test_msg_size_below_header_is_protocol_error(serve: Any) -> None:
    s = serve(_read_handler(lambda m: reply_to(m, b"", size=8)))
    dev = connect(s.path, timeout=1)
    with pytest.raises(ProtocolError):
        dev.bar(0).read32(0)
    dev.close()


def test_error_reply_keeps_errno_and_the_connection(serve: Any) -> None:
    calls = []

    def read(m: Message) -> Reply:
        calls.append(m)
        if len(calls) == 1:
            return reply_to(m, flags=REPLY | ERROR, error=errno.EACCES)
        return basic(m)

    s = serve(_read_handler(read))
    with connect(s.path) as dev:
        with pytest.raises(PeerError) as info:
            dev.bar(0).read32(4)
        assert info.value.errno == errno.EACCES
        assert "VFIO_USER_REGION_READ" in str(info.value)
        assert dev.connected
        assert dev.bar(0).read32(4) == 0x03020100


def test_error_reply_with_errno_zero_becomes_eio(serve: Any) -> None:
    s = serve(_read_handler(lambda m: reply_to(m, flags=REPLY | ERROR, error=0)))
    with connect(s.path) as dev, pytest.raises(PeerError) as info:
        dev.bar(0).read8(0)
    assert info.value.errno == errno.EIO


def test_server_vanishing_mid_call(serve: Any) -> None:
    s = serve(_read_handler(lambda m: b"CLOSE"))
    dev = connect(s.path)
    with pytest.raises(ConnectionClosed, match="closed the connection"):
        dev.bar(0).read32(0)
    with pytest.raises(ConnectionClosed):
        dev.reset()
    dev.close()  # close of a dead connection is quiet


def test_server_vanishing_inside_a_message(serve: Any) -> None:
    def half(m: Message) -> Reply:
        assert s.conn is not None
        s.conn.sendall(reply_to(m, m.payload[:16] + b"abcd")[:20])
        return b"CLOSE"

    s = serve(_read_handler(half))
    dev = connect(s.path)
    with pytest.raises(ConnectionClosed, match="inside a message"):
        dev.bar(0).read32(0)
    dev.close()


def test_silent_server_times_out_per_request(serve: Any) -> None:
    s = serve(_read_handler(lambda m: None))
    dev = connect(s.path, timeout=0.3)
    with pytest.raises(ConnectionClosed, match=r"no reply within 0\.3s"):
        dev.bar(0).read32(0)
    assert not dev.connected
    dev.close()


def test_unsolicited_fds_on_a_reply_are_closed(serve: Any) -> None:
    before = open_fds()
    r, w = os.pipe()
    s = serve(_read_handler(lambda m: (reply_to(m, m.payload[:16] + b"abcd"), [r, w])))
    with connect(s.path) as dev:
        assert dev.bar(0).read32(0) == int.from_bytes(b"abcd", "little")
    os.close(r)
    os.close(w)
    s.close()
    assert open_fds() == before


# --- device info, region info, IRQ info --------------------------------------------------------


def test_absurd_region_count_is_refused(serve: Any) -> None:
    def handler(m: Message) -> Reply:
        if m.command == Command.DEVICE_GET_INFO:
            return reply_to(m, P.DeviceInfoMsg(16, 3, 0xFFFF_FFFF, 5).pack())
        return basic(m)

    s = serve(handler)
    dev = connect(s.path)
    with pytest.raises(ProtocolError, match="regions"):
        _ = dev.info
    dev.close()


def _region_handler(make: Callable[[Message, int], Reply]) -> Handler:
    def handler(m: Message) -> Reply:
        if m.command == Command.DEVICE_GET_REGION_INFO:
            return make(m, struct.unpack_from("=I", m.payload, 8)[0])
        return basic(m)
    return handler


def test_sparse_area_outside_the_region_is_refused(serve: Any) -> None:
    s = serve(_region_handler(lambda m, i: reply_to(m, P.RegionInfoMsg(
        i, flags=7, size=0x1000, sparse_areas=((0, 0x2000),)).pack())))
    dev = connect(s.path)
    with pytest.raises(ProtocolError, match="sparse area"):
        dev.bar(0)
    dev.close()


def test_capability_chain_loop_is_refused(serve: Any) -> None:
    def make(m: Message, i: int) -> Reply:
        # a sparse-mmap capability at 32 whose "next" points back at itself
        info = struct.pack("=IIIIQQ", 32 + 8 + 8, 3 | 8, i, 32, 0x1000, 0)
        cap = struct.pack("=HHI", 1, 1, 32) + struct.pack("=II", 0, 0)
        return reply_to(m, info + cap)

    s = serve(_region_handler(make))
    dev = connect(s.path)
    with pytest.raises(ProtocolError, match="loops"):
        dev.bar(0)
    dev.close()


def test_capability_pointing_outside_the_reply_is_refused(serve: Any) -> None:
    def make(m: Message, i: int) -> Reply:
        info = struct.pack("=IIIIQQ", 48, 3 | 8, i, 4000, 0x1000, 0)
        return reply_to(m, info + bytes(16))

    s = serve(_region_handler(make))
    dev = connect(s.path)
    with pytest.raises(ProtocolError):
        dev.bar(0)
    dev.close()


def test_region_reply_larger_than_asked_is_refused(serve: Any) -> None:
    s = serve(_region_handler(lambda m, i: reply_to(
        m, struct.pack("=IIIIQQ", 32, 3, i, 0, 0x1000, 0) + bytes(100_000))))
    dev = connect(s.path)
    with pytest.raises(ProtocolError):
        dev.bar(0)
    dev.close()


def test_region_info_grows_argsz_once(serve: Any) -> None:
    """A reply whose caps do not fit says the argsz it needs; the client asks again."""
    areas = tuple((i * 0x1000, 0x1000) for i in range(64))  # 64 areas: > the first argsz
    memfd = os.memfd_create("bar")
    os.ftruncate(memfd, 0x40000)
    asked: list[int] = []

    def make(m: Message, i: int) -> Reply:
        argsz = struct.unpack_from("=I", m.payload)[0]
        asked.append(argsz)
        msg = P.RegionInfoMsg(i, flags=7, size=0x40000, sparse_areas=areas)
        return (reply_to(m, msg.pack(max_size=argsz)), [memfd])

    s = serve(_region_handler(make))
    with connect(s.path) as dev:
        info = dev.region_info(0)
        assert len(info.mmap_areas) == 64
        assert asked[1] == P.RegionInfoMsg(0, sparse_areas=areas).full_size()
        with dev.bar(0).mmap(0x3000) as m:
            m.write32(0, 0xCAFE)
        assert os.pread(memfd, 4, 0x3000) == (0xCAFE).to_bytes(4, "little")
    os.close(memfd)


def test_fd_with_a_region_that_is_not_mappable_is_closed(serve: Any) -> None:
    before = open_fds()
    r, w = os.pipe()
    s = serve(_region_handler(lambda m, i: (reply_to(m, good_region_info(i)), [r])))
    with connect(s.path) as dev:
        assert not dev.region_info(0).mmappable
    os.close(r)
    os.close(w)
    s.close()
    assert open_fds() == before


def test_mmap_flag_without_fd_means_messages(serve: Any) -> None:
    s = serve(_region_handler(lambda m, i: reply_to(m, good_region_info(i, flags=7))))
    with connect(s.path) as dev:
        info = dev.region_info(0)
        assert not info.mmappable
        assert dev.bar(0).read32(0) == 0x03020100


def test_irq_info_for_another_index_is_refused(serve: Any) -> None:
    def handler(m: Message) -> Reply:
        if m.command == Command.DEVICE_GET_IRQ_INFO:
            return reply_to(m, P.IrqInfoMsg(7, flags=1, count=1).pack())
        return basic(m)

    s = serve(handler)
    dev = connect(s.path)
    with pytest.raises(ProtocolError, match="IRQ_INFO"):
        dev.irq_info(IrqIndex.MSI)
    dev.close()


def test_set_irqs_fds_are_split_to_the_servers_max_msg_fds(serve: Any) -> None:
    def handler(m: Message) -> Reply:
        if m.command == Command.DEVICE_GET_IRQ_INFO:
            return reply_to(m, P.IrqInfoMsg(2, flags=1, count=5).pack())
        return basic(m)

    s = serve(handler, version=lambda m: version_reply(m, {"max_msg_fds": 2}))
    with connect(s.path) as dev:
        fds = dev.enable_irq(IrqIndex.MSIX, 5)
        assert len(fds) == 5
    sets = [P.IrqSet.unpack(m.payload) for m in s.received if m.command == Command.DEVICE_SET_IRQS]
    eventfd_sets = [x for x in sets if x.flags & IrqAction.DATA_EVENTFD]
    assert [(x.start, x.count) for x in eventfd_sets] == [(0, 2), (2, 2), (4, 1)]
    received = [m for m in s.received if m.command == Command.DEVICE_SET_IRQS and m.fds]
    assert [len(m.fds) for m in received] == [2, 2, 1]


# --- server -> client commands -----------------------------------------------------------------


def test_server_dma_outside_mappings_gets_efault(serve: Any) -> None:
    """The server DMA_READs an unmapped address in the middle of our request:
    the client answers EFAULT and still gets its own reply."""
    answers: list[Message] = []

    def handler(m: Message) -> Reply:
        if m.command == Command.DEVICE_RESET:
            assert s.conn is not None
            s.conn.sendall(HEADER.pack(77, Command.DMA_READ, 32, 0, 0)
                           + P.DMA_ACCESS.pack(0x5000, 8))
            reader = MessageReader(s.conn)
            answers.append(reader.read())  # type: ignore[arg-type]
            return reply_to(m)
        return basic(m)

    s = serve(handler)
    with connect(s.path) as dev:
        dev.reset()
    (a,) = answers
    assert (a.msg_id, a.command, a.is_reply, a.is_error, a.error) == \
        (77, Command.DMA_READ, True, True, errno.EFAULT)


def test_unknown_server_command_gets_enosys(serve: Any) -> None:
    answers: list[Message] = []

    def handler(m: Message) -> Reply:
        if m.command == Command.DEVICE_RESET:
            assert s.conn is not None
            s.conn.sendall(HEADER.pack(5, Command.DEVICE_GET_INFO, 16, 0, 0))
            answers.append(MessageReader(s.conn).read())  # type: ignore[arg-type]
            return reply_to(m)
        return basic(m)

    s = serve(handler)
    with connect(s.path) as dev:
        dev.reset()
    assert answers[0].is_error and answers[0].error == errno.ENOSYS


def test_server_dma_read_of_a_mapping_without_fd(serve: Any) -> None:
    """DMA_READ served inline while the client waits for the DMA_MAP reply's
    successor, and DMA_WRITE lands in client memory."""
    got: list[Message] = []

    def handler(m: Message) -> Reply:
        if m.command == Command.DMA_MAP:
            assert not m.fds  # mapped without an fd
            return reply_to(m)
        if m.command == Command.DEVICE_RESET:
            assert s.conn is not None
            reader = MessageReader(s.conn)
            s.conn.sendall(HEADER.pack(1, Command.DMA_READ, 32, 0, 0)
                           + P.DMA_ACCESS.pack(0x10010, 4))
            got.append(reader.read())  # type: ignore[arg-type]
            s.conn.sendall(HEADER.pack(2, Command.DMA_WRITE, 36, 0, 0)
                           + P.DMA_ACCESS.pack(0x10020, 4) + b"WXYZ")
            got.append(reader.read())  # type: ignore[arg-type]
            return reply_to(m)
        return basic(m)

    s = serve(handler)
    with connect(s.path, share_dma_fds=False) as dev:
        buf = dev.dma_alloc(0x1000, iova=0x10000)
        buf.write(b"abcd", 0x10)
        dev.reset()
        assert buf.read(0x20, 4) == b"WXYZ"
    read_reply, write_reply = got
    assert read_reply.payload == P.DMA_ACCESS.pack(0x10010, 4) + b"abcd"
    assert not write_reply.is_error
    assert write_reply.payload == P.DMA_ACCESS.pack(0x10020, 4)


def test_dma_map_sends_the_memfd_and_unmap_matches(serve: Any) -> None:
    s = serve(basic)
    with connect(s.path) as dev:
        mem = SharedMemory(0x2000)
        dev.dma_space.map(0x40000, mem, writable=False)
        dev.dma_space.unmap(0x40000, 0x2000)
        mem.close()
    maps = [m for m in s.received if m.command == Command.DMA_MAP]
    unmaps = [m for m in s.received if m.command == Command.DMA_UNMAP]
    dm = P.DmaMap.unpack(maps[0].payload)
    assert (dm.address, dm.size, dm.flags, dm.offset) == (0x40000, 0x2000, P.DmaMapFlag.READ, 0)
    assert len(maps[0].fds) == 1
    du = P.DmaUnmap.unpack(unmaps[0].payload)
    assert (du.address, du.size, du.flags) == (0x40000, 0x2000, 0)


def test_many_requests_leak_no_fds(serve: Any) -> None:
    """Region info with fds, IRQ setup and teardown, DMA map/unmap, repeated:
    the fd count of the client process does not grow."""
    memfd = os.memfd_create("bar")
    os.ftruncate(memfd, 0x1000)

    def handler(m: Message) -> Reply:
        if m.command == Command.DEVICE_GET_REGION_INFO:
            i = struct.unpack_from("=I", m.payload, 8)[0]
            return (reply_to(m, good_region_info(i, flags=7)), [memfd])
        if m.command == Command.DEVICE_GET_IRQ_INFO:
            return reply_to(m, P.IrqInfoMsg(1, flags=1, count=1).pack())
        return basic(m)

    s = serve(handler)
    before = open_fds()
    for _ in range(5):
        with _reconnect(s, handler) as dev:
            dev.regions()
            dev.enable_irq(IrqIndex.MSI, 1)
            buf = dev.dma_alloc(0x1000)
            buf.close()
    assert open_fds() == before
    os.close(memfd)


def _reconnect(s: FakeServer, handler: Handler) -> Any:
    """A fresh server on a fresh path for each round (the fake serves one
    connection)."""
    path = Path(s.path).with_name(f"r{len(os.listdir(Path(s.path).parent))}.sock")
    fresh = FakeServer(path, handler)
    dev = connect(fresh.path)

    class _Ctx:
        def __enter__(self) -> Any:
            return dev

        def __exit__(self, *exc: object) -> None:
            dev.close()
            fresh.close()

    return _Ctx()


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_idle_client_serves_dma_for_mappings_without_fd(serve: Any) -> None:
    """No request in flight, no twin socket: the server DMA_WRITEs into a
    mapping made without an fd and the client's idle thread answers."""
    replies: list[Message] = []

    def handler(m: Message) -> Reply:
        if m.is_reply:
            replies.append(m)
            return None
        return basic(m)

    s = serve(handler)
    with connect(s.path, share_dma_fds=False) as dev:
        buf = dev.dma_alloc(0x1000, iova=0x20000)
        assert s.conn is not None
        s.conn.sendall(HEADER.pack(9, Command.DMA_WRITE, 16 + 16 + 3, 0, 0)
                       + P.DMA_ACCESS.pack(0x20100, 3) + b"hey")
        _wait_for(lambda: bool(replies))
        assert buf.read(0x100, 3) == b"hey"
        s.conn.sendall(HEADER.pack(10, Command.DMA_READ, 32, 0, 0) + P.DMA_ACCESS.pack(0x20100, 3))
        _wait_for(lambda: len(replies) == 2)
        assert replies[1].payload == P.DMA_ACCESS.pack(0x20100, 3) + b"hey"
        # requests still work with the idle thread around
        assert dev.bar(0).read32(0) == 0x03020100
    assert (replies[0].msg_id, replies[0].is_error) == (9, False)


def test_twin_socket_serves_server_commands(serve: Any) -> None:
    """The server sets up a twin socket; its DMA commands go there and the
    client answers there while the main socket stays request/reply."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def version(m: Message) -> Reply:
        caps = {"max_msg_fds": 8, "twin_socket": {"supported": True, "fd_index": 0}}
        return (version_reply(m, caps), [theirs.fileno()])

    s = serve(basic, version=version)
    with connect(s.path) as dev:
        theirs.close()
        offered = json.loads(s.received[0].payload[4:-1])["capabilities"]
        assert offered["twin_socket"] == {"supported": True}
        buf = dev.dma_alloc(0x1000, iova=0x30000)  # with an fd: served all the same
        buf.write(b"twin", 0x10)
        reader = MessageReader(ours)
        ours.sendall(HEADER.pack(3, Command.DMA_READ, 32, 0, 0) + P.DMA_ACCESS.pack(0x30010, 4))
        reply = reader.read()
        assert reply is not None and reply.is_reply and not reply.is_error
        assert reply.payload == P.DMA_ACCESS.pack(0x30010, 4) + b"twin"
        ours.sendall(HEADER.pack(4, Command.DMA_READ, 32, 0, 0) + P.DMA_ACCESS.pack(0x90000, 4))
        reply = reader.read()
        assert reply is not None and reply.is_error and reply.error == errno.EFAULT
        assert dev.bar(0).read32(0) == 0x03020100
        # a reply on the twin socket (we send no commands there) breaks the connection
        ours.sendall(HEADER.pack(4, Command.DMA_READ, 16, 1, 0))
        _wait_for(lambda: not dev.connected)
    ours.close()


def test_server_taking_no_fds(serve: Any) -> None:
    """max_msg_fds 0: DMA maps go without fds, eventfds cannot be routed."""
    def handler(m: Message) -> Reply:
        if m.command == Command.DEVICE_GET_IRQ_INFO:
            return reply_to(m, P.IrqInfoMsg(1, flags=1, count=1).pack())
        return basic(m)

    s = serve(handler, version=lambda m: version_reply(m, {"max_msg_fds": 0}))
    with connect(s.path) as dev:
        buf = dev.dma_alloc(0x1000)
        assert not dev.dma_space.mappings[0].shared_fd
        buf.close()
        with pytest.raises(UsageError, match="max_msg_fds 0"):
            dev.enable_irq(IrqIndex.MSI)
    maps = [m for m in s.received if m.command == Command.DMA_MAP]
    assert len(maps) == 1 and maps[0].fds == []


def test_unsolicited_second_reply_drops_the_connection(serve: Any) -> None:
    s = serve(_read_handler(lambda m: reply_to(m, m.payload[:16] + b"abcd")
                            + reply_to(m, m.payload[:16] + b"abcd")))
    dev = connect(s.path)
    with pytest.raises(ProtocolError, match="second reply"):
        dev.bar(0).read32(0)
    assert not dev.connected
    dev.close()


def test_dma_unmap_answered_for_another_range(serve: Any) -> None:
    def handler(m: Message) -> Reply:
        if m.command == Command.DMA_UNMAP:
            return reply_to(m, P.DmaUnmap(0xDEAD000, 0x1000).pack())
        return basic(m)

    s = serve(handler)
    dev = connect(s.path)
    buf = dev.dma_alloc(0x1000, iova=0x7000)
    with pytest.raises(ProtocolError, match="DMA_UNMAP"):
        buf.close()
    assert dev.dma_space.mappings == []  # forgotten locally all the same
    assert not dev.connected
    dev.close()


# --- the register fast path: odd replies after clean ones -------------------------------------
#
# After a clean register read the client reads the socket itself in call()
# and answers a read that holds exactly its clean reply there; anything else
# is handed to the reader.  The first read of a connection never takes that
# path, so these tests send their odd reply after three clean ones.

def _after_clean_reads(odd: Callable[[Message, socket.socket], Reply],
                       clean: int = 3) -> Callable[..., Handler]:
    """A handler answering the REGION_READ after ``clean`` clean ones with
    ``odd(msg, conn)``; made by :func:`_start`."""
    def make(s_ref: list[FakeServer]) -> Handler:
        reads = [0]

        def handler(msg: Message) -> Reply:
            if msg.is_reply:               # the client's answer to our command
                return None
            if msg.command != Command.REGION_READ:
                return basic(msg)
            reads[0] += 1
            if reads[0] != clean + 1:
                return basic(msg)
            assert s_ref[0].conn is not None
            return odd(msg, s_ref[0].conn)
        return handler
    return make


def _start(serve: Any, make: Callable[..., Handler]) -> FakeServer:
    ref: list[FakeServer] = []
    s = serve(make(ref))
    ref.append(s)
    return s


def _good(msg: Message) -> bytes:
    return reply_to(msg, msg.payload[:16] + b"\x10\x20\x30\x40")


def _split(msg: Message, conn: socket.socket) -> Reply:
    data = _good(msg)
    conn.sendall(data[:20])
    threading.Event().wait(0.1)   # the client's read takes the first part alone
    return data[20:]


def _dma_first(msg: Message, conn: socket.socket) -> Reply:
    # a server command before the reply, in the same send: the client serves
    # it (here: a DMA_READ outside any mapping, answered with EFAULT)
    return HEADER.pack(0x77, Command.DMA_READ, 32, 0, 0) + P.DMA_ACCESS.pack(0xdead000, 4) \
        + _good(msg)


def _command_after(msg: Message, conn: socket.socket) -> Reply:
    # the reply and, behind it in the same send, a server command
    return _good(msg) + HEADER.pack(0x78, Command.DMA_READ, 32, 0, 0) \
        + P.DMA_ACCESS.pack(0xdead000, 4)


@pytest.mark.parametrize("odd", [_split, _dma_first, _command_after],
                         ids=["split-reply", "command-before", "command-after"])
def test_fast_path_hands_odd_reads_to_the_reader(serve: Any, odd: Any) -> None:
    s = _start(serve, _after_clean_reads(odd))
    with connect(s.path, timeout=2) as dev:
        bar = dev.bar(0)
        assert [bar.read32(0) for _ in range(3)] == [0x03020100] * 3
        assert bar.read32(0) == 0x40302010
        assert [bar.read32(0) for _ in range(2)] == [0x03020100] * 2
        assert dev.connected
    dma = [m for m in s.received if m.command == Command.DMA_READ]
    if odd is not _split:                      # the server command was answered, once
        assert [(m.msg_id, m.is_reply, m.error) for m in dma] == \
            [(0x77 if odd is _dma_first else 0x78, True, errno.EFAULT)]


@pytest.mark.parametrize(("odd", "error"), [
    (lambda m, c: reply_to(m, flags=REPLY | ERROR, error=errno.EBUSY), PeerError),
    (lambda m, c: reply_to(m, m.payload[:16] + b"abcd", msg_id=m.msg_id + 1), ProtocolError),
    (lambda m, c: reply_to(m, m.payload[:16] + b"abcd", command=Command.REGION_WRITE),
     ProtocolError),
    (lambda m, c: reply_to(m, m.payload[:16] + b"ab"), ProtocolError),
    (lambda m, c: reply_to(m, P.REGION_ACCESS.pack(8, 0, 4) + b"abcd"), ProtocolError),
    (lambda m, c: reply_to(m, P.REGION_ACCESS.pack(0, 1, 4) + b"abcd"), ProtocolError),
    (lambda m, c: reply_to(m, P.REGION_ACCESS.pack(0, 0, 2) + b"abcd"), ProtocolError),
    (lambda m, c: b"CLOSE", ConnectionClosed),
], ids=["error-reply", "wrong-id", "wrong-command", "short-data", "other-offset",
        "other-region", "other-count", "server-gone"])
def test_fast_path_odd_reply_errors(serve: Any, odd: Any, error: type[Exception]) -> None:
    s = _start(serve, _after_clean_reads(odd))
    dev = connect(s.path, timeout=2)
    bar = dev.bar(0)
    for _ in range(3):
        bar.read32(0)
    with pytest.raises(error):
        bar.read32(0)
    if error is PeerError:                     # an error reply keeps the connection
        assert dev.connected and bar.read32(0) == 0x03020100
    else:
        assert not dev.connected
    dev.close()


def test_fast_path_closes_fds_of_a_good_reply(serve: Any) -> None:
    before = open_fds()
    r, w = os.pipe()
    s = _start(serve, _after_clean_reads(lambda m, c: (_good(m), [r, w])))
    with connect(s.path, timeout=2) as dev:
        bar = dev.bar(0)
        for _ in range(3):
            bar.read32(0)
        assert bar.read32(0) == 0x40302010
    os.close(r)
    os.close(w)
    s.close()
    assert open_fds() == before


def test_fast_path_not_taken_while_the_reader_holds_part_of_a_message(serve: Any) -> None:
    """A clean reply comes with the first 16 bytes of a server command; the
    rest of that command, sent after the client's next request, has the exact
    shape of the reply that request waits for.  The client must finish the
    command in its reader (and answer it), not take those bytes as its reply."""
    sent: list[bytes] = []

    def handler(msg: Message) -> Reply:
        if msg.is_reply:
            return None
        if msg.command != Command.REGION_READ:
            return basic(msg)
        sent.append(msg.payload)
        if len(sent) == 4:
            decoy = reply_to(Message((msg.msg_id + 1) & 0xFFFF, msg.command, 0, 0, b"", []),
                             msg.payload[:16] + b"EVIL")
            command = HEADER.pack(0x79, Command.DMA_WRITE, 16 + len(decoy), 0, 0) + decoy
            pending.append(command[16:])
            return _good(msg) + command[:16]
        if len(sent) == 5:
            assert s.conn is not None
            s.conn.sendall(pending[0])
            threading.Event().wait(0.1)
        return _good(msg)

    pending: list[bytes] = []
    s = serve(handler)
    with connect(s.path, timeout=2) as dev:
        bar = dev.bar(0)
        for _ in range(3):
            bar.read32(0)
        assert bar.read32(0) == 0x40302010
        assert bar.read32(0) == 0x40302010      # not int.from_bytes(b"EVIL")
        assert dev.connected
    # The client sent its answer while it read the fifth reply; the server's
    # thread may not have taken it off the socket yet.
    deadline = time.monotonic() + 10
    while True:
        answered = [m for m in s.received if m.is_reply and m.command == Command.DMA_WRITE]
        if answered or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert [m.msg_id for m in answered] == [0x79]


def test_message_ids_count_up_and_wrap_after_0xffff(serve: Any) -> None:
    """Every request takes the next 16-bit message ID (spec "Header"), on
    every path (VERSION's 0, the register fast path, pipelined block reads),
    and 0xFFFF is followed by 0.  The server checks each reply's ID, so an ID
    that repeated or skipped would show as a wrong sequence here."""
    s = serve(basic)
    with connect(s.path, timeout=10) as dev:
        bar = dev.bar(0)
        bar.read32(0)
        bar.read32(4)
        # pipelined block reads (64 requests per round trip) for the bulk
        for _ in range((0x10000 - len(s.received)) // 1000):
            bar.read_block(0, 1000, 1)
        while len(s.received) < 0x10002:  # the server records each request before its reply
            bar.read32(8)
    ids = [m.msg_id for m in s.received]
    assert ids == [*range(0x10000), 0, 1]


def test_fast_path_times_out_like_the_first_read(serve: Any) -> None:
    """The fast path's own read of the socket honours the per-request
    timeout (SO_RCVTIMEO) as the reader does."""
    s = _start(serve, _after_clean_reads(lambda m, c: None))
    dev = connect(s.path, timeout=0.3)
    bar = dev.bar(0)
    for _ in range(3):
        bar.read32(0)
    with pytest.raises(ConnectionClosed, match=r"no reply within 0\.3s"):
        bar.read32(0)
    assert not dev.connected
    dev.close()


def _echo_write_head(msg: Message) -> Reply:
    """basic(), with a REGION_WRITE answered by its access head (spec
    "REGION_WRITE": the reply carries offset, region and count)."""
    if msg.command == Command.REGION_WRITE:
        return reply_to(msg, msg.payload[:16])
    return basic(msg)


def test_fast_path_closes_fds_of_a_good_write_reply(serve: Any) -> None:
    """call() (a register write) reads its reply with os.read too: fds sent
    with it are closed by the kernel, none lands in the client."""
    before = open_fds()
    r, w = os.pipe()
    writes = [0]

    def handler(msg: Message) -> Reply:
        if msg.command == Command.REGION_WRITE:
            writes[0] += 1
            if writes[0] == 4:
                return reply_to(msg, msg.payload[:16]), [r, w]
        return _echo_write_head(msg)

    s = serve(handler)
    with connect(s.path, timeout=2) as dev:
        bar = dev.bar(0)
        for value in range(5):
            bar.write32(4, value)
        assert dev.connected
    os.close(r)
    os.close(w)
    s.close()
    assert open_fds() == before
    assert [m.payload[16:] for m in s.received if m.command == Command.REGION_WRITE] == \
        [v.to_bytes(4, "little") for v in range(5)]


def test_a_short_write_is_completed(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.write may take part of a request (a signal, or SO_SNDTIMEO, after
    some bytes went): both fast paths send the rest, and the server sees
    whole requests."""
    from pyvfio.user.client import connection

    monkeypatch.setattr(connection, "_write", lambda fd, data: os.write(fd, data[:5]))
    s = serve(_echo_write_head)
    with connect(s.path, timeout=2) as dev:
        bar = dev.bar(0)
        assert [bar.read32(8) for _ in range(4)] == [0x03020100] * 4
        for value in range(4):
            bar.write32(4, value)
        assert dev.connected
    assert [(m.command, m.payload[:16]) for m in s.received
            if m.command in (Command.REGION_READ, Command.REGION_WRITE)] == \
        [(Command.REGION_READ, P.REGION_ACCESS.pack(8, 0, 4))] * 4 + \
        [(Command.REGION_WRITE, P.REGION_ACCESS.pack(4, 0, 4))] * 4


# --- more fds than the client takes (16): the kernel closes the rest (MSG_CTRUNC) ------------

def _pipes(n: int) -> list[int]:
    return [fd for _ in range(n) for fd in os.pipe()]


@pytest.mark.parametrize("clean_reads", [0, 3], ids=["reader", "fast-path"])
def test_too_many_fds_on_a_register_reply_lose_it_nothing(serve: Any, clean_reads: int) -> None:
    """20 fds on a read32 reply: whether the reader (which sees MSG_CTRUNC)
    or the fast path (os.read, which cannot) takes it, the value is
    returned, the connection stays up and no fd lands in the client."""
    before = open_fds()
    sent = _pipes(10)
    s = _start(serve, _after_clean_reads(lambda m, c: (_good(m), sent), clean=clean_reads))
    with connect(s.path, timeout=2) as dev:
        bar = dev.bar(0)
        for _ in range(clean_reads):
            bar.read32(0)
        assert bar.read32(0) == 0x40302010
        assert dev.connected and bar.read32(0) == 0x03020100
    for fd in sent:
        os.close(fd)
    s.close()
    assert open_fds() == before


@pytest.mark.parametrize("clean_reads", [0, 3], ids=["reader", "fast-path"])
def test_too_many_fds_on_a_server_command_lose_it_nothing(serve: Any, clean_reads: int) -> None:
    """A DMA_READ with 20 fds in front of a read32 reply is served the same
    on both paths: fds never belong to a server command (here: EFAULT, the
    address is in no mapping)."""
    before = open_fds()
    sent = _pipes(10)

    def dma_read_first(msg: Message, conn: socket.socket) -> Reply:
        send_message(conn, HEADER.pack(0x77, Command.DMA_READ, 32, 0, 0)
                     + P.DMA_ACCESS.pack(0xdead000, 4), sent)
        threading.Event().wait(0.05)   # its own read, before the reply's
        return basic(msg)

    s = _start(serve, _after_clean_reads(dma_read_first, clean=clean_reads))
    with connect(s.path, timeout=2) as dev:
        bar = dev.bar(0)
        assert [bar.read32(0) for _ in range(clean_reads + 2)] == [0x03020100] * (clean_reads + 2)
    for fd in sent:
        os.close(fd)
    s.close()
    assert [(m.msg_id, m.error) for m in s.received if m.command == Command.DMA_READ] == \
        [(0x77, errno.EFAULT)]
    assert open_fds() == before


def test_too_many_fds_on_a_reply_whose_fds_are_needed_is_refused(serve: Any) -> None:
    """A region's info with 20 fds: the mmap fd may be among those the kernel
    closed, so the reply cannot be trusted (FdsTruncated)."""
    before = open_fds()
    sent = _pipes(10)
    s = serve(_region_handler(lambda m, i: (reply_to(m, good_region_info(i, flags=7)), sent)))
    dev = connect(s.path, timeout=2)
    with pytest.raises(FdsTruncated, match="more than 16 fds"):
        dev.bar(0)
    assert not dev.connected
    dev.close()
    for fd in sent:
        os.close(fd)
    s.close()
    assert open_fds() == before
