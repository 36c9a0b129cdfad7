"""PCI configuration space: typed access and capability walking.

:class:`ConfigSpace` sits on two callables, ``read(offset, size) -> bytes``
and ``write(offset, data)``, so the same code reads a kernel device's config
region, a vfio-user device's, a sysfs ``config`` file or a bytearray.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyvfio.errors import UsageError

Reader = Callable[[int, int], bytes]
Writer = Callable[[int, bytes], None]

# Standard header offsets (type 0 and type 1 share these).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_MASTER = 0x4
COMMAND_INTX_DISABLE = 0x400
STATUS_INTERRUPT = 0x8
STATUS_CAP_LIST = 0x10

EXT_CAP_START = 0x100


class CapId(enum.IntEnum):
    """Standard capability IDs (``PCI_CAP_ID_*``)."""

    PM = 0x01
    AGP = 0x02
    VPD = 0x03
    SLOTID = 0x04
    MSI = 0x05
    CHSWP = 0x06
    PCIX = 0x07
    HT = 0x08
    VNDR = 0x09
    DBG = 0x0A
    CCRC = 0x0B
    SHPC = 0x0C
    SSVID = 0x0D
    AGP3 = 0x0E
    SECDEV = 0x0F
    EXP = 0x10
    MSIX = 0x11
    SATA = 0x12
    AF = 0x13
    EA = 0x14


class ExtCapId(enum.IntEnum):
    """Extended capability IDs (``PCI_EXT_CAP_ID_*``)."""

    ERR = 0x01
    VC = 0x02
    DSN = 0x03
    PWR = 0x04
    RCLD = 0x05
    RCILC = 0x06
    RCEC = 0x07
    MFVC = 0x08
    VC9 = 0x09
    RCRB = 0x0A
    VNDR = 0x0B
    CAC = 0x0C
    ACS = 0x0D
    ARI = 0x0E
    ATS = 0x0F
    SRIOV = 0x10
    MRIOV = 0x11
    MCAST = 0x12
    PRI = 0x13
    AMD_XXX = 0x14
    REBAR = 0x15
    DPA = 0x16
    TPH = 0x17
    LTR = 0x18
    SECPCI = 0x19
    PMUX = 0x1A
    PASID = 0x1B
    DPC = 0x1D
    L1SS = 0x1E
    PTM = 0x1F


@dataclass(frozen=True)
class Capability:
    """A capability found in config space: its ID, offset, and whether it is an
    extended (PCIe, offset >= 0x100) capability."""

    id: int
    offset: int
    extended: bool = False
    version: int = 0

    @property
    def name(self) -> str:
        table: type[enum.IntEnum] = ExtCapId if self.extended else CapId
        try:
            return table(self.id).name
        except ValueError:
            return f"{'EXT_' if self.extended else ''}CAP_{self.id:#04x}"


class ConfigSpace:
    """Typed access to a PCI config space and its capability lists."""

    def __init__(self, read: Reader, write: Writer | None = None, size: int = 256, *,
                 name: str = "") -> None:
        self._read = read
        self._write = write
        self.size = size
        self.name = name  # whose config space, for repr and errors

    def __repr__(self) -> str:
        # No config read here: a repr must not do I/O on a device.
        of = f" of {self.name}" if self.name else ""
        mode = "" if self._write is not None else ", read-only"
        return f"<ConfigSpace{of} ({self.size:#x} bytes{mode})>"

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> ConfigSpace:
        """A read-only (or, for a bytearray, writable) view of captured config bytes."""
        buf = data

        def read(offset: int, size: int) -> bytes:
            return bytes(buf[offset:offset + size]).ljust(size, b"\xff")

        def write(offset: int, value: bytes) -> None:
            if not isinstance(buf, bytearray):
                raise UsageError("config space bytes are read-only")
            buf[offset:offset + len(value)] = value

        return cls(read, write, size=len(data))

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.size:
            raise UsageError(f"config access {offset:#x}+{size} outside {self.size:#x} bytes")
        return self._read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        if self._write is None:
            raise UsageError("this config space is read-only")
        if offset < 0 or offset + len(data) > self.size:
            raise UsageError(f"config access {offset:#x}+{len(data)} outside {self.size:#x} bytes")
        self._write(offset, data)

    def read8(self, offset: int) -> int:
        return self.read(offset, 1)[0]

    def read16(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 2), "little")

    def read32(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 4), "little")

    def write8(self, offset: int, value: int) -> None:
        self.write(offset, bytes([value & 0xFF]))

    def write16(self, offset: int, value: int) -> None:
        self.write(offset, (value & 0xFFFF).to_bytes(2, "little"))

    def write32(self, offset: int, value: int) -> None:
        self.write(offset, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    # ---- header fields ----

    @property
    def vendor_id(self) -> int:
        return self.read16(VENDOR_ID)

    @property
    def device_id(self) -> int:
        return self.read16(DEVICE_ID)

    @property
    def class_code(self) -> int:
        return int.from_bytes(self.read(CLASS_PROG, 3), "little")

    @property
    def revision(self) -> int:
        return self.read8(REVISION_ID)

    @property
    def header_type(self) -> int:
        return self.read8(HEADER_TYPE) & 0x7F

    @property
    def interrupt_pin(self) -> int:
        return self.read8(INTERRUPT_PIN)

    def set_command(self, set_bits: int = 0, clear_bits: int = 0) -> int:
        """Read-modify-write the command register; returns the new value."""
        value = (self.read16(COMMAND) | set_bits) & ~clear_bits & 0xFFFF
        self.write16(COMMAND, value)
        return value

    def enable_bus_master(self) -> None:
        self.set_command(COMMAND_MEMORY | COMMAND_MASTER)

    # ---- capabilities ----

    def capabilities(self) -> Iterator[Capability]:
        """Walk the standard list, then (for PCIe config spaces larger than
        256 bytes) the extended list.  Loops and out-of-range pointers end the
        walk instead of spinning: the data may come from a hostile peer."""
        if self.read16(STATUS) & STATUS_CAP_LIST:
            seen: set[int] = set()
            ptr = self.read8(CAPABILITY_LIST) & 0xFC
            while ptr >= 0x40 and ptr not in seen and ptr + 2 <= min(self.size, 256):
                seen.add(ptr)
                cap_id, nxt = self.read(ptr, 2)
                yield Capability(cap_id, ptr)
                ptr = nxt & 0xFC
        if self.size > EXT_CAP_START:
            seen = set()
            ptr = EXT_CAP_START
            while ptr >= EXT_CAP_START and ptr not in seen and ptr + 4 <= self.size:
                seen.add(ptr)
                header = self.read32(ptr)
                if header in (0, 0xFFFFFFFF):
                    break
                yield Capability(header & 0xFFFF, ptr, True, (header >> 16) & 0xF)
                ptr = (header >> 20) & 0xFFC

    def find_capability(self, cap_id: int, extended: bool = False) -> Capability | None:
        for cap in self.capabilities():
            if cap.id == cap_id and cap.extended == extended:
                return cap
        return None
