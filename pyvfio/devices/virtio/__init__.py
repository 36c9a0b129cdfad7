"""Virtio devices over the modern virtio-pci transport, served over vfio-user.

:mod:`~pyvfio.devices.virtio.transport` is the reusable part (capabilities,
common configuration, notifications, ISR, MSI-X, feature negotiation,
reset); :mod:`~pyvfio.devices.virtio.queue` reads and writes split
virtqueues through the model's DMA access; :mod:`~pyvfio.devices.virtio.rng`
and :mod:`~pyvfio.devices.virtio.blk` are devices the guest's own
``virtio_rng`` and ``virtio_blk`` drivers drive.
"""
