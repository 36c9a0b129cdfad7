"""Emulated PCI devices served over vfio-user.

:mod:`pyvfio.devices.model` is the framework (subclass
:class:`~pyvfio.devices.model.PciDeviceModel`); :mod:`pyvfio.devices.edu`
is QEMU's edu device.  ``pyvfio serve --list`` shows the models the command
line can serve.
"""
