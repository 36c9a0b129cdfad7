"""PCI addresses: one type that parses, normalises and prints them.

An address names one PCI function as ``domain:bus:device.function`` in hex,
the way sysfs names ``/sys/bus/pci/devices/<address>`` (the kernel prints it
with ``"%04x:%02x:%02x.%d"``, ``drivers/pci/probe.c``).  The domain is
usually ``0000``, but it is an int, not four digits: Intel VMD puts its
devices in domains from ``0x10000`` up, so ``10001:8a:00.0`` is a real
address (``drivers/pci/controller/vmd.c``).

:meth:`PciAddress.parse` takes what a user types: the full form, a short
form without the domain (``00:03.0``, domain 0), one-digit bus or device
numbers (``1:0.1``), any case, surrounding whitespace.  ``str()`` gives the
canonical sysfs form, so ``str(PciAddress.parse(text))`` is the one
normalisation every layer (host, kernel backends, broker policy, CLI) uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyvfio.errors import UsageError

__all__ = ["PciAddress"]

_ADDRESS = re.compile(
    r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")

DOMAIN_MAX = 0xFFFF_FFFF
"""The kernel's PCI domain is a 32-bit number (``pci_domain_nr``)."""
DEVICE_MAX = 0x1F
"""Five bits of device number (PCI Local Bus spec: 32 devices per bus)."""


@dataclass(frozen=True, order=True)
class PciAddress:
    """One PCI function: ``domain`` (0..2**32-1), ``bus`` (0..255), ``device``
    (0..31), ``function`` (0..7).  Immutable, hashable and ordered as sysfs
    lists devices.  ``str()`` is the sysfs name (``0000:00:03.0``,
    ``10001:8a:00.0``).

    Raises :class:`~pyvfio.errors.UsageError` for a field out of range.
    """

    domain: int
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        for name, value, top in (("domain", self.domain, DOMAIN_MAX), ("bus", self.bus, 0xFF),
                                 ("device", self.device, DEVICE_MAX),
                                 ("function", self.function, 7)):
            if type(value) is not int or not 0 <= value <= top:
                raise UsageError(f"not a PCI address ({name} {value!r} is outside 0..{top:#x})")

    @classmethod
    def parse(cls, text: object) -> PciAddress:
        """``"00:03.0"``, ``"0000:00:03.0"``, ``"1:0.1"``, ``" 0000:AF:1F.7 "``,
        ``"10001:8a:00.0"`` (or a :class:`PciAddress`) -> a :class:`PciAddress`.

        Raises :class:`~pyvfio.errors.UsageError` ("not a PCI address
        (DDDD:BB:DD.F): 'text'") for anything else."""
        if isinstance(text, PciAddress):
            return text
        m = _ADDRESS.match(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise UsageError(f"not a PCI address (DDDD:BB:DD.F): {text!r}")
        domain, bus, dev, fn = m.groups()
        if int(dev, 16) > DEVICE_MAX:
            raise UsageError(f"not a PCI address (device number above 1f): {text!r}")
        return cls(int(domain or "0", 16), int(bus, 16), int(dev, 16), int(fn))

    @classmethod
    def normalize(cls, text: object) -> str:
        """The canonical form of ``text``: ``str(PciAddress.parse(text))``."""
        return str(cls.parse(text))

    @classmethod
    def is_address(cls, text: object) -> bool:
        """Whether ``text`` parses (no exception)."""
        try:
            cls.parse(text)
        except UsageError:
            return False
        return True

    @property
    def slot(self) -> str:
        """``domain:bus:device`` without the function (a slot's devices share it)."""
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}"

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function}"
