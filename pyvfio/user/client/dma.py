"""DMA between a vfio-user client and its server: the table of DMA_MAP windows
(:class:`VfioUserDmaSpace`) and the serving of the server's DMA_READ /
DMA_WRITE commands (on the twin socket, inline, or by an idle-time thread).
"""

from __future__ import annotations

import errno
import os
import select
import threading
from dataclasses import dataclass
from typing import Any

from pyvfio.device import PAGE_SIZE, DmaSpace, SharedMemory
from pyvfio.errors import ClosedError, PeerError, ProtocolError, UsageError
from pyvfio.user import protocol as P
from pyvfio.user.client._base import ClientBase
from pyvfio.user.client.connection import (
    CLIENT_MAX_DATA_XFER,
    CLIENT_MAX_MSG_FDS,
    _answer_server_command,
    _command_name,
)
from pyvfio.user.protocol import DMA_ACCESS, Command, Message, MessageReader

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

    def __init__(self, device: ServerCommands, share_fds: bool = True) -> None:
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


class ServerCommands(ClientBase):
    """Answers the server's commands (DMA_READ / DMA_WRITE) wherever they arrive."""

    dma_space: VfioUserDmaSpace

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
