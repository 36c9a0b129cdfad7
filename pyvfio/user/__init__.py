"""vfio-user: the protocol (:mod:`pyvfio.user.protocol`), the device server
(:mod:`pyvfio.user.server`, with :mod:`pyvfio.user.dma` and
:mod:`pyvfio.user.irq`) and the client (:mod:`pyvfio.user.client`).

Device models live in :mod:`pyvfio.devices`; see ``docs/vfio-user.md`` and
``docs/vfio-user-client.md``.
"""
