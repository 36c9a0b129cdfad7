"""iommufd's uAPI: ``include/uapi/linux/iommufd.h`` as ctypes.

Every iommufd ioctl is ``_IO(';', 0x80 + n)`` and takes a struct whose first
``__u32`` is its own ``size``; the kernel accepts any size from the first
release of the struct up to what it knows and requires unknown trailing bytes
to be zero, so the structs here are the 6.12 layouts and :func:`new` fills
``size`` in.  The layouts are checked field by field against the real 6.12
header by ``tests/uapi/test_iommufd_layout.py`` (a compiled C probe).

Also here: ``struct iommu_test_cmd`` from ``drivers/iommu/iommufd/iommufd_test.h``
(not a uAPI header, but reachable from userspace when the kernel is built with
``CONFIG_IOMMUFD_TEST``): it creates *mock domains*, software IOMMU domains
that support dirty tracking, which is how dirty tracking is tested without
hardware that has it.
"""

from __future__ import annotations

import ctypes
import enum
from typing import TypeVar

from pyvfio.uapi.ioctl import _IO, register_names

__all__ = [
    "IOMMUFD_CMD_BASE",
    "IOMMUFD_TYPE",
    "IOMMU_DESTROY",
    "IOMMU_GET_HW_INFO",
    "IOMMU_HWPT_ALLOC",
    "IOMMU_HWPT_GET_DIRTY_BITMAP",
    "IOMMU_HWPT_SET_DIRTY_TRACKING",
    "IOMMU_IOAS_ALLOC",
    "IOMMU_IOAS_ALLOW_IOVAS",
    "IOMMU_IOAS_COPY",
    "IOMMU_IOAS_IOVA_RANGES",
    "IOMMU_IOAS_MAP",
    "IOMMU_IOAS_MAP_FILE",
    "IOMMU_IOAS_UNMAP",
    "IOMMU_OPTION",
    "IOMMU_TEST_CMD",
    "IOMMU_VFIO_IOAS",
    "MOCK_APERTURE_LAST",
    "MOCK_APERTURE_START",
    "HwCapability",
    "HwInfoType",
    "HwptAllocFlag",
    "HwptDataType",
    "IoasMapFlag",
    "IommuTestOp",
    "OptionId",
    "OptionOp",
    "VfioIoasOp",
    "iommu_destroy",
    "iommu_hw_info",
    "iommu_hw_info_vtd",
    "iommu_hwpt_alloc",
    "iommu_hwpt_get_dirty_bitmap",
    "iommu_hwpt_set_dirty_tracking",
    "iommu_ioas_alloc",
    "iommu_ioas_allow_iovas",
    "iommu_ioas_copy",
    "iommu_ioas_iova_ranges",
    "iommu_ioas_map",
    "iommu_ioas_map_file",
    "iommu_ioas_unmap",
    "iommu_iova_range",
    "iommu_option",
    "iommu_test_cmd",
    "iommu_vfio_ioas",
    "new",
]

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64  # __aligned_u64: natural alignment on x86-64 already

IOMMUFD_TYPE = ord(";")
IOMMUFD_CMD_BASE = 0x80


def _io(nr: int) -> int:
    """``_IO(IOMMUFD_TYPE, nr)``: no size or direction bits, just type and number."""
    return _IO(IOMMUFD_TYPE, nr)


# enum { IOMMUFD_CMD_BASE = 0x80, IOMMUFD_CMD_DESTROY = IOMMUFD_CMD_BASE, ... }
IOMMU_DESTROY = _io(0x80)
IOMMU_IOAS_ALLOC = _io(0x81)
IOMMU_IOAS_ALLOW_IOVAS = _io(0x82)
IOMMU_IOAS_COPY = _io(0x83)
IOMMU_IOAS_IOVA_RANGES = _io(0x84)
IOMMU_IOAS_MAP = _io(0x85)
IOMMU_IOAS_UNMAP = _io(0x86)
IOMMU_OPTION = _io(0x87)
IOMMU_VFIO_IOAS = _io(0x88)
IOMMU_HWPT_ALLOC = _io(0x89)
IOMMU_GET_HW_INFO = _io(0x8A)
IOMMU_HWPT_SET_DIRTY_TRACKING = _io(0x8B)
IOMMU_HWPT_GET_DIRTY_BITMAP = _io(0x8C)
IOMMU_HWPT_INVALIDATE = _io(0x8D)
IOMMU_FAULT_QUEUE_ALLOC = _io(0x8E)
#: Added in Linux 6.13; older kernels answer ENOTTY.
IOMMU_IOAS_MAP_FILE = _io(0x8F)
#: ``IOMMU_TEST_CMD = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 32)`` (iommufd_test.h).
IOMMU_TEST_CMD = _io(IOMMUFD_CMD_BASE + 32)


class IoasMapFlag(enum.IntFlag):
    """``enum iommufd_ioas_map_flags`` (for MAP, MAP_FILE and COPY)."""

    FIXED_IOVA = 1 << 0
    WRITEABLE = 1 << 1
    READABLE = 1 << 2


class OptionId(enum.IntEnum):
    """``enum iommufd_option``."""

    RLIMIT_MODE = 0  # global: 0 per-user RLIMIT_MEMLOCK accounting, 1 per-process
    HUGE_PAGES = 1  # per IOAS: 1 (default) combine contiguous pages, 0 map PAGE_SIZE only


class OptionOp(enum.IntEnum):
    """``enum iommufd_option_ops``."""

    SET = 0
    GET = 1


class VfioIoasOp(enum.IntEnum):
    """``enum iommufd_vfio_ioas_op``: the IOAS the VFIO container compatibility uses."""

    GET = 0
    SET = 1
    CLEAR = 2


class HwptAllocFlag(enum.IntFlag):
    """``enum iommufd_hwpt_alloc_flags``."""

    NEST_PARENT = 1 << 0
    DIRTY_TRACKING = 1 << 1
    FAULT_ID_VALID = 1 << 2


class HwptDataType(enum.IntEnum):
    """``enum iommu_hwpt_data_type``."""

    NONE = 0
    VTD_S1 = 1
    SELFTEST = 0xDEAD  # IOMMU_HWPT_DATA_SELFTEST (iommufd_test.h)


class HwInfoType(enum.IntEnum):
    """``enum iommu_hw_info_type``."""

    NONE = 0
    INTEL_VTD = 1
    SELFTEST = 0xFEEDBEEF  # IOMMU_HW_INFO_TYPE_SELFTEST (iommufd_test.h)


class HwCapability(enum.IntFlag):
    """``enum iommufd_hw_capabilities``."""

    DIRTY_TRACKING = 1 << 0
    PCI_PASID_EXEC = 1 << 1
    PCI_PASID_PRIV = 1 << 2


#: ``enum iommufd_hwpt_set_dirty_tracking_flags``
IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1
#: ``enum iommufd_hwpt_get_dirty_bitmap_flags``: read without clearing the dirty bits
IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_
                           if not name.startswith("_"))
        return f"{type(self).__name__}({fields})"


class iommu_destroy(_Struct):
    """``struct iommu_destroy { __u32 size; __u32 id; };``"""

    _fields_ = (("size", u32), ("id", u32))


class iommu_ioas_alloc(_Struct):
    """``struct iommu_ioas_alloc { __u32 size; __u32 flags; __u32 out_ioas_id; };``"""

    _fields_ = (("size", u32), ("flags", u32), ("out_ioas_id", u32))


class iommu_iova_range(_Struct):
    """``struct iommu_iova_range { __aligned_u64 start; __aligned_u64 last; };``
    (``last`` is inclusive)."""

    _fields_ = (("start", u64), ("last", u64))


class iommu_ioas_iova_ranges(_Struct):
    """``struct iommu_ioas_iova_ranges``::

        __u32 size; __u32 ioas_id; __u32 num_iovas; __u32 __reserved;
        __aligned_u64 allowed_iovas;      /* user pointer to iommu_iova_range[] */
        __aligned_u64 out_iova_alignment;

    ``num_iovas`` is in/out: too small gives EMSGSIZE with the needed count.
    """

    _fields_ = (("size", u32), ("ioas_id", u32), ("num_iovas", u32), ("__reserved", u32),
                ("allowed_iovas", u64), ("out_iova_alignment", u64))


class iommu_ioas_allow_iovas(_Struct):
    """``struct iommu_ioas_allow_iovas``::

        __u32 size; __u32 ioas_id; __u32 num_iovas; __u32 __reserved;
        __aligned_u64 allowed_iovas;
    """

    _fields_ = (("size", u32), ("ioas_id", u32), ("num_iovas", u32), ("__reserved", u32),
                ("allowed_iovas", u64))


class iommu_ioas_map(_Struct):
    """``struct iommu_ioas_map``::

        __u32 size; __u32 flags; __u32 ioas_id; __u32 __reserved;
        __aligned_u64 user_va; __aligned_u64 length; __aligned_u64 iova;

    Without ``FIXED_IOVA`` the kernel picks the IOVA and returns it in ``iova``.
    """

    _fields_ = (("size", u32), ("flags", u32), ("ioas_id", u32), ("__reserved", u32),
                ("user_va", u64), ("length", u64), ("iova", u64))


class iommu_ioas_map_file(_Struct):
    """``struct iommu_ioas_map_file`` (Linux 6.13+)::

        __u32 size; __u32 flags; __u32 ioas_id; __s32 fd;
        __aligned_u64 start; __aligned_u64 length; __aligned_u64 iova;

    Maps ``length`` bytes of the memfd ``fd`` from byte ``start``.
    """

    _fields_ = (("size", u32), ("flags", u32), ("ioas_id", u32), ("fd", s32),
                ("start", u64), ("length", u64), ("iova", u64))


class iommu_ioas_copy(_Struct):
    """``struct iommu_ioas_copy``::

        __u32 size; __u32 flags; __u32 dst_ioas_id; __u32 src_ioas_id;
        __aligned_u64 length; __aligned_u64 dst_iova; __aligned_u64 src_iova;

    The source range must exactly match one earlier MAP.
    """

    _fields_ = (("size", u32), ("flags", u32), ("dst_ioas_id", u32), ("src_ioas_id", u32),
                ("length", u64), ("dst_iova", u64), ("src_iova", u64))


class iommu_ioas_unmap(_Struct):
    """``struct iommu_ioas_unmap``::

        __u32 size; __u32 ioas_id; __aligned_u64 iova; __aligned_u64 length;

    ``length`` returns the bytes unmapped; 0..U64_MAX unmaps everything.
    """

    _fields_ = (("size", u32), ("ioas_id", u32), ("iova", u64), ("length", u64))


class iommu_option(_Struct):
    """``struct iommu_option``::

        __u32 size; __u32 option_id; __u16 op; __u16 __reserved;
        __u32 object_id; __aligned_u64 val64;
    """

    _fields_ = (("size", u32), ("option_id", u32), ("op", u16), ("__reserved", u16),
                ("object_id", u32), ("val64", u64))


class iommu_vfio_ioas(_Struct):
    """``struct iommu_vfio_ioas { __u32 size; __u32 ioas_id; __u16 op; __u16 __reserved; };``"""

    _fields_ = (("size", u32), ("ioas_id", u32), ("op", u16), ("__reserved", u16))


class iommu_hwpt_alloc(_Struct):
    """``struct iommu_hwpt_alloc``::

        __u32 size; __u32 flags; __u32 dev_id; __u32 pt_id;
        __u32 out_hwpt_id; __u32 __reserved; __u32 data_type; __u32 data_len;
        __aligned_u64 data_uptr;
        __u32 fault_id; __u32 __reserved2;      /* since 6.11 */
    """

    _fields_ = (("size", u32), ("flags", u32), ("dev_id", u32), ("pt_id", u32),
                ("out_hwpt_id", u32), ("__reserved", u32), ("data_type", u32),
                ("data_len", u32), ("data_uptr", u64), ("fault_id", u32),
                ("__reserved2", u32))


class iommu_hw_info_vtd(_Struct):
    """``struct iommu_hw_info_vtd``::

        __u32 flags; __u32 __reserved;
        __aligned_u64 cap_reg;   /* VT-d spec 11.4.2 Capability Register */
        __aligned_u64 ecap_reg;  /* VT-d spec 11.4.3 Extended Capability Register */
    """

    _fields_ = (("flags", u32), ("__reserved", u32), ("cap_reg", u64), ("ecap_reg", u64))


class iommu_hw_info(_Struct):
    """``struct iommu_hw_info`` (6.12 layout)::

        __u32 size; __u32 flags; __u32 dev_id; __u32 data_len;
        __aligned_u64 data_uptr;
        __u32 out_data_type; __u8 out_max_pasid_log2; __u8 __reserved[3];
        __aligned_u64 out_capabilities;

    ``data_len`` is in/out: the buffer size, then the size the kernel has.
    ``out_max_pasid_log2`` is 0 when the device has no PASID support.
    """

    _fields_ = (("size", u32), ("flags", u32), ("dev_id", u32), ("data_len", u32),
                ("data_uptr", u64), ("out_data_type", u32), ("out_max_pasid_log2", u8),
                ("__reserved", u8 * 3), ("out_capabilities", u64))


class iommu_hwpt_set_dirty_tracking(_Struct):
    """``struct iommu_hwpt_set_dirty_tracking { __u32 size; __u32 flags; __u32 hwpt_id; __u32 __reserved; };``"""

    _fields_ = (("size", u32), ("flags", u32), ("hwpt_id", u32), ("__reserved", u32))


class iommu_hwpt_get_dirty_bitmap(_Struct):
    """``struct iommu_hwpt_get_dirty_bitmap``::

        __u32 size; __u32 hwpt_id; __u32 flags; __u32 __reserved;
        __aligned_u64 iova; __aligned_u64 length; __aligned_u64 page_size;
        __aligned_u64 data;  /* bitmap: bit (iova - base) / page_size */
    """

    _fields_ = (("size", u32), ("hwpt_id", u32), ("flags", u32), ("__reserved", u32),
                ("iova", u64), ("length", u64), ("page_size", u64), ("data", u64))


# --- iommufd_test.h (CONFIG_IOMMUFD_TEST) ---------------------------------------------------


class IommuTestOp(enum.IntEnum):
    """The ``IOMMU_TEST_OP_*`` enum of ``iommufd_test.h`` (the part used here)."""

    ADD_RESERVED = 1
    MOCK_DOMAIN = 2
    MD_CHECK_MAP = 3
    MD_CHECK_REFS = 4
    CREATE_ACCESS = 5
    DESTROY_ACCESS_PAGES = 6
    ACCESS_PAGES = 7
    ACCESS_RW = 8
    SET_TEMP_MEMORY_LIMIT = 9
    MOCK_DOMAIN_REPLACE = 10
    ACCESS_REPLACE_IOAS = 11
    MOCK_DOMAIN_FLAGS = 12
    DIRTY = 13


#: The IOVA window a mock domain translates (``MOCK_APERTURE_START/LAST``).
MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1


class _test_mock_domain(_Struct):
    _fields_ = (("out_stdev_id", u32), ("out_hwpt_id", u32), ("out_idev_id", u32),
                ("dev_flags", u32))  # dev_flags only for MOCK_DOMAIN_FLAGS


class _test_check_map(_Struct):
    _fields_ = (("iova", u64), ("length", u64), ("uptr", u64))


class _test_dirty(_Struct):
    _fields_ = (("flags", u32), ("iova", u64), ("length", u64), ("page_size", u64),
                ("uptr", u64), ("out_nr_dirty", u64))


class _test_union(ctypes.Union):
    _fields_ = (("mock_domain", _test_mock_domain), ("check_map", _test_check_map),
                ("dirty", _test_dirty))


class iommu_test_cmd(_Struct):
    """``struct iommu_test_cmd`` (iommufd_test.h)::

        __u32 size; __u32 op; __u32 id; __u32 __reserved;
        union { ... mock_domain, check_map, dirty ... };
        __u32 last;

    Only the union members pyvfio uses are spelled out; the largest member
    (``dirty``, 48 bytes) fixes the union's size, so ``last`` sits where the
    kernel expects it (checked by the layout test).
    """

    _anonymous_ = ("u",)
    _fields_ = (("size", u32), ("op", u32), ("id", u32), ("__reserved", u32),
                ("u", _test_union), ("last", u32))


_S = TypeVar("_S", bound=ctypes.Structure)


def new(struct_type: type[_S], **fields: int) -> _S:
    """An instance of an iommufd struct with ``size`` set to its size."""
    value = struct_type(**fields)
    value.size = ctypes.sizeof(struct_type)
    return value


register_names(globals(), ("IOMMU_",))
