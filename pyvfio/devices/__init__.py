"""Emulated PCI devices served over vfio-user.

:mod:`pyvfio.devices.model` is the framework (subclass
:class:`~pyvfio.devices.model.PciDeviceModel`); :mod:`pyvfio.devices.edu`
is QEMU's edu device; :mod:`pyvfio.devices.virtio` is the virtio-pci
transport with virtio-rng and virtio-blk.  ``pyvfio serve --list`` shows the models the command
line can serve.
"""
