"""Names for PCI IDs from the ``pci.ids`` database (the file lspci uses).

The file is about 1.3 MB and 36,000 lines, and a host inventory usually needs
the names of a handful of vendors.  So nothing is parsed up front: the first
lookup reads the file once and indexes only the vendor lines (one regex pass
over the bytes); a vendor's device and subsystem lines are parsed the first
time that vendor is asked about; the class section (``C xx`` lines at the end)
is parsed on the first class lookup.

Format (from the file's own header)::

    vendor  vendor_name
    \\tdevice  device_name
    \\t\\tsubvendor subdevice  subsystem_name
    C class  class_name
    \\tsubclass  subclass_name
    \\t\\tprog-if  prog-if_name
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Where distributions put the file, in the order lspci's builds look for it.
SEARCH_PATHS = (
    "usr/share/misc/pci.ids",
    "usr/share/hwdata/pci.ids",
    "usr/share/pci.ids",
    "usr/share/misc/pci.ids.gz",
    "usr/share/hwdata/pci.ids.gz",
)

_VENDOR_LINE = re.compile(rb"^([0-9a-fA-F]{4})  ([^\n]*)$", re.MULTILINE)
_CLASS_SECTION = re.compile(rb"^C [0-9a-fA-F]{2}  ", re.MULTILINE)


@dataclass
class _Vendor:
    name: str
    start: int  # byte offset of the first line after the vendor line
    end: int  # byte offset of the next vendor (or class) line
    devices: dict[int, str] | None = None
    subsystems: dict[tuple[int, int, int], str] | None = None


class PciIds:
    """Lazy lookups in one ``pci.ids`` file.  Every lookup returns ``None`` for
    an ID the file does not know."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._data: bytes | None = None
        self._vendors: dict[int, _Vendor] | None = None
        self._class_start = -1
        self._classes: dict[tuple[int, ...], str] | None = None

    @classmethod
    def find(cls, root: str = "/") -> PciIds | None:
        """The first ``pci.ids`` present under ``root``, or ``None`` (names are
        then simply absent from the inventory)."""
        for rel in SEARCH_PATHS:
            path = os.path.join(root, rel)
            if os.path.isfile(path):
                return cls(path)
        return None

    # ---- indexing ----

    def _index(self) -> dict[int, _Vendor]:
        if self._vendors is not None:
            return self._vendors
        try:
            if self.path.endswith(".gz"):
                import gzip  # only some distributions compress it; keep start-up lean

                with gzip.open(self.path, "rb") as f:
                    data = f.read()
            else:
                with open(self.path, "rb") as f:
                    data = f.read()
        except OSError:
            data = b""
        self._data = data
        m = _CLASS_SECTION.search(data)
        self._class_start = m.start() if m else len(data)
        vendors: dict[int, _Vendor] = {}
        previous: _Vendor | None = None
        for vm in _VENDOR_LINE.finditer(data, 0, self._class_start):
            if previous is not None:
                previous.end = vm.start()
            previous = _Vendor(vm.group(2).decode("utf-8", "replace"), vm.end() + 1, self._class_start)
            vendors[int(vm.group(1), 16)] = previous
        self._vendors = vendors
        return vendors

    def _vendor_block(self, vendor_id: int) -> _Vendor | None:
        vendor = self._index().get(vendor_id)
        if vendor is None or vendor.devices is not None:
            return vendor
        devices: dict[int, str] = {}
        subsystems: dict[tuple[int, int, int], str] = {}
        assert self._data is not None
        current = -1
        for raw in self._data[vendor.start:vendor.end].split(b"\n"):
            if raw.startswith(b"\t\t"):
                # "\t\tsubvendor subdevice  name"
                parts = raw[2:].split(b"  ", 1)
                ids = parts[0].split()
                if current >= 0 and len(parts) == 2 and len(ids) == 2:
                    try:
                        key = (current, int(ids[0], 16), int(ids[1], 16))
                    except ValueError:
                        continue
                    subsystems[key] = parts[1].decode("utf-8", "replace")
            elif raw.startswith(b"\t"):
                parts = raw[1:].split(b"  ", 1)
                if len(parts) == 2:
                    try:
                        current = int(parts[0], 16)
                    except ValueError:
                        continue
                    devices[current] = parts[1].decode("utf-8", "replace")
        vendor.devices = devices
        vendor.subsystems = subsystems
        return vendor

    def _class_table(self) -> dict[tuple[int, ...], str]:
        if self._classes is not None:
            return self._classes
        self._index()
        assert self._data is not None
        table: dict[tuple[int, ...], str] = {}
        base = sub = -1
        for raw in self._data[self._class_start:].split(b"\n"):
            if raw.startswith(b"#") or not raw.strip():
                continue
            try:
                if raw.startswith(b"C "):
                    code, name = raw[2:].split(b"  ", 1)
                    base, sub = int(code, 16), -1
                    table[(base,)] = name.decode("utf-8", "replace")
                elif raw.startswith(b"\t\t") and sub >= 0:
                    code, name = raw[2:].split(b"  ", 1)
                    table[(base, sub, int(code, 16))] = name.decode("utf-8", "replace")
                elif raw.startswith(b"\t") and base >= 0:
                    code, name = raw[1:].split(b"  ", 1)
                    sub = int(code, 16)
                    table[(base, sub)] = name.decode("utf-8", "replace")
            except ValueError:
                continue
        self._classes = table
        return table

    # ---- lookups ----

    def vendor(self, vendor_id: int) -> str | None:
        v = self._index().get(vendor_id)
        return v.name if v else None

    def device(self, vendor_id: int, device_id: int) -> str | None:
        v = self._vendor_block(vendor_id)
        return v.devices.get(device_id) if v and v.devices is not None else None

    def subsystem(self, vendor_id: int, device_id: int, sub_vendor: int, sub_device: int) -> str | None:
        """The subsystem's own name if listed under the device, else ``None``."""
        v = self._vendor_block(vendor_id)
        if v is None or v.subsystems is None:
            return None
        return v.subsystems.get((device_id, sub_vendor, sub_device))

    def class_name(self, class_code: int) -> str | None:
        """The most specific name for a 24-bit class code (base, sub, prog-if):
        the subclass name if known, else the base class name."""
        table = self._class_table()
        base, sub = class_code >> 16, (class_code >> 8) & 0xFF
        return table.get((base, sub)) or table.get((base,))

    def prog_if_name(self, class_code: int) -> str | None:
        return self._class_table().get((class_code >> 16, (class_code >> 8) & 0xFF, class_code & 0xFF))
