"""The ctypes structs of :mod:`pyvfio.uapi.iommufd` and :mod:`pyvfio.uapi.vfio_cdev`
against the real kernel headers, field by field, through a compiled C probe.

The headers are the guest kernel's own: ``linux/iommufd.h``, ``linux/vfio.h``
and ``drivers/iommu/iommufd/iommufd_test.h`` (mock domains; not a uAPI header,
only in the source) from Debian's ``linux-source-6.12`` tarball, extracted
once into ``~/.cache/pyvfio/uapi-6.12`` and put ahead of the system headers
with ``CPATH`` (``__user`` stripped, as ``make headers_install`` does).  The
installed ``linux-libc-dev`` is 6.1 and has no ``iommufd.h`` at all.  Without
the tarball (the harness installs it to build the guest kernel) those tests
skip with that reason; the sizes and numbers the kernel checks are pinned
below regardless.

``IOMMU_IOAS_MAP_FILE`` is newer than 6.12 (Linux 6.13), so its layout is
checked against the struct as written in the upstream header (quoted below).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

from pyvfio.uapi import iommufd as U
from pyvfio.uapi import vfio_cdev as C

from .conftest import Layout, c_fields, enum_probe

IOMMUFD_STRUCTS: list[type[ctypes.Structure]] = [
    U.iommu_destroy, U.iommu_ioas_alloc, U.iommu_iova_range, U.iommu_ioas_iova_ranges,
    U.iommu_ioas_allow_iovas, U.iommu_ioas_map, U.iommu_ioas_copy, U.iommu_ioas_unmap,
    U.iommu_option, U.iommu_vfio_ioas, U.iommu_hwpt_alloc, U.iommu_hw_info_vtd,
    U.iommu_hw_info, U.iommu_hwpt_set_dirty_tracking, U.iommu_hwpt_get_dirty_bitmap,
]

IOMMUFD_MACROS = {
    "IOMMU_DESTROY": U.IOMMU_DESTROY,
    "IOMMU_IOAS_ALLOC": U.IOMMU_IOAS_ALLOC,
    "IOMMU_IOAS_ALLOW_IOVAS": U.IOMMU_IOAS_ALLOW_IOVAS,
    "IOMMU_IOAS_COPY": U.IOMMU_IOAS_COPY,
    "IOMMU_IOAS_IOVA_RANGES": U.IOMMU_IOAS_IOVA_RANGES,
    "IOMMU_IOAS_MAP": U.IOMMU_IOAS_MAP,
    "IOMMU_IOAS_MAP_FILE": U.IOMMU_IOAS_MAP_FILE,
    "IOMMU_IOAS_UNMAP": U.IOMMU_IOAS_UNMAP,
    "IOMMU_OPTION": U.IOMMU_OPTION,
    "IOMMU_VFIO_IOAS": U.IOMMU_VFIO_IOAS,
    "IOMMU_HWPT_ALLOC": U.IOMMU_HWPT_ALLOC,
    "IOMMU_GET_HW_INFO": U.IOMMU_GET_HW_INFO,
    "IOMMU_HWPT_SET_DIRTY_TRACKING": U.IOMMU_HWPT_SET_DIRTY_TRACKING,
    "IOMMU_HWPT_GET_DIRTY_BITMAP": U.IOMMU_HWPT_GET_DIRTY_BITMAP,
    "IOMMU_HWPT_INVALIDATE": U.IOMMU_HWPT_INVALIDATE,
    "IOMMU_FAULT_QUEUE_ALLOC": U.IOMMU_FAULT_QUEUE_ALLOC,
}

# Enum constants are not macros, so the probe prints them through an array of
# (name, value) pairs built in extra_source.
IOMMUFD_ENUMS = {
    "IOMMU_IOAS_MAP_FIXED_IOVA": U.IoasMapFlag.FIXED_IOVA,
    "IOMMU_IOAS_MAP_WRITEABLE": U.IoasMapFlag.WRITEABLE,
    "IOMMU_IOAS_MAP_READABLE": U.IoasMapFlag.READABLE,
    "IOMMU_OPTION_RLIMIT_MODE": U.OptionId.RLIMIT_MODE,
    "IOMMU_OPTION_HUGE_PAGES": U.OptionId.HUGE_PAGES,
    "IOMMU_OPTION_OP_SET": U.OptionOp.SET,
    "IOMMU_OPTION_OP_GET": U.OptionOp.GET,
    "IOMMU_VFIO_IOAS_GET": U.VfioIoasOp.GET,
    "IOMMU_VFIO_IOAS_SET": U.VfioIoasOp.SET,
    "IOMMU_VFIO_IOAS_CLEAR": U.VfioIoasOp.CLEAR,
    "IOMMU_HWPT_ALLOC_NEST_PARENT": U.HwptAllocFlag.NEST_PARENT,
    "IOMMU_HWPT_ALLOC_DIRTY_TRACKING": U.HwptAllocFlag.DIRTY_TRACKING,
    "IOMMU_HWPT_FAULT_ID_VALID": U.HwptAllocFlag.FAULT_ID_VALID,
    "IOMMU_HWPT_DATA_NONE": U.HwptDataType.NONE,
    "IOMMU_HWPT_DATA_VTD_S1": U.HwptDataType.VTD_S1,
    "IOMMU_HW_INFO_TYPE_NONE": U.HwInfoType.NONE,
    "IOMMU_HW_INFO_TYPE_INTEL_VTD": U.HwInfoType.INTEL_VTD,
    "IOMMU_HW_CAP_DIRTY_TRACKING": U.HwCapability.DIRTY_TRACKING,
    "IOMMU_HW_CAP_PCI_PASID_EXEC": U.HwCapability.PCI_PASID_EXEC,
    "IOMMU_HW_CAP_PCI_PASID_PRIV": U.HwCapability.PCI_PASID_PRIV,
    "IOMMU_HWPT_DIRTY_TRACKING_ENABLE": U.IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    "IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR": U.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
}


def _check_structs(layout: Layout, structs: list[type[ctypes.Structure]]) -> None:
    for struct in structs:
        name = struct.__name__
        assert ctypes.sizeof(struct) == layout.sizes[name], f"sizeof(struct {name})"
        for field, offset in c_fields(struct):
            assert offset == layout.offsets[name][field], f"offsetof(struct {name}, {field})"


def test_iommufd_structs_match_header(c_layout: Callable[..., Layout],
                                      headers_612: Path) -> None:
    layout = c_layout(["linux/iommufd.h"],
                      {s.__name__: [f for f, _ in c_fields(s)] for s in IOMMUFD_STRUCTS},
                      macros=list(IOMMUFD_MACROS),
                      extra_source=enum_probe(list(IOMMUFD_ENUMS)))
    _check_structs(layout, IOMMUFD_STRUCTS)
    # MAP_FILE is 6.13: absent from the 6.12 header, present in ours (for newer kernels).
    assert "IOMMU_IOAS_MAP_FILE" not in layout.macros
    assert {n: v for n, v in IOMMUFD_MACROS.items() if n != "IOMMU_IOAS_MAP_FILE"} == {
        n: layout.macros[n] for n in IOMMUFD_MACROS if n != "IOMMU_IOAS_MAP_FILE"}
    assert {n: int(v) for n, v in IOMMUFD_ENUMS.items()} == {
        n: layout.macros[n] for n in IOMMUFD_ENUMS}


def test_iommufd_struct_sizes_are_what_the_kernel_expects() -> None:
    """The sizes the 6.12 kernel's ``IOCTL_OP`` table accepts as "at least";
    the kernel refuses anything shorter with EINVAL, so these are pinned even
    without a header."""
    assert ctypes.sizeof(U.iommu_ioas_map) == 40
    assert ctypes.sizeof(U.iommu_ioas_unmap) == 24
    assert ctypes.sizeof(U.iommu_hwpt_alloc) == 48
    assert ctypes.sizeof(U.iommu_hw_info) == 40
    assert ctypes.sizeof(U.iommu_hwpt_get_dirty_bitmap) == 48
    assert U.IOMMU_DESTROY == 0x3B80
    assert U.IOMMU_IOAS_MAP == 0x3B85
    assert U.IOMMU_TEST_CMD == 0x3BA0
    assert C.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76


def test_map_file_layout() -> None:
    # Upstream include/uapi/linux/iommufd.h (6.13+), quoted:
    #   struct iommu_ioas_map_file {
    #       __u32 size; __u32 flags; __u32 ioas_id; __s32 fd;
    #       __aligned_u64 start; __aligned_u64 length; __aligned_u64 iova; };
    #   IOMMUFD_CMD_IOAS_MAP_FILE = 0x8f
    expected = {"size": 0, "flags": 4, "ioas_id": 8, "fd": 12, "start": 16, "length": 24,
                "iova": 32}
    assert dict(c_fields(U.iommu_ioas_map_file)) == expected
    assert ctypes.sizeof(U.iommu_ioas_map_file) == 40
    assert U.IOMMU_IOAS_MAP_FILE == 0x3B8F
    assert U.iommu_ioas_map_file.fd.size == 4


CDEV_STRUCTS: list[type[ctypes.Structure]] = [
    C.vfio_device_bind_iommufd, C.vfio_device_attach_iommufd_pt,
    C.vfio_device_detach_iommufd_pt,
]


def test_vfio_cdev_structs_match_header(c_layout: Callable[..., Layout],
                                        headers_612: Path) -> None:
    layout = c_layout(["linux/vfio.h"],
                      {s.__name__: [f for f, _ in c_fields(s)] for s in CDEV_STRUCTS},
                      macros=["VFIO_DEVICE_BIND_IOMMUFD", "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                              "VFIO_DEVICE_DETACH_IOMMUFD_PT", "VFIO_NOIOMMU_IOMMU"])
    _check_structs(layout, CDEV_STRUCTS)
    assert layout.macros == {
        "VFIO_DEVICE_BIND_IOMMUFD": C.VFIO_DEVICE_BIND_IOMMUFD,
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT": C.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        "VFIO_DEVICE_DETACH_IOMMUFD_PT": C.VFIO_DEVICE_DETACH_IOMMUFD_PT,
        "VFIO_NOIOMMU_IOMMU": C.VFIO_NOIOMMU_IOMMU,
    }


def test_iommu_test_cmd_matches_kernel_source(c_layout: Callable[..., Layout],
                                              headers_612: Path) -> None:
    fields = {
        "size": 0, "op": 0, "id": 0, "__reserved": 0, "last": 0,
        "mock_domain.out_stdev_id": 0, "mock_domain.out_hwpt_id": 0,
        "mock_domain.out_idev_id": 0, "mock_domain_flags.dev_flags": 0,
        "check_map.iova": 0, "check_map.length": 0, "check_map.uptr": 0,
        "dirty.flags": 0, "dirty.iova": 0, "dirty.length": 0, "dirty.page_size": 0,
        "dirty.uptr": 0, "dirty.out_nr_dirty": 0,
    }
    layout = c_layout(["linux/iommufd.h"], {"iommu_test_cmd": list(fields)},
                      macros=["IOMMU_TEST_CMD"],
                      extra_source="#include <iommufd_test.h>\n" + enum_probe(
                          [f"IOMMU_TEST_OP_{op.name}" for op in U.IommuTestOp]
                          + ["MOCK_APERTURE_START", "MOCK_APERTURE_LAST"]))
    cmd = U.iommu_test_cmd
    union = cmd.u.offset
    ours = {
        "size": cmd.size.offset, "op": cmd.op.offset, "id": cmd.id.offset,
        "__reserved": cmd.__reserved.offset, "last": cmd.last.offset,
        "mock_domain.out_stdev_id": union + U._test_mock_domain.out_stdev_id.offset,
        "mock_domain.out_hwpt_id": union + U._test_mock_domain.out_hwpt_id.offset,
        "mock_domain.out_idev_id": union + U._test_mock_domain.out_idev_id.offset,
        "mock_domain_flags.dev_flags": union + U._test_mock_domain.dev_flags.offset,
    }
    for sub in ("iova", "length", "uptr"):
        ours[f"check_map.{sub}"] = union + getattr(U._test_check_map, sub).offset
    for sub in ("flags", "iova", "length", "page_size", "uptr", "out_nr_dirty"):
        ours[f"dirty.{sub}"] = union + getattr(U._test_dirty, sub).offset
    assert ours == layout.offsets["iommu_test_cmd"]
    assert ctypes.sizeof(cmd) == layout.sizes["iommu_test_cmd"]
    assert layout.macros["IOMMU_TEST_CMD"] == U.IOMMU_TEST_CMD
    for op in U.IommuTestOp:
        assert layout.macros[f"IOMMU_TEST_OP_{op.name}"] == op, op.name
    assert layout.macros["MOCK_APERTURE_START"] == U.MOCK_APERTURE_START
    assert layout.macros["MOCK_APERTURE_LAST"] == U.MOCK_APERTURE_LAST
