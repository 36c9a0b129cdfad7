"""What the parts of a :class:`~pyvfio.user.client.VfioUserDevice` share: the
connection state they declare once, and the request helpers that turn a bad
reply into a dropped connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from typing import Any

from pyvfio.device import Device
from pyvfio.errors import ProtocolError
from pyvfio.user.client.connection import _Connection
from pyvfio.user.protocol import Capabilities, Message


class ClientBase(Device):
    """The state of a vfio-user client device, declared once for the mixins
    (:mod:`.dma`, :mod:`.region`, :mod:`.irq`, :mod:`.migration`);
    :class:`~pyvfio.user.client.VfioUserDevice` sets it up."""

    path: str
    version: tuple[int, int]
    capabilities: Capabilities
    max_xfer: int
    _conn: _Connection
    _region_fds: dict[int, int]
    _threads: list[threading.Thread]
    _thread_lock: threading.Lock
    _twin: socket.socket | None
    _idle_stop: int | None

    def _request(self, command: int, payload: bytes, fds: Sequence[int] = (), *,
                 keep_fds: bool = False) -> Message:
        if self._closed:
            self._ensure_open()
        return self._conn.request(command, payload, fds, keep_fds=keep_fds)

    def _malformed(self, what: str) -> ProtocolError:
        """A reply that parsed but makes no sense: drop the connection."""
        self._conn._break(f"protocol error: {what}")
        return ProtocolError(f"{self.path}: {what}")

    def _unpack(self, parse: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return parse(*args, **kwargs)
        except ProtocolError as exc:
            raise self._malformed(str(exc)) from None
