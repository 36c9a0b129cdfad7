"""The vfio-user server: serves device models over UNIX sockets.

One :class:`Server` serves any number of devices, each on its own socket
path (:meth:`Server.add`).  Each device takes one client at a time; a
further client waits (connected, unanswered) until the current one leaves,
as with libvfio-user, and beyond :data:`MAX_WAITING_CLIENTS` is turned away.  Every
client connection runs in its own thread with its own :class:`Connection`:
its own DMA table (:mod:`pyvfio.user.dma`) and interrupt state
(:mod:`pyvfio.user.irq`), so clients of different devices are isolated from
each other.  When a client goes, its DMA windows are unmapped and its
eventfds closed; the device keeps its state and the next client can connect.

The request path is kept lean for REGION_READ/WRITE: precompiled structs, a
dispatch table, one ``recvmsg`` that usually holds whole messages, one
``send`` per reply, and no logging unless something fails.

Server-to-client commands (DMA_READ/DMA_WRITE for windows mapped without an
fd) go over the twin socket when the client negotiated one, else over the
main socket with replies demultiplexed by message id.

Migration follows the v2 state machine of the spec (``DEVICE_FEATURE``
MIG_DEVICE_STATE, MIG_DATA_READ/WRITE); the model provides
``save_state``/``load_state`` and the framework adds config space.

The handlers live by command group, as libvfio-user keeps them:

- :mod:`.listener`: :class:`Server` and :class:`DeviceServer` (sockets, accept, one
  client at a time)
- :mod:`.connection`: :class:`Connection`: the loop, dispatch, VERSION, DEVICE_GET_INFO,
  DEVICE_RESET, teardown
- :mod:`.dma`: DMA_MAP / DMA_UNMAP and the server's DMA_READ / DMA_WRITE
- :mod:`.region`: region info, ioeventfds, REGION_READ / WRITE / WRITE_MULTI
- :mod:`.irq`: DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS
- :mod:`.feature`: DEVICE_FEATURE and MIG_DATA_READ / WRITE
- :mod:`.migration`: :class:`MigrationFsm`, the migration state machine
"""

from __future__ import annotations

from pyvfio.user.server._base import CLIENT_REPLY_TIMEOUT as CLIENT_REPLY_TIMEOUT
from pyvfio.user.server._base import KVM_IOEVENTFD_FLAG_DATAMATCH as KVM_IOEVENTFD_FLAG_DATAMATCH
from pyvfio.user.server._base import LISTEN_BACKLOG as LISTEN_BACKLOG
from pyvfio.user.server._base import MAX_WAITING_CLIENTS as MAX_WAITING_CLIENTS
from pyvfio.user.server._base import SERVER_MAX_DATA_XFER_SIZE as SERVER_MAX_DATA_XFER_SIZE
from pyvfio.user.server._base import SERVER_MAX_DMA_MAPS as SERVER_MAX_DMA_MAPS
from pyvfio.user.server._base import SERVER_MAX_MSG_FDS as SERVER_MAX_MSG_FDS
from pyvfio.user.server.connection import Connection
from pyvfio.user.server.listener import DeviceServer, Server
from pyvfio.user.server.migration import MigrationFsm

__all__ = ["Connection", "DeviceServer", "MigrationFsm", "Server"]
