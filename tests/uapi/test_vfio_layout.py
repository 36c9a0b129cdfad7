"""``pyvfio.uapi.vfio`` against the kernel's ``linux/vfio.h``.

Every struct's size and every field's offset is compared with what gcc says
for the installed header.  Structs newer than the installed header (Debian
12 ships 6.1 headers) are compared with their definitions copied verbatim
from upstream ``include/uapi/linux/vfio.h`` (below), compiled the same way.
"""

from __future__ import annotations

import ctypes
import re

import pytest

from pyvfio.device import DeviceFlag, IrqAction, IrqFlag, IrqIndex, RegionFlag, RegionIndex
from pyvfio.migration import MigFlag, MigState
from pyvfio.uapi import ioctl as uioctl
from pyvfio.uapi import vfio

from .conftest import c_fields, enum_probe, header_enum_members, header_text

# Upstream definitions (torvalds/linux include/uapi/linux/vfio.h) of structs
# added or extended after 6.1; compiled for those the installed header lacks
# (under their own name) or has in an older form (renamed upstream_<name>).
UPSTREAM_DEFINITIONS = {
    "vfio_device_info": """
struct vfio_device_info {
	__u32	argsz;
	__u32	flags;
	__u32	num_regions;	/* Max region index + 1 */
	__u32	num_irqs;	/* Max IRQ index + 1 */
	__u32   cap_offset;	/* Offset within info struct of first cap */
	__u32   pad;
};""",
    "vfio_pci_dependent_device": """
struct vfio_pci_dependent_device {
	union {
		__u32   group_id;
		__u32	devid;
	};
	__u16	segment;
	__u8	bus;
	__u8	devfn; /* Use PCI_SLOT/PCI_FUNC */
};""",
    "vfio_device_gfx_plane_info": """
struct vfio_device_gfx_plane_info {
	__u32 argsz;
	__u32 flags;
	__u32 drm_plane_type;
	__u32 drm_format;
	__aligned_u64 drm_format_mod;
	__u32 width;
	__u32 height;
	__u32 stride;
	__u32 size;
	__u32 x_pos;
	__u32 y_pos;
	__u32 x_hot;
	__u32 y_hot;
	union {
		__u32 region_index;
		__u32 dmabuf_id;
	};
	__u32 reserved;
};""",
    "vfio_device_ioeventfd": """
struct vfio_device_ioeventfd {
	__u32	argsz;
	__u32	flags;
	__aligned_u64	offset;
	__aligned_u64	data;
	__s32	fd;
	__u32	reserved;
};""",
    "vfio_iommu_type1_info": """
struct vfio_iommu_type1_info {
	__u32	argsz;
	__u32	flags;
	__aligned_u64	iova_pgsizes;
	__u32   cap_offset;
	__u32   pad;
};""",
    "vfio_device_info_cap_pci_atomic_comp": """
struct vfio_device_info_cap_pci_atomic_comp {
	struct vfio_info_cap_header header;
	__u32 flags;
	__u32 reserved;
};""",
    "vfio_precopy_info": """
struct vfio_precopy_info {
	__u32 argsz;
	__u32 flags;
	__aligned_u64 initial_bytes;
	__aligned_u64 dirty_bytes;
};""",
    "vfio_device_feature_mig_data_size": """
struct vfio_device_feature_mig_data_size {
	__aligned_u64 stop_copy_length;
};""",
    "vfio_device_feature_bus_master": """
struct vfio_device_feature_bus_master {
	__u32 op;
};""",
    "vfio_region_dma_range": """
struct vfio_region_dma_range {
	__u64 offset;
	__u64 length;
};""",
    "vfio_device_feature_dma_buf": """
struct vfio_device_feature_dma_buf {
	__u32	region_index;
	__u32	open_flags;
	__u32   flags;
	__u32   nr_ranges;
	struct vfio_region_dma_range dma_ranges[];
};""",
    "vfio_device_bind_iommufd": """
struct vfio_device_bind_iommufd {
	__u32		argsz;
	__u32		flags;
	__s32		iommufd;
	__u32		out_devid;
	__aligned_u64	token_uuid_ptr;
};""",
    "vfio_device_attach_iommufd_pt": """
struct vfio_device_attach_iommufd_pt {
	__u32	argsz;
	__u32	flags;
	__u32	pt_id;
	__u32	pasid;
};""",
    "vfio_device_detach_iommufd_pt": """
struct vfio_device_detach_iommufd_pt {
	__u32	argsz;
	__u32	flags;
	__u32	pasid;
};""",
}

# Upstream ioctl numbers newer than the 6.1 header, as the header computes them.
UPSTREAM_IOCTLS = {
    "VFIO_DEVICE_BIND_IOMMUFD": 100 + 18,
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": 100 + 19,
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": 100 + 20,
    "VFIO_MIG_GET_PRECOPY_INFO": 100 + 21,
}


@pytest.fixture(scope="module")
def installed_header() -> str:
    text = header_text("linux/vfio.h")
    if text is None:
        pytest.skip("/usr/include/linux/vfio.h is missing: install linux-libc-dev "
                    "(scripts/setup does)")
    return text


def test_api_version_number_is_pinned() -> None:
    # rust-vmm's vfio-bindings pins the same value.
    assert vfio.VFIO_GET_API_VERSION == 0x3B64 == 15204
    assert vfio.VFIO_CHECK_EXTENSION == 0x3B65
    assert vfio.VFIO_GROUP_GET_STATUS == 0x3B67
    assert vfio.VFIO_DEVICE_GET_REGION_INFO == 0x3B6C
    assert vfio.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert vfio.VFIO_IOMMU_MAP_DMA == 0x3B71
    assert vfio.VFIO_IOMMU_UNMAP_DMA == 0x3B72
    assert vfio.VFIO_DEVICE_FEATURE == 0x3B75
    assert vfio.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76


def test_ioc_encoding_matches_asm_generic() -> None:
    # _IOWR('V', 0, 16-byte struct) from videodev2.h: VIDIOC_QUERYCAP is _IOR('V', 0, 104).
    assert uioctl._IOR("V", 0, 104) == 0x80685600
    assert uioctl._IOW("V", 2, 4) == 0x40045602
    assert uioctl._IOWR("V", 4, 88) == 0xC0585604


def _struct_body(header: str, name: str) -> str | None:
    m = re.search(rf"\bstruct\s+{re.escape(name)}\s*\{{(.*?)\n\}};", header, re.S)
    return m.group(1) if m else None


def test_struct_layouts_match_headers(installed_header: str, c_layout) -> None:
    """Installed header first; upstream text for what it lacks or has older."""
    structs: dict[str, list[str]] = {}
    extra: list[str] = []
    checks: list[tuple[str, str, list[str], bool]] = []  # (ours, C name, fields, full)
    from_upstream = []
    for name, cls in vfio.STRUCTS.items():
        fields = [f for f, _ in c_fields(cls)]
        body = _struct_body(installed_header, name)
        present = [f for f in fields if body is not None and re.search(rf"\b{f}\b", body)]
        if body is not None:
            structs[name] = present
            checks.append((name, name, present, present == fields))
        if body is None or present != fields:
            assert name in UPSTREAM_DEFINITIONS, (
                f"struct {name}: fields {sorted(set(fields) - set(present))} are in neither "
                "the installed header nor the upstream copy")
            cname = name if body is None else f"upstream_{name}"
            extra.append(UPSTREAM_DEFINITIONS[name].replace(f"struct {name} {{",
                                                            f"struct {cname} {{"))
            structs[cname] = fields
            checks.append((name, cname, fields, True))
            from_upstream.append(name)
    layout = c_layout(["linux/vfio.h"], structs, extra_source="\n".join(extra))
    mismatches = []
    for name, cname, fields, full in checks:
        cls = vfio.STRUCTS[name]
        ours = dict(c_fields(cls))
        size = ctypes.sizeof(cls)
        if full and layout.sizes[cname] != size:
            mismatches.append(f"sizeof(struct {cname}): C {layout.sizes[cname]}, ctypes {size}")
        if not full and layout.sizes[cname] > size:  # an older, shorter form is fine (argsz)
            mismatches.append(f"struct {cname} is larger in the installed header")
        for fname in fields:
            if layout.offsets[cname][fname] != ours[fname]:
                mismatches.append(f"offsetof({cname}, {fname}): C "
                                  f"{layout.offsets[cname][fname]}, ctypes {ours[fname]}")
    assert not mismatches, "\n".join(mismatches)
    # The core of the legacy API must be checked against the real header.
    for core in ("vfio_region_info", "vfio_irq_set", "vfio_iommu_type1_dma_map",
                 "vfio_iommu_type1_info_cap_iova_range", "vfio_region_info_cap_sparse_mmap",
                 "vfio_device_feature_dma_logging_control", "vfio_device_feature_mig_state"):
        assert core not in from_upstream
    print("checked against upstream text:", from_upstream)


def test_ioctl_numbers_match_header(installed_header: str, c_layout) -> None:
    layout = c_layout(["linux/vfio.h"], {}, macros=list(vfio.IOCTLS))
    assert len(layout.macros) >= 20, "the probe saw too few VFIO ioctl macros"
    for name, value in layout.macros.items():
        assert vfio.IOCTLS[name] == value, name
    for name in set(vfio.IOCTLS) - set(layout.macros):
        assert name in UPSTREAM_IOCTLS, f"{name} is missing from the installed header"
        assert vfio.IOCTLS[name] == 0x3B00 | UPSTREAM_IOCTLS[name]


# Constants of pyvfio.uapi.vfio that the installed header may lack (Debian 12's
# linux-libc-dev is 6.1).  Each is compared with the 6.12 kernel's header instead
# (test_every_constant_matches_the_612_header); any other constant the installed
# header does not define fails test_every_constant_matches_the_installed_header.
NEWER_THAN_6_1 = {
    "VFIO_DEVICE_STATE_PRE_COPY", "VFIO_DEVICE_STATE_PRE_COPY_P2P", "VFIO_DEVICE_STATE_NR",
    "VFIO_MIGRATION_PRE_COPY", "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
    "VFIO_DEVICE_FEATURE_BUS_MASTER", "VFIO_DEVICE_FEATURE_CLEAR_MASTER",
    "VFIO_DEVICE_FEATURE_SET_MASTER", "VFIO_DEVICE_FLAGS_CDX",
    "VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP", "VFIO_PCI_ATOMIC_COMP32", "VFIO_PCI_ATOMIC_COMP64",
    "VFIO_PCI_ATOMIC_COMP128", "VFIO_PCI_DEVID_OWNED", "VFIO_PCI_DEVID_NOT_OWNED",
    "VFIO_PCI_HOT_RESET_FLAG_DEV_ID", "VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED",
}

# Dropped upstream after 6.12 (renamed __VFIO_RESERVED_TYPE1_NESTING_IOMMU); a newer
# installed header lacks it, and the 6.12 test still compares it.
REMOVED_AFTER_6_12 = {"VFIO_TYPE1_NESTING_IOMMU"}

# Newer than 6.12 as well: the upstream lines (torvalds/linux
# include/uapi/linux/vfio.h), compiled the same way as the headers.
UPSTREAM_CONSTANTS = {
    "VFIO_DEVICE_BIND_FLAG_TOKEN": "#define VFIO_DEVICE_BIND_FLAG_TOKEN (1 << 0)",
    "VFIO_DEVICE_ATTACH_PASID": "#define VFIO_DEVICE_ATTACH_PASID\t(1 << 0)",
    "VFIO_DEVICE_DETACH_PASID": "#define VFIO_DEVICE_DETACH_PASID\t(1 << 0)",
    "VFIO_DEVICE_FEATURE_DMA_BUF": "#define VFIO_DEVICE_FEATURE_DMA_BUF 11",
}


def uapi_constants() -> dict[str, int]:
    """Every ``VFIO_*`` integer of :mod:`pyvfio.uapi.vfio` that is not an ioctl number."""
    return {n: v for n, v in vars(vfio).items()
            if n.startswith("VFIO_") and isinstance(v, int) and n not in vfio.IOCTLS}


def probe_constants(c_layout, header: str, names: set[str]) -> dict[str, int]:
    """The header's value of each name it defines, as a macro or an enum member."""
    enums = sorted(names & header_enum_members(header))
    macros = sorted(names - set(enums))
    return c_layout(["linux/vfio.h"], {}, macros=macros, extra_source=enum_probe(enums)).macros


def _mismatches(seen: dict[str, int], ours: dict[str, int]) -> dict[str, tuple[int, int]]:
    # C's (1 << 31) is a negative int; compare as the __u32 the kernel uses.
    return {n: (seen[n], ours[n]) for n in seen if seen[n] & 0xFFFFFFFF != ours[n] & 0xFFFFFFFF}


def test_every_constant_matches_the_installed_header(installed_header: str, c_layout) -> None:
    ours = uapi_constants()
    seen = probe_constants(c_layout, installed_header, set(ours))
    assert not _mismatches(seen, ours)
    # enum members (region and IRQ indexes, migration states) are compared too
    assert {"VFIO_PCI_CONFIG_REGION_INDEX", "VFIO_PCI_MSIX_IRQ_INDEX",
            "VFIO_DEVICE_STATE_STOP_COPY"} <= set(seen)
    newer = NEWER_THAN_6_1 | set(UPSTREAM_CONSTANTS) | REMOVED_AFTER_6_12
    unchecked = set(ours) - set(seen)
    assert unchecked <= newer, (
        f"not in the installed header and not listed as newer: {sorted(unchecked - newer)}")


def test_every_constant_matches_the_612_header(c_layout, headers_612) -> None:
    """What the installed header lacks is in 6.12's, with the same value; what
    6.12 lacks too is compared with the upstream line."""
    header = (headers_612 / "linux" / "vfio.h").read_text()
    ours = uapi_constants()
    seen = probe_constants(c_layout, header, set(ours))
    assert not _mismatches(seen, ours)
    assert set(seen) >= NEWER_THAN_6_1, sorted(NEWER_THAN_6_1 - set(seen))
    assert set(ours) - set(seen) == set(UPSTREAM_CONSTANTS)


def test_constants_newer_than_612_match_upstream(c_layout) -> None:
    ours = uapi_constants()
    layout = c_layout(["linux/types.h"], {}, macros=sorted(UPSTREAM_CONSTANTS),
                      extra_source="\n".join(UPSTREAM_CONSTANTS.values()))
    assert layout.macros == {n: ours[n] for n in UPSTREAM_CONSTANTS}


def test_python_enums_are_the_uapi_constants() -> None:
    """The enums the rest of pyvfio uses (pyvfio.device, pyvfio.migration)
    carry the numbers of the uapi constants, which the tests above check
    against the kernel's headers."""
    c = uapi_constants()

    def mirror(enum_cls, name) -> dict[str, int]:
        return {m.name: int(m) for m in enum_cls}, {m.name: c[name(m.name)] for m in enum_cls}

    pairs = [
        mirror(MigState, lambda n: f"VFIO_DEVICE_STATE_{n}"),
        mirror(MigFlag, lambda n: f"VFIO_MIGRATION_{n}"),
        mirror(DeviceFlag, lambda n: f"VFIO_DEVICE_FLAGS_{n}"),
        mirror(RegionFlag, lambda n: f"VFIO_REGION_INFO_FLAG_{n}"),
        mirror(RegionIndex, lambda n: f"VFIO_PCI_{n}_REGION_INDEX"),
        mirror(IrqFlag, lambda n: f"VFIO_IRQ_INFO_{n}"),
        mirror(IrqIndex, lambda n: f"VFIO_PCI_{n}_IRQ_INDEX"),
        mirror(IrqAction, lambda n: f"VFIO_IRQ_SET_{n}"),
    ]
    for ours, kernel in pairs:
        assert ours == kernel
    # every state of enum vfio_device_mig_state has a MigState
    assert len(MigState) == c["VFIO_DEVICE_STATE_NR"]


def test_irq_set_buffer_argsz_covers_data() -> None:
    import struct

    buf = vfio.irq_set_buffer(vfio.VFIO_IRQ_SET_DATA_EVENTFD | vfio.VFIO_IRQ_SET_ACTION_TRIGGER,
                              vfio.VFIO_PCI_MSIX_IRQ_INDEX, 0, 2, struct.pack("<ii", 7, 8))
    argsz, flags, index, start, count, fd0, fd1 = struct.unpack("<IIIIIii", buf)
    assert (argsz, flags, index, start, count, fd0, fd1) == (28, 0x24, 2, 0, 2, 7, 8)


def test_iter_caps_follows_chain_and_stops_on_cycles() -> None:
    import struct

    buf = bytearray(64)
    struct.pack_into("<HHI", buf, 32, 1, 1, 48)   # id 1 -> next 48
    struct.pack_into("<HHI", buf, 48, 2, 1, 32)   # id 2 -> back to 32: a cycle
    assert [c[0] for c in uioctl.iter_caps(buf, 32, min_offset=32)] == [1, 2]
    # A pointer into the fixed part or past the end ends the walk.
    struct.pack_into("<HHI", buf, 48, 2, 1, 8)
    assert [c[0] for c in uioctl.iter_caps(buf, 32, min_offset=32)] == [1, 2]
    assert list(uioctl.iter_caps(buf, 60, min_offset=32)) == []
    assert list(uioctl.iter_caps(buf, 0)) == []


def test_ioctl_error_keeps_errno_and_names_the_ioctl() -> None:
    import errno
    import os

    from pyvfio.errors import KernelError

    r, w = os.pipe()
    try:
        with pytest.raises(KernelError) as exc:
            uioctl.ioctl(r, vfio.VFIO_GET_API_VERSION, 0, target="container")
        assert exc.value.errno in (errno.ENOTTY, errno.EINVAL)
        assert str(exc.value).startswith("VFIO_GET_API_VERSION on container: [Errno ")
        with pytest.raises(TypeError):
            uioctl.ioctl(r, vfio.VFIO_GET_API_VERSION, b"x")
    finally:
        os.close(r)
        os.close(w)
