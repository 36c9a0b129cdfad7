"""IRQ calls of a vfio-user client: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS
(eventfds travel as SCM_RIGHTS, at most ``max_msg_fds`` per message).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvfio.device import IrqAction, IrqFlag, IrqInfo
from pyvfio.errors import UsageError
from pyvfio.user import protocol as P
from pyvfio.user.client._base import ClientBase
from pyvfio.user.protocol import Command


class IrqCalls(ClientBase):
    """IRQ info and SET_IRQS."""

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
