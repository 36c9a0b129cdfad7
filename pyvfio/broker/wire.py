"""The broker's wire format: length-prefixed JSON messages with fds alongside.

One message on an ``AF_UNIX`` ``SOCK_STREAM`` socket is::

    +----------------------+--------------------------------+
    | length: u32, big end | body: `length` bytes of UTF-8  |
    +----------------------+--------------------------------+
      + SCM_RIGHTS ancillary data (0..max fds), sent with the first byte

The body is one JSON object.  If the message carries fds, the object says how
many in ``"nfds"``, and the receiver checks that count against what the kernel
delivered: a message whose fds went missing (``MSG_CTRUNC``) or that carries
fds it did not announce is a :class:`~pyvfio.errors.ProtocolError`, and every
fd that did arrive is closed before raising, so a hostile peer cannot make us
leak descriptors.

Sizes are bounded on both sides: a body is 1..:data:`MAX_MESSAGE_BYTES` bytes
(a larger length prefix is refused without reading the body, and the
connection must then be dropped, because the stream cannot be resynchronised)
and a message carries at most :data:`MAX_FDS` fds (the kernel's ``SCM_MAX_FD``
is 253; the broker's requests may carry none).

Peer identity comes from the kernel (:func:`peer_credentials`:
``SO_PEERCRED`` and ``SO_PEERGROUPS``, captured at ``connect()``), never from
anything the peer writes.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvfio.errors import ConnectionClosed, ProtocolError

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE_BYTES",
    "FramingError",
    "Message",
    "PeerCredentials",
    "close_fds",
    "decode_body",
    "encode",
    "peer_credentials",
    "recv_message",
    "send_message",
]

#: Largest body accepted or sent (bytes).  Requests are a few hundred bytes;
#: a handoff of many devices and buffers stays well below this.
MAX_MESSAGE_BYTES = 64 * 1024

#: Most fds one message may carry (the kernel's ``SCM_MAX_FD``).
MAX_FDS = 253

_HEADER = struct.Struct(">I")
_INT = array.array("i").itemsize

# SO_PEERGROUPS (Linux 4.13) is missing from Python's socket module.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


class FramingError(ProtocolError):
    """A :class:`ProtocolError` after which the stream cannot be trusted to be
    at a message boundary (an oversized length, truncated fds): the receiver
    must drop the connection.  Other protocol errors leave the stream usable."""


@dataclass
class Message:
    """A decoded message: the JSON object and the fds that came with it (owned
    by the receiver: close them or hand them on)."""

    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd in ``fds``, ignoring ones that are already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def encode(body: dict[str, Any], nfds: int = 0) -> bytes:
    """Serialise ``body`` (with ``nfds`` set when fds travel) into one frame."""
    if nfds:
        body = {**body, "nfds": nfds}
    data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of "
                            f"{MAX_MESSAGE_BYTES} bytes", errno.EMSGSIZE)
    return _HEADER.pack(len(data)) + data


def decode_body(data: bytes) -> dict[str, Any]:
    """Parse a frame body; anything but a JSON object is a ProtocolError."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"message body is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("message body nests too deeply") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"message body must be a JSON object, not {type(body).__name__}")
    return body


def send_message(sock: socket.socket, body: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message, the fds (if any) riding on its first byte."""
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"cannot send {len(fds)} fds in one message (limit {MAX_FDS})",
                            errno.EMSGSIZE)
    frame = encode(body, len(fds))
    ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                 if fds else [])
    sent = sock.sendmsg([frame], ancillary, socket.MSG_NOSIGNAL)
    if sent < len(frame):  # a large frame may go out in pieces; fds went with the first
        sock.sendall(frame[sent:], socket.MSG_NOSIGNAL)


def _collect_fds(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _INT
            into.extend(array.array("i", data[:usable]))


def _recv_exact(sock: socket.socket, size: int, fds: list[int], max_fds: int,
                at_boundary: bool) -> bytes:
    """Read exactly ``size`` bytes, gathering any fds delivered on the way."""
    chunks: list[bytes] = []
    got = 0
    ancillary_space = socket.CMSG_SPACE(max(max_fds, 1) * _INT)
    while got < size:
        try:
            data, ancdata, flags, _addr = sock.recvmsg(size - got, ancillary_space,
                                                       socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        _collect_fds(ancdata, fds)
        if flags & socket.MSG_CTRUNC:
            raise FramingError(f"peer sent more fds than the {max_fds} this message may carry")
        if not data:
            if at_boundary and got == 0:
                raise ConnectionClosed("peer closed the connection")
            raise ConnectionClosed(f"peer closed the connection in the middle of a message "
                                   f"({got} of {size} bytes read)")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_message(sock: socket.socket, *, max_fds: int = 0,
                 max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Receive one message.

    Raises :class:`ConnectionClosed` on EOF (at a boundary or mid-message) and
    :class:`ProtocolError` on a bad frame: an oversized length (the body is
    *not* read: drop the connection), a body that is not a JSON object, more
    fds than ``max_fds``, or an fd count that disagrees with ``"nfds"``.  On
    any error the fds received so far are closed.
    """
    fds: list[int] = []
    try:
        header = _recv_exact(sock, _HEADER.size, fds, max_fds, at_boundary=True)
        (length,) = _HEADER.unpack(header)
        if not 0 < length <= max_bytes:
            raise FramingError(f"message length {length} is outside 1..{max_bytes}",
                               errno.EMSGSIZE)
        body = decode_body(_recv_exact(sock, length, fds, max_fds, at_boundary=False))
        announced = body.get("nfds", 0)
        if not isinstance(announced, int) or isinstance(announced, bool) or announced < 0:
            raise ProtocolError(f"'nfds' must be a non-negative integer, not {announced!r}")
        if len(fds) > max_fds:
            raise ProtocolError(f"message carries {len(fds)} fds; at most {max_fds} allowed")
        if announced != len(fds):
            raise ProtocolError(f"message announces {announced} fds but {len(fds)} arrived")
    except BaseException:
        close_fds(fds)
        raise
    body.pop("nfds", None)
    return Message(body, fds)


# --- who is on the other end -----------------------------------------------------------------


@dataclass(frozen=True)
class PeerCredentials:
    """The peer as the kernel recorded it when it called ``connect()``.

    ``pid``/``uid``/``gid`` come from ``SO_PEERCRED`` (``struct ucred``),
    ``groups`` (the supplementary groups) from ``SO_PEERGROUPS``.
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def all_gids(self) -> frozenset[int]:
        return frozenset((self.gid, *self.groups))

    @property
    def user_name(self) -> str:
        return _user_name(self.uid)

    def describe(self) -> str:
        return f"uid={self.uid} user={self.user_name} gid={self.gid} pid={self.pid}"


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Read the connecting process's identity from the kernel."""
    ucred = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
    pid, uid, gid = ucred.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 ucred.size))
    groups: tuple[int, ...] = ()
    size = 64 * _INT
    while size <= 65536 * _INT:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 4
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):  # kernel < 4.13
                break
            raise
        groups = tuple(array.array("I", raw[: len(raw) - len(raw) % _INT]))
        break
    return PeerCredentials(pid, uid, gid, groups)
