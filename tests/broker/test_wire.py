"""The broker's wire codec against good and hostile input, over real socketpairs."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvfio.broker import wire
from pyvfio.errors import ConnectionClosed, ProtocolError
from pyvfio.testing.fds import fd_targets as open_fds


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_round_trip_with_fds(pair) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        wire.send_message(a, {"op": "open", "device": "0000:00:03.0"}, [r, w])
        msg = wire.recv_message(b, max_fds=4)
        assert msg.body == {"op": "open", "device": "0000:00:03.0"}
        assert len(msg.fds) == 2
        # the received fds are new descriptions of the same pipe, close-on-exec
        os.write(msg.fds[1], b"x")
        assert os.read(r, 1) == b"x"
        assert os.get_inheritable(msg.fds[0]) is False
        wire.close_fds(msg.fds)
    finally:
        os.close(r)
        os.close(w)


def test_frame_layout_is_big_endian_length_then_json(pair) -> None:
    a, b = pair
    wire.send_message(a, {"op": "hello"})
    raw = b.recv(100)
    (length,) = struct.unpack(">I", raw[:4])
    assert raw[4:] == b'{"op":"hello"}' and length == len(raw) - 4


def test_large_message_arrives_whole(pair) -> None:
    a, b = pair
    body = {"blob": "x" * (wire.MAX_MESSAGE_BYTES - 100)}
    import threading
    t = threading.Thread(target=wire.send_message, args=(a, body))
    t.start()
    assert wire.recv_message(b).body == body
    t.join()


def test_encode_refuses_oversized_body() -> None:
    with pytest.raises(ProtocolError) as exc:
        wire.encode({"blob": "x" * wire.MAX_MESSAGE_BYTES})
    assert exc.value.errno == errno.EMSGSIZE


@pytest.mark.parametrize("length", [0, wire.MAX_MESSAGE_BYTES + 1, 0xFFFFFFFF])
def test_bad_length_prefix_is_refused_without_reading_the_body(pair, length: int) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", length))
    with pytest.raises(wire.FramingError, match="outside"):
        wire.recv_message(b)


@pytest.mark.parametrize("body, match", [
    (b"not json", "not valid UTF-8 JSON"),
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b"[" * 5000 + b"]" * 5000, "nest|JSON"),
    (b'{"nfds": -1}', "non-negative"),
    (b'{"nfds": true}', "non-negative"),
    (b'{"nfds": 2}', "announces 2 fds but 0 arrived"),
])
def test_bad_bodies_are_protocol_errors_and_the_stream_stays_usable(pair, body, match) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError, match=match) as exc:
        wire.recv_message(b)
    assert not isinstance(exc.value, wire.FramingError)
    wire.send_message(a, {"next": 1})
    assert wire.recv_message(b).body == {"next": 1}


def test_unannounced_fds_are_closed(pair) -> None:
    a, b = pair
    r, w = os.pipe()
    before = open_fds()
    frame = wire.encode({"op": "hello"})  # no nfds
    a.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
    with pytest.raises(ProtocolError, match="announces 0 fds but 1 arrived"):
        wire.recv_message(b, max_fds=4)
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_too_many_fds_are_closed_and_the_connection_must_drop(pair) -> None:
    a, b = pair
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
    before = open_fds()
    wire.send_message(a, {"op": "open"}, fds)
    with pytest.raises(wire.FramingError, match="more fds"):
        wire.recv_message(b, max_fds=0)
    assert open_fds() == before  # whatever the kernel delivered was closed again
    wire.close_fds(fds)


def test_eof_at_boundary_and_mid_message(pair) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 10) + b'{"a"')
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosed, match="middle of a message"):
        wire.recv_message(b)
    c, d = socket.socketpair()
    c.close()
    with pytest.raises(ConnectionClosed, match="closed the connection"):
        wire.recv_message(d)
    d.close()


def test_send_refuses_too_many_fds(pair) -> None:
    a, _ = pair
    with pytest.raises(ProtocolError, match="cannot send"):
        wire.send_message(a, {}, [0] * (wire.MAX_FDS + 1))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_or_leak(data: bytes) -> None:
    a, b = socket.socketpair()
    b.settimeout(1)
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        before = open_fds()
        while True:
            try:
                wire.recv_message(b)
            except wire.FramingError:
                break
            except ProtocolError:
                continue
            except ConnectionClosed:
                break
        assert open_fds() == before
    finally:
        a.close()
        b.close()


def test_peer_credentials_are_the_kernels(pair) -> None:
    _a, b = pair
    creds = wire.peer_credentials(b)
    assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(creds.groups) == set(os.getgroups())
    assert creds.all_gids >= {os.getgid()}


def test_peer_credentials_of_another_user() -> None:
    """A child that drops to uid/gid 65534 before connecting is seen as 65534,
    whatever it writes."""
    if os.getuid() != 0:
        pytest.skip("needs root to switch the child to another uid")
    import shutil
    import tempfile

    sockdir = tempfile.mkdtemp(prefix="pyvfio-wire-")  # pytest's tmp_path is 0700 root-only
    os.chmod(sockdir, 0o755)
    path = os.path.join(sockdir, "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.settimeout(10)
    server.bind(path)
    os.chmod(path, 0o666)
    server.listen(1)
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            wire.send_message(c, {"uid": 0, "user": "root"})  # a lie
            c.recv(1)
        finally:
            os._exit(0)
    conn, _ = server.accept()
    try:
        creds = wire.peer_credentials(conn)
        assert (creds.uid, creds.gid, creds.pid) == (65534, 65534, pid)
        assert creds.groups == ()
        assert wire.recv_message(conn).body == {"uid": 0, "user": "root"}
    finally:
        conn.close()
        server.close()
        os.waitpid(pid, 0)
        shutil.rmtree(sockdir)
