"""What a device reports about itself: :class:`DeviceInfo`, :class:`RegionInfo`
(with its sparse mmap areas) and :class:`IrqInfo`, and the names and errors
built from them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pyvfio.core.flags import DeviceFlag, IrqFlag, IrqIndex, RegionFlag, RegionIndex
from pyvfio.errors import UsageError

# --- value types -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """``struct vfio_device_info``: flags and how many regions and IRQ indexes."""

    flags: DeviceFlag
    num_regions: int
    num_irqs: int

    def as_dict(self) -> dict[str, Any]:
        return {"flags": int(self.flags), "flag_names": _flag_names(self.flags),
                "num_regions": self.num_regions, "num_irqs": self.num_irqs}


@dataclass(frozen=True)
class SparseArea:
    """One mmap-able window of a region (``vfio_region_sparse_mmap_area``)."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """``struct vfio_region_info`` with its capabilities decoded.

    ``offset`` is where the region lives in the device fd (kernel) or the
    server's region fd (vfio-user); callers normally do not need it.
    ``mmap_areas`` lists where mmap is allowed: the whole region when the
    region is mmap-able and has no sparse capability, nothing when it is not.
    ``type`` is ``(type, subtype)`` from ``VFIO_REGION_INFO_CAP_TYPE``.
    ``caps`` lists the IDs of every capability the region reported
    (``VFIO_REGION_INFO_CAP_*``: 1 sparse mmap, 2 type, 3 MSI-X mappable).
    """

    index: int
    flags: RegionFlag
    size: int
    offset: int = 0
    mmap_areas: tuple[SparseArea, ...] = ()
    type: tuple[int, int] | None = None
    caps: tuple[int, ...] = ()

    @property
    def readable(self) -> bool:
        return bool(self.flags & RegionFlag.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & RegionFlag.WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & RegionFlag.MMAP) and bool(self.mmap_areas)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": _region_name(self.index),
            "size": self.size,
            "flags": int(self.flags),
            "flag_names": _flag_names(self.flags),
            "mmap_areas": [{"offset": a.offset, "size": a.size} for a in self.mmap_areas],
            "type": list(self.type) if self.type else None,
            "caps": list(self.caps),
        }


@dataclass(frozen=True)
class IrqInfo:
    """``struct vfio_irq_info``."""

    index: int
    count: int
    flags: IrqFlag

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": _irq_name(self.index), "count": self.count,
                "flags": int(self.flags), "flag_names": _flag_names(self.flags)}


def _flag_names(flags: enum.IntFlag) -> list[str]:
    return [f.name for f in type(flags) if f in flags and f.name]


def _region_name(index: int) -> str:
    try:
        return RegionIndex(index).name
    except ValueError:
        return f"REGION{index}"


def outside_region_error(device: str, index: int, size: int, offset: int, width: int
                         ) -> UsageError:
    """The error of an access outside a region, naming the device and region
    (shared by every backend's accessors so that they all say the same)."""
    region = f"region {index} ({_region_name(index)})"
    if size == 0:
        return UsageError(f"{device}: {region} is not implemented (size 0); "
                          f"`pyvfio info` lists the regions the device has")
    return UsageError(f"{device}: {width}-byte access at {offset:#x} is outside {region}, "
                      f"which is {size:#x} bytes")


def _irq_name(index: int) -> str:
    try:
        return IrqIndex(index).name
    except ValueError:
        return f"IRQ{index}"
