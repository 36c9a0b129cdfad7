"""A vfio-user server's interrupt state for one client.

The client routes each vector to an eventfd with ``DEVICE_SET_IRQS``
(``DATA_EVENTFD | ACTION_TRIGGER``); the server signals it when the device
raises that vector.  Masking follows VFIO: a masked vector that fires is
remembered as pending and delivered on unmask; INTx is automasked after each
delivery and re-fires on unmask while the line is still asserted.  Only one
of INTx, MSI and MSI-X is in use at a time, as with the kernel's vfio-pci.

Every eventfd received from the client is closed when it is replaced or
de-assigned, and all of them when the client disconnects.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

from pyvfio.device import IrqAction, IrqFlag, IrqIndex

__all__ = ["IrqState", "irq_flags"]

_EXCLUSIVE = (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX)


def irq_flags(index: int) -> IrqFlag:
    """``VFIO_IRQ_INFO_*`` the server reports for an index."""
    if index == IrqIndex.INTX:
        return IrqFlag.EVENTFD | IrqFlag.MASKABLE | IrqFlag.AUTOMASKED
    if index in (IrqIndex.MSI, IrqIndex.MSIX):
        return IrqFlag.EVENTFD | IrqFlag.MASKABLE | IrqFlag.NORESIZE
    return IrqFlag.EVENTFD


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:  # a full (or foreign, nonblocking) eventfd: nothing to do
        pass


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class IrqState:
    """Eventfds, masks and pending bits of every IRQ index of one client.

    ``intx_level`` is asked whether the device still asserts INTx (for the
    re-fire on unmask)."""

    def __init__(self, counts: Sequence[int], intx_level: Callable[[], bool] = lambda: False
                 ) -> None:
        self.counts = list(counts)
        self.trigger: list[list[int]] = [[-1] * n for n in self.counts]
        self.mask_fds: list[list[int]] = [[-1] * n for n in self.counts]
        self.unmask_fds: list[list[int]] = [[-1] * n for n in self.counts]
        self.masked: list[list[bool]] = [[False] * n for n in self.counts]
        self.pending: list[list[bool]] = [[False] * n for n in self.counts]
        self._intx_level = intx_level

    # ---- what the device does ----

    def enabled(self, index: int) -> bool:
        """Whether the client routed any vector of ``index`` to an eventfd."""
        return index < len(self.trigger) and any(fd >= 0 for fd in self.trigger[index])

    def fire(self, index: int, vector: int = 0) -> bool:
        """Deliver ``vector`` of ``index``; ``False`` when it was masked
        (now pending) or has no eventfd."""
        if index >= len(self.trigger) or not 0 <= vector < self.counts[index]:
            return False
        fd = self.trigger[index][vector]
        if fd < 0:
            return False
        if self.masked[index][vector]:
            self.pending[index][vector] = True
            return False
        _signal(fd)
        if index == IrqIndex.INTX:
            self._mask(index, vector)
        return True

    def _mask(self, index: int, vector: int) -> None:
        if not self.masked[index][vector]:
            self.masked[index][vector] = True
            if self.mask_fds[index][vector] >= 0:
                _signal(self.mask_fds[index][vector])

    def _unmask(self, index: int, vector: int) -> None:
        was = self.masked[index][vector]
        self.masked[index][vector] = False
        if was and self.unmask_fds[index][vector] >= 0:
            _signal(self.unmask_fds[index][vector])
        if index == IrqIndex.INTX:
            self.pending[index][vector] = False
            if self._intx_level():
                self.fire(index, vector)
        elif self.pending[index][vector]:
            self.pending[index][vector] = False
            self.fire(index, vector)

    # ---- DEVICE_SET_IRQS ----

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 bools: Sequence[bool] | None, fds: list[int]) -> None:
        """Apply one ``DEVICE_SET_IRQS``.  Takes ownership of ``fds`` on
        success; on failure raises ``OSError`` and leaves them to the caller.
        The codec has checked that one DATA and one ACTION flag are set."""
        if index >= len(self.counts) or self.counts[index] == 0:
            raise OSError(errno.EINVAL, f"SET_IRQS: the device has no IRQ index {index}")
        n = self.counts[index]
        data = flags & (IrqAction.DATA_NONE | IrqAction.DATA_BOOL | IrqAction.DATA_EVENTFD)
        action = flags & (IrqAction.ACTION_MASK | IrqAction.ACTION_UNMASK
                          | IrqAction.ACTION_TRIGGER)
        if fds and data != IrqAction.DATA_EVENTFD:
            raise OSError(errno.EINVAL, "SET_IRQS: fds sent without DATA_EVENTFD")
        if count == 0:
            if data == IrqAction.DATA_NONE and action == IrqAction.ACTION_TRIGGER and start == 0:
                self._disable(index)
                return
            raise OSError(errno.EINVAL, "SET_IRQS: count 0 is only for DATA_NONE|ACTION_TRIGGER "
                          "with start 0 (disable the index)")
        if start >= n or start + count > n:
            raise OSError(errno.EINVAL, f"SET_IRQS: vectors {start}..{start + count - 1} outside "
                          f"0..{n - 1} of index {index}")
        vectors = range(start, start + count)
        if data == IrqAction.DATA_EVENTFD:
            if fds and len(fds) != count:
                raise OSError(errno.EINVAL, f"SET_IRQS: {len(fds)} fds for {count} vectors")
            if any(not is_eventfd(fd) for fd in fds):
                raise OSError(errno.EINVAL, "SET_IRQS: an fd is not an eventfd")
            if action == IrqAction.ACTION_TRIGGER and fds and index in _EXCLUSIVE:
                for other in _EXCLUSIVE:
                    if other != index and self.enabled(other):
                        raise OSError(errno.EINVAL, f"SET_IRQS: IRQ index {other} is in use; "
                                      f"disable it before enabling index {index}")
            table = {IrqAction.ACTION_TRIGGER: self.trigger, IrqAction.ACTION_MASK: self.mask_fds,
                     IrqAction.ACTION_UNMASK: self.unmask_fds}[action][index]
            for i, v in enumerate(vectors):
                old = table[v]
                table[v] = fds[i] if fds else -1
                if old >= 0:
                    os.close(old)
                if action == IrqAction.ACTION_TRIGGER and not fds:
                    self.masked[index][v] = False
                    self.pending[index][v] = False
            return
        selected = [v for i, v in enumerate(vectors)
                    if data == IrqAction.DATA_NONE or (bools is not None and bools[i])]
        for v in selected:
            if action == IrqAction.ACTION_TRIGGER:
                self.fire(index, v)
            elif action == IrqAction.ACTION_MASK:
                self._mask(index, v)
            else:
                self._unmask(index, v)

    def _disable(self, index: int) -> None:
        for table in (self.trigger, self.mask_fds, self.unmask_fds):
            row = table[index]
            for v, fd in enumerate(row):
                if fd >= 0:
                    os.close(fd)
                row[v] = -1
        self.masked[index] = [False] * self.counts[index]
        self.pending[index] = [False] * self.counts[index]

    def reset(self) -> None:
        """Device reset: clear masks and pending bits, keep the routing."""
        for index in range(len(self.counts)):
            self.masked[index] = [False] * self.counts[index]
            self.pending[index] = [False] * self.counts[index]

    def close(self) -> None:
        """Close every eventfd the client gave (disconnect)."""
        for index in range(len(self.counts)):
            self._disable(index)

    def open_fds(self) -> int:
        return sum(fd >= 0 for table in (self.trigger, self.mask_fds, self.unmask_fds)
                   for row in table for fd in row)
