"""Connecting: open the socket, tell a non-vfio-user socket apart, and
negotiate VERSION (capabilities, the twin socket).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct

from pyvfio.errors import ConnectionClosed, PeerError, ProtocolError
from pyvfio.user import protocol as P
from pyvfio.user.client.connection import CLIENT_MAX_DATA_XFER, CLIENT_MAX_MSG_FDS, DEFAULT_TIMEOUT
from pyvfio.user.client.device import VfioUserDevice
from pyvfio.user.protocol import (
    HEADER,
    HEADER_SIZE,
    Capabilities,
    Command,
    MessageReader,
    close_fds,
)

# --- connecting ------------------------------------------------------------------------------


def connect(path: str, *, timeout: float | None = DEFAULT_TIMEOUT, share_dma_fds: bool = True,
            twin_socket: bool = True) -> VfioUserDevice:
    """Connect to the vfio-user server at ``path`` and negotiate.

    ``timeout`` bounds the connection and each reply (``None``: wait
    forever).  ``share_dma_fds=False`` maps DMA buffers without fds, so the
    server goes through DMA_READ/DMA_WRITE messages.  ``twin_socket`` offers
    the server a separate socket for its commands.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    twin: socket.socket | None = None
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ConnectionClosed(f"no vfio-user server at {path}: no such socket") from None
        except ConnectionRefusedError:
            raise ConnectionClosed(f"no vfio-user server listening at {path}") from None
        except TimeoutError:
            raise ConnectionClosed(f"connecting to {path} timed out after {timeout}s") from None
        except OSError as exc:  # permission denied, a bad path: say which and what to do
            from pyvfio.sockets import connect_error

            raise ConnectionClosed(connect_error(path, exc, "vfio-user server")) from None
        # Blocking from here on; timeouts are the kernel's (SO_RCVTIMEO/SO_SNDTIMEO)
        # so that the request path pays no poll() per call.
        sock.settimeout(None)
        if timeout is not None:
            tv = struct.pack("@ll", int(timeout), int((timeout % 1) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        reader = MessageReader(sock, max_msg_size=P.MAX_JSON_SIZE + 64,
                               max_fds=CLIENT_MAX_MSG_FDS)
        try:
            version, caps, twin = _negotiate(sock, reader, path, twin_socket, timeout)
            return VfioUserDevice(path, sock, reader, version, caps, timeout=timeout,
                                  share_dma_fds=share_dma_fds, twin=twin)
        except BaseException:
            reader.close()
            raise
    except BaseException:
        if twin is not None:
            twin.close()
        sock.close()
        raise


def _check_first_reply(sock: socket.socket, path: str, max_size: int) -> None:
    """Look at (without taking) the first bytes the server sent: a peer that
    is not a vfio-user server (an HTTP or ssh socket, say) answers something
    whose "header" claims an absurd size, which the reader would otherwise
    wait for until the timeout.  A header split over two sends is left to
    the reader."""
    head = sock.recv(64, socket.MSG_PEEK)
    if b'"server":"pyvfio-broker"' in head:  # it speaks first: see pyvfio.broker.server
        raise ProtocolError(f"{path} is a pyvfio broker, not a vfio-user server: use "
                            f"--broker {path} BDF")
    if len(head) < HEADER_SIZE:
        return
    _msg_id, command, msg_size, _flags, _err = HEADER.unpack_from(head)
    if command != Command.VERSION or not HEADER_SIZE <= msg_size <= max_size:
        raise ProtocolError(f"{path} is not a vfio-user server: its first bytes "
                            f"{head[:HEADER_SIZE]!r} are not a VERSION reply")


def _negotiate(sock: socket.socket, reader: MessageReader, path: str, offer_twin: bool,
               timeout: float | None) -> tuple[tuple[int, int], Capabilities, socket.socket | None]:
    ours = Capabilities(max_msg_fds=CLIENT_MAX_MSG_FDS, max_data_xfer_size=CLIENT_MAX_DATA_XFER,
                        write_multiple=True,
                        twin_socket={"supported": True} if offer_twin else None)
    request = P.Version(P.VERSION_MAJOR, P.VERSION_MINOR, ours).pack()
    not_vfio_user = "is it a vfio-user server?"
    try:
        sock.sendall(HEADER.pack(0, Command.VERSION, HEADER_SIZE + len(request), 0, 0) + request)
    except (BrokenPipeError, ConnectionResetError):
        raise ConnectionClosed(f"{path} closed the connection before taking our VERSION "
                               f"request; {not_vfio_user}") from None
    except OSError as exc:
        raise ConnectionClosed(f"VERSION to {path}: {exc}") from None
    try:
        _check_first_reply(sock, path, reader.max_msg_size)
        msg = reader.read()
    except BlockingIOError:
        raise ConnectionClosed(f"{path} did not answer VERSION within {timeout}s (a server "
                               "that serves one client at a time may be busy)") from None
    except (ConnectionResetError, BrokenPipeError):
        raise ConnectionClosed(f"{path} broke the connection instead of answering VERSION; "
                               f"{not_vfio_user}") from None
    except ConnectionClosed as exc:
        raise ConnectionClosed(f"VERSION to {path}: {exc}; {not_vfio_user}") from None
    except OSError as exc:
        raise ConnectionClosed(f"VERSION to {path}: {exc}") from None
    if msg is None:
        raise ConnectionClosed(f"{path} closed the connection during VERSION negotiation "
                               "(it may not support our protocol version, or it turned a "
                               "client away)")
    fds = msg.fds
    try:
        if not msg.is_reply or msg.command != Command.VERSION or msg.msg_id != 0:
            raise ProtocolError(f"{path} answered VERSION with {msg!r}")
        if msg.problem is not None:
            raise ProtocolError(f"VERSION reply from {path}: {msg.problem}")
        if msg.is_error:
            raise PeerError(msg.error or errno.EIO, "VFIO_USER_VERSION")
        if reader.queued:
            raise ProtocolError(f"{path} sent messages before VERSION was done")
        reply = P.Version.unpack(msg.payload)
        if reply.major != P.VERSION_MAJOR or reply.minor > P.VERSION_MINOR:
            raise ProtocolError(f"{path} answered protocol {reply.major}.{reply.minor} to "
                                f"our {P.VERSION_MAJOR}.{P.VERSION_MINOR}")
        caps = reply.caps
        twin = None
        t = caps.twin_socket
        if t is not None and t.get("supported"):
            if not offer_twin:
                raise ProtocolError(f"{path} set up a twin socket we did not offer")
            index = t.get("fd_index")
            if index is None or index >= len(fds):
                raise ProtocolError(f"{path} enabled twin-socket mode without a valid fd "
                                    f"(fd_index {index}, {len(fds)} fds)")
            if not stat.S_ISSOCK(os.fstat(fds[index]).st_mode):
                raise ProtocolError(f"{path}: the twin fd is not a UNIX stream socket")
            twin = socket.socket(fileno=fds.pop(index))
            if twin.family != socket.AF_UNIX or twin.type != socket.SOCK_STREAM:
                twin.close()
                twin = None
                raise ProtocolError(f"{path}: the twin fd is not a UNIX stream socket")
        return (reply.major, reply.minor), caps, twin
    finally:
        close_fds(fds)
