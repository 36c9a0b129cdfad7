"""Framing over an ``AF_UNIX`` stream socket: :func:`send_message` writes one
message (and its ``SCM_RIGHTS`` fds) and :class:`MessageReader` reads whole
messages with their fds, bounded in size and fd count so that a hostile peer
cannot make us allocate gigabytes or leak descriptors.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from pyvfio.errors import ConnectionClosed, FdsTruncated, ProtocolError
from pyvfio.user.protocol._codec import _fail
from pyvfio.user.protocol.header import HEADER, HEADER_SIZE, Command, Header
from pyvfio.user.protocol.version import DEFAULT_MAX_DATA_XFER_SIZE

# --- framing ---------------------------------------------------------------------------------

_INT_SIZE = array.array("i").itemsize
# socket's flags are IntFlag members: ``&`` on them is slow on the per-message path.
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def send_message(sock: socket.socket, data: bytes | Sequence[bytes],
                 fds: Iterable[int] = ()) -> None:
    """Send one packed message (bytes, or a list of buffers) with ``fds`` as
    SCM_RIGHTS attached to its first byte.  Loops over short writes (the
    fds go with the first chunk only)."""
    buffers: list[Any] = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    fd_list = list(fds)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list))] if fd_list else []
    total = sum(len(b) for b in buffers)
    sent = sock.sendmsg(buffers, anc)
    if sent < total:
        # Rare: a signal or a full socket buffer cut the write short.  The
        # fds went with the first chunk; send the rest as plain bytes.
        rest = memoryview(b"".join(bytes(b) for b in buffers))[sent:]
        while len(rest):
            rest = rest[sock.send(rest):]


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Message:
    """A received message: header fields, payload, fds (owned by whoever
    takes the message; close them when done), and ``problem`` when the
    message could not be taken whole (too big, too many fds): the header is
    valid, the payload was discarded, and the receiver should answer with an
    error reply carrying ``problem.errno``."""

    __slots__ = ("command", "error", "fds", "flags", "msg_id", "payload", "problem")

    def __init__(self, msg_id: int, command: int, flags: int, error: int, payload: bytes,
                 fds: list[int], problem: ProtocolError | None = None) -> None:
        self.msg_id = msg_id
        self.command = command
        self.flags = flags
        self.error = error
        self.payload = payload
        self.fds = fds
        self.problem = problem

    @property
    def header(self) -> Header:
        return Header(self.msg_id, self.command, HEADER_SIZE + len(self.payload), self.flags,
                      self.error)

    # Plain ints, not MsgFlag: an IntFlag ``&`` builds an enum member, which
    # costs microseconds on the per-message path.
    @property
    def is_reply(self) -> bool:
        return self.flags & 0xF == 1  # MsgFlag.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & 0x10)  # MsgFlag.NO_REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & 0x20)  # MsgFlag.ERROR

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds = []

    def __repr__(self) -> str:
        try:
            name = Command(self.command).name
        except ValueError:
            name = str(self.command)
        kind = "reply" if self.is_reply else "command"
        return (f"<Message {kind} {name} id={self.msg_id} flags={self.flags:#x} "
                f"error={self.error} payload={len(self.payload)}B fds={self.fds}>")


class MessageReader:
    """Reads whole messages (with their SCM_RIGHTS fds) from a stream socket.

    One ``recvmsg`` usually returns one or several whole messages; a message
    split across reads is assembled in a buffer bounded by ``max_msg_size``.
    A message over that bound is not stored: its bytes are read and dropped
    and it is returned with ``problem`` set (``E2BIG``), so the stream stays
    in sync.  fds beyond ``max_fds`` are closed by the kernel (``MSG_CTRUNC``)
    and the message gets ``problem`` too.  A ``msg_size`` smaller than the
    header cannot be resynchronised: :meth:`read_some` raises
    :class:`ProtocolError` and the connection must be closed.

    The kernel never merges the bytes of two sends carrying fds into one
    read, and stops a read right after the send that carried fds, so fds
    received by one ``recvmsg`` belong to the last message that starts in
    that read (or, if none starts there, to the one being assembled).
    Received fds are ``O_CLOEXEC``.
    """

    def __init__(self, sock: socket.socket, *, max_msg_size: int = DEFAULT_MAX_DATA_XFER_SIZE + 4096,
                 max_fds: int = 16, bufsize: int = 65536) -> None:
        self.sock = sock
        self.max_msg_size = max_msg_size
        self.max_fds = max_fds
        self.bufsize = bufsize
        self._cmsg_space = self.cmsg_space = socket.CMSG_SPACE(max_fds * _INT_SIZE)
        self._pending = b""  # bytes of an incomplete header / small message
        self._pending_fds: list[int] = []  # fds that came with those bytes
        self._pending_truncated = False
        self._big: bytearray | None = None  # payload being assembled
        self._big_view: memoryview | None = None
        self._big_have = 0
        self._big_head: tuple[int, int, int, int] | None = None
        self._big_fds: list[int] = []
        self._big_problem: ProtocolError | None = None
        self._discard = 0  # bytes left to drop of an oversized message
        self._queue: list[Message] = []
        self.eof = False
        # recvmsg calls made by read_some(): a caller that does its own
        # recvmsg while the reader is idle (the server's fast path) sees from
        # a change that the reader was used meanwhile and may not be idle.
        self.reads = 0

    @property
    def queued(self) -> int:
        """Whole messages already received and not yet taken by :meth:`read`
        (a client checks it so that a server command that arrived in the same
        read as a reply is not left waiting)."""
        return len(self._queue)

    def close(self) -> None:
        """Close every fd held in half-read or queued messages."""
        close_fds(self._big_fds)
        close_fds(self._pending_fds)
        self._big_fds = []
        self._pending_fds = []
        for m in self._queue:
            m.close_fds()
        self._queue.clear()

    def read(self) -> Message | None:
        """Block until one whole message is in; ``None`` on a clean EOF
        between messages.  Raises :class:`ConnectionClosed` on EOF inside a
        message."""
        while not self._queue:
            if self.eof:
                return None
            self._queue.extend(self.read_some())
        return self._queue.pop(0)

    def read_some(self) -> list[Message]:
        """One ``recvmsg``; the messages it completed (maybe none).  Sets
        ``eof`` on a clean end of stream."""
        if self._queue:
            out, self._queue = self._queue, []
            return out
        self.reads += 1
        try:
            data, anc, msg_flags, _addr = self.sock.recvmsg(
                self.bufsize, self._cmsg_space, _MSG_CMSG_CLOEXEC)
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.close()
            raise ConnectionClosed(f"vfio-user peer broke the connection: {exc}") from None
        return self.take(data, anc, msg_flags)

    @property
    def idle(self) -> bool:
        """No message queued or half read: the next bytes on the socket start
        a message.  A caller that does its own ``recvmsg`` (the server's
        region-access fast path) may only do so then, and must hand whatever
        it does not handle itself to :meth:`take`."""
        return not (self._queue or self._pending or self._big is not None or self._discard)

    def push(self, data: bytes, anc: list[tuple[int, int, bytes]], msg_flags: int) -> None:
        """Queue for :meth:`read` the messages that one ``recvmsg`` result
        completes: a caller that did its own ``recvmsg`` while the reader was
        idle (the client's register fast path) hands back a result it does not
        handle itself.  Raises as :meth:`take`."""
        self._queue.extend(self.take(data, anc, msg_flags))

    def take(self, data: bytes, anc: list[tuple[int, int, bytes]], msg_flags: int
             ) -> list[Message]:
        """The messages that one ``recvmsg`` result (``data``, ancillary data
        and flags, as :meth:`socket.socket.recvmsg` returns them, received with
        ``MSG_CMSG_CLOEXEC`` into :attr:`cmsg_space`) completes."""
        if not anc and len(data) >= HEADER_SIZE and not self._pending and self._big is None \
                and not self._discard:
            # Fast path: exactly one whole message and no fds (the common case).
            msg_id, command, msg_size, flags, err = HEADER.unpack_from(data)
            if msg_size == len(data):
                return [Message(msg_id, command, flags, err, data[HEADER_SIZE:], [])]
        fds: list[int] = []
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                n = len(cdata) // _INT_SIZE
                fds.extend(array.array("i", cdata[:n * _INT_SIZE]))
        truncated = bool(msg_flags & _MSG_CTRUNC)
        if not data:
            close_fds(fds)
            self.eof = True
            if self._pending or self._big is not None or self._discard:
                self.close()
                raise ConnectionClosed("vfio-user peer closed the connection inside a message")
            return []
        try:
            return self._feed(data, fds, truncated)
        except BaseException:
            close_fds(fds)
            raise

    def _feed(self, data: bytes, fds: list[int], truncated: bool) -> list[Message]:
        out: list[Message] = []
        pos = 0
        n = len(data)
        # 1. finish a message in progress (oversized-discard or big payload)
        if self._discard:
            take = min(self._discard, n)
            self._discard -= take
            pos = take
            if not self._discard:
                assert self._big_head is not None
                out.append(self._finish_big())
        elif self._big is not None:
            assert self._big_view is not None
            take = min(len(self._big) - self._big_have, n)
            self._big_view[self._big_have:self._big_have + take] = data[:take]
            self._big_have += take
            pos = take
            if self._big_have == len(self._big):
                out.append(self._finish_big())
        carry: list[int] = []
        if self._pending:
            data = self._pending + data[pos:]
            pos = 0
            n = len(data)
            self._pending = b""
            carry, self._pending_fds = self._pending_fds, []
            if self._pending_truncated:
                self._pending_truncated = False
                truncated = True
        last_start: Message | None = None
        # 2. whole messages in this chunk
        while pos < n:
            if n - pos < HEADER_SIZE:
                self._pending = data[pos:]
                self._pending_fds, carry = carry, []
                break
            msg_id, command, msg_size, flags, err = HEADER.unpack_from(data, pos)
            if msg_size < HEADER_SIZE:
                for m in out:
                    m.close_fds()
                close_fds(carry)
                raise _fail(f"message header claims msg_size {msg_size} < {HEADER_SIZE}; "
                            "the stream cannot be resynchronised")
            end = pos + msg_size
            if end <= n:
                m = Message(msg_id, command, flags, err, data[pos + HEADER_SIZE:end], carry)
                carry = []
                out.append(m)
                last_start = m
                pos = end
                continue
            # the message continues in later reads
            self._big_head = (msg_id, command, flags, err)
            self._big_fds, carry = carry, []
            have = n - pos - HEADER_SIZE
            if msg_size > self.max_msg_size:
                self._big_problem = _fail(
                    f"message of {msg_size} bytes is over the {self.max_msg_size}-byte limit",
                    errno.E2BIG)
                self._discard = msg_size - HEADER_SIZE - have
                self._big = None
            else:
                self._big_problem = None
                self._big = bytearray(msg_size - HEADER_SIZE)
                self._big_view = memoryview(self._big)
                self._big_view[:have] = data[pos + HEADER_SIZE:]
                self._big_have = have
            last_start = None
            pos = n
            # fds of this read belong to the message that starts here
            self._attach(None, fds, truncated)
            return out
        if fds or truncated:
            if last_start is not None:
                self._attach(last_start, fds, truncated)
            elif self._big is not None or self._discard:
                self._attach(None, fds, truncated)
            elif out:
                self._attach(out[-1], fds, truncated)
            else:  # only a header fragment so far: the fds wait for it
                self._pending_fds.extend(fds)
                if truncated:
                    self._pending_truncated = True
        return out

    def _attach(self, msg: Message | None, fds: list[int], truncated: bool) -> None:
        if msg is None:
            self._big_fds.extend(fds)
            if truncated and self._big_problem is None:
                self._big_problem = FdsTruncated("message carried more fds than allowed")
            return
        msg.fds.extend(fds)
        if truncated and msg.problem is None:
            msg.problem = FdsTruncated(f"message carried more than {self.max_fds} fds")

    def _finish_big(self) -> Message:
        assert self._big_head is not None
        msg_id, command, flags, err = self._big_head
        payload = bytes(self._big) if self._big is not None else b""
        m = Message(msg_id, command, flags, err, payload, self._big_fds, self._big_problem)
        self._big = None
        self._big_view = None
        self._big_have = 0
        self._big_head = None
        self._big_fds = []
        self._big_problem = None
        return m
