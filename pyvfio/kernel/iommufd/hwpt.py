""":class:`Hwpt`: a HW page table (``IOMMU_HWPT_ALLOC``, dirty tracking) and
:class:`HwInfo` (``IOMMU_GET_HW_INFO``), what the IOMMU behind a device offers.

Kernel: ``include/uapi/linux/iommufd.h``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from pyvfio.device import PAGE_SIZE
from pyvfio.errors import UsageError
from pyvfio.kernel.iommufd._common import IommufdHandle, _bitmap
from pyvfio.uapi import iommufd as U
from pyvfio.uapi.ioctl import ioctl

_NO_HWPT_FLAGS = U.HwptAllocFlag(0)


@dataclass(frozen=True)
class HwInfo:
    """What ``IOMMU_GET_HW_INFO`` says about the IOMMU behind a device."""

    type: int
    capabilities: U.HwCapability
    max_pasid_log2: int
    data: bytes

    @property
    def type_name(self) -> str:
        try:
            return U.HwInfoType(self.type).name
        except ValueError:
            return f"{self.type:#x}"

    @property
    def dirty_tracking(self) -> bool:
        return bool(self.capabilities & U.HwCapability.DIRTY_TRACKING)

    @property
    def vtd(self) -> U.iommu_hw_info_vtd | None:
        """The VT-d registers (``struct iommu_hw_info_vtd``) for an Intel IOMMU."""
        if self.type != U.HwInfoType.INTEL_VTD or len(self.data) < ctypes.sizeof(U.iommu_hw_info_vtd):
            return None
        return U.iommu_hw_info_vtd.from_buffer_copy(self.data)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_name, "capabilities": int(self.capabilities),
                               "dirty_tracking": self.dirty_tracking,
                               "max_pasid_log2": self.max_pasid_log2}
        vtd = self.vtd
        if vtd is not None:
            out["vtd"] = {"flags": int(vtd.flags), "cap_reg": f"{vtd.cap_reg:#x}",
                          "ecap_reg": f"{vtd.ecap_reg:#x}"}
        return out


# --- HW page tables --------------------------------------------------------------------------


class Hwpt:
    """A HW page table (an IOMMU domain) allocated with ``IOMMU_HWPT_ALLOC``.
    Devices attach to it instead of to the IOAS; it mirrors the IOAS's
    mappings.  With dirty tracking, :meth:`read_dirty` reports which pages
    devices wrote."""

    def __init__(self, iommufd: IommufdHandle, hwpt_id: int, *, dev_id: int = 0, pt_id: int = 0,
                 flags: U.HwptAllocFlag = _NO_HWPT_FLAGS, owned: bool = True) -> None:
        self.iommufd = iommufd
        self.id = hwpt_id
        self.dev_id = dev_id
        self.pt_id = pt_id
        self.flags = flags
        self.owned = owned
        self._closed = False

    @property
    def target(self) -> str:
        return f"HWPT {self.id}"

    def set_dirty_tracking(self, enabled: bool) -> None:
        """``IOMMU_HWPT_SET_DIRTY_TRACKING``."""
        arg = U.new(U.iommu_hwpt_set_dirty_tracking, hwpt_id=self.id,
                    flags=U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enabled else 0)
        ioctl(self.iommufd.fileno(), U.IOMMU_HWPT_SET_DIRTY_TRACKING, arg, target=self.target)

    def dirty_bitmap(self, iova: int, length: int, page_size: int = PAGE_SIZE, *,
                     clear: bool = True) -> bytes:
        """``IOMMU_HWPT_GET_DIRTY_BITMAP``: the raw bitmap, bit ``n`` for the page
        at ``iova + n * page_size``.  Reading clears the dirty bits unless
        ``clear=False``."""
        if page_size <= 0 or page_size & (page_size - 1) or iova % page_size or length % page_size:
            raise UsageError(f"IOVA {iova:#x}+{length:#x} must be aligned to a power-of-two "
                             f"page size, not {page_size:#x}")
        bitmap = _bitmap(length // page_size, ())
        arg = U.new(U.iommu_hwpt_get_dirty_bitmap, hwpt_id=self.id, iova=iova, length=length,
                    page_size=page_size, data=ctypes.addressof(bitmap),
                    flags=0 if clear else U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR)
        ioctl(self.iommufd.fileno(), U.IOMMU_HWPT_GET_DIRTY_BITMAP, arg, target=self.target)
        return bytes(bitmap)

    def read_dirty(self, iova: int, length: int, page_size: int = PAGE_SIZE, *,
                   clear: bool = True) -> list[int]:
        """The IOVAs of the dirty pages in ``iova..iova+length``."""
        bitmap = self.dirty_bitmap(iova, length, page_size, clear=clear)
        pages = length // page_size
        return [iova + n * page_size for n in range(pages) if bitmap[n // 8] >> (n % 8) & 1]

    def close(self) -> None:
        if self._closed:
            return
        if self.owned and not self.iommufd.closed:
            self.iommufd.destroy(self.id)
        self._closed = True

    def __enter__(self) -> Hwpt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Hwpt {self.id} flags={self.flags!r}>"
