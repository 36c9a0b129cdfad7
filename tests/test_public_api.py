"""The deliberate public surface of pyvfio (trio-style): changing it is a decision."""

import pyvfio


def test_top_level_names() -> None:
    assert sorted(pyvfio.__all__) == sorted([
        "BrokerRefused", "Device", "DeviceInUse", "DeviceNotFound", "DmaBuffer", "EventFd",
        "IrqIndex", "KernelError", "NotBoundToVfio", "NotViable", "PciAddress", "ProtocolError",
        "PyvfioError", "RegionIndex", "__version__",
    ])
    for name in pyvfio.__all__:
        assert hasattr(pyvfio, name)


def test_kernel_error_keeps_errno_and_context() -> None:
    err = pyvfio.KernelError(16, "VFIO_GROUP_SET_CONTAINER", "group 12")
    assert err.errno == 16
    assert str(err) == "VFIO_GROUP_SET_CONTAINER on group 12: [Errno 16] Device or resource busy"
    assert isinstance(err, OSError)
