"""Interrupts as eventfds (``eventfd(2)``): what ``VFIO_DEVICE_SET_IRQS`` and
vfio-user ``DEVICE_SET_IRQS`` hand to the device.
"""

from __future__ import annotations

import os
import select

from pyvfio.errors import ClosedError

# --- interrupts ------------------------------------------------------------------------------


class EventFd:
    """An eventfd the device signals.  ``wait()`` blocks until it fires (or the
    timeout passes) and returns the count read, 0 on timeout."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if fd is None else fd
        self._poller: select.poll | None = None

    def fileno(self) -> int:
        if self.fd < 0:
            raise ClosedError("eventfd is closed")
        return self.fd

    def wait(self, timeout: float | None = None) -> int:
        """Block until the device signals the eventfd or ``timeout`` seconds
        pass (``None``: no limit; rounded up to whole milliseconds), and return
        the counter read (which clears it), 0 on timeout.  Raises
        :class:`ClosedError` when closed."""
        poller = self._poller
        if poller is None:  # made once: interrupt round trips are a hot path
            poller = select.poll()
            poller.register(self.fileno(), select.POLLIN)
            self._poller = poller
        elif self.fd < 0:
            raise ClosedError("eventfd is closed")
        # poll() takes float milliseconds (rounded up: never a shorter wait)
        if not poller.poll(None if timeout is None else timeout * 1000):
            return 0
        try:  # read() inlined: interrupt round trips are a hot path
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def read(self) -> int:
        """Return and clear the counter; 0 when it is not signalled."""
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0

    def signal(self, value: int = 1) -> None:
        os.eventfd_write(self.fileno(), value)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __repr__(self) -> str:
        return f"<EventFd fd={self.fd}>" if self.fd >= 0 else "<EventFd closed>"

    def __exit__(self, *exc: object) -> None:
        self.close()
