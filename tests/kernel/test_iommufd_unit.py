"""The iommufd backend where no kernel is needed: finding cdevs in sysfs, the
errors for a kernel or device without iommufd, fds that are not iommufds,
argument checks, HW info decoding, and how errno becomes an error that says
what to do.  Everything that talks to /dev/iommu is tested against the real
6.12 kernel in ``tests/guest/test_iommufd*.py``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

import pytest

from pyvfio.device import SharedMemory
from pyvfio.errors import (
    ClosedError,
    DeviceNotFound,
    IovaRangeError,
    KernelError,
    MemlockLimitError,
    NotBoundToVfio,
    UsageError,
)
from pyvfio.kernel import iommufd as I
from pyvfio.testing.fds import fd_targets
from pyvfio.uapi import iommufd as U

BDF = "0000:00:03.0"
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def make_device(root: Path, bdf: str = BDF, *, driver: str | None = "vfio-pci",
                cdev: str | None = "vfio0", bus: str = "pci") -> Path:
    base = root / "sys/bus" / bus / "devices" / bdf
    base.mkdir(parents=True)
    if driver is not None:
        drv = root / "sys/bus" / bus / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        (base / "driver").symlink_to(drv)
    if cdev is not None:
        (base / "vfio-dev" / cdev).mkdir(parents=True)
        node = root / "dev/vfio/devices" / cdev
        node.parent.mkdir(parents=True, exist_ok=True)
        node.touch()
    return base


# --- finding the cdev ------------------------------------------------------------------------


def test_cdev_found_through_sysfs(tmp_path: Path) -> None:
    make_device(tmp_path, cdev="vfio3")
    info = I.cdev_for(BDF, str(tmp_path))
    assert info.name == "vfio3"
    assert info.path == str(tmp_path / "dev/vfio/devices/vfio3")


def test_cdev_of_an_mdev_by_uuid(tmp_path: Path) -> None:
    make_device(tmp_path, UUID, driver="mtty", cdev="vfio1", bus="mdev")
    assert I.cdev_for(UUID.upper(), str(tmp_path)).path == str(tmp_path / "dev/vfio/devices/vfio1")


def test_cdev_missing_device(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFound, match=r"no device 0000:00:03\.0"):
        I.cdev_for(BDF, str(tmp_path))


def test_cdev_device_on_a_host_driver(tmp_path: Path) -> None:
    make_device(tmp_path, driver="e1000", cdev=None)
    with pytest.raises(NotBoundToVfio, match="bound to e1000, not a vfio driver") as exc:
        I.cdev_for(BDF, str(tmp_path))
    assert exc.value.problems[0]["driver"] == "e1000"


def test_cdev_vfio_driver_but_kernel_without_cdevs(tmp_path: Path) -> None:
    make_device(tmp_path, driver="vfio-pci", cdev=None)
    with pytest.raises(I.IommufdUnavailable, match="CONFIG_VFIO_DEVICE_CDEV"):
        I.cdev_for(BDF, str(tmp_path))


@pytest.mark.parametrize("name", ["00:03.0x", "", "../../etc", "0000:00:03.8", "not-a-uuid"])
def test_cdev_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError):
        I.cdev_for(name, str(tmp_path))


# --- /dev/iommu ------------------------------------------------------------------------------


def test_open_without_dev_iommu_explains(tmp_path: Path) -> None:
    with pytest.raises(I.IommufdUnavailable, match="CONFIG_IOMMUFD"):
        I.Iommufd.open(str(tmp_path))


def test_open_cdev_device_without_iommufd_leaves_nothing_open(tmp_path: Path) -> None:
    make_device(tmp_path)
    before = fd_targets()
    with pytest.raises(I.IommufdUnavailable):
        I.open_cdev_device(BDF, str(tmp_path))
    assert fd_targets() == before


def test_from_fd_refuses_what_is_not_an_iommufd() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(UsageError, match=f"fd {r} is not an iommufd.*ENOTTY"):
            I.Iommufd.from_fd(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("fd", [-1, "3", None])
def test_from_fd_refuses_non_fds(fd: object) -> None:
    with pytest.raises(UsageError):
        I.Iommufd.from_fd(fd)  # type: ignore[arg-type]


def test_device_from_fds_checks_the_iommufd_first() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(UsageError, match="not an iommufd"):
            I.device_from_fds(r, w, "passed-in")
        os.fstat(w)  # on failure a handed-in device fd stays open: still the caller's
    finally:
        os.close(r)
        os.close(w)


def test_closed_iommufd_and_ioas() -> None:
    ifd = I.Iommufd(-1, owned=False)
    with pytest.raises(ClosedError):
        ifd.fileno()
    r, w = os.pipe()
    ifd = I.Iommufd(r)
    ioas = I.Ioas(ifd, 1, owned=False)
    ioas.close()
    with pytest.raises(ClosedError, match="IOAS 1 is destroyed"):
        ioas.unmap(0x1000, 0x1000)
    ifd.close()
    ifd.close()  # idempotent
    os.close(w)
    with pytest.raises(OSError):
        os.fstat(r)  # owned: closed with the object


# --- argument checks before any ioctl ------------------------------------------------------


def test_map_outside_the_memory_is_a_usage_error() -> None:
    ioas = I.Ioas(I.Iommufd(-1, owned=False), 1, owned=False)
    mem = SharedMemory(8192)
    try:
        with pytest.raises(UsageError, match="outside the 0x2000-byte memory"):
            ioas.map(0x100000, mem, offset=4096, size=8192)
    finally:
        mem.close()


def test_map_fast_path_reports_errors_and_respects_close() -> None:
    """A pipe stands in for /dev/iommu: every ioctl fails with ENOTTY.  The
    repeat of a call (the fast path) must report it like the first call, and
    after close() even a primed repeat is refused before any ioctl."""
    r, w = os.pipe()
    mem = SharedMemory(4096)
    try:
        ioas = I.Ioas(I.Iommufd(r, owned=False), 1, owned=False)
        for _ in range(2):
            with pytest.raises(KernelError) as exc:
                ioas.map(0x100000, mem)
            assert exc.value.errno == errno.ENOTTY and exc.value.op == "IOMMU_IOAS_MAP"
            with pytest.raises(KernelError) as exc:
                ioas.unmap(0x100000, 4096)
            assert exc.value.errno == errno.ENOTTY and exc.value.op == "IOMMU_IOAS_UNMAP"
        # Closing the memory makes the primed fast path forget it: its stale
        # address must never reach the kernel again.
        other = SharedMemory(4096)
        with pytest.raises(KernelError):
            ioas.map(0x200000, other)
        assert ioas._last_memory is other
        other.close()
        assert ioas._last_memory is None
        with pytest.raises(ClosedError, match="closed memory"):
            ioas.map(0x200000, other)
        ioas.close()
        with pytest.raises(ClosedError, match="IOAS 1 is destroyed"):
            ioas.map(0x100000, mem)
        with pytest.raises(ClosedError, match="IOAS 1 is destroyed"):
            ioas.unmap(0x100000, 4096)
    finally:
        mem.close()
        os.close(r)
        os.close(w)


def test_allow_iovas_rejects_backwards_ranges() -> None:
    ioas = I.Ioas(I.Iommufd(-1, owned=False), 1, owned=False)
    with pytest.raises(UsageError, match="ends before it starts"):
        ioas.allow_iovas([(0x2000, 0x1000)])


@pytest.mark.parametrize(("iova", "length", "page"), [(0x800, 0x1000, 0x1000),
                                                      (0, 0x1800, 0x1000), (0, 0x3000, 0x3000)])
def test_dirty_bitmap_alignment(iova: int, length: int, page: int) -> None:
    hwpt = I.Hwpt(I.Iommufd(-1, owned=False), 5, owned=False)
    with pytest.raises(UsageError, match="power-of-two page size"):
        hwpt.dirty_bitmap(iova, length, page)


def test_bitmap_layout_is_the_kernels() -> None:
    """Bit n of u64 word n // 64 is page n, as the kernel's test_bit reads it."""
    words = I._bitmap(130, [0, 63, 64, 129])
    assert list(words) == [1 | 1 << 63, 1, 1 << 1]
    with pytest.raises(UsageError):
        I._bitmap(8, [8])


# --- decoding --------------------------------------------------------------------------------


def test_hw_info_vtd_decoding() -> None:
    data = struct.pack("<IIQQ", 0, 0, 0x00D2008C40660462, 0x0000000000F0101A)
    info = I.HwInfo(type=U.HwInfoType.INTEL_VTD, capabilities=U.HwCapability(0),
                    max_pasid_log2=0, data=data)
    assert info.type_name == "INTEL_VTD"
    assert not info.dirty_tracking
    vtd = info.vtd
    assert vtd is not None and vtd.cap_reg == 0x00D2008C40660462
    assert info.as_dict()["vtd"]["ecap_reg"] == "0xf0101a"


def test_hw_info_other_types() -> None:
    info = I.HwInfo(type=U.HwInfoType.SELFTEST, capabilities=U.HwCapability.DIRTY_TRACKING,
                    max_pasid_log2=20, data=struct.pack("<II", 0, 0xDEADBEEF))
    assert info.type_name == "SELFTEST"
    assert info.dirty_tracking
    assert info.vtd is None
    assert I.HwInfo(type=0x1234, capabilities=U.HwCapability(0), max_pasid_log2=0,
                    data=b"").type_name == "0x1234"


# --- errno -> meaning ------------------------------------------------------------------------


def test_enomem_on_map_names_the_memlock_limit() -> None:
    ioas = I.Ioas(I.Iommufd(-1, owned=False), 7, owned=False)
    err = ioas._map_error(KernelError(errno.ENOMEM, "IOMMU_IOAS_MAP", "IOAS 7"),
                          "IOMMU_IOAS_MAP", 0x10000, 0x1000)
    assert isinstance(err, MemlockLimitError)
    assert err.errno == errno.ENOMEM
    assert "RLIMIT_MEMLOCK" in str(err) and "IOAS 7" in str(err)


def test_eexist_on_map_is_an_iova_error() -> None:
    ioas = I.Ioas(I.Iommufd(-1, owned=False), 7, owned=False)
    err = ioas._map_error(KernelError(errno.EEXIST, "IOMMU_IOAS_MAP", "IOAS 7"),
                          "IOMMU_IOAS_MAP", 0x10000, 0x1000)
    assert isinstance(err, IovaRangeError)
    assert "0x10000+0x1000 is already mapped" in str(err)


def test_fixed_maps_and_unmaps_reuse_prebuilt_structs() -> None:
    """The hot path builds no ctypes objects after the first call (measured in
    benchmarks/iommufd_bench.py).  A pipe stands in for /dev/iommu: the ioctl
    fails with ENOTTY, after the struct was built and cached."""
    r, w = os.pipe()
    ioas = I.Ioas(I.Iommufd(r), 9, owned=False)
    mem = SharedMemory(4096)
    try:
        for _ in range(2):
            with pytest.raises(KernelError, match="IOMMU_IOAS_MAP on IOAS 9") as exc:
                ioas.map(0x100000, mem)
            assert exc.value.errno == errno.ENOTTY
            with pytest.raises(KernelError, match="IOMMU_IOAS_UNMAP on IOAS 9"):
                ioas.unmap(0x100000, 4096)
        (arg,) = ioas._fixed_maps.values()
        assert (arg.size, arg.ioas_id, arg.user_va, arg.length, arg.iova, arg.flags) == (
            ctypes.sizeof(U.iommu_ioas_map), 9, mem.address, 4096, 0x100000, 7)
        (unmap,) = ioas._unmap_cache.values()
        assert (unmap.ioas_id, unmap.iova, unmap.length) == (9, 0x100000, 4096)
        with pytest.raises(KernelError):
            ioas.map_user(mem.address, 4096, readable=True, writable=False)  # kernel-chosen
        assert len(ioas._map_cache) == 0  # kernel-chosen IOVAs: a new struct each time
        with pytest.raises(KernelError):
            ioas.map_user(mem.address, 4096, 0x200000)
        assert len(ioas._map_cache) == 1
    finally:
        mem.close()
        ioas.iommufd.close()
        os.close(w)
    with pytest.raises(ClosedError):
        ioas.unmap(0x100000, 4096)


def test_noiommu_is_told_by_the_group_node_not_the_group_name(tmp_path: Path) -> None:
    """Emulated (mdev) groups are also named "vfio-noiommu" in sysfs; only a
    real no-IOMMU group has a ``/dev/vfio/noiommu-N`` node."""
    for bdf, group, node in ((BDF, "7", "noiommu-7"), ("0000:00:04.0", "8", "8")):
        base = make_device(tmp_path, bdf)
        groups = tmp_path / "sys/kernel/iommu_groups" / group
        groups.mkdir(parents=True)
        (groups / "name").write_text("vfio-noiommu\n")
        (base / "iommu_group").symlink_to(groups)
        (tmp_path / "dev/vfio" / node).touch()
    assert I.is_noiommu(BDF, str(tmp_path))
    assert not I.is_noiommu("0000:00:04.0", str(tmp_path))
    make_device(tmp_path, UUID, driver="mtty", cdev="vfio9", bus="mdev")
    assert not I.is_noiommu(UUID, str(tmp_path))


def test_noiommu_device_has_no_cdev(tmp_path: Path) -> None:
    base = make_device(tmp_path, cdev="vfio2")  # vfio-dev/vfio2 but no "dev" attribute
    groups = tmp_path / "sys/kernel/iommu_groups/3"
    groups.mkdir(parents=True)
    (base / "iommu_group").symlink_to(groups)
    (tmp_path / "dev/vfio/noiommu-3").touch()
    with pytest.raises(I.IommufdUnavailable, match="no-IOMMU mode, where vfio gives devices no cdev"):
        I.cdev_for(BDF, str(tmp_path))
    (base / "vfio-dev/vfio2/dev").write_text("511:2\n")  # a kernel that does make one
    assert I.cdev_for(BDF, str(tmp_path)).name == "vfio2"
