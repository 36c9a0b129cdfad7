""":class:`VfioUserDevice`: a :class:`~pyvfio.device.Device` on the far side of a
UNIX socket, put together from the calls of each command group.
"""

from __future__ import annotations

import os
import socket
import threading

from pyvfio.device import DeviceFlag, DeviceInfo
from pyvfio.user import protocol as P
from pyvfio.user.client.connection import (
    CLIENT_MAX_DATA_XFER,
    MAX_IRQ_INDEXES,
    MAX_REGIONS,
    _Connection,
)
from pyvfio.user.client.dma import ServerCommands, VfioUserDmaSpace
from pyvfio.user.client.irq import IrqCalls
from pyvfio.user.client.migration import MigrationCalls
from pyvfio.user.client.region import RegionCalls
from pyvfio.user.protocol import Capabilities, Command, MessageReader, close_fds

# --- the device ------------------------------------------------------------------------------


class VfioUserDevice(ServerCommands, RegionCalls, IrqCalls, MigrationCalls):
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

    def _get_info(self) -> DeviceInfo:
        reply = self._request(Command.DEVICE_GET_INFO, P.DeviceInfoMsg().pack())
        msg = P.DeviceInfoMsg.unpack(reply.payload, reply=True)
        if msg.num_regions > MAX_REGIONS or msg.num_irqs > MAX_IRQ_INDEXES:
            raise self._malformed(f"DEVICE_GET_INFO: {msg.num_regions} regions, {msg.num_irqs} "
                                  "IRQ indexes is more than a device has")
        return DeviceInfo(DeviceFlag(msg.flags), msg.num_regions, msg.num_irqs)

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
