"""The vfio-user wire protocol: message header, every command's body, and
framing over an ``AF_UNIX`` stream socket with ``SCM_RIGHTS`` fds.

Spec: QEMU ``docs/interop/vfio-user.rst``; struct layouts cross-checked with
nutanix/libvfio-user ``include/vfio-user.h`` and QEMU ``hw/vfio-user/protocol.h``.
All integers are in host byte order (the spec says so); every struct is packed.

Each message body is a small dataclass with ``pack() -> bytes`` and
``unpack(payload) -> instance``.  ``unpack`` checks every length it is given
and raises :class:`~pyvfio.errors.ProtocolError` (with the errno a server
should answer: ``EINVAL`` for malformed input, ``E2BIG`` for sizes over the
negotiated limits) and never anything else, whatever the bytes.  ``pack``
raises ``ProtocolError`` too when a field does not fit its wire width.

One module per concept, by command group (as libvfio-user keeps its handlers):

- :mod:`.header`: ``struct vfio_user_header``, :class:`Command`, :class:`MsgFlag`
- :mod:`.version`: VERSION and its capabilities, the negotiated limits
- :mod:`.dma`: DMA_MAP, DMA_UNMAP, DMA_READ / DMA_WRITE
- :mod:`.device_info`: DEVICE_GET_INFO
- :mod:`.region`: DEVICE_GET_REGION_INFO, DEVICE_GET_REGION_IO_FDS, REGION_READ /
  REGION_WRITE / REGION_WRITE_MULTI
- :mod:`.irq`: DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS
- :mod:`.feature`: DEVICE_FEATURE
- :mod:`.migration`: the migration features, DMA dirty logging, MIG_DATA_READ / WRITE
- :mod:`.framing`: :func:`send_message` and :class:`MessageReader` (whole
  messages with their fds, bounded in size and fd count)

This package re-exports every name, so ``from pyvfio.user import protocol as P``
and ``P.DmaMap`` keep working.  It is used by both sides: the server
(:mod:`pyvfio.user.server`) and the client (:mod:`pyvfio.user.client`).
"""

from __future__ import annotations

# The migration states and flags are vfio.h's, shared with the kernel backend.
from pyvfio.migration import MigFlag as MigrationFlag
from pyvfio.migration import MigState
from pyvfio.user.protocol.device_info import DeviceInfoMsg
from pyvfio.user.protocol.dma import DMA_ACCESS as DMA_ACCESS
from pyvfio.user.protocol.dma import DmaAccess, DmaMap, DmaMapFlag, DmaUnmap, DmaUnmapFlag
from pyvfio.user.protocol.feature import DeviceFeature, FeatureFlag, FeatureIndex
from pyvfio.user.protocol.framing import Message, MessageReader, send_message
from pyvfio.user.protocol.framing import close_fds as close_fds
from pyvfio.user.protocol.header import HEADER, HEADER_SIZE, Command, Header, MsgFlag, pack_message
from pyvfio.user.protocol.irq import MAX_IRQ_COUNT as MAX_IRQ_COUNT
from pyvfio.user.protocol.irq import IrqInfoMsg, IrqSet
from pyvfio.user.protocol.migration import MAX_LOG_RANGES as MAX_LOG_RANGES
from pyvfio.user.protocol.migration import (
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    MigData,
    MigrationFeature,
    MigStateMsg,
)
from pyvfio.user.protocol.region import MAX_IO_FDS as MAX_IO_FDS
from pyvfio.user.protocol.region import MAX_REGION_CAPS as MAX_REGION_CAPS
from pyvfio.user.protocol.region import MAX_SPARSE_AREAS as MAX_SPARSE_AREAS
from pyvfio.user.protocol.region import MAX_WRITE_MULTI as MAX_WRITE_MULTI
from pyvfio.user.protocol.region import REGION_ACCESS as REGION_ACCESS
from pyvfio.user.protocol.region import REGION_ACCESS_MESSAGE as REGION_ACCESS_MESSAGE
from pyvfio.user.protocol.region import REGION_ACCESS_PARTS as REGION_ACCESS_PARTS
from pyvfio.user.protocol.region import (
    IoFdType,
    RegionAccess,
    RegionCapId,
    RegionInfoMsg,
    RegionIoFds,
    RegionWriteMulti,
    SubRegionIoFd,
    WriteOne,
)
from pyvfio.user.protocol.region import region_access_parts as region_access_parts
from pyvfio.user.protocol.version import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
    VERSION_MAJOR,
    VERSION_MINOR,
    Capabilities,
    Version,
)
from pyvfio.user.protocol.version import MAX_DATA_XFER_LIMIT as MAX_DATA_XFER_LIMIT
from pyvfio.user.protocol.version import MAX_JSON_SIZE as MAX_JSON_SIZE
from pyvfio.user.protocol.version import MAX_MSG_FDS_LIMIT as MAX_MSG_FDS_LIMIT

__all__ = [
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_DMA_MAPS",
    "DEFAULT_MAX_MSG_FDS",
    "DEFAULT_PGSIZES",
    "HEADER",
    "HEADER_SIZE",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "Capabilities",
    "Command",
    "DeviceFeature",
    "DeviceInfoMsg",
    "DmaAccess",
    "DmaLoggingControl",
    "DmaLoggingRange",
    "DmaLoggingReport",
    "DmaMap",
    "DmaMapFlag",
    "DmaUnmap",
    "DmaUnmapFlag",
    "FeatureFlag",
    "FeatureIndex",
    "Header",
    "IoFdType",
    "IrqInfoMsg",
    "IrqSet",
    "Message",
    "MessageReader",
    "MigData",
    "MigState",
    "MigStateMsg",
    "MigrationFeature",
    "MigrationFlag",
    "MsgFlag",
    "RegionAccess",
    "RegionCapId",
    "RegionInfoMsg",
    "RegionIoFds",
    "RegionWriteMulti",
    "SubRegionIoFd",
    "Version",
    "WriteOne",
    "pack_message",
    "send_message",
]
