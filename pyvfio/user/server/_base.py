"""What every part of a :class:`~pyvfio.user.server.Connection` shares: the
server's limits, the interface of the device server that owns a connection, and
the connection state that the per-command-group handlers (:mod:`.dma`,
:mod:`.region`, :mod:`.irq`, :mod:`.feature`) work on.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
from typing import Any, Protocol

from pyvfio.devices.model import IoEventFd, PciDeviceModel, RegionSpec
from pyvfio.user import protocol as P
from pyvfio.user.dma import DmaTable
from pyvfio.user.irq import IrqState
from pyvfio.user.server.migration import MigrationFsm

log = logging.getLogger("pyvfio.user.server")

_HEADER = P.HEADER
_REGION_ACCESS = P.REGION_ACCESS
_ACCESS_MESSAGE = P.REGION_ACCESS_MESSAGE
_REPLY = int(P.MsgFlag.REPLY)
_REPLY_ERROR = int(P.MsgFlag.REPLY | P.MsgFlag.ERROR)
_NO_REPLY = int(P.MsgFlag.NO_REPLY)
_CMD_REGION_READ = int(P.Command.REGION_READ)
_CMD_REGION_WRITE = int(P.Command.REGION_WRITE)

SERVER_MAX_MSG_FDS = 16
SERVER_MAX_DATA_XFER_SIZE = P.DEFAULT_MAX_DATA_XFER_SIZE
SERVER_MAX_DMA_MAPS = 4096
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
LISTEN_BACKLOG = 64
MAX_WAITING_CLIENTS = 4  # clients queued behind the connected one
# Commands a client may send while the connection's own thread waits for its
# reply to our DMA_READ/WRITE (they are kept and answered afterwards).
MAX_BACKLOG = 256
CLIENT_REPLY_TIMEOUT = 10.0  # seconds a model waits for a DMA_READ/WRITE reply
_FD_COMMANDS = frozenset({P.Command.DMA_MAP, P.Command.DEVICE_SET_IRQS})


class ServedDevice(Protocol):
    """What a connection needs from the :class:`~pyvfio.user.server.DeviceServer`
    that accepted it: the device, its socket path, the limits it offers, its
    migration state machine and ioeventfds (which outlive clients)."""

    device: PciDeviceModel
    path: str
    max_msg_fds: int
    max_data_xfer_size: int
    max_dma_maps: int
    reply_timeout: float
    migration: MigrationFsm
    io_fds: dict[int, list[tuple[IoEventFd, int]]]

    def _connection_ended(self, conn: Any) -> None: ...


class ConnectionBase:
    """The state of one client connection, declared once for the handler
    mixins; :class:`~pyvfio.user.server.Connection` sets it up."""

    owner: ServedDevice
    device: PciDeviceModel
    sock: socket.socket
    reader: P.MessageReader
    dma: DmaTable
    irqs: IrqState
    client_caps: P.Capabilities
    negotiated: bool
    thread: threading.Thread | None
    _send_lock: threading.Lock
    _cond: threading.Condition
    _replies: dict[int, P.Message | None]
    _backlog: collections.deque[P.Message]
    _next_id: int
    _twin: socket.socket | None
    _twin_reader: P.MessageReader | None
    _twin_lock: threading.Lock
    _twin_thread: threading.Thread | None
    _twin_eof: bool
    _reply_timeout: float
    _closed: bool
    _close_after_reply: list[int]
    _regions: list[RegionSpec | None]
    _access_table: list[tuple[int, bool, bool, Any, memoryview | None] | None]
    _max_xfer: int
    _max_read: int

    @property
    def _client_max_xfer(self) -> int:
        """The largest data transfer we may send the client (its VERSION)."""
        return min(self.owner.max_data_xfer_size, self.client_caps.max_data_xfer_size)

    def _send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        with self._send_lock:
            P.send_message(self.sock, data, fds)

    def _send_error(self, m: P.Message, err: int) -> None:
        with self._send_lock:
            self.sock.sendall(_HEADER.pack(m.msg_id, m.command, 16, _REPLY_ERROR, err))
