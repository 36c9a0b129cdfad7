"""Message framing: whole messages with their fds from a stream socket,
bounded sizes and fd counts, no fd leaked on any path."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from pyvfio.errors import ConnectionClosed, FdsTruncated, ProtocolError
from pyvfio.testing.fds import fd_numbers as open_fds
from pyvfio.user import protocol as P


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def msg(msg_id: int, command: int = P.Command.REGION_READ, payload: bytes = b"\0" * 16) -> bytes:
    return P.pack_message(msg_id, command, payload)


def test_several_messages_in_one_read(pair):
    a, b = pair
    a.sendall(msg(1) + msg(2) + msg(3, P.Command.DEVICE_RESET, b""))
    r = P.MessageReader(b)
    assert [m.msg_id for m in r.read_some()] == [1, 2, 3]


def test_message_split_byte_by_byte(pair):
    a, b = pair
    r = P.MessageReader(b)
    data = msg(7, payload=b"x" * 40)
    got = []
    for i in range(len(data)):
        a.send(data[i:i + 1])
        got += r.read_some()
    assert len(got) == 1 and got[0].payload == b"x" * 40


def test_fds_belong_to_their_message(pair):
    a, b = pair
    r = P.MessageReader(b)
    e1, e2 = os.eventfd(0), os.eventfd(0)
    P.send_message(a, msg(1))
    P.send_message(a, msg(2), [e1])
    P.send_message(a, msg(3), [e2, e1])
    out = []
    while len(out) < 3:
        out += r.read_some()
    assert [len(m.fds) for m in out] == [0, 1, 2]
    for m in out:
        m.close_fds()
    os.close(e1)
    os.close(e2)


def test_fds_with_a_header_fragment_wait_for_the_message(pair):
    a, b = pair
    r = P.MessageReader(b)
    e = os.eventfd(0)
    data = msg(9)
    P.send_message(a, data[:5], [e])
    assert r.read_some() == []
    a.sendall(data[5:])
    out = r.read_some()
    assert len(out) == 1 and len(out[0].fds) == 1
    out[0].close_fds()
    os.close(e)


def test_too_many_fds_are_closed_and_flagged(pair):
    a, b = pair
    before = open_fds()
    r = P.MessageReader(b, max_fds=2)
    fds = [os.eventfd(0) for _ in range(6)]
    P.send_message(a, msg(1), fds)
    for f in fds:
        os.close(f)
    m = r.read()
    assert m is not None and m.problem is not None and len(m.fds) <= 2
    assert (type(m.problem), m.problem.errno, str(m.problem)) == \
        (FdsTruncated, 22, "message carried more than 2 fds")  # EINVAL
    m.close_fds()
    assert open_fds() == before


def test_too_many_fds_on_a_message_over_several_reads(pair):
    """The fds come with the first read of a message that is assembled over
    several: the truncation still flags that message, whose payload is whole."""
    a, b = pair
    before = open_fds()
    r = P.MessageReader(b, max_fds=2, bufsize=4096)
    fds = [os.eventfd(0) for _ in range(6)]
    P.send_message(a, msg(1, payload=b"x" * 50000), fds)
    for f in fds:
        os.close(f)
    m = r.read()
    assert m is not None and m.problem is not None and len(m.fds) <= 2
    assert (m.problem.errno, str(m.problem)) == (22, "message carried more fds than allowed")
    assert (m.msg_id, m.payload) == (1, b"x" * 50000)
    m.close_fds()
    assert open_fds() == before


def test_oversized_message_is_skipped_without_allocating(pair):
    a, b = pair
    r = P.MessageReader(b, max_msg_size=4096)
    big = P.pack_message(1, P.Command.REGION_WRITE, b"y" * 100_000)
    t = threading.Thread(target=a.sendall, args=(big,))
    t.start()
    m = r.read()
    t.join()
    assert m is not None and m.problem is not None and m.problem.errno == 7  # E2BIG
    assert str(m.problem) == "message of 100016 bytes is over the 4096-byte limit"
    assert m.payload == b""
    a.sendall(msg(2))
    m2 = r.read()
    assert m2 is not None and m2.msg_id == 2  # the stream is still in sync


def test_header_claiming_less_than_a_header_is_fatal(pair):
    a, b = pair
    a.sendall(P.HEADER.pack(1, 9, 8, 0, 0))
    with pytest.raises(ProtocolError) as exc:
        P.MessageReader(b).read()
    assert str(exc.value) == ("message header claims msg_size 8 < 16; "
                              "the stream cannot be resynchronised")


def test_a_message_of_exactly_max_msg_size_is_taken(pair):
    """The size bound is inclusive: a message of max_msg_size bytes, over
    several reads, is assembled; one byte more is refused."""
    a, b = pair
    r = P.MessageReader(b, max_msg_size=8192, bufsize=1024)
    for size, problem in ((8192, None), (8193, 7)):  # E2BIG
        data = P.pack_message(1, P.Command.REGION_WRITE, b"z" * (size - P.HEADER_SIZE))
        t = threading.Thread(target=a.sendall, args=(data,))
        t.start()
        m = r.read()
        t.join()
        assert m is not None
        assert (m.problem.errno if m.problem else None) == problem
        assert len(m.payload) == (size - P.HEADER_SIZE if problem is None else 0)


def test_fds_sent_with_the_rest_of_a_message_go_to_that_message(pair):
    """A peer may send a message in two pieces with the fds on the second;
    they belong to the message that piece completes (in one read)."""
    a, b = pair
    before = open_fds()
    r = P.MessageReader(b, bufsize=4096)
    data = P.pack_message(5, P.Command.DMA_MAP, b"m" * 3000)
    a.sendall(data[:100])
    assert r.read_some() == []
    fd = os.eventfd(0)
    P.send_message(a, data[100:], [fd])
    os.close(fd)
    got = []
    while not got:
        got = r.read_some()
    [m] = got
    assert (m.msg_id, m.payload, len(m.fds), m.problem) == (5, b"m" * 3000, 1, None)
    m.close_fds()
    assert open_fds() == before


def test_eof_inside_a_message(pair):
    a, b = pair
    before = open_fds()
    r = P.MessageReader(b)
    e = os.eventfd(0)
    P.send_message(a, msg(1, payload=b"z" * 100)[:50], [e])
    os.close(e)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosed):
        r.read()
    assert open_fds() == before


def test_clean_eof(pair):
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert P.MessageReader(b).read() is None


def test_payload_that_looks_like_a_header_is_payload(pair):
    """The rest of a message assembled over several reads is payload, even
    when one read of it holds exactly what parses as a whole message."""
    a, b = pair
    r = P.MessageReader(b)
    tail = P.HEADER.pack(9, P.Command.VERSION, 32, 0, 0) + b"b" * 16
    data = P.pack_message(4, P.Command.REGION_WRITE, b"a" * 5000 + tail)
    a.sendall(data[:-len(tail)])
    assert r.read_some() == []
    a.sendall(tail)
    got = []
    while not got:
        got = r.read_some()
    [m] = got
    assert (m.msg_id, m.command, m.payload) == (4, P.Command.REGION_WRITE, b"a" * 5000 + tail)


def test_a_short_write_sends_the_rest_without_the_fds():
    """sendmsg may send less than asked (a signal, a full buffer): the rest
    follows as plain bytes, from where it stopped, the fds only once."""
    calls: list[tuple[str, bytes, int]] = []

    class ShortSocket:
        def sendmsg(self, buffers, anc):
            data = b"".join(bytes(x) for x in buffers)
            calls.append(("sendmsg", data[:10], sum(len(c[2]) for c in anc)))  # fds
            return 10

        def send(self, data):
            calls.append(("send", bytes(data[:7]), 0))
            return min(len(data), 7)

    data = P.pack_message(1, P.Command.REGION_WRITE, bytes(range(20)))
    P.send_message(ShortSocket(), [data[:5], data[5:]], [0])  # type: ignore[arg-type]
    assert calls[0] == ("sendmsg", data[:10], 1)
    assert [c[0] for c in calls[1:]] == ["send"] * 4  # 26 bytes left, 7 at a time
    assert b"".join(c[1] for c in calls) == data


def test_push_queues_what_a_recvmsg_result_completes(pair):
    """push: a caller that did its own recvmsg hands the result back; the
    messages it completes are queued for read, with their fds and flags."""
    a, b = pair
    before = open_fds()
    r = P.MessageReader(b)
    fd = os.eventfd(0)
    P.send_message(a, msg(1) + msg(2), [fd])
    os.close(fd)
    data, anc, flags, _addr = b.recvmsg(65536, r.cmsg_space, socket.MSG_CMSG_CLOEXEC)
    r.push(data, anc, flags)
    assert r.queued == 2
    m1, m2 = r.read(), r.read()
    assert m1 is not None and m2 is not None
    assert (m1.msg_id, m1.fds, m2.msg_id, len(m2.fds), m2.problem) == (1, [], 2, 1, None)
    m2.close_fds()
    r.push(msg(3) + msg(4), [], socket.MSG_CTRUNC)  # fds were cut off: the last is flagged
    m3, m4 = r.read(), r.read()
    assert m3 is not None and m4 is not None
    assert (m3.msg_id, m3.problem, m4.msg_id) == (3, None, 4)
    assert type(m4.problem) is FdsTruncated and m4.problem.errno == 22
    assert open_fds() == before


def test_a_reset_connection_is_connection_closed(pair):
    """A peer that closes with our bytes unread resets the connection: the
    reader says so, and holds no fds afterwards."""
    a, b = pair
    r = P.MessageReader(b)
    b.sendall(msg(1))
    a.close()
    with pytest.raises(ConnectionClosed) as exc:
        r.read()
    assert str(exc.value).startswith("vfio-user peer broke the connection: ")
    assert r.queued == 0
