"""Running a vfio-user :class:`~pyvfio.user.server.Server` in the foreground
until it is told to stop, as ``pyvfio serve`` does and as a user's own
server script should::

    with Server() as server:
        server.add(MyModel(), "/run/my.sock")
        serve_until_signalled(server)     # Ctrl-C or SIGTERM: returns the signal

A signal stops the accept loop instead of raising ``KeyboardInterrupt`` in
whatever the main thread was doing, so there is no traceback, and the
``with`` block's ``close()`` then disconnects clients and removes the socket
files (a service manager's SIGTERM included).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvfio.user.server import Server

__all__ = ["serve_until_signalled"]


def serve_until_signalled(server: Server,
                          signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> int | None:
    """Run ``server.serve_forever()`` until one of ``signals`` arrives (or
    another thread calls ``server.stop()``); return that signal's number, or
    ``None``.  The previous handlers are restored.  Must run in the main
    thread (Python delivers signals only there)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve_until_signalled() must run in the main thread")
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        server.stop()  # only a flag and a wake-up byte: safe in a handler

    old = {s: signal.signal(s, on_signal) for s in signals}
    try:
        server.serve_forever()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return received[0] if received else None
