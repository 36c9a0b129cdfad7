"""The message header: ``struct vfio_user_header``, the command numbers and
the header flags.

Spec: QEMU ``docs/interop/vfio-user.rst``, "Header"; libvfio-user
``include/vfio-user.h``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from pyvfio.user.protocol._codec import _fail, _need, _pack


class Command(enum.IntEnum):
    """``enum vfio_user_command``.  14 (the old ``DIRTY_PAGES``) is retired."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgFlag(enum.IntFlag):
    """Header ``flags``: type in bits 0-3, then No_reply and Error."""

    COMMAND = 0x0
    REPLY = 0x1
    TYPE_MASK = 0xF
    NO_REPLY = 0x10
    ERROR = 0x20


# --- header ----------------------------------------------------------------------------------

HEADER = struct.Struct("=HHIII")
"""``struct vfio_user_header``: msg_id u16, command u16, msg_size u32 (header
included), flags u32, error u32."""
HEADER_SIZE = HEADER.size  # 16


@dataclass(frozen=True)
class Header:
    """``struct vfio_user_header``."""

    msg_id: int
    command: int
    msg_size: int
    flags: int = 0
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & MsgFlag.TYPE_MASK == MsgFlag.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & MsgFlag.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & MsgFlag.ERROR)

    def pack(self) -> bytes:
        return _pack(HEADER, "header", self.msg_id, self.command, self.msg_size, self.flags,
                     self.error)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        _need(data, HEADER_SIZE, "header")
        msg_id, command, msg_size, flags, err = HEADER.unpack_from(data)
        if msg_size < HEADER_SIZE:
            raise _fail(f"header: msg_size {msg_size} is smaller than the header")
        return cls(msg_id, command, msg_size, flags, err)


def pack_message(msg_id: int, command: int, payload: bytes = b"", flags: int = 0,
                 error: int = 0) -> bytes:
    """Header plus payload, as one bytes object."""
    return _pack(HEADER, "header", msg_id, command, HEADER_SIZE + len(payload), flags,
                 error) + payload
