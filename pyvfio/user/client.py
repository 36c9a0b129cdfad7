"""The vfio-user client: a :class:`~pyvfio.device.Device` on the far side of a
UNIX socket.

:func:`connect` opens the socket, negotiates ``VFIO_USER_VERSION`` and returns
a :class:`VfioUserDevice`, which a driver uses exactly like a kernel VFIO
device: regions through ``REGION_READ``/``REGION_WRITE`` messages (or mmap of
the fd the server passes with the region info), interrupts through eventfds
sent with ``DEVICE_SET_IRQS``, DMA buffers from memfds whose fds travel with
``DMA_MAP``, reset, and migration over ``DEVICE_FEATURE`` and
``MIG_DATA_READ``/``WRITE``.

Spec: QEMU ``docs/interop/vfio-user.rst``.  The wire format is
:mod:`pyvfio.user.protocol`'s; this module is the client's behaviour.

The connection model (spec "Socket" and "Command Concurrency"):

* One request at a time is in flight on the main socket, under a lock, so a
  driver may call the device from an interrupt thread and a main thread.
* The server may send ``DMA_READ``/``DMA_WRITE`` commands (for mappings made
  without an fd, or for any mapping).  They are served wherever they arrive:

  - on the twin socket when the server set one up during negotiation (a
    small thread serves it: the main socket then carries only our requests
    and their replies);
  - otherwise on the main socket: inline while a request waits for its
    reply, and — only while a mapping without an fd exists, the one case in
    which a server needs us when we are idle — by an idle-time thread that
    takes the request lock when the socket turns readable.  The common case
    (fd-backed DMA) therefore has no thread on the request path.

Every length and count from the server is checked against what was asked for
and what was negotiated ("defend against a malicious server"): a malformed
reply raises :class:`~pyvfio.errors.ProtocolError` and drops the connection;
an error reply raises :class:`~pyvfio.errors.PeerError` with the server's
errno; a server that goes away raises :class:`~pyvfio.errors.ConnectionClosed`.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyvfio.device import (
    PAGE_SIZE,
    Device,
    DeviceFlag,
    DeviceInfo,
    DmaSpace,
    IrqAction,
    IrqFlag,
    IrqInfo,
    RegionFlag,
    RegionInfo,
    SharedMemory,
    SparseArea,
    outside_region_error,
)
from pyvfio.errors import ClosedError, ConnectionClosed, PeerError, ProtocolError, UsageError
from pyvfio.migration import MigFlag, Migration, MigrationError, MigState, arc_path
from pyvfio.user import protocol as P
from pyvfio.user.protocol import (
    DMA_ACCESS,
    HEADER,
    HEADER_SIZE,
    REGION_ACCESS,
    Capabilities,
    Command,
    Message,
    MessageReader,
    MsgFlag,
    close_fds,
    send_message,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DmaMapping",
    "VfioUserDevice",
    "VfioUserDmaSpace",
    "VfioUserMigration",
    "connect",
]

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
_pack_access = REGION_ACCESS.pack
_REPLY_FLAGS = 1  # MsgFlag.REPLY, as a plain int for the fast path


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
        self._next_id = 0
        self.serve_command: Any = None  # set by the device: (Message) -> bytes

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
            msg_id = self._next_id
            self._next_id = (msg_id + 1) & 0xFFFF
            flags = MsgFlag.NO_REPLY if no_reply else 0
            self._send(command, HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags,
                                            0) + payload, fds)
            if no_reply:
                return Message(msg_id, command, MsgFlag.REPLY, 0, b"", [])
            return self._finish(self._read(command), msg_id, command, keep_fds)

    def call(self, command: int, payload: bytes) -> bytes:
        """The register-access fast path: a command without fds whose reply
        payload is all the caller needs.  Same checks as :meth:`request`;
        the common case (the very next message is our clean reply) runs in
        this one frame."""
        with self.lock:
            if self.broken is not None:
                raise self._down(command)
            msg_id = self._next_id
            self._next_id = (msg_id + 1) & 0xFFFF
            try:
                self.sock.sendall(_pack_header(msg_id, command, 16 + len(payload), 0, 0)
                                  + payload)
            except OSError as exc:
                raise self._send_failed(command, exc) from None
            try:
                msg = self.reader.read()
            except OSError as exc:
                raise self._read_failed(command, exc) from None
            if msg is None:
                raise self._read_failed(command, None)
            if msg.flags == _REPLY_FLAGS and msg.msg_id == msg_id and msg.command == command \
                    and not msg.fds and msg.problem is None and not self.reader.queued:
                return msg.payload
            return self._finish(msg, msg_id, command, False).payload

    def _finish(self, msg: Message, msg_id: int, command: int, keep_fds: bool) -> Message:
        """From the first message after our request to our checked reply:
        serve server commands on the way, raise on errors.  Lock held."""
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
                if msg.problem is not None:
                    msg.close_fds()
                    raise ProtocolError(f"{_command_name(command)} reply from {self.name}: "
                                        f"{msg.problem}", msg.problem.errno)
                if msg.is_error:
                    msg.close_fds()
                    raise PeerError(msg.error or errno.EIO, _command_name(command))
                break
            if msg.fds and not keep_fds:
                msg.close_fds()  # fds where none belong
            # Commands that came in the same read as the reply would wait in the
            # reader's queue with nobody to see them: serve them now.
            while self.reader.queued:
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
    closed."""
    msg.close_fds()
    flags = MsgFlag.REPLY
    try:
        if msg.problem is not None:
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


# --- DMA -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DmaMapping:
    """One ``DMA_MAP`` the client made: ``size`` bytes of ``memory`` from
    ``offset`` visible to the server at ``iova``; ``shared_fd`` says whether
    the memfd went along (the server maps it) or not (the server reaches the
    memory through DMA_READ/DMA_WRITE messages)."""

    iova: int
    size: int
    memory: SharedMemory
    offset: int
    readable: bool
    writable: bool
    shared_fd: bool

    @property
    def end(self) -> int:
        return self.iova + self.size


class VfioUserDmaSpace(DmaSpace):
    """The server's view of client memory: a table of ``DMA_MAP`` windows.

    ``map()`` sends the memfd of the :class:`SharedMemory` with ``DMA_MAP``
    (``share_fds=True``, the default of the connection) so the server mmaps
    it; with ``share_fd=False`` no fd goes and the server must use
    ``DMA_READ``/``DMA_WRITE`` messages, which this client serves from the
    same table.  Any IOVA is valid (the client is the IOMMU); the page size
    is the smallest of the server's ``pgsizes`` that is at least ours.
    """

    def __init__(self, device: VfioUserDevice, share_fds: bool = True) -> None:
        self._device = device
        self.share_fds = share_fds
        self._mappings: list[DmaMapping] = []
        self._table_lock = threading.Lock()
        pgsizes = device.capabilities.pgsizes
        usable = [1 << b for b in range(64) if pgsizes >> b & 1 and 1 << b >= PAGE_SIZE]
        self._page_size = min(usable) if usable else PAGE_SIZE

    @property
    def iova_ranges(self) -> list[tuple[int, int]]:
        return [(0, (1 << 64) - 1)]

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def mappings(self) -> list[DmaMapping]:
        with self._table_lock:
            return list(self._mappings)

    def __repr__(self) -> str:
        with self._table_lock:
            n = len(self._mappings)
        how = "fds shared" if self.share_fds else "no fds: DMA_READ/DMA_WRITE"
        return f"<VfioUserDmaSpace of {self._device.name}: {n} mapping(s), {how}>"

    def map(self, iova: int, memory: SharedMemory, offset: int = 0, size: int | None = None,
            readable: bool = True, writable: bool = True, *,
            share_fd: bool | None = None) -> None:
        """``VFIO_USER_DMA_MAP``.  ``share_fd`` overrides the space's default."""
        if size is None:
            size = memory.size - offset
        if size <= 0 or offset < 0 or offset + size > memory.size:
            raise UsageError(f"DMA map of {offset:#x}+{size:#x} does not fit in memory of "
                             f"{memory.size:#x} bytes")
        ps = self._page_size
        if iova % ps or size % ps or offset % PAGE_SIZE or iova < 0 or iova + size > 1 << 64:
            raise UsageError(f"DMA map {iova:#x}+{size:#x} (offset {offset:#x}) is not aligned "
                             f"to the {ps:#x}-byte page size")
        if memory.closed:
            raise ClosedError("DMA map of closed memory")
        share = self.share_fds if share_fd is None else share_fd
        if self._device.capabilities.max_msg_fds < 1:
            share = False  # the server takes no fds at all: it gets DMA_READ/WRITE instead
        flags = (P.DmaMapFlag.READ if readable else 0) | (P.DmaMapFlag.WRITE if writable else 0)
        mapping = DmaMapping(iova, size, memory, offset, readable, writable, share)
        with self._table_lock:
            for m in self._mappings:
                if m.iova < iova + size and iova < m.end:
                    raise UsageError(f"DMA map {iova:#x}+{size:#x} overlaps the mapping "
                                     f"{m.iova:#x}+{m.size:#x}")
            # In the table before the request: the server may DMA into it as soon
            # as it has processed the map, even before we read the reply.
            self._mappings.append(mapping)
        body = P.DmaMap(iova, size, int(flags), memory.fd_offset + offset if share else 0).pack()
        try:
            self._device._conn.request(Command.DMA_MAP, body,
                                       [memory.fd] if share else ())
        except BaseException:
            with self._table_lock:
                self._mappings.remove(mapping)
            raise
        if not share:
            self._device._need_server_commands()

    def unmap(self, iova: int, size: int) -> None:
        """``VFIO_USER_DMA_UNMAP`` of exactly a previous mapping.  The mapping
        stays in the table (servable) until the server has answered: the spec
        has the server drop every reference before it replies."""
        with self._table_lock:
            mapping = next((m for m in self._mappings if m.iova == iova and m.size == size), None)
        if mapping is None:
            raise UsageError(f"no DMA mapping at {iova:#x}+{size:#x} to unmap")
        try:
            reply = self._device._conn.request(Command.DMA_UNMAP,
                                               P.DmaUnmap(iova, size).pack())
            # The spec has the server echo the entry; an empty reply is tolerated.
            if reply.payload:
                echo = self._device._unpack(P.DmaUnmap.unpack, reply.payload, reply=True)
                if (echo.address, echo.size) != (iova, size):
                    raise self._device._malformed(
                        f"DMA_UNMAP of {iova:#x}+{size:#x} answered for "
                        f"{echo.address:#x}+{echo.size:#x}")
        finally:
            # Whatever the answer, the memory must not be reachable through us any
            # more: the caller frees it next (a dead server has unmapped it anyway).
            with self._table_lock:
                if mapping in self._mappings:
                    self._mappings.remove(mapping)

    def _window(self, address: int, count: int, write: bool) -> memoryview:
        """The bytes of our memory behind ``address..address+count``, if one
        mapping covers it and allows the access.  Call with the table lock held."""
        for m in self._mappings:
            if m.iova <= address and address + count <= m.end:
                if write and not m.writable:
                    raise PeerError(errno.EPERM, "DMA_WRITE to a mapping that is not writable")
                if not write and not m.readable:
                    raise PeerError(errno.EPERM, "DMA_READ of a mapping that is not readable")
                start = m.offset + address - m.iova
                return m.memory.view[start:start + count]
        raise PeerError(errno.EFAULT, f"DMA access {address:#x}+{count:#x} outside every mapping")

    def serve(self, msg: Message) -> bytes:
        """Answer ``DMA_READ``/``DMA_WRITE`` from the server (reply payload)."""
        if msg.command not in (Command.DMA_READ, Command.DMA_WRITE):
            raise PeerError(errno.ENOSYS, _command_name(msg.command))
        write = msg.command == Command.DMA_WRITE
        access = P.DmaAccess.unpack(msg.payload, with_data=write, max_count=CLIENT_MAX_DATA_XFER)
        head = DMA_ACCESS.pack(access.address, access.count)
        with self._table_lock:
            window = self._window(access.address, access.count, write)
            if write:
                window[:] = access.data
                return head
            return head + bytes(window)

    def forget_all(self) -> None:
        with self._table_lock:
            self._mappings.clear()


# --- migration -------------------------------------------------------------------------------


class VfioUserMigration(Migration):
    """:class:`pyvfio.migration.Migration` over ``DEVICE_FEATURE`` and
    ``MIG_DATA_READ``/``WRITE``.

    ``set_state`` walks the kernel's arcs (:func:`~pyvfio.migration.arc_path`)
    one ``MIG_DEVICE_STATE`` SET at a time, so it works with a server that
    implements only the direct arcs the spec lists (a server that does
    combination transitions itself is not bothered by single arcs).
    """

    def __init__(self, device: VfioUserDevice) -> None:
        self.device = device
        self.name = device.name
        self._flags: MigFlag | None = None

    @property
    def flags(self) -> MigFlag:
        if self._flags is None:
            try:
                self._flags = MigFlag(int(self.device.migration_flags()))
            except PeerError:  # the server does not offer the MIGRATION feature
                self._flags = MigFlag(0)
        return self._flags

    def get_state(self) -> MigState:
        return MigState(int(self.device.get_mig_state()))

    def set_state(self, state: MigState) -> None:
        target = MigState(int(state))
        for step in arc_path(self.get_state(), target, self.flags):
            reached = self.device.set_mig_state(step)
            if int(reached) != int(step):
                raise MigrationError(f"{self.name}: asked for {step.name}, the server reports "
                                     f"{P.MigState(int(reached)).name}", "state")

    def read_data(self, size: int) -> bytes:
        return self.device.mig_data_read(size)

    def write_data(self, data: bytes) -> int:
        self.device.mig_data_write(data)
        return len(data)


# --- the device ------------------------------------------------------------------------------


class VfioUserDevice(Device):
    """A device served by a vfio-user server.  Create with :func:`connect`.

    Beyond the :class:`Device` API: ``capabilities`` (the server's, as
    negotiated), ``version`` (``(major, minor)``), ``region_io_fds()``,
    ``write_multiple()``, ``device_feature()`` and the migration calls.
    """

    backend = "vfio-user"

    def __init__(self, path: str, sock: socket.socket, reader: MessageReader,
                 version: tuple[int, int], capabilities: Capabilities, *,
                 timeout: float | None, share_dma_fds: bool,
                 twin: socket.socket | None) -> None:
        super().__init__(path)
        self.path = path
        self.version = version
        self.capabilities = capabilities
        self.backend_reason = (f"vfio-user server at {path} (protocol {version[0]}.{version[1]})")
        # Largest data we put in (or ask for in) one message.
        self.max_xfer = min(capabilities.max_data_xfer_size, CLIENT_MAX_DATA_XFER)
        # Replies and server commands are bounded by the transfer limits.
        reader.max_msg_size = max(self.max_xfer, CLIENT_MAX_DATA_XFER) + 4096
        self._conn = _Connection(sock, reader, path, timeout)
        self._conn.serve_command = self._serve_server_command
        self._region_fds: dict[int, int] = {}
        self._threads: list[threading.Thread] = []
        self._thread_lock = threading.Lock()
        self._twin = twin
        self._idle_stop: int | None = None  # eventfd that stops the idle thread
        self.dma_space = VfioUserDmaSpace(self, share_dma_fds)
        self.dma = self.dma_space
        if twin is not None:
            self._start_thread(self._twin_loop, "twin")

    # ---- server -> client commands ----

    def _serve_server_command(self, msg: Message) -> bytes:
        if msg.command in (Command.DMA_READ, Command.DMA_WRITE):
            return self.dma_space.serve(msg)
        raise PeerError(errno.ENOSYS, _command_name(msg.command))

    def _start_thread(self, target: Any, what: str) -> None:
        t = threading.Thread(target=target, name=f"vfio-user {what} {self.path}", daemon=True)
        self._threads.append(t)
        t.start()

    def _twin_loop(self) -> None:
        """Serve the server's commands on the twin socket until it closes."""
        assert self._twin is not None
        sock = self._twin
        reader = MessageReader(sock, max_msg_size=CLIENT_MAX_DATA_XFER + 4096,
                               max_fds=CLIENT_MAX_MSG_FDS)
        try:
            while True:
                msg = reader.read()
                if msg is None:
                    return
                if msg.is_reply:
                    msg.close_fds()
                    raise ProtocolError("reply on the twin socket, where we send no commands")
                reply = _answer_server_command(self._serve_server_command, msg)
                if reply is not None:
                    sock.sendall(reply)
        except (ProtocolError, OSError) as exc:
            # The server can no longer reach us: the spec says abort.
            self._conn._break(f"twin socket failed: {exc}")
        finally:
            reader.close()

    def _need_server_commands(self) -> None:
        """A mapping without an fd exists: make sure someone answers the
        server's DMA_READ/DMA_WRITE when no request is in flight."""
        with self._thread_lock:  # two threads mapping at once start one idle thread
            if self._twin is not None or self._idle_stop is not None:
                return
            self._idle_stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._start_thread(self._idle_loop, "idle")

    def _idle_loop(self) -> None:
        stop = self._idle_stop
        assert stop is not None
        poller = select.poll()
        poller.register(self._conn.sock.fileno(), select.POLLIN)
        poller.register(stop, select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == stop for fd, _ in events) or self._conn.broken is not None:
                return
            self._conn.serve_idle()
            if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in events):
                return

    # ---- Device primitives ----

    def _request(self, command: int, payload: bytes, fds: Sequence[int] = (), *,
                 keep_fds: bool = False) -> Message:
        if self._closed:
            self._ensure_open()
        return self._conn.request(command, payload, fds, keep_fds=keep_fds)

    def _get_info(self) -> DeviceInfo:
        reply = self._request(Command.DEVICE_GET_INFO, P.DeviceInfoMsg().pack())
        msg = P.DeviceInfoMsg.unpack(reply.payload, reply=True)
        if msg.num_regions > MAX_REGIONS or msg.num_irqs > MAX_IRQ_INDEXES:
            raise self._malformed(f"DEVICE_GET_INFO: {msg.num_regions} regions, {msg.num_irqs} "
                                  "IRQ indexes is more than a device has")
        return DeviceInfo(DeviceFlag(msg.flags), msg.num_regions, msg.num_irqs)

    def _malformed(self, what: str) -> ProtocolError:
        """A reply that parsed but makes no sense: drop the connection."""
        self._conn._break(f"protocol error: {what}")
        return ProtocolError(f"{self.path}: {what}")

    def _unpack(self, parse: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return parse(*args, **kwargs)
        except ProtocolError as exc:
            raise self._malformed(str(exc)) from None

    def _get_region_info(self, index: int) -> RegionInfo:
        argsz = P.RegionInfoMsg.SIZE + 256  # room for a sparse map of a few areas
        for _attempt in range(2):
            reply = self._request(Command.DEVICE_GET_REGION_INFO,
                                  P.RegionInfoMsg(index, argsz=argsz).pack(), keep_fds=True)
            fds = reply.fds
            try:
                msg = self._unpack(P.RegionInfoMsg.unpack, reply.payload, reply=True)
                if msg.index != index:
                    raise self._malformed(f"REGION_INFO for region {index} answered for "
                                          f"region {msg.index}")
                if msg.argsz > argsz and len(reply.payload) < msg.argsz:
                    # The capabilities did not fit: ask again with the size it needs.
                    if msg.argsz > MAX_REGION_INFO_SIZE:
                        raise self._malformed(f"REGION_INFO argsz {msg.argsz} is over "
                                              f"{MAX_REGION_INFO_SIZE}")
                    argsz = msg.argsz
                    close_fds(fds)
                    continue
                if len(reply.payload) > max(argsz, P.RegionInfoMsg.SIZE):
                    raise self._malformed(f"REGION_INFO reply of {len(reply.payload)} bytes, "
                                          f"over the {argsz} asked for")
                info = self._region_info_from(msg, fds)
                fds = []
                return info
            finally:
                close_fds(fds)
        raise self._malformed(f"REGION_INFO for region {index}: argsz kept growing")

    def _region_info_from(self, msg: P.RegionInfoMsg, fds: list[int]) -> RegionInfo:
        """Check the reply against itself and keep the region fd when the
        region may be mmapped.  Consumes ``fds``."""
        flags = RegionFlag(msg.flags & (RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP
                                        | RegionFlag.CAPS))
        size = msg.size
        if size >= 1 << 63:
            raise self._malformed(f"region {msg.index} size {size:#x} is absurd")
        areas: tuple[SparseArea, ...] = ()
        if msg.sparse_areas is not None:
            for off, length in msg.sparse_areas:
                if length == 0 or off + length > size:
                    raise self._malformed(f"region {msg.index}: sparse area {off:#x}+{length:#x} "
                                          f"is outside the region of {size:#x} bytes")
            areas = tuple(SparseArea(o, s) for o, s in msg.sparse_areas)
        elif size:
            areas = (SparseArea(0, size),)
        fd = None
        if len(fds) > 1:
            raise self._malformed(f"region {msg.index} info came with {len(fds)} fds")
        if fds:
            fd = fds.pop()
        if flags & RegionFlag.MMAP and fd is None:
            # MMAP without an fd is nothing we can map: access through messages.
            flags &= ~RegionFlag.MMAP
        if fd is not None and not flags & RegionFlag.MMAP:
            os.close(fd)  # an fd where none belongs
            fd = None
        if fd is not None:
            old = self._region_fds.pop(msg.index, None)
            if old is not None:
                os.close(old)
            self._region_fds[msg.index] = fd
        else:
            areas = ()
        # The codec decodes the sparse-mmap and type capabilities; those are the
        # ids we can report (an MSI-X-mappable capability is not decoded).
        caps = tuple(cap for cap, present in ((P.RegionCapId.SPARSE_MMAP,
                                               msg.sparse_areas is not None),
                                              (P.RegionCapId.TYPE, msg.type is not None))
                     if present)
        return RegionInfo(msg.index, flags, size, msg.offset, areas, msg.type,
                          tuple(int(c) for c in caps))

    def _region_read(self, index: int, offset: int, size: int) -> bytes:
        if size <= self.max_xfer:
            return self._read_chunk(index, offset, size)
        parts = []
        for start in range(0, size, self.max_xfer):
            parts.append(self._read_chunk(index, offset + start,
                                          min(self.max_xfer, size - start)))
        return b"".join(parts)

    def _read_chunk(self, index: int, offset: int, size: int) -> bytes:
        head = _pack_access(offset, index, size)
        payload = self._conn.call(Command.REGION_READ, head)
        if len(payload) != 16 + size or payload[:16] != head:
            raise self._malformed(f"REGION_READ of region {index} {offset:#x}+{size}: reply "
                                  f"does not match (payload {len(payload)} bytes)")
        return payload[16:]

    def _region_write(self, index: int, offset: int, data: bytes) -> None:
        size = len(data)
        step = self.max_xfer
        for start in range(0, size, step):
            chunk = data[start:start + step] if size > step else data
            head = _pack_access(offset + start, index, len(chunk))
            if self._conn.call(Command.REGION_WRITE, head + chunk) != head:
                raise self._malformed(f"REGION_WRITE of region {index} {offset + start:#x}+"
                                      f"{len(chunk)}: reply does not match")

    def _region_int_accessors(self, info: RegionInfo
                              ) -> dict[int, tuple[Callable[[int], int],
                                                   Callable[[int, int], None]]]:
        """Register accessors of one region that build the message and check
        the reply in one frame around :meth:`_Connection.call` (the request
        path costs about as much Python as the socket round trip itself).
        The reply must echo our 16-byte access head exactly."""
        index, size = info.index, info.size
        call = self._conn.call
        malformed = self._malformed
        from_bytes = int.from_bytes

        name = self.name

        def bad(offset: int, width: int) -> UsageError:
            return outside_region_error(name, index, size, offset, width)

        def make(width: int) -> tuple[Callable[[int], int], Callable[[int, int], None]]:
            limit = size - width
            mask = (1 << (8 * width)) - 1
            reply_size = 16 + width

            def read_n(offset: int) -> int:
                if not 0 <= offset <= limit:
                    raise bad(offset, width)
                head = _pack_access(offset, index, width)
                payload = call(9, head)  # REGION_READ
                if len(payload) != reply_size or payload[:16] != head:
                    raise malformed(f"REGION_READ of region {index} {offset:#x}+{width}: "
                                    f"reply does not match (payload {len(payload)} bytes)")
                return from_bytes(payload[16:], "little")

            def write_n(offset: int, value: int) -> None:
                if not 0 <= offset <= limit:
                    raise bad(offset, width)
                head = _pack_access(offset, index, width)
                if call(10, head + (value & mask).to_bytes(width, "little")) != head:
                    raise malformed(f"REGION_WRITE of region {index} {offset:#x}+{width}: "
                                    "reply does not match")

            return read_n, write_n

        return {width: make(width) for width in (1, 2, 4, 8)}

    def _region_mmap(self, info: RegionInfo, offset: int, size: int) -> mmap.mmap:
        fd = self._region_fds.get(info.index)
        if fd is None:
            raise UsageError(f"region {info.index} of {self.path} came without an fd to mmap")
        where = info.offset + offset
        if where % mmap.ALLOCATIONGRANULARITY:
            raise UsageError(f"region {info.index}: mmap offset {where:#x} is not page aligned")
        prot = (mmap.PROT_READ if info.flags & RegionFlag.READ else 0) | \
            (mmap.PROT_WRITE if info.flags & RegionFlag.WRITE else 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=where)

    def _get_irq_info(self, index: int) -> IrqInfo:
        reply = self._request(Command.DEVICE_GET_IRQ_INFO, P.IrqInfoMsg(index).pack())
        msg = self._unpack(P.IrqInfoMsg.unpack, reply.payload, reply=True)
        if msg.index != index:
            raise self._malformed(f"IRQ_INFO for index {index} answered for index {msg.index}")
        if msg.count > P.MAX_IRQ_COUNT:
            raise self._malformed(f"IRQ index {index} claims {msg.count} vectors")
        return IrqInfo(index, msg.count, IrqFlag(msg.flags & 0xF))

    def _set_irqs(self, index: int, flags: IrqAction, start: int, count: int,
                  data: Sequence[int] | Sequence[bool] | None) -> None:
        dtype = flags & (IrqAction.DATA_NONE | IrqAction.DATA_BOOL | IrqAction.DATA_EVENTFD)
        if dtype == IrqAction.DATA_EVENTFD:
            fds = [int(fd) for fd in (data or ())]
            if len(fds) != count:
                raise UsageError(f"SET_IRQS with DATA_EVENTFD needs {count} fds, got {len(fds)}")
            if all(fd < 0 for fd in fds):
                # vfio-user de-assigns a range by sending no fds at all.
                self._request(Command.DEVICE_SET_IRQS,
                              P.IrqSet(index, int(flags), start, count).pack())
                return
            if any(fd < 0 for fd in fds):
                raise UsageError("vfio-user cannot de-assign some vectors of a range and assign "
                                 "others in one call: split it")
            # The server takes at most max_msg_fds fds per message.
            step = self.capabilities.max_msg_fds
            if step < 1:
                raise UsageError(f"{self.path} takes no fds (max_msg_fds 0): its interrupts "
                                 "cannot be routed to eventfds")
            for i in range(0, count, step):
                chunk = fds[i:i + step]
                self._request(Command.DEVICE_SET_IRQS,
                              P.IrqSet(index, int(flags), start + i, len(chunk)).pack(),
                              chunk)
            return
        bools = None
        if dtype == IrqAction.DATA_BOOL:
            bools = tuple(bool(b) for b in (data or ()))
            if len(bools) != count:
                raise UsageError(f"SET_IRQS with DATA_BOOL needs {count} booleans")
        self._request(Command.DEVICE_SET_IRQS,
                      P.IrqSet(index, int(flags), start, count, bools).pack())

    def _reset(self) -> None:
        self._request(Command.DEVICE_RESET, b"")

    def _close(self) -> None:
        self.dma_space.forget_all()
        self._conn.close()
        if self._twin is not None:
            try:
                self._twin.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._idle_stop is not None:
            os.eventfd_write(self._idle_stop, 1)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        if self._twin is not None:
            self._twin.close()
        if self._idle_stop is not None:
            os.close(self._idle_stop)
            self._idle_stop = None
        close_fds(self._region_fds.values())
        self._region_fds.clear()

    # ---- vfio-user extras ----

    @property
    def connected(self) -> bool:
        """False once the server went away or the connection was dropped."""
        return not self._closed and self._conn.broken is None

    def region_io_fds(self, index: int) -> tuple[list[P.SubRegionIoFd], list[int]]:
        """``VFIO_USER_DEVICE_GET_REGION_IO_FDS``: the sub-regions of region
        ``index`` and the fds they index (the caller owns and closes them)."""
        argsz = P.RegionIoFds.SIZE + 16 * P.RegionIoFds.ENTRY_SIZE
        for _attempt in range(2):
            reply = self._request(Command.DEVICE_GET_REGION_IO_FDS,
                                  P.RegionIoFds(index, argsz=argsz).pack(), keep_fds=True)
            fds = reply.fds
            try:
                msg = self._unpack(P.RegionIoFds.unpack, reply.payload, reply=True)
                if msg.index != index:
                    raise self._malformed(f"REGION_IO_FDS for {index} answered for {msg.index}")
                if msg.count and not msg.sub_regions:
                    if msg.argsz <= argsz or msg.argsz > MAX_REGION_INFO_SIZE:
                        raise self._malformed(f"REGION_IO_FDS: {msg.count} sub-regions without "
                                              f"entries (argsz {msg.argsz})")
                    argsz = msg.argsz
                    close_fds(fds)
                    fds = []
                    continue
                region_size = self.region(index).size
                for sub in msg.sub_regions:
                    if sub.fd_index >= len(fds) or sub.offset + sub.size > region_size:
                        raise self._malformed(f"REGION_IO_FDS: sub-region {sub} is outside the "
                                              f"region or names fd {sub.fd_index} of {len(fds)}")
                out, fds = fds, []
                return list(msg.sub_regions), out
            finally:
                close_fds(fds)
        raise self._malformed("REGION_IO_FDS: argsz kept growing")

    def write_multiple(self, writes: Iterable[tuple[int, int, bytes]]) -> None:
        """Several small register writes ``(region, offset, data)`` (each 1-8
        bytes) in as few ``REGION_WRITE_MULTI`` messages as allowed, in order;
        one REGION_WRITE each when the server did not offer ``write_multiple``."""
        items = [(int(r), int(o), bytes(d)) for r, o, d in writes]
        for r, o, d in items:
            if not 1 <= len(d) <= 8:
                raise UsageError(f"write_multiple: writes are 1-8 bytes, not {len(d)}")
            self.region(r)._check(o, len(d))
        if not self.capabilities.write_multiple:
            for r, o, d in items:
                self._region_write(r, o, d)
            return
        per_msg = max(1, min(P.MAX_WRITE_MULTI, (self.max_xfer - 8) // 24))
        for i in range(0, len(items), per_msg):
            batch = tuple(P.WriteOne(r, o, d) for r, o, d in items[i:i + per_msg])
            reply = self._request(Command.REGION_WRITE_MULTI, P.RegionWriteMulti(batch).pack())
            done = self._unpack(P.RegionWriteMulti.unpack, reply.payload, reply=True).wr_cnt
            if done != len(batch):
                raise self._malformed(f"REGION_WRITE_MULTI: {done} of {len(batch)} writes "
                                      "reported done")

    def device_feature(self, feature: int, flags: int, data: bytes = b"",
                       max_reply: int = 0) -> bytes:
        """Raw ``VFIO_USER_DEVICE_FEATURE``: returns the reply's data."""
        argsz = P.DeviceFeature.SIZE + max(len(data), max_reply)
        reply = self._request(Command.DEVICE_FEATURE,
                              P.DeviceFeature(feature | flags, data, argsz).pack())
        msg = self._unpack(P.DeviceFeature.unpack, reply.payload, reply=True)
        if msg.feature != feature:
            raise self._malformed(f"DEVICE_FEATURE {feature} answered for {msg.feature}")
        if len(msg.data) > max(len(data), max_reply):
            raise self._malformed(f"DEVICE_FEATURE reply carries {len(msg.data)} bytes, over "
                                  f"the {max(len(data), max_reply)} asked for")
        return msg.data

    # migration (v2 state machine over DEVICE_FEATURE and MIG_DATA_*)

    def migration(self) -> VfioUserMigration:
        """The neutral :class:`pyvfio.migration.Migration` of this device (what
        :func:`pyvfio.migration.migrate` uses); the calls below are the raw
        protocol operations it is built on."""
        self._ensure_open()
        return VfioUserMigration(self)

    def migration_flags(self) -> P.MigrationFlag:
        """``VFIO_DEVICE_FEATURE_MIGRATION``: what the device supports
        (raises :class:`PeerError` when it cannot migrate)."""
        data = self.device_feature(P.FeatureIndex.MIGRATION, P.FeatureFlag.GET,
                                   max_reply=P.MigrationFeature.SIZE)
        return P.MigrationFlag(self._unpack(P.MigrationFeature.unpack, data).flags)

    def get_mig_state(self) -> P.MigState:
        data = self.device_feature(P.FeatureIndex.MIG_DEVICE_STATE, P.FeatureFlag.GET,
                                   max_reply=P.MigStateMsg.SIZE)
        return self._mig_state(self._unpack(P.MigStateMsg.unpack, data).device_state)

    def set_mig_state(self, state: int) -> P.MigState:
        """Move the device to ``state`` (one arc or a path the server takes);
        returns the state the server reports."""
        data = self.device_feature(P.FeatureIndex.MIG_DEVICE_STATE, P.FeatureFlag.SET,
                                   P.MigStateMsg(int(P.MigState(state))).pack())
        if not data:
            return P.MigState(state)
        return self._mig_state(self._unpack(P.MigStateMsg.unpack, data).device_state)

    def _mig_state(self, value: int) -> P.MigState:
        try:
            return P.MigState(value)
        except ValueError:
            raise self._malformed(f"unknown migration state {value}") from None

    def mig_data_read(self, size: int | None = None) -> bytes:
        """One ``MIG_DATA_READ`` of up to ``size`` bytes (default: the
        transfer limit); fewer bytes than asked means the stream is drained."""
        size = self.max_xfer if size is None else min(size, self.max_xfer)
        reply = self._request(Command.MIG_DATA_READ, P.MigData(size, argsz=8 + size).pack())
        msg = self._unpack(P.MigData.unpack, reply.payload, with_data=True, max_size=size)
        return msg.data

    def mig_data_read_all(self) -> bytes:
        """Read migration data until the server has no more."""
        parts = []
        while True:
            chunk = self.mig_data_read()
            parts.append(chunk)
            if len(chunk) < self.max_xfer:
                return b"".join(parts)

    def mig_data_write(self, data: bytes) -> None:
        """Send migration data to a device in ``RESUMING``, split to the limit."""
        view = memoryview(bytes(data))
        for start in range(0, len(view), self.max_xfer):
            chunk = bytes(view[start:start + self.max_xfer])
            self._request(Command.MIG_DATA_WRITE,
                          P.MigData(len(chunk), chunk, argsz=8).pack())

    def dma_logging_start(self, page_size: int = PAGE_SIZE,
                          ranges: Iterable[tuple[int, int]] = ()) -> int:
        """Start dirty logging of the device's DMA writes over ``ranges``
        (``(iova, length)``; none: everything).  Returns the page size the
        server chose."""
        body = P.DmaLoggingControl(page_size, tuple(P.DmaLoggingRange(i, n)
                                                    for i, n in ranges)).pack()
        data = self.device_feature(P.FeatureIndex.DMA_LOGGING_START, P.FeatureFlag.SET, body)
        if not data:
            return page_size
        return int(self._unpack(P.DmaLoggingControl.unpack, data).page_size)

    def dma_logging_stop(self) -> None:
        self.device_feature(P.FeatureIndex.DMA_LOGGING_STOP, P.FeatureFlag.SET,
                            P.DmaLoggingControl(0).pack())

    def dma_logging_report(self, iova: int, length: int, page_size: int = PAGE_SIZE) -> list[int]:
        """IOVAs of the pages (of ``page_size``) the device wrote in
        ``[iova, iova+length)`` since the last report."""
        request = P.DmaLoggingReport(iova, length, page_size)
        data = self.device_feature(P.FeatureIndex.DMA_LOGGING_REPORT, P.FeatureFlag.GET,
                                   request.pack(), max_reply=request.SIZE + request.bitmap_size)
        report = self._unpack(P.DmaLoggingReport.unpack, data, reply=True)
        if (report.iova, report.length, report.page_size) != (iova, length, page_size):
            raise self._malformed("DMA_LOGGING_REPORT answered for another range")
        pages = -(-length // page_size)
        bits = int.from_bytes(report.bitmap, "little")
        return [iova + i * page_size for i in range(pages) if bits >> i & 1]


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
