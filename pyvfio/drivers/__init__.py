"""Userspace drivers written against the backend-neutral :class:`pyvfio.device.Device`.

Each runs unchanged over kernel VFIO (legacy or iommufd), fds from the
broker, or a vfio-user connection.  ``python -m pyvfio.drivers.edu BDF``
runs the edu driver's self-test.
"""
