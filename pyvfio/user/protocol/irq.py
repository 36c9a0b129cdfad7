"""IRQ command group: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS.

Spec: QEMU ``docs/interop/vfio-user.rst``; the structs are ``linux/vfio.h``'s
``vfio_irq_info`` and ``vfio_irq_set``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from pyvfio.device import IrqAction, IrqFlag
from pyvfio.user.protocol._codec import _fail, _need, _pack

# --- DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS ---------------------------------------------------

_IRQ_INFO = struct.Struct("=IIII")


@dataclass(frozen=True)
class IrqInfoMsg:
    """``struct vfio_irq_info``: argsz, flags (``VFIO_IRQ_INFO_*``), index,
    count (u32).  The request sets argsz and index."""

    index: int
    argsz: int = _IRQ_INFO.size
    flags: int = 0
    count: int = 0

    SIZE: ClassVar[int] = _IRQ_INFO.size  # 16

    def pack(self) -> bytes:
        return _pack(_IRQ_INFO, "DEVICE_GET_IRQ_INFO", self.argsz, self.flags, self.index,
                     self.count)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, *, reply: bool = False) -> IrqInfoMsg:
        _need(payload, cls.SIZE, "DEVICE_GET_IRQ_INFO", exact=not reply)
        argsz, flags, index, count = _IRQ_INFO.unpack_from(payload)
        if argsz < cls.SIZE:
            raise _fail(f"DEVICE_GET_IRQ_INFO: argsz {argsz} < {cls.SIZE}")
        return cls(index, argsz, IrqFlag(flags), count)


_IRQ_SET = struct.Struct("=IIIII")
_DATA_MASK = int(IrqAction.DATA_NONE | IrqAction.DATA_BOOL | IrqAction.DATA_EVENTFD)
_ACTION_MASK = int(IrqAction.ACTION_MASK | IrqAction.ACTION_UNMASK | IrqAction.ACTION_TRIGGER)
MAX_IRQ_COUNT = 2048  # the PCI maximum of MSI-X vectors


@dataclass(frozen=True)
class IrqSet:
    """``struct vfio_irq_set``: argsz, flags, index, start, count (u32), then
    for ``DATA_BOOL`` ``count`` bytes of booleans.  For ``DATA_EVENTFD`` the
    eventfds travel as SCM_RIGHTS (none: de-assign the range).  ``argsz`` is
    the whole request payload (no reply payload).

    Exactly one DATA flag and one ACTION flag must be set; ``count`` is
    bounded by :data:`MAX_IRQ_COUNT`."""

    index: int
    flags: int
    start: int = 0
    count: int = 0
    bools: tuple[bool, ...] | None = None
    argsz: int | None = None

    SIZE: ClassVar[int] = _IRQ_SET.size  # 20

    @property
    def data_type(self) -> int:
        return self.flags & _DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & _ACTION_MASK

    def pack(self) -> bytes:
        data = b""
        if self.flags & IrqAction.DATA_BOOL:
            data = bytes(1 if b else 0 for b in (self.bools or ()))
        argsz = self.SIZE + len(data) if self.argsz is None else self.argsz
        return _pack(_IRQ_SET, "DEVICE_SET_IRQS", argsz, self.flags, self.index, self.start,
                     self.count) + data

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> IrqSet:
        _need(payload, cls.SIZE, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = _IRQ_SET.unpack_from(payload)
        if argsz != len(payload):
            raise _fail(f"DEVICE_SET_IRQS: argsz {argsz} != payload size {len(payload)}")
        if flags & ~(_DATA_MASK | _ACTION_MASK):
            raise _fail(f"DEVICE_SET_IRQS: unknown flags {flags:#x}")
        data_type, action = flags & _DATA_MASK, flags & _ACTION_MASK
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise _fail(f"DEVICE_SET_IRQS: flags {flags:#x} need exactly one DATA and one "
                        "ACTION flag")
        if count > MAX_IRQ_COUNT or start > MAX_IRQ_COUNT:
            raise _fail(f"DEVICE_SET_IRQS: start {start} count {count} out of range")
        bools: tuple[bool, ...] | None = None
        if data_type == IrqAction.DATA_BOOL:
            _need(payload, cls.SIZE + count, "DEVICE_SET_IRQS bools", exact=True)
            bools = tuple(bool(b) for b in bytes(payload[cls.SIZE:]))
        elif len(payload) != cls.SIZE:
            raise _fail(f"DEVICE_SET_IRQS: {len(payload) - cls.SIZE} bytes of data with "
                        f"flags {flags:#x}")
        return cls(index, flags, start, count, bools, argsz)
