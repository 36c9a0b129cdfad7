"""The client's main socket: the limits it enforces, and request/reply under a
lock, serving the server's commands (DMA_READ / DMA_WRITE) that arrive while a
request waits.  Spec: QEMU ``docs/interop/vfio-user.rst``, "Socket" and
"Command Concurrency".
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pyvfio.device import _FORMATS
from pyvfio.errors import ClosedError, ConnectionClosed, FdsTruncated, PeerError, ProtocolError
from pyvfio.user.protocol import (
    HEADER,
    HEADER_SIZE,
    REGION_ACCESS,
    REGION_ACCESS_PARTS,
    Command,
    Message,
    MessageReader,
    MsgFlag,
    region_access_parts,
    send_message,
)

DEFAULT_TIMEOUT = 30.0
"""Seconds to wait for the connection, and for each reply (``None``: forever)."""

CLIENT_MAX_MSG_FDS = 16
"""fds we accept in one message (a region fd, a twin socket, a few io fds)."""
CLIENT_MAX_DATA_XFER = 1 << 20
"""Largest DMA_READ/DMA_WRITE we serve, and largest region transfer we send."""

MAX_REGIONS = 1024
"""A server reporting more regions (or IRQ indexes) than this is refused."""
MAX_IRQ_INDEXES = 64
MAX_REGION_INFO_SIZE = 64 << 10
"""Largest region-info reply (with capabilities) we ask for."""

_pack_header = HEADER.pack
_CMD_REGION_READ = int(Command.REGION_READ)
_unpack_header = HEADER.unpack_from
_write, _read = os.write, os.read
_pack_access = REGION_ACCESS.pack
_REPLY_FLAGS = 1  # MsgFlag.REPLY, as a plain int for the fast path
_MSG_IDS = tuple(range(0x10000))
"""Every 16-bit message ID, made once: a connection's IDs are these, in turn
(:meth:`_Connection.__init__`), so taking one is a C call that returns a
stored int rather than Python arithmetic that makes a new one."""


def _command_name(command: int) -> str:
    try:
        return f"VFIO_USER_{Command(command).name}"
    except ValueError:
        return f"vfio-user command {command}"


# --- the connection --------------------------------------------------------------------------


class _Connection:
    """The main socket: request/reply under a lock, serving server commands
    that arrive in between.  ``server_commands`` is the callback that answers
    a command from the server (returns the reply payload or raises
    :class:`PeerError`/``ProtocolError`` to answer with an error)."""

    def __init__(self, sock: socket.socket, reader: MessageReader, name: str,
                 timeout: float | None) -> None:
        self.sock = sock
        self.name = name
        self.timeout = timeout
        self.reader = reader
        self.lock = threading.Lock()
        self.broken: str | None = None  # why the connection is unusable
        self.closed = False  # closed by us (ClosedError) rather than broken
        # () -> int: each request's ID (spec "Header"): 1, 2, .. 0xFFFF, 0, 1, ..
        # ID 0 went to VERSION (negotiate.py), so the stream starts after it.
        self._next_msg_id = itertools.chain.from_iterable(itertools.repeat(_MSG_IDS)).__next__
        self._next_msg_id()
        self.serve_command: Any = None  # set by the device: (Message) -> bytes
        # The fast path of call(): prebound methods, and the reader's read
        # count when call() last saw it idle (-1: not known to be idle).
        self._lock_acquire, self._lock_release = self.lock.acquire, self.lock.release
        # The fast paths write and read the socket's fd with os.write and
        # os.read, the cheapest calls Python has (recvmsg builds a tuple, a
        # list and an address on every call).  A reply they read may not
        # carry fds, and without a control buffer the kernel closes any that
        # come (scm_recv), as the reader would.  The fd stays valid while
        # the lock is held: close() closes the socket under the lock, after
        # marking the connection broken, which the fast paths test first.
        self._fd = sock.fileno()
        self._idle_at = -1

    # ---- request/reply ----

    def _down(self, command: int) -> Exception:
        if self.closed:
            return ClosedError(f"vfio-user device {self.name} is closed")
        return ConnectionClosed(f"{_command_name(command)}: vfio-user connection to {self.name} "
                                f"is down: {self.broken}")

    def _send(self, command: int, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            if fds:
                send_message(self.sock, data, fds)
            else:
                self.sock.sendall(data)
        except OSError as exc:
            raise self._send_failed(command, exc) from None

    def _send_failed(self, command: int, exc: OSError) -> Exception:
        if isinstance(exc, BlockingIOError):  # SO_SNDTIMEO expired
            self._break(f"sending timed out after {self.timeout}s")
            return ConnectionClosed(f"{_command_name(command)} to {self.name}: the server did "
                                    f"not take the message within {self.timeout}s; "
                                    "connection dropped")
        self._break(f"the server closed the connection ({exc})")
        return ConnectionClosed(f"{_command_name(command)} to {self.name}: the server closed "
                                "the connection")

    def _read_failed(self, command: int, exc: OSError | None) -> Exception:
        """What a failed read means (``exc`` None: a clean EOF).  Breaks the
        connection: the stream cannot be trusted any more."""
        if exc is None:
            self._break("the server closed the connection")
            return ConnectionClosed(f"{_command_name(command)} to {self.name}: the server "
                                    "closed the connection")
        if isinstance(exc, BlockingIOError):  # SO_RCVTIMEO expired
            self._break(f"no reply within {self.timeout}s")
            return ConnectionClosed(f"{_command_name(command)} to {self.name}: no reply within "
                                    f"{self.timeout}s; connection dropped")
        self._break(str(exc) if isinstance(exc, ConnectionClosed) else f"socket error: {exc}")
        if isinstance(exc, ConnectionClosed):
            return exc
        return ConnectionClosed(f"{_command_name(command)} to {self.name}: {exc}")

    def request(self, command: int, payload: bytes, fds: Sequence[int] = (),
                *, no_reply: bool = False, keep_fds: bool = False) -> Message:
        """Send one command and return its reply.  fds that came with the
        reply are closed unless ``keep_fds`` (then the caller owns them).  An
        error reply raises :class:`PeerError`."""
        with self.lock:
            if self.broken is not None:
                raise self._down(command)
            msg_id = self._next_msg_id()
            flags = MsgFlag.NO_REPLY if no_reply else 0
            self._send(command, HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags,
                                            0) + payload, fds)
            if no_reply:
                return Message(msg_id, command, MsgFlag.REPLY, 0, b"", [])
            return self._finish(self._read(command), msg_id, command, keep_fds)

    def call(self, command: int, payload: bytes) -> bytes:
        """The register-access fast path: a command without fds whose reply
        payload is all the caller needs.  Same checks as :meth:`request`.
        While the reader holds nothing (it was idle after our last call and
        nobody read since), this frame reads the socket itself, and a read
        that holds exactly our clean reply is answered here; anything else
        goes to the reader and the general path (:meth:`_reply`)."""
        self._lock_acquire()
        try:
            if self.broken is not None:
                raise self._down(command)
            msg_id = self._next_msg_id()
            self._write(command, _pack_header(msg_id, command, 16 + len(payload), 0, 0) + payload)
            reader = self.reader
            if reader.reads != self._idle_at:
                return self._reply(msg_id, command, None)
            try:
                data = _read(self._fd, reader.bufsize)
            except OSError as exc:
                raise self._read_failed(command, exc) from None
            if len(data) >= 16:
                reply_id, reply_command, size, flags, _err = _unpack_header(data)
                if flags == _REPLY_FLAGS and reply_id == msg_id \
                        and reply_command == command and size == len(data):
                    return data[16:]
            return self._reply(msg_id, command, data)
        finally:
            self._lock_release()

    def _write(self, command: int, data: bytes) -> None:
        """Send ``data`` (no fds) on the fast paths: one ``os.write``, and the
        rest with ``sendall`` in the rare case that the socket took only part
        of it."""
        try:
            written = _write(self._fd, data)
            if written != len(data):
                self.sock.sendall(data[written:])
        except OSError as exc:
            raise self._send_failed(command, exc) from None

    def _reply(self, msg_id: int, command: int, received: bytes | None) -> bytes:
        """The general path of the fast calls (lock held, request sent): the
        payload of our checked reply from the reader, serving the server's
        commands on the way.  ``received``: bytes the caller read from the
        socket itself and did not take (an empty read is the end of the
        stream), handed to the reader first."""
        reader = self.reader
        if received is not None:
            self._idle_at = -1
            try:
                reader.push(received, [], 0)
            except OSError as exc:
                raise self._read_failed(command, exc) from None
        try:
            msg = reader.read()
        except OSError as exc:
            raise self._read_failed(command, exc) from None
        if msg is None:
            raise self._read_failed(command, None)
        if not (msg.flags == _REPLY_FLAGS and msg.msg_id == msg_id
                and msg.command == command and not msg.fds and msg.problem is None
                and not reader.queued):
            msg = self._finish(msg, msg_id, command, False)
        if reader.idle:
            self._idle_at = reader.reads
        return msg.payload

    def register_reader(self, index: int, width: int, limit: int,
                        outside: Callable[[int, int], Exception],
                        malformed: Callable[[str], Exception]) -> Callable[[int], int]:
        """``read(offset) -> int``: one REGION_READ of ``width`` bytes of region
        ``index``, the whole request in one frame (the ``read8``..``read64`` of
        a region; spec "REGION_READ").  ``offset`` must lie in
        ``0..limit`` (else ``outside(offset, width)`` is raised); the reply must
        echo the request's access head and carry ``width`` bytes, else
        ``malformed(text)`` is raised and the connection dropped.  The value is
        little-endian, as PCI registers are.

        It is :meth:`call` written out for one request shape: the request is
        one ``pack``, and while the reader is known idle a read that is exactly
        the expected reply is split by one ``unpack`` into its 32-byte head
        and the value (the ``unpack`` refuses any other length), and the head
        is checked with one comparison.  Both heads are packed from four parts
        (:data:`REGION_ACCESS_PARTS`), of which only the message ID and the
        offset change from read to read."""
        lock_acquire, lock_release = self._lock_acquire, self._lock_release
        fd, write, read_fd, reader = self._fd, _write, _read, self.reader
        next_msg_id = self._next_msg_id
        bufsize = reader.bufsize
        pack = REGION_ACCESS_PARTS.pack
        value_at = struct.Struct("<" + _FORMATS[width]).unpack_from
        # A whole reply -> (its 32-byte head, the value); struct.error if the
        # read is not exactly one reply's size.
        split_reply = struct.Struct("<32s" + _FORMATS[width]).unpack
        reply_size = 32 + width
        read_command = _CMD_REGION_READ
        request_head, region_count = region_access_parts(read_command, 32, 0, index, width)
        reply_head, _ = region_access_parts(read_command, reply_size, _REPLY_FLAGS, index, width)

        def read(offset: int) -> int:
            if offset > limit or offset < 0:
                raise outside(offset, width)
            lock_acquire()
            try:
                if self.broken is not None:
                    raise self._down(read_command)
                msg_id = next_msg_id()
                request = pack(msg_id, request_head, offset, region_count)
                try:
                    written = write(fd, request)
                    if written != 32:  # the socket took part of it (see _write)
                        self.sock.sendall(request[written:])
                except OSError as exc:
                    raise self._send_failed(read_command, exc) from None
                received = None
                if reader.reads == self._idle_at:
                    try:
                        received = read_fd(fd, bufsize)
                    except OSError as exc:
                        raise self._read_failed(read_command, exc) from None
                    try:
                        head, value = split_reply(received)
                    except struct.error:  # not one reply of our size: the reader's
                        pass
                    else:
                        if head == pack(msg_id, reply_head, offset, region_count):
                            return value
                payload = self._reply(msg_id, read_command, received)
            finally:
                lock_release()
            if len(payload) != reply_size - 16 or payload[:16] != _pack_access(
                    offset, index, width):
                raise malformed(f"REGION_READ of region {index} {offset:#x}+{width}: "
                                f"reply does not match (payload {len(payload)} bytes)")
            return value_at(payload, 16)[0]

        return read

    def call_many(self, command: int, payloads: Sequence[bytes]) -> list[bytes]:
        """Several commands of one kind without fds, pipelined: all sent in one
        ``sendall``, then their replies read in order, so the batch costs one
        round trip.  Returns the reply payloads.  An error reply to one of
        them is raised (the first one) only after every reply was read, so the
        stream stays in step; a protocol error breaks the connection as in
        :meth:`request`."""
        with self.lock:
            if self.broken is not None:
                raise self._down(command)
            ids: list[int] = []
            parts: list[bytes] = []
            for payload in payloads:
                msg_id = self._next_msg_id()
                ids.append(msg_id)
                parts.append(_pack_header(msg_id, command, 16 + len(payload), 0, 0))
                parts.append(payload)
            try:
                self.sock.sendall(b"".join(parts))
            except OSError as exc:
                raise self._send_failed(command, exc) from None
            out: list[bytes] = []
            first_error: PeerError | None = None
            last = ids[-1] if ids else -1
            for msg_id in ids:
                try:
                    out.append(self._finish(self._read(command), msg_id, command, False,
                                            msg_id != last).payload)
                except PeerError as exc:
                    first_error = first_error or exc
                    out.append(b"")
            if first_error is not None:
                raise first_error
            return out

    def _finish(self, msg: Message, msg_id: int, command: int, keep_fds: bool,
                more_replies: bool = False) -> Message:
        """From the first message after our request to our checked reply:
        serve server commands on the way, raise on errors.  Lock held.
        ``more_replies``: replies to later pipelined requests may follow in
        the reader's queue (:meth:`call_many`)."""
        try:
            while True:
                if not msg.is_reply:
                    self._serve(msg)
                    msg = self._read(command)
                    continue
                if msg.msg_id != msg_id or msg.command != command:
                    msg.close_fds()
                    raise ProtocolError(
                        f"{_command_name(command)} to {self.name}: got a reply to "
                        f"{_command_name(msg.command)} id {msg.msg_id}, expected id {msg_id}")
                # Fds cut off a reply that takes none lose nothing: closed
                # below, as any fds where none belong (FdsTruncated).
                if msg.problem is not None and (keep_fds or type(msg.problem) is not FdsTruncated):
                    msg.close_fds()
                    raise type(msg.problem)(f"{_command_name(command)} reply from {self.name}: "
                                            f"{msg.problem}", msg.problem.errno)
                if msg.is_error:
                    msg.close_fds()
                    raise PeerError(msg.error or errno.EIO, _command_name(command))
                break
            if msg.fds and not keep_fds:
                msg.close_fds()  # fds where none belong
            # Commands that came in the same read as the reply would wait in the
            # reader's queue with nobody to see them: serve them now.
            while self.reader.queued and not more_replies:
                extra = self._read(command)
                if extra.is_reply:
                    extra.close_fds()
                    raise ProtocolError(f"{self.name} sent a second reply (to "
                                        f"{_command_name(extra.command)} id {extra.msg_id})")
                self._serve(extra)
            return msg
        except ProtocolError as exc:
            self._break(f"protocol error: {exc}")
            raise

    def _read(self, command: int) -> Message:
        try:
            msg = self.reader.read()
        except OSError as exc:
            raise self._read_failed(command, exc) from None
        if msg is None:
            raise self._read_failed(command, None)
        return msg

    def _serve(self, msg: Message) -> None:
        """Answer one command from the server on this socket."""
        reply = _answer_server_command(self.serve_command, msg)
        if reply is not None:
            try:
                self.sock.sendall(reply)
            except OSError as exc:
                self._break(f"replying to the server failed: {exc}")
                raise ConnectionClosed(f"{self.name}: replying to a server command failed: "
                                       f"{exc}") from None

    def serve_idle(self) -> None:
        """Called by the idle thread when the socket is readable: read and
        serve what is there, unless a requester already did."""
        with self.lock:
            if self.broken is not None:
                return
            poller = select.poll()  # not select(): fds above 1024 are fine
            poller.register(self.sock.fileno(), select.POLLIN)
            if not poller.poll(0) and not self.reader.queued:
                return
            try:
                msg = self._read(0)
                if msg.is_reply:
                    msg.close_fds()
                    raise ProtocolError(f"{self.name} sent a reply to "
                                        f"{_command_name(msg.command)} id {msg.msg_id} that "
                                        "nobody asked for")
                self._serve(msg)
                while self.reader.queued:
                    self._serve(self._read(0))
            except ProtocolError as exc:
                self._break(f"protocol error: {exc}")
            except ConnectionClosed:
                pass

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        if self.broken is None:
            self.broken = "closed by the client"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self.lock:
            self.reader.close()
            self.sock.close()


def _answer_server_command(handler: Any, msg: Message) -> bytes | None:
    """The reply (header + payload) to a server→client command, or ``None``
    when it asked for none.  fds never belong to a server command: they are
    closed, and so more fds than the reader takes (:class:`FdsTruncated`)
    lose it nothing."""
    msg.close_fds()
    flags = MsgFlag.REPLY
    try:
        if msg.problem is not None and type(msg.problem) is not FdsTruncated:
            raise msg.problem
        if handler is None:
            raise PeerError(errno.ENOSYS, _command_name(msg.command))
        payload = handler(msg)
    except PeerError as exc:
        payload, flags, err = b"", MsgFlag.REPLY | MsgFlag.ERROR, exc.errno or errno.EINVAL
    except ProtocolError as exc:
        payload, flags, err = b"", MsgFlag.REPLY | MsgFlag.ERROR, exc.errno
    else:
        err = 0
    if msg.no_reply:
        return None
    return HEADER.pack(msg.msg_id, msg.command, HEADER_SIZE + len(payload), flags, err) + payload
