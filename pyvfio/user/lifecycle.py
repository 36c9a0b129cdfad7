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
from typing import TYPE_CHECKING

from pyvfio.sockets import stop_on_signals

if TYPE_CHECKING:
    from pyvfio.user.server import Server

__all__ = ["serve_until_signalled"]


def serve_until_signalled(server: Server,
                          signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> int | None:
    """Run ``server.serve_forever()`` until one of ``signals`` arrives (or
    another thread calls ``server.stop()``); return that signal's number, or
    ``None``.  The previous handlers are restored.  Must run in the main
    thread (Python delivers signals only there); a signal the kernel gives
    to a connection's thread wakes the accept loop all the same
    (:func:`pyvfio.sockets.stop_on_signals`)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve_until_signalled() must run in the main thread")
    with stop_on_signals(server.stop, server.wakeup_fd(), signals) as received:
        server.serve_forever()
    return received[0] if received else None
