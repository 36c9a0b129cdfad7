"""vfio variant drivers as ``modules.alias`` describes them (seed 004).

Since Linux 5.20 a vfio PCI driver declares its IDs with
``PCI_DRIVER_OVERRIDE_DEVICE_VFIO()``, which makes depmod write lines like::

    alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
    alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci

into ``/lib/modules/<release>/modules.alias``.  A module with such a line is a
vfio driver; ``vfio_pci`` itself matches everything with seven wildcards.
libvirt picks the driver for a device the same way we do here: the
``vfio_pci:`` pattern that matches the device's modalias (``pci:v...``) with
the fewest wildcards.
"""

from __future__ import annotations

import os
import re
from fnmatch import fnmatchcase

VFIO_PCI_MODULE = "vfio_pci"

_ALIAS_LINE = re.compile(rb"^alias vfio_pci:(\S+) (\S+)", re.MULTILINE)


class VfioAliases:
    """The ``vfio_pci:`` aliases of one kernel release; parsed on first use."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._patterns: dict[str, list[str]] | None = None

    @classmethod
    def for_root(cls, root: str, release: str | None) -> VfioAliases:
        if not release:
            return cls(None)
        return cls(os.path.join(root, "lib/modules", release, "modules.alias"))

    @property
    def available(self) -> bool:
        """Whether the file exists (without it no driver can be recognised as
        a variant by its aliases, only by the /dev/vfio cross-check)."""
        return self.path is not None and os.path.isfile(self.path)

    def patterns(self) -> dict[str, list[str]]:
        """``{module: [pattern after "vfio_pci:", ...]}``."""
        if self._patterns is None:
            table: dict[str, list[str]] = {}
            data = b""
            if self.path is not None:
                try:
                    with open(self.path, "rb") as f:
                        data = f.read()
                except OSError:
                    data = b""
            for m in _ALIAS_LINE.finditer(data):
                table.setdefault(m.group(2).decode(), []).append(m.group(1).decode())
            self._patterns = table
        return self._patterns

    def is_vfio_module(self, module: str) -> bool:
        return module.replace("-", "_") in self.patterns()

    def best_module(self, modalias: str | None) -> tuple[str, str] | None:
        """The variant module (not ``vfio_pci``) whose pattern matches
        ``modalias`` with the fewest wildcards, and that pattern; ``None`` if
        no variant matches."""
        if not modalias or not modalias.startswith("pci:"):
            return None
        subject = modalias[4:]
        best: tuple[int, str, str] | None = None
        for module, patterns in self.patterns().items():
            if module == VFIO_PCI_MODULE:
                continue
            for pattern in patterns:
                if fnmatchcase(subject, pattern):
                    score = pattern.count("*") + pattern.count("?")
                    if best is None or score < best[0]:
                        best = (score, module, pattern)
        return (best[1], best[2]) if best else None
