"""Serving devices on sockets: :class:`DeviceServer` (one device on one socket
path, one client at a time, later clients wait) and :class:`Server` (several
devices, one accept loop).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pyvfio.devices.model import IoEventFd, PciDeviceModel
from pyvfio.errors import UsageError
from pyvfio.sockets import forget_wakeup_fd, listen_error, prepare_listen_path
from pyvfio.user.server._base import (
    CLIENT_REPLY_TIMEOUT,
    LISTEN_BACKLOG,
    MAX_WAITING_CLIENTS,
    SERVER_MAX_DATA_XFER_SIZE,
    SERVER_MAX_DMA_MAPS,
    SERVER_MAX_MSG_FDS,
    log,
)
from pyvfio.user.server.connection import Connection
from pyvfio.user.server.migration import MigrationFsm

# --- one device on one socket ----------------------------------------------------------------


class DeviceServer:
    """A device model served on one socket path, one client at a time."""

    def __init__(self, device: PciDeviceModel, path: str, *,
                 max_msg_fds: int = SERVER_MAX_MSG_FDS,
                 max_data_xfer_size: int = SERVER_MAX_DATA_XFER_SIZE,
                 max_dma_maps: int = SERVER_MAX_DMA_MAPS,
                 reply_timeout: float = CLIENT_REPLY_TIMEOUT) -> None:
        self.device = device
        self.path = path
        self.reply_timeout = reply_timeout
        self.max_msg_fds = max_msg_fds
        self.max_data_xfer_size = max_data_xfer_size
        self.max_dma_maps = max_dma_maps
        self.migration = MigrationFsm(device)
        self.connection: Connection | None = None
        self.listener: socket.socket | None = None
        self.clients_served = 0
        # Called as on_client("connected"|"disconnected", self, connection) from
        # the server's threads with its lock held: it must not block (the
        # control socket only queues an event).
        self.on_client: Callable[[str, DeviceServer, Connection], None] | None = None
        self._lock = threading.Lock()
        self._waiting: collections.deque[socket.socket] = collections.deque()
        self._closing = False
        # One fd held back for the day the process runs out (_accept_failed).
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._last_accept_error = 0.0
        device.finalize()
        # ioeventfds are the device's, not a client's: they outlive clients.
        self.io_fds: dict[int, list[tuple[IoEventFd, int]]] = {}
        for index, spec in device.regions.items():
            for sub in spec.ioeventfds:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.io_fds.setdefault(index, []).append((sub, fd))
        self._io_thread: threading.Thread | None = None
        self._io_wake: tuple[int, int] | None = None
        if self.io_fds:
            self._io_wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._io_thread = threading.Thread(target=self._poll_io_fds, daemon=True,
                                               name=f"vfio-user ioeventfds {path}")
            self._io_thread.start()

    def _poll_io_fds(self) -> None:
        """Turn ioeventfd signals into writes through the region callbacks."""
        assert self._io_wake is not None
        poller = select.poll()
        poller.register(self._io_wake[0], select.POLLIN)
        by_fd: dict[int, tuple[int, IoEventFd]] = {}
        for index, subs in self.io_fds.items():
            for sub, fd in subs:
                by_fd[fd] = (index, sub)
                poller.register(fd, select.POLLIN)
        while not self._closing:
            for fd, _ev in poller.poll():
                if fd == self._io_wake[0]:
                    return
                try:
                    hits = os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                index, sub = by_fd[fd]
                data = (sub.datamatch or 0).to_bytes(sub.size, "little")
                access = self.device.regions[index].access
                assert access is not None
                with self.device.lock:
                    for _ in range(min(hits, 1024)):
                        try:
                            access(sub.offset, data, True)
                        except Exception:
                            log.exception("%s: ioeventfd write failed", self.path)

    def listen(self) -> None:
        _prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            # Room for clients that connect before the accept loop runs (or
            # while it is busy): a full backlog fails their connect() at once.
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise _listen_error(self.path, exc) from exc
        self.listener = sock

    def accept(self) -> None:
        """Take one waiting client.  Never raises: an error is this client's
        (it is turned away and the error logged), never the server's."""
        listener = self.listener
        if listener is None:  # removed while the accept loop was looking at it
            return
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._accept_failed(exc)
            return
        try:
            self._take(sock)
        except Exception as exc:  # no thread, no memory: turn this client away
            sock.close()
            log.error("%s: cannot serve a new client: %s", self.path, exc)

    def _accept_failed(self, exc: OSError) -> None:
        """accept() failed.  Out of fds (EMFILE, ENFILE), the client would stay
        queued and the listener readable, so the accept loop would spin:
        give back the reserve fd, accept the client and close it at once
        (it sees the connection end), then take the reserve again."""
        now = time.monotonic()
        if now - self._last_accept_error > 1.0:
            self._last_accept_error = now
            log.warning("%s: cannot accept a client: %s (%s); turning it away", self.path,
                        exc.strerror or exc, errno.errorcode.get(exc.errno or 0, "?"))
        if exc.errno not in (errno.EMFILE, errno.ENFILE) or self.listener is None:
            return
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        try:
            sock, _ = self.listener.accept()
            sock.close()
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _take(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        with self._lock:
            if self.connection is not None:
                # One client at a time.  Like libvfio-user (which accepts only
                # when detached), later clients wait their turn; past a few,
                # they are turned away.
                if len(self._waiting) >= MAX_WAITING_CLIENTS:
                    sock.close()
                else:
                    self._waiting.append(sock)
                return
            self._start(sock)

    def _start(self, sock: socket.socket) -> None:
        """Run a connection for ``sock`` (with ``_lock`` held)."""
        conn = Connection(self, sock)
        thread = threading.Thread(target=conn.run, name=f"vfio-user {self.path}", daemon=True)
        conn.thread = thread
        self.connection = conn
        try:
            thread.start()
        except BaseException:  # no thread: the device must not look taken
            self.connection = None
            raise
        self.clients_served += 1
        # The thread's end (_connection_ended) waits for _lock: this comes first.
        self._notify("connected", conn)

    @property
    def busy(self) -> bool:
        """A client is connected (negotiated or not)."""
        return self.connection is not None

    def _connection_ended(self, conn: Connection) -> None:
        with self._lock:
            if self.connection is conn:
                self.connection = None
                self._notify("disconnected", conn)
                if self._waiting and not self._closing:
                    self._start(self._waiting.popleft())

    def _notify(self, what: str, conn: Connection) -> None:
        if self.on_client is not None:
            try:
                self.on_client(what, self, conn)
            except Exception:
                log.exception("%s: on_client(%s) failed", self.path, what)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            while self._waiting:
                self._waiting.popleft().close()
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        if self._io_wake is not None:
            os.write(self._io_wake[1], b"x")
            if self._io_thread is not None:
                self._io_thread.join(5)
            for fd in self._io_wake:
                os.close(fd)
            self._io_wake = None
            for subs in self.io_fds.values():
                for _sub, fd in subs:
                    os.close(fd)
            self.io_fds = {}
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        conn = self.connection
        if conn is not None:
            conn.close()
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(5)


def _listen_error(path: str, exc: OSError) -> UsageError:
    """Say which path failed and what to do, instead of a bare errno."""
    return listen_error(path, exc)


def _prepare_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead server; refuse a live one, a
    symlink, a non-socket file or a directory others could swap it in
    (the rules of a root daemon: :func:`pyvfio.sockets.prepare_listen_path`)."""
    prepare_listen_path(path, "vfio-user server")


# --- the server ------------------------------------------------------------------------------


class Server:
    """Serves several devices from one process.

    >>> server = Server()
    >>> server.add(EduDevice(), "/tmp/edu.sock")     # doctest: +SKIP
    >>> server.serve_forever()                        # doctest: +SKIP

    ``start()`` runs the accept loop in a background thread instead;
    ``close()`` stops it, disconnects clients and removes the socket files.
    """

    def __init__(self) -> None:
        self.devices: list[DeviceServer] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, device: PciDeviceModel, path: str, **limits: Any) -> DeviceServer:
        ds = DeviceServer(device, path, **limits)
        ds.listen()
        assert ds.listener is not None
        self._selector.register(ds.listener, selectors.EVENT_READ, ds)
        self.devices.append(ds)
        return ds

    def remove(self, ds: DeviceServer) -> None:
        """Stop serving ``ds``: end its client (if any), close its socket and
        remove the socket file.  The model is left to the caller."""
        if ds.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(ds.listener)
        with contextlib.suppress(ValueError):
            self.devices.remove(ds)
        ds.close()

    def serve_forever(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select():
                if key.data is None:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 64)
                    continue
                try:
                    key.data.accept()
                except Exception:  # never let one client end the loop of all devices
                    log.exception("%s: accepting a client failed", key.data.path)

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="vfio-user accept",
                                        daemon=True)
        self._thread.start()
        return self

    def wakeup_fd(self) -> int:
        """The write end (non-blocking) of the pipe that wakes the accept
        loop: a byte written to it makes :meth:`serve_forever` look at
        :meth:`stop` again (for :func:`signal.set_wakeup_fd`)."""
        return self._wake_w

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for ds in self.devices:
            with contextlib.suppress(KeyError, ValueError):
                if ds.listener is not None:
                    self._selector.unregister(ds.listener)
            ds.close()
        self._selector.close()
        forget_wakeup_fd(self._wake_w)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connections(self) -> Iterator[Connection]:
        for ds in self.devices:
            if ds.connection is not None:
                yield ds.connection
