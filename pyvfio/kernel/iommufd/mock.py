""":class:`MockDevice`: a device of iommufd's self-test interface
(``CONFIG_IOMMUFD_TEST``, ``IOMMU_TEST_OP_MOCK_DOMAIN``), for dirty tracking
where no hardware IOMMU offers it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvfio.kernel.iommufd._common import IommufdHandle


@dataclass
class MockDevice:
    """A mock device from ``IOMMU_TEST_OP_MOCK_DOMAIN``: ``stdev_id`` is the
    self-test device object (destroying it detaches and unbinds), ``hwpt_id``
    the domain it attached to, ``idev_id`` its bound-device ID (what a real
    device's ``VFIO_DEVICE_BIND_IOMMUFD`` returns)."""

    iommufd: IommufdHandle
    stdev_id: int
    hwpt_id: int
    idev_id: int

    def close(self) -> None:
        if self.stdev_id and not self.iommufd.closed:
            self.iommufd.destroy(self.stdev_id)
        self.stdev_id = 0
