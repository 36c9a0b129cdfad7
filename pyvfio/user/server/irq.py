"""IRQ command group of a connection: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS
(the interrupt state itself is :mod:`pyvfio.user.irq`).
"""

from __future__ import annotations

import errno

from pyvfio.errors import ProtocolError
from pyvfio.user import protocol as P
from pyvfio.user.irq import irq_flags
from pyvfio.user.server._base import ConnectionBase


class IrqHandlers(ConnectionBase):
    """IRQ info and SET_IRQS."""

    def _get_irq_info(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.IrqInfoMsg.unpack(m.payload)
        if req.index >= len(self.device.irq_counts):
            raise ProtocolError(f"no IRQ index {req.index}", errno.EINVAL)
        count = self.device.irq_counts[req.index]
        return P.IrqInfoMsg(req.index, P.IrqInfoMsg.SIZE, irq_flags(req.index) if count else 0,
                            count).pack(), []

    def _set_irqs(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.IrqSet.unpack(m.payload)
        fds = m.fds
        self.irqs.set_irqs(req.index, req.flags, req.start, req.count, req.bools, fds)
        m.fds = []  # taken over by the IRQ state
        return b"", []
