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
# modules.builtin.modinfo: NUL-separated "module.key=value" strings of the
# built-in modules, whose aliases depmod does not put in modules.alias.
_BUILTIN_ALIAS = re.compile(rb"(?:^|\0)([\w-]+)\.alias=vfio_pci:([^\0]+)")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


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

    def patterns(self) -> dict[str, list[str]]:
        """``{module: [pattern after "vfio_pci:", ...]}`` from ``modules.alias``
        and, for drivers built into the kernel, ``modules.builtin.modinfo``."""
        if self._patterns is None:
            table: dict[str, list[str]] = {}
            if self.path is not None:
                for m in _ALIAS_LINE.finditer(_read(self.path)):
                    table.setdefault(m.group(2).decode(), []).append(m.group(1).decode())
                builtin = os.path.join(os.path.dirname(self.path), "modules.builtin.modinfo")
                for m in _BUILTIN_ALIAS.finditer(_read(builtin)):
                    table.setdefault(m.group(1).decode(), []).append(m.group(2).decode())
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
