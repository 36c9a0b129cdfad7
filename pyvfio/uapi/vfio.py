"""``include/uapi/linux/vfio.h``: ioctl numbers, flags and ctypes structs.

Names are the kernel's.  Every VFIO ioctl is ``_IO(';', 100 + n)`` (the
header says why: "we use the _IO() macro for these defines to avoid
implicitly embedding a size into the ioctl request"; the size lives in
``argsz``).  Struct sizes and field offsets are checked against the
installed kernel headers by ``tests/uapi/test_vfio_layout.py`` (a C probe),
and against the upstream header's text for structs newer than the installed
headers.

Flexible array members (``__u8 data[]``) are not declared as fields: like C's
``sizeof``, a struct's ``sizeof`` here is the fixed part, and the caller
appends the array in a larger buffer (see :func:`irq_set_buffer`).
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

from pyvfio.uapi.ioctl import _IO, CapHeader, register_names

# The header's own name for the capability header.
vfio_info_cap_header = CapHeader

VFIO_API_VERSION = 0

# --- extensions (VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments) ----------------------------
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_TYPE1_NESTING_IOMMU = 6  # __VFIO_RESERVED_TYPE1_NESTING_IOMMU upstream since 6.6
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

EXTENSION_NAMES = {
    VFIO_TYPE1_IOMMU: "TYPE1", VFIO_SPAPR_TCE_IOMMU: "SPAPR_TCE", VFIO_TYPE1v2_IOMMU: "TYPE1v2",
    VFIO_DMA_CC_IOMMU: "DMA_CC", VFIO_EEH: "EEH", VFIO_TYPE1_NESTING_IOMMU: "TYPE1_NESTING",
    VFIO_SPAPR_TCE_v2_IOMMU: "SPAPR_TCE_v2", VFIO_NOIOMMU_IOMMU: "NOIOMMU",
    VFIO_UNMAP_ALL: "UNMAP_ALL", VFIO_UPDATE_VADDR: "UPDATE_VADDR",
}

VFIO_TYPE = ord(";")
VFIO_BASE = 100

# --- /dev/vfio/vfio (container) --------------------------------------------------------------
VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)

# --- /dev/vfio/$GROUP ------------------------------------------------------------------------
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)

# --- device fd -------------------------------------------------------------------------------
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_DEVICE_PCI_HOT_RESET = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_DEVICE_QUERY_GFX_PLANE = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_DEVICE_GET_GFX_DMABUF = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_DEVICE_IOEVENTFD = _IO(VFIO_TYPE, VFIO_BASE + 16)
VFIO_DEVICE_FEATURE = _IO(VFIO_TYPE, VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)
VFIO_MIG_GET_PRECOPY_INFO = _IO(VFIO_TYPE, VFIO_BASE + 21)  # on the migration data fd

# --- type1 IOMMU (on the container once SET_IOMMU is done) -----------------------------------
# Numbers overlap with the device ioctls above: they go to a different fd.
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)
VFIO_IOMMU_ENABLE = _IO(VFIO_TYPE, VFIO_BASE + 15)
VFIO_IOMMU_DISABLE = _IO(VFIO_TYPE, VFIO_BASE + 16)
VFIO_IOMMU_DIRTY_PAGES = _IO(VFIO_TYPE, VFIO_BASE + 17)


# --- structs: group --------------------------------------------------------------------------

class vfio_group_status(ctypes.Structure):
    """::

        struct vfio_group_status {
            __u32 argsz;
            __u32 flags;   /* VFIO_GROUP_FLAGS_VIABLE, _CONTAINER_SET */
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]


VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1


# --- structs: device info --------------------------------------------------------------------

class vfio_device_info(ctypes.Structure):
    """::

        struct vfio_device_info {
            __u32 argsz;
            __u32 flags;        /* VFIO_DEVICE_FLAGS_* */
            __u32 num_regions;  /* Max region index + 1 */
            __u32 num_irqs;     /* Max IRQ index + 1 */
            __u32 cap_offset;   /* Offset within info struct of first cap */
            __u32 pad;
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("num_regions", c_uint32),
                ("num_irqs", c_uint32), ("cap_offset", c_uint32), ("pad", c_uint32)]


VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
VFIO_DEVICE_FLAGS_AMBA = 1 << 3
VFIO_DEVICE_FLAGS_CCW = 1 << 4
VFIO_DEVICE_FLAGS_AP = 1 << 5
VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
VFIO_DEVICE_FLAGS_CDX = 1 << 8

VFIO_DEVICE_INFO_CAP_ZPCI_BASE = 1
VFIO_DEVICE_INFO_CAP_ZPCI_GROUP = 2
VFIO_DEVICE_INFO_CAP_ZPCI_UTIL = 3
VFIO_DEVICE_INFO_CAP_ZPCI_PFIP = 4
VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP = 5


class vfio_device_info_cap_pci_atomic_comp(ctypes.Structure):
    """``struct vfio_device_info_cap_pci_atomic_comp`` (6.5+): header, flags
    (``VFIO_PCI_ATOMIC_COMP32/64/128``), reserved."""

    _fields_ = [("header", CapHeader), ("flags", c_uint32), ("reserved", c_uint32)]


VFIO_PCI_ATOMIC_COMP32 = 1 << 0
VFIO_PCI_ATOMIC_COMP64 = 1 << 1
VFIO_PCI_ATOMIC_COMP128 = 1 << 2


# --- structs: regions ------------------------------------------------------------------------

class vfio_region_info(ctypes.Structure):
    """::

        struct vfio_region_info {
            __u32 argsz;
            __u32 flags;          /* VFIO_REGION_INFO_FLAG_* */
            __u32 index;          /* Region index */
            __u32 cap_offset;     /* Offset within info struct of first cap */
            __aligned_u64 size;   /* Region size (bytes) */
            __aligned_u64 offset; /* Region offset from start of device fd */
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("cap_offset", c_uint32), ("size", c_uint64), ("offset", c_uint64)]


VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
VFIO_REGION_INFO_CAP_NVLINK2_SSATGT = 4
VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD = 5


class vfio_region_sparse_mmap_area(ctypes.Structure):
    """``struct vfio_region_sparse_mmap_area { __aligned_u64 offset; __aligned_u64 size; }``"""

    _fields_ = [("offset", c_uint64), ("size", c_uint64)]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):
    """::

        struct vfio_region_info_cap_sparse_mmap {
            struct vfio_info_cap_header header;
            __u32 nr_areas;
            __u32 reserved;
            struct vfio_region_sparse_mmap_area areas[];
        };
    """

    _fields_ = [("header", CapHeader), ("nr_areas", c_uint32), ("reserved", c_uint32)]


class vfio_region_info_cap_type(ctypes.Structure):
    """``struct vfio_region_info_cap_type { header; __u32 type; __u32 subtype; }``"""

    _fields_ = [("header", CapHeader), ("type", c_uint32), ("subtype", c_uint32)]


VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 1 << 31
VFIO_REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF
VFIO_REGION_TYPE_GFX = 1
VFIO_REGION_TYPE_CCW = 2
VFIO_REGION_TYPE_MIGRATION_DEPRECATED = 3
VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION = 1
VFIO_REGION_SUBTYPE_INTEL_IGD_HOST_CFG = 2
VFIO_REGION_SUBTYPE_INTEL_IGD_LPC_CFG = 3
VFIO_REGION_SUBTYPE_GFX_EDID = 1


class vfio_region_gfx_edid(ctypes.Structure):
    """``struct vfio_region_gfx_edid``: the EDID region's layout."""

    _fields_ = [("edid_offset", c_uint32), ("edid_max_size", c_uint32), ("edid_size", c_uint32),
                ("max_xres", c_uint32), ("max_yres", c_uint32), ("link_state", c_uint32)]


class vfio_region_info_cap_nvlink2_ssatgt(ctypes.Structure):
    """Deprecated upstream, kept for the layout test."""

    _fields_ = [("header", CapHeader), ("tgt", c_uint64)]


class vfio_region_info_cap_nvlink2_lnkspd(ctypes.Structure):
    """Deprecated upstream, kept for the layout test."""

    _fields_ = [("header", CapHeader), ("link_speed", c_uint32), ("__pad", c_uint32)]


class vfio_device_migration_info(ctypes.Structure):
    """The v1 migration region's header (removed from drivers in 5.18; layout only)."""

    _fields_ = [("device_state", c_uint32), ("reserved", c_uint32), ("pending_bytes", c_uint64),
                ("data_offset", c_uint64), ("data_size", c_uint64)]


# --- structs: interrupts ---------------------------------------------------------------------

class vfio_irq_info(ctypes.Structure):
    """::

        struct vfio_irq_info {
            __u32 argsz;
            __u32 flags;   /* VFIO_IRQ_INFO_* */
            __u32 index;   /* IRQ index */
            __u32 count;   /* Number of IRQs within this index */
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("count", c_uint32)]


VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3


class vfio_irq_set(ctypes.Structure):
    """::

        struct vfio_irq_set {
            __u32 argsz;   /* includes data[] */
            __u32 flags;   /* VFIO_IRQ_SET_DATA_* | VFIO_IRQ_SET_ACTION_* */
            __u32 index;
            __u32 start;
            __u32 count;
            __u8  data[];  /* __s32 eventfds, or __u8 bools */
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("start", c_uint32), ("count", c_uint32)]


VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = 0x7
VFIO_IRQ_SET_ACTION_TYPE_MASK = 0x38


def irq_set_buffer(flags: int, index: int, start: int, count: int,
                   data: bytes = b"") -> bytearray:
    """A ``vfio_irq_set`` followed by its ``data[]``, with ``argsz`` covering both."""
    head = ctypes.sizeof(vfio_irq_set)
    buf = bytearray(head + len(data))
    hdr = vfio_irq_set.from_buffer(buf)
    hdr.argsz = len(buf)
    hdr.flags = flags
    hdr.index = index
    hdr.start = start
    hdr.count = count
    del hdr  # release the export so the caller may keep using buf freely
    buf[head:] = data
    return buf


# Region and IRQ indexes of vfio-pci (fixed user ABI).
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5


# --- structs: hot reset ----------------------------------------------------------------------

class _dependent_device_id(ctypes.Union):
    _fields_ = [("group_id", c_uint32), ("devid", c_uint32)]


class vfio_pci_dependent_device(ctypes.Structure):
    """::

        struct vfio_pci_dependent_device {
            union { __u32 group_id; __u32 devid; };
            __u16 segment;
            __u8  bus;
            __u8  devfn;   /* Use PCI_SLOT/PCI_FUNC */
        };
    """

    _anonymous_ = ("_id",)
    _fields_ = [("_id", _dependent_device_id), ("segment", c_uint16), ("bus", c_uint8),
                ("devfn", c_uint8)]


VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = -1


class vfio_pci_hot_reset_info(ctypes.Structure):
    """``struct vfio_pci_hot_reset_info { argsz; flags; __u32 count;
    struct vfio_pci_dependent_device devices[]; }``.  The kernel answers
    ENOSPC (not a larger argsz) when ``devices[]`` does not fit; ``count``
    then says how many there are."""

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("count", c_uint32)]


VFIO_PCI_HOT_RESET_FLAG_DEV_ID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED = 1 << 1


class vfio_pci_hot_reset(ctypes.Structure):
    """``struct vfio_pci_hot_reset { argsz; flags; __u32 count; __s32 group_fds[]; }``"""

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("count", c_uint32)]


# --- structs: graphics and ioeventfd (layouts only) ------------------------------------------

class _gfx_plane_id(ctypes.Union):
    _fields_ = [("region_index", c_uint32), ("dmabuf_id", c_uint32)]


class vfio_device_gfx_plane_info(ctypes.Structure):
    """``struct vfio_device_gfx_plane_info`` (mdev vGPUs)."""

    _anonymous_ = ("_id",)
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("drm_plane_type", c_uint32),
                ("drm_format", c_uint32), ("drm_format_mod", c_uint64), ("width", c_uint32),
                ("height", c_uint32), ("stride", c_uint32), ("size", c_uint32),
                ("x_pos", c_uint32), ("y_pos", c_uint32), ("x_hot", c_uint32),
                ("y_hot", c_uint32), ("_id", _gfx_plane_id), ("reserved", c_uint32)]


class vfio_device_ioeventfd(ctypes.Structure):
    """``struct vfio_device_ioeventfd``: write ``data`` at device-fd ``offset``
    when eventfd ``fd`` fires."""

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("offset", c_uint64),
                ("data", c_uint64), ("fd", c_int32), ("reserved", c_uint32)]


VFIO_DEVICE_IOEVENTFD_8 = 1 << 0
VFIO_DEVICE_IOEVENTFD_16 = 1 << 1
VFIO_DEVICE_IOEVENTFD_32 = 1 << 2
VFIO_DEVICE_IOEVENTFD_64 = 1 << 3


# --- structs: device features (migration, DMA logging, ...) ----------------------------------

class vfio_device_feature(ctypes.Structure):
    """::

        struct vfio_device_feature {
            __u32 argsz;
            __u32 flags;   /* feature index | GET | SET | PROBE */
            __u8  data[];
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]


VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18

VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9
VFIO_DEVICE_FEATURE_BUS_MASTER = 10
VFIO_DEVICE_FEATURE_DMA_BUF = 11


def feature_buffer(flags: int, payload: bytes | ctypes.Structure = b"") -> bytearray:
    """A ``vfio_device_feature`` followed by ``payload``, ``argsz`` covering both."""
    data = bytes(payload)
    head = ctypes.sizeof(vfio_device_feature)
    buf = bytearray(head + len(data))
    hdr = vfio_device_feature.from_buffer(buf)
    hdr.argsz = len(buf)
    hdr.flags = flags
    del hdr
    buf[head:] = data
    return buf


class vfio_device_feature_migration(ctypes.Structure):
    """``struct vfio_device_feature_migration { __aligned_u64 flags; }``
    (``VFIO_MIGRATION_STOP_COPY | _P2P | _PRE_COPY``)."""

    _fields_ = [("flags", c_uint64)]


VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2


class vfio_device_feature_mig_state(ctypes.Structure):
    """``struct vfio_device_feature_mig_state { __u32 device_state; __s32 data_fd; }``"""

    _fields_ = [("device_state", c_uint32), ("data_fd", c_int32)]


# enum vfio_device_mig_state
VFIO_DEVICE_STATE_ERROR = 0
VFIO_DEVICE_STATE_STOP = 1
VFIO_DEVICE_STATE_RUNNING = 2
VFIO_DEVICE_STATE_STOP_COPY = 3
VFIO_DEVICE_STATE_RESUMING = 4
VFIO_DEVICE_STATE_RUNNING_P2P = 5
VFIO_DEVICE_STATE_PRE_COPY = 6
VFIO_DEVICE_STATE_PRE_COPY_P2P = 7
VFIO_DEVICE_STATE_NR = 8

MIG_STATE_NAMES = {
    VFIO_DEVICE_STATE_ERROR: "ERROR", VFIO_DEVICE_STATE_STOP: "STOP",
    VFIO_DEVICE_STATE_RUNNING: "RUNNING", VFIO_DEVICE_STATE_STOP_COPY: "STOP_COPY",
    VFIO_DEVICE_STATE_RESUMING: "RESUMING", VFIO_DEVICE_STATE_RUNNING_P2P: "RUNNING_P2P",
    VFIO_DEVICE_STATE_PRE_COPY: "PRE_COPY", VFIO_DEVICE_STATE_PRE_COPY_P2P: "PRE_COPY_P2P",
}


class vfio_precopy_info(ctypes.Structure):
    """``struct vfio_precopy_info { argsz; flags; __aligned_u64 initial_bytes;
    __aligned_u64 dirty_bytes; }`` (6.2+, on the migration data fd)."""

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("initial_bytes", c_uint64),
                ("dirty_bytes", c_uint64)]


class vfio_device_low_power_entry_with_wakeup(ctypes.Structure):
    _fields_ = [("wakeup_eventfd", c_int32), ("reserved", c_uint32)]


class vfio_device_feature_dma_logging_control(ctypes.Structure):
    """::

        struct vfio_device_feature_dma_logging_control {
            __aligned_u64 page_size;
            __u32 num_ranges;
            __u32 __reserved;
            __aligned_u64 ranges;  /* user pointer to dma_logging_range[] */
        };
    """

    _fields_ = [("page_size", c_uint64), ("num_ranges", c_uint32), ("__reserved", c_uint32),
                ("ranges", c_uint64)]


class vfio_device_feature_dma_logging_range(ctypes.Structure):
    _fields_ = [("iova", c_uint64), ("length", c_uint64)]


class vfio_device_feature_dma_logging_report(ctypes.Structure):
    """``{ __aligned_u64 iova, length, page_size, bitmap /* user pointer */; }``"""

    _fields_ = [("iova", c_uint64), ("length", c_uint64), ("page_size", c_uint64),
                ("bitmap", c_uint64)]


class vfio_device_feature_mig_data_size(ctypes.Structure):
    _fields_ = [("stop_copy_length", c_uint64)]


class vfio_device_feature_bus_master(ctypes.Structure):
    _fields_ = [("op", c_uint32)]


VFIO_DEVICE_FEATURE_CLEAR_MASTER = 0
VFIO_DEVICE_FEATURE_SET_MASTER = 1


class vfio_region_dma_range(ctypes.Structure):
    _fields_ = [("offset", c_uint64), ("length", c_uint64)]


class vfio_device_feature_dma_buf(ctypes.Structure):
    """``{ __u32 region_index, open_flags, flags, nr_ranges;
    struct vfio_region_dma_range dma_ranges[]; }``"""

    _fields_ = [("region_index", c_uint32), ("open_flags", c_uint32), ("flags", c_uint32),
                ("nr_ranges", c_uint32)]


# --- structs: device cdev + iommufd (6.6+) ---------------------------------------------------

class vfio_device_bind_iommufd(ctypes.Structure):
    """::

        struct vfio_device_bind_iommufd {
            __u32 argsz;
            __u32 flags;            /* VFIO_DEVICE_BIND_FLAG_TOKEN */
            __s32 iommufd;
            __u32 out_devid;
            __aligned_u64 token_uuid_ptr;  /* newer kernels; older ones take argsz 16 */
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("iommufd", c_int32),
                ("out_devid", c_uint32), ("token_uuid_ptr", c_uint64)]


VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    """``struct vfio_device_attach_iommufd_pt { argsz; flags; __u32 pt_id; __u32 pasid; }``
    (``pasid`` since 6.12; older kernels accept argsz 12)."""

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("pt_id", c_uint32),
                ("pasid", c_uint32)]


VFIO_DEVICE_ATTACH_PASID = 1 << 0


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    """``struct vfio_device_detach_iommufd_pt { argsz; flags; __u32 pasid; }``"""

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("pasid", c_uint32)]


VFIO_DEVICE_DETACH_PASID = 1 << 0


# --- structs: type1 IOMMU --------------------------------------------------------------------

class vfio_iommu_type1_info(ctypes.Structure):
    """::

        struct vfio_iommu_type1_info {
            __u32 argsz;
            __u32 flags;                 /* VFIO_IOMMU_INFO_PGSIZES, _CAPS */
            __aligned_u64 iova_pgsizes;  /* Bitmap of supported page sizes */
            __u32 cap_offset;
            __u32 pad;
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("iova_pgsizes", c_uint64),
                ("cap_offset", c_uint32), ("pad", c_uint32)]


VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1

VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class vfio_iova_range(ctypes.Structure):
    """``struct vfio_iova_range { __u64 start; __u64 end; }`` — ``end`` is inclusive."""

    _fields_ = [("start", c_uint64), ("end", c_uint64)]


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    """``{ header; __u32 nr_iovas; __u32 reserved; struct vfio_iova_range iova_ranges[]; }``"""

    _fields_ = [("header", CapHeader), ("nr_iovas", c_uint32), ("reserved", c_uint32)]


class vfio_iommu_type1_info_cap_migration(ctypes.Structure):
    """``{ header; __u32 flags; __u64 pgsize_bitmap; __u64 max_dirty_bitmap_size; }``"""

    _fields_ = [("header", CapHeader), ("flags", c_uint32), ("pgsize_bitmap", c_uint64),
                ("max_dirty_bitmap_size", c_uint64)]


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):
    """``{ header; __u32 avail; }``: how many more DMA mappings the container
    accepts (the module's ``dma_entry_limit`` minus those in use)."""

    _fields_ = [("header", CapHeader), ("avail", c_uint32)]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    """::

        struct vfio_iommu_type1_dma_map {
            __u32 argsz;
            __u32 flags;   /* VFIO_DMA_MAP_FLAG_READ | _WRITE | _VADDR */
            __u64 vaddr;   /* Process virtual address */
            __u64 iova;    /* IO virtual address */
            __u64 size;    /* Size of mapping (bytes) */
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("vaddr", c_uint64),
                ("iova", c_uint64), ("size", c_uint64)]


VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2


class vfio_bitmap(ctypes.Structure):
    """``struct vfio_bitmap { __u64 pgsize; __u64 size; __u64 __user *data; }``"""

    _fields_ = [("pgsize", c_uint64), ("size", c_uint64), ("data", c_uint64)]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    """::

        struct vfio_iommu_type1_dma_unmap {
            __u32 argsz;
            __u32 flags;   /* _GET_DIRTY_BITMAP | _ALL | _VADDR */
            __u64 iova;
            __u64 size;    /* in: size to unmap; out: size unmapped */
            __u8  data[];
        };
    """

    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("iova", c_uint64),
                ("size", c_uint64)]


VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2


class vfio_iommu_type1_dirty_bitmap(ctypes.Structure):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]


VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0
VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1
VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2


class vfio_iommu_type1_dirty_bitmap_get(ctypes.Structure):
    _fields_ = [("iova", c_uint64), ("size", c_uint64), ("bitmap", vfio_bitmap)]


# Every struct above, for the layout test and for tools.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    name: obj for name, obj in dict(globals()).items()
    if name.startswith("vfio_") and isinstance(obj, type) and issubclass(obj, ctypes.Structure)
}

IOCTLS: dict[str, int] = {
    name: value for name, value in dict(globals()).items()
    if name.startswith("VFIO_") and isinstance(value, int) and 0x3B00 <= value <= 0x3BFF
}
"""Every ioctl request number above, by name (all are ``_IO(';', nr)``)."""

# Device-fd names win over the type1 names that share numbers 12..17 in error
# messages only when no op is given; callers in pyvfio always pass op.
register_names(IOCTLS, ("VFIO_",))
