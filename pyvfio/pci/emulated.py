"""An emulated PCI configuration space for device models.

:class:`EmulatedConfig` holds the bytes of a type-0 config space together with
two masks: which bits a write may change (``wmask``) and which bits are
write-1-to-clear (``w1cmask``).  That is all the PCI spec needs for the header
and the common capabilities, and it gives BAR sizing for free: a BAR's low
``log2(size)`` bits are read-only (zero, plus the type bits), so writing all
ones and reading back yields the size mask, exactly as on hardware.

Builders add the capabilities device models need — PM, MSI, MSI-X (table and
PBA location), PCI Express — chained from ``0x34`` in the order added.
Models (and the vfio-user server) can hook writes to a range to react, e.g.
to a Function Level Reset request in the PCIe Device Control register.

QEMU's ``hw/pci/pci.c`` (``wmask``/``w1cmask``/``cmask``) and libvfio-user's
``lib/pci.c`` do the same; the register layouts are the PCI Local Bus and PCI
Express Base specifications' (``include/uapi/linux/pci_regs.h`` names).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from pyvfio.errors import UsageError
from pyvfio.pci.config import (
    BAR0,
    CAPABILITY_LIST,
    COMMAND,
    COMMAND_INTX_DISABLE,
    COMMAND_IO,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    STATUS,
    STATUS_CAP_LIST,
    STATUS_INTERRUPT,
    CapId,
)

__all__ = [
    "CONFIG_SIZE",
    "PCIE_CONFIG_SIZE",
    "BarKind",
    "BarSpec",
    "EmulatedConfig",
    "PcieType",
]

CONFIG_SIZE = 256
PCIE_CONFIG_SIZE = 4096

ROM_ADDRESS = 0x30
COMMAND_SERR = 0x100
COMMAND_PARITY = 0x40
# Status bits software clears by writing 1 (PCI_STATUS_*: parity, aborts, SERR).
STATUS_W1C = 0x0100 | 0x0800 | 0x1000 | 0x2000 | 0x4000 | 0x8000

MSI_FLAGS_ENABLE = 0x0001
MSI_FLAGS_QMASK = 0x000E
MSI_FLAGS_QSIZE = 0x0070
MSI_FLAGS_64BIT = 0x0080
MSI_FLAGS_MASKBIT = 0x0100
MSIX_FLAGS_QSIZE = 0x07FF
MSIX_FLAGS_MASKALL = 0x4000
MSIX_FLAGS_ENABLE = 0x8000
EXP_DEVCTL_BCR_FLR = 0x8000

WriteHook = Callable[[int, int], None]
"""Called as ``hook(offset, size)`` after a write touched the hooked range."""


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


class PcieType(enum.IntEnum):
    """``PCI_EXP_TYPE_*`` (Device/Port Type of the PCIe capability)."""

    ENDPOINT = 0x0
    LEG_END = 0x1
    RC_END = 0x9


@dataclass(frozen=True)
class BarSpec:
    """A BAR as config space sees it: size (a power of two), kind, prefetchable."""

    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 5:
            raise UsageError(f"BAR index must be 0..5, not {self.index}")
        if self.size <= 0 or self.size & (self.size - 1):
            raise UsageError(f"BAR{self.index} size must be a power of two, not {self.size:#x}")
        if self.kind is BarKind.IO and self.size < 4:
            raise UsageError(f"I/O BAR{self.index} must be at least 4 bytes")
        if self.kind is not BarKind.IO and self.size < 16:
            raise UsageError(f"memory BAR{self.index} must be at least 16 bytes")
        if self.kind is BarKind.MEM64 and self.index == 5:
            raise UsageError("a 64-bit BAR cannot start at BAR5")
        if self.kind is BarKind.MEM32 and self.size > 1 << 31:
            raise UsageError(f"a 32-bit BAR cannot be {self.size:#x} bytes; use MEM64")


class EmulatedConfig:
    """A config space with write masks, capability builders and write hooks.

    ``read(offset, size)``/``write(offset, data)`` are what a region callback
    needs; any offset and size inside the space are allowed (as through a
    vfio config region).  Values are little-endian.
    """

    def __init__(self, vendor_id: int, device_id: int, *, class_code: int = 0,
                 revision: int = 0, subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 interrupt_pin: int = 0, size: int = CONFIG_SIZE) -> None:
        if size not in (CONFIG_SIZE, PCIE_CONFIG_SIZE):
            raise UsageError(f"config space is {CONFIG_SIZE} or {PCIE_CONFIG_SIZE} bytes")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self._hooks: list[tuple[int, int, WriteHook]] = []
        self._cap_tail = CAPABILITY_LIST  # where the next capability pointer goes
        self._cap_next_free = 0x40
        self.bars: dict[int, BarSpec] = {}
        self.rom_size = 0
        self.caps: dict[int, int] = {}  # cap id -> offset
        self._put(0x00, 2, vendor_id)
        self._put(0x02, 2, device_id)
        self._put(0x08, 1, revision)
        self._put(0x09, 3, class_code)
        self._put(0x2C, 2, subsystem_vendor_id)
        self._put(0x2E, 2, subsystem_id)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self._mask(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY
                   | COMMAND_SERR | COMMAND_INTX_DISABLE)
        self._mask(STATUS, 2, 0, w1c=STATUS_W1C)
        self._mask(0x0C, 1, 0xFF)  # cache line size
        self._mask(0x0D, 1, 0xFF)  # latency timer
        self._mask(INTERRUPT_LINE, 1, 0xFF)
        if size == PCIE_CONFIG_SIZE:
            # An empty extended capability list: header 0 at 0x100 (id 0, next 0).
            self._put(0x100, 4, 0)

    # ---- raw helpers ----

    def _put(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _mask(self, offset: int, size: int, wmask: int, *, w1c: int = 0) -> None:
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = w1c.to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        """The current value of a register (no side effects)."""
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Set a register from the device side (ignores the write masks)."""
        self._check(offset, size)
        self._put(offset, size, value)

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise UsageError(f"config access {offset:#x}+{size} outside {self.size:#x} bytes")

    # ---- the region interface ----

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a write through the masks, then run the hooks it touched."""
        size = len(data)
        self._check(offset, size)
        end = offset + size
        old = int.from_bytes(self.data[offset:end], "little")
        val = int.from_bytes(data, "little")
        wm = int.from_bytes(self.wmask[offset:end], "little")
        w1c = int.from_bytes(self.w1cmask[offset:end], "little")
        new = ((old & ~wm) | (val & wm)) & ~(val & w1c)
        self.data[offset:end] = new.to_bytes(size, "little")
        for start, stop, hook in self._hooks:
            if offset < stop and start < end:
                hook(offset, size)

    def add_write_hook(self, start: int, size: int, hook: WriteHook) -> None:
        self._hooks.append((start, start + size, hook))

    # ---- header helpers the framework uses ----

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & COMMAND_INTX_DISABLE)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & COMMAND_MASTER)

    def set_interrupt_status(self, asserted: bool) -> None:
        """Reflect the INTx line level in Status bit 3 (as hardware does)."""
        status = self.get(STATUS, 2)
        self._put(STATUS, 2, (status | STATUS_INTERRUPT) if asserted
                  else (status & ~STATUS_INTERRUPT))

    # ---- BARs ----

    def add_bar(self, bar: BarSpec) -> None:
        """Declare a BAR: type bits read-only, size bits read-only zero."""
        off = BAR0 + 4 * bar.index
        if bar.index in self.bars or (bar.index - 1 in self.bars
                                      and self.bars[bar.index - 1].kind is BarKind.MEM64):
            raise UsageError(f"BAR{bar.index} is already declared")
        if bar.kind is BarKind.IO:
            self._put(off, 4, 0x1)
            self._mask(off, 4, ~(bar.size - 1) & 0xFFFFFFFC)
        else:
            low = (0x4 if bar.kind is BarKind.MEM64 else 0) | (0x8 if bar.prefetchable else 0)
            self._put(off, 4, low)
            self._mask(off, 4, ~(bar.size - 1) & 0xFFFFFFF0)
            if bar.kind is BarKind.MEM64:
                if bar.index + 1 in self.bars:
                    raise UsageError(f"BAR{bar.index + 1} is taken; 64-bit BAR{bar.index} "
                                     "needs it")
                self._put(off + 4, 4, 0)
                self._mask(off + 4, 4, ~((bar.size - 1) >> 32) & 0xFFFFFFFF)
        self.bars[bar.index] = bar

    def add_rom(self, size: int) -> None:
        if size < 2048 or size & (size - 1):
            raise UsageError(f"expansion ROM size must be a power of two >= 2 KiB, not {size:#x}")
        self.rom_size = size
        self._mask(ROM_ADDRESS, 4, (~(size - 1) & 0xFFFFF800) | 0x1)

    def bar_address(self, index: int) -> int:
        """The address software programmed into a BAR (type bits stripped)."""
        bar = self.bars[index]
        off = BAR0 + 4 * index
        if bar.kind is BarKind.IO:
            return self.get(off, 4) & ~0x3
        value = self.get(off, 4) & ~0xF
        if bar.kind is BarKind.MEM64:
            value |= self.get(off + 4, 4) << 32
        return value

    # ---- capabilities ----

    def add_capability(self, cap_id: int, length: int) -> int:
        """Reserve ``length`` bytes for a capability, link it into the list,
        and return its offset (dword aligned, after the previous one)."""
        if length < 2:
            raise UsageError("a capability is at least 2 bytes (id and next)")
        offset = self._cap_next_free
        if offset + length > CONFIG_SIZE:
            raise UsageError(f"no room for a {length}-byte capability at {offset:#x}")
        self._put(offset, 1, cap_id)
        self._put(offset + 1, 1, 0)
        self._put(self._cap_tail, 1, offset)
        self._cap_tail = offset + 1
        self._cap_next_free = (offset + length + 3) & ~3
        self._put(STATUS, 2, self.get(STATUS, 2) | STATUS_CAP_LIST)
        self.caps.setdefault(cap_id, offset)
        return offset

    def add_pm(self) -> int:
        """Power Management capability, version 3, D0/D3hot; PMCSR power
        state and PME_En writable, PME_Status write-1-to-clear."""
        off = self.add_capability(CapId.PM, 8)
        self._put(off + 2, 2, 0x0003)  # PMC: version 3
        self._put(off + 4, 2, 0x0008)  # PMCSR: No_Soft_Reset
        self._mask(off + 4, 2, 0x0103, w1c=0x8000)
        return off

    def add_msi(self, vectors: int = 1, *, is_64bit: bool = True,
                per_vector_mask: bool = False) -> int:
        """MSI capability with ``vectors`` (1, 2, 4, 8, 16 or 32) messages."""
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise UsageError(f"MSI supports 1, 2, 4, 8, 16 or 32 vectors, not {vectors}")
        length = (14 if is_64bit else 10) + (10 if per_vector_mask else 0)
        off = self.add_capability(CapId.MSI, length)
        control = ((vectors.bit_length() - 1) << 1) | (MSI_FLAGS_64BIT if is_64bit else 0) \
            | (MSI_FLAGS_MASKBIT if per_vector_mask else 0)
        self._put(off + 2, 2, control)
        self._mask(off + 2, 2, MSI_FLAGS_ENABLE | MSI_FLAGS_QSIZE)
        self._mask(off + 4, 4, 0xFFFFFFFC)  # address (low)
        data_off = off + 8
        if is_64bit:
            self._mask(off + 8, 4, 0xFFFFFFFF)  # address (high)
            data_off = off + 12
        self._mask(data_off, 2, 0xFFFF)
        if per_vector_mask:
            mask_off = off + (16 if is_64bit else 12)
            self._mask(mask_off, 4, (1 << vectors) - 1 if vectors < 32 else 0xFFFFFFFF)
        return off

    @property
    def msi_enabled(self) -> bool:
        off = self.caps.get(CapId.MSI)
        return off is not None and bool(self.get(off + 2, 2) & MSI_FLAGS_ENABLE)

    def add_msix(self, table_size: int, table_bar: int, table_offset: int, pba_bar: int,
                 pba_offset: int) -> int:
        """MSI-X capability: ``table_size`` vectors, table and PBA in BARs at
        8-byte aligned offsets.  Enable and Function Mask are writable."""
        if not 1 <= table_size <= 2048:
            raise UsageError(f"MSI-X has 1..2048 vectors, not {table_size}")
        if table_offset & 7 or pba_offset & 7:
            raise UsageError("MSI-X table and PBA offsets must be 8-byte aligned")
        off = self.add_capability(CapId.MSIX, 12)
        self._put(off + 2, 2, table_size - 1)
        self._mask(off + 2, 2, MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL)
        self._put(off + 4, 4, table_offset | table_bar)
        self._put(off + 8, 4, pba_offset | pba_bar)
        return off

    @property
    def msix_enabled(self) -> bool:
        off = self.caps.get(CapId.MSIX)
        return off is not None and bool(self.get(off + 2, 2) & MSIX_FLAGS_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        off = self.caps.get(CapId.MSIX)
        return off is not None and bool(self.get(off + 2, 2) & MSIX_FLAGS_MASKALL)

    def add_pcie(self, port_type: PcieType = PcieType.ENDPOINT, *, flr: bool = True) -> int:
        """PCI Express capability (version 2, 60 bytes).  Device Control is
        writable; with ``flr`` the Device Capabilities advertise Function
        Level Reset and writing Initiate FLR calls the ``on_flr`` hook."""
        off = self.add_capability(CapId.EXP, 0x3C)
        self._put(off + 2, 2, 0x2 | (int(port_type) << 4))  # PCI_EXP_FLAGS: v2, type
        devcap = 0x0000_0001 | (0x1000_0000 if flr else 0)  # 256-byte max payload; FLR
        self._put(off + 4, 4, devcap)
        self._put(off + 8, 2, 0x2810)  # DEVCTL: RO enable, 512-byte MRRS, no snoop
        self._mask(off + 8, 2, 0x7FFF | (EXP_DEVCTL_BCR_FLR if flr else 0))
        self._mask(off + 10, 2, 0, w1c=0x000F)  # DEVSTA error bits
        self._put(off + 12, 4, 0x0000_0011)  # LNKCAP: 2.5 GT/s x1
        self._put(off + 18, 2, 0x0011)  # LNKSTA: 2.5 GT/s x1
        self._mask(off + 16, 2, 0x01C3)  # LNKCTL: ASPM, RCB, common clock, ext sync
        self._mask(off + 0x28, 2, 0x0000FFFF & 0x7FF)  # DEVCTL2
        return off

    def on_flr(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when software sets Initiate FLR (the bit reads back 0)."""
        off = self.caps.get(CapId.EXP)
        if off is None:
            raise UsageError("no PCI Express capability to take an FLR from")
        devctl = off + 8

        def check(_offset: int, _size: int) -> None:
            value = self.get(devctl, 2)
            if value & EXP_DEVCTL_BCR_FLR:
                self._put(devctl, 2, value & ~EXP_DEVCTL_BCR_FLR)
                hook()

        self.add_write_hook(devctl, 2, check)

    # ---- reset ----

    def snapshot(self) -> bytes:
        return bytes(self.data)

    def restore(self, data: bytes) -> None:
        if len(data) != self.size:
            raise UsageError(f"config snapshot is {len(data)} bytes, need {self.size}")
        self.data[:] = data

    def reset_state(self, initial: bytes) -> None:
        """Return every writable register to its power-on value."""
        self.restore(initial)
