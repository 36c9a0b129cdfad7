"""The vfio-user client: a :class:`~pyvfio.device.Device` on the far side of a
UNIX socket.

:func:`connect` opens the socket, negotiates ``VFIO_USER_VERSION`` and returns
a :class:`VfioUserDevice`, which a driver uses exactly like a kernel VFIO
device: regions through ``REGION_READ``/``REGION_WRITE`` messages (or mmap of
the fd the server passes with the region info), interrupts through eventfds
sent with ``DEVICE_SET_IRQS``, DMA buffers from memfds whose fds travel with
``DMA_MAP``, reset, and migration over ``DEVICE_FEATURE`` and
``MIG_DATA_READ``/``WRITE``.

Spec: QEMU ``docs/interop/vfio-user.rst``.  The wire format is
:mod:`pyvfio.user.protocol`'s; this package is the client's behaviour.

The connection model (spec "Socket" and "Command Concurrency"):

* One request at a time is in flight on the main socket, under a lock, so a
  driver may call the device from an interrupt thread and a main thread.
* The server may send ``DMA_READ``/``DMA_WRITE`` commands (for mappings made
  without an fd, or for any mapping).  They are served wherever they arrive:

  - on the twin socket when the server set one up during negotiation (a
    small thread serves it: the main socket then carries only our requests
    and their replies);
  - otherwise on the main socket: inline while a request waits for its
    reply, and — only while a mapping without an fd exists, the one case in
    which a server needs us when we are idle — by an idle-time thread that
    takes the request lock when the socket turns readable.  The common case
    (fd-backed DMA) therefore has no thread on the request path.

Every length and count from the server is checked against what was asked for
and what was negotiated ("defend against a malicious server"): a malformed
reply raises :class:`~pyvfio.errors.ProtocolError` and drops the connection;
an error reply raises :class:`~pyvfio.errors.PeerError` with the server's
errno; a server that goes away raises :class:`~pyvfio.errors.ConnectionClosed`.

One module per concept:

- :mod:`.negotiate`: :func:`connect` and VERSION negotiation
- :mod:`.connection`: the main socket, request/reply, the client's limits
- :mod:`.device`: :class:`VfioUserDevice`, put together from the calls below
- :mod:`.region`: region info, region access, mmap, io fds, REGION_WRITE_MULTI
- :mod:`.irq`: IRQ info and SET_IRQS
- :mod:`.dma`: :class:`VfioUserDmaSpace` and serving the server's DMA_READ / DMA_WRITE
- :mod:`.migration`: DEVICE_FEATURE, migration, dirty logging, :class:`VfioUserMigration`
"""

from __future__ import annotations

from pyvfio.user.client.connection import CLIENT_MAX_DATA_XFER as CLIENT_MAX_DATA_XFER
from pyvfio.user.client.connection import CLIENT_MAX_MSG_FDS as CLIENT_MAX_MSG_FDS
from pyvfio.user.client.connection import DEFAULT_TIMEOUT
from pyvfio.user.client.connection import MAX_IRQ_INDEXES as MAX_IRQ_INDEXES
from pyvfio.user.client.connection import MAX_REGION_INFO_SIZE as MAX_REGION_INFO_SIZE
from pyvfio.user.client.connection import MAX_REGIONS as MAX_REGIONS
from pyvfio.user.client.device import VfioUserDevice
from pyvfio.user.client.dma import DmaMapping, VfioUserDmaSpace
from pyvfio.user.client.migration import VfioUserMigration
from pyvfio.user.client.negotiate import connect

__all__ = [
    "DEFAULT_TIMEOUT",
    "DmaMapping",
    "VfioUserDevice",
    "VfioUserDmaSpace",
    "VfioUserMigration",
    "connect",
]
