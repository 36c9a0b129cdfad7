""":class:`Host`, as :mod:`pyvfio.host` exports it: the sysfs model of the host
(:class:`pyvfio.host.model.Host`) plus the diagnosis of its devices.

The model is the lower layer (facts read from sysfs) and the diagnosis
(:mod:`pyvfio.host.diagnosis`) is built on it; the convenience methods that
join them live here, above both, so neither module imports the other back.
"""

from __future__ import annotations

from pyvfio.host import model
from pyvfio.host.diagnosis import Diagnosis, diagnose, diagnose_many

__all__ = ["Host"]


class Host(model.Host):
    """The host under ``root`` (see :class:`pyvfio.host.model.Host`), with
    :meth:`diagnose` and :meth:`diagnose_many`."""

    def diagnose(self, address: str) -> Diagnosis:
        """The :class:`~pyvfio.host.diagnosis.Diagnosis` of one device (any
        address form :class:`~pyvfio.pci.address.PciAddress` takes)."""
        return diagnose(self, address)

    def diagnose_many(self, addresses: list[str]) -> list[Diagnosis]:
        """The diagnoses of several devices, sharing one read of the host."""
        return diagnose_many(self, addresses)
