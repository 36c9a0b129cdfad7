"""Names for PCI IDs from the ``pci.ids`` database (the file lspci uses).

The file is about 1.3 MB and 36,000 lines, and a host inventory needs the
names of a handful of vendors and devices.  So nothing is parsed: the file is
read once, and each lookup finds its line with ``bytes.find`` (a memchr-speed
scan, about a tenth of a millisecond over the whole file) and caches the
answer.  A vendor line is ``\n`` + four hex digits + two spaces, which no
other line starts with; a device is searched only inside its vendor's block,
a subsystem only inside its device's block.  The class section (``C xx``
lines at the end) is small and parsed on the first class lookup.

Format (from the file's own header)::

    vendor  vendor_name
    \tdevice  device_name
    \t\tsubvendor subdevice  subsystem_name
    C class  class_name
    \tsubclass  subclass_name
    \t\tprog-if  prog-if_name
"""

from __future__ import annotations

import os
import re

# Where distributions put the file, in the order lspci's builds look for it.
SEARCH_PATHS = (
    "usr/share/misc/pci.ids",
    "usr/share/hwdata/pci.ids",
    "usr/share/pci.ids",
    "usr/share/misc/pci.ids.gz",
    "usr/share/hwdata/pci.ids.gz",
)

# The line after a block: the next vendor line (or the class section) ends a
# vendor's block; any line not indented twice ends a device's block.
_END_OF_VENDOR = re.compile(rb"\n(?:[0-9a-fA-F]{4}  |C )")
_END_OF_DEVICE = re.compile(rb"\n(?!\t\t|#)")

_Span = tuple[int, int]  # byte offsets: start of the line after the header, end of the block


def _name_at(data: bytes, pos: int) -> str:
    """The text from ``pos`` to the end of its line."""
    end = data.find(b"\n", pos)
    return data[pos:end if end >= 0 else len(data)].decode("utf-8", "replace")


class PciIds:
    """Lazy lookups in one ``pci.ids`` file.  Every lookup returns ``None`` for
    an ID the file does not know."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._data: bytes | None = None
        self._class_start = 0
        self._vendors: dict[int, tuple[str, _Span] | None] = {}
        self._devices: dict[tuple[int, int], tuple[str, _Span] | None] = {}
        self._subsystems: dict[tuple[int, int, int, int], str | None] = {}
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

    def _bytes(self) -> bytes:
        if self._data is None:
            try:
                if self.path.endswith(".gz"):
                    import gzip  # only some distributions compress it

                    with gzip.open(self.path, "rb") as f:
                        data = f.read()
                else:
                    with open(self.path, "rb") as f:
                        data = f.read()
            except OSError:
                data = b""
            # A leading newline makes the first line findable like the others.
            self._data = b"\n" + data
            pos = self._data.find(b"\nC ")
            self._class_start = pos if pos >= 0 else len(self._data)
        return self._data

    def _vendor_entry(self, vendor_id: int) -> tuple[str, _Span] | None:
        if vendor_id in self._vendors:
            return self._vendors[vendor_id]
        data = self._bytes()
        entry = None
        pos = data.find(b"\n%04x  " % vendor_id, 0, self._class_start)
        if pos >= 0:
            name_at = pos + 7
            start = data.find(b"\n", name_at)
            start = len(data) if start < 0 else start
            m = _END_OF_VENDOR.search(data, start, self._class_start)
            entry = (_name_at(data, name_at), (start, m.start() if m else self._class_start))
        self._vendors[vendor_id] = entry
        return entry

    def _device_entry(self, vendor_id: int, device_id: int) -> tuple[str, _Span] | None:
        key = (vendor_id, device_id)
        if key in self._devices:
            return self._devices[key]
        entry = None
        vendor = self._vendor_entry(vendor_id)
        if vendor is not None:
            data = self._bytes()
            lo, hi = vendor[1]
            pos = data.find(b"\n\t%04x  " % device_id, lo, hi)
            if pos >= 0:
                name_at = pos + 8
                start = data.find(b"\n", name_at, hi)
                start = hi if start < 0 else start
                m = _END_OF_DEVICE.search(data, start + 1, hi)
                entry = (_name_at(data, name_at), (start, m.start() if m else hi))
        self._devices[key] = entry
        return entry

    def _class_table(self) -> dict[tuple[int, ...], str]:
        if self._classes is not None:
            return self._classes
        data = self._bytes()
        table: dict[tuple[int, ...], str] = {}
        base = sub = -1
        for raw in data[self._class_start:].split(b"\n"):
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
        entry = self._vendor_entry(vendor_id)
        return entry[0] if entry else None

    def device(self, vendor_id: int, device_id: int) -> str | None:
        entry = self._device_entry(vendor_id, device_id)
        return entry[0] if entry else None

    def subsystem(self, vendor_id: int, device_id: int, sub_vendor: int, sub_device: int) -> str | None:
        """The subsystem's own name if listed under the device, else ``None``."""
        key = (vendor_id, device_id, sub_vendor, sub_device)
        if key in self._subsystems:
            return self._subsystems[key]
        name = None
        entry = self._device_entry(vendor_id, device_id)
        if entry is not None:
            data = self._bytes()
            lo, hi = entry[1]
            pos = data.find(b"\n\t\t%04x %04x  " % (sub_vendor, sub_device), lo, hi)
            if pos >= 0:
                name = _name_at(data, pos + 14)
        self._subsystems[key] = name
        return name

    def class_name(self, class_code: int) -> str | None:
        """The most specific name for a 24-bit class code (base, sub, prog-if):
        the subclass name if known, else the base class name."""
        table = self._class_table()
        base, sub = class_code >> 16, (class_code >> 8) & 0xFF
        return table.get((base, sub)) or table.get((base,))

    def base_class_name(self, class_code: int) -> str | None:
        """The base class's name (``C xx`` line), ``None`` if pci.ids lacks it."""
        return self._class_table().get((class_code >> 16,))

    def subclass_name(self, class_code: int) -> str | None:
        """The subclass's own name, ``None`` if pci.ids lacks it (no fallback)."""
        return self._class_table().get((class_code >> 16, (class_code >> 8) & 0xFF))

    def prog_if_name(self, class_code: int) -> str | None:
        return self._class_table().get((class_code >> 16, (class_code >> 8) & 0xFF, class_code & 0xFF))
