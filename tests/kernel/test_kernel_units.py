"""Host-side tests of the kernel backend's pure parts: capability-chain
decoding against hostile lengths, backend choice on a fake root, BDF
parsing, group blockers.  Everything that talks to the kernel is tested in
tests/guest/test_kernel_*.py on a real one."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest

from pyvfio.device import SparseArea
from pyvfio.errors import UsageError
from pyvfio.kernel import _sysfs, choose_backend, open_device
from pyvfio.kernel.device import decode_region_caps
from pyvfio.uapi import vfio as V

FIXED = ctypes.sizeof(V.vfio_region_info)


def _sparse_cap(offset: int, areas: list[tuple[int, int]], nr: int | None = None,
                nxt: int = 0) -> bytes:
    head = struct.pack("<HHIII", V.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, nxt,
                       len(areas) if nr is None else nr, 0)
    return head + b"".join(struct.pack("<QQ", o, s) for o, s in areas)


def test_sparse_and_type_caps_decode() -> None:
    buf = bytearray(FIXED)
    sparse = _sparse_cap(FIXED, [(0, 0x1000), (0x3000, 0x1000)], nxt=FIXED + 48)
    buf += sparse
    buf += struct.pack("<HHIII", V.VFIO_REGION_INFO_CAP_TYPE, 1, 0, 0x80008086, 1)
    areas, rtype = decode_region_caps(buf, FIXED, 0x4000)
    assert areas == (SparseArea(0, 0x1000), SparseArea(0x3000, 0x1000))
    assert rtype == (0x80008086, 1)


def test_sparse_cap_with_lying_count_is_bounded() -> None:
    buf = bytearray(FIXED) + _sparse_cap(FIXED, [(0, 0x1000)], nr=1_000_000)
    areas, _ = decode_region_caps(buf, FIXED, 0x4000)
    assert areas == (SparseArea(0, 0x1000),)


def test_sparse_area_outside_the_region_is_dropped() -> None:
    buf = bytearray(FIXED) + _sparse_cap(FIXED, [(0, 0x1000), (0x3000, 0x2000)])
    areas, _ = decode_region_caps(buf, FIXED, 0x4000)
    assert areas == (SparseArea(0, 0x1000),)


def test_zero_sparse_areas_means_no_mmap() -> None:
    buf = bytearray(FIXED) + _sparse_cap(FIXED, [])
    areas, _ = decode_region_caps(buf, FIXED, 0x4000)
    assert areas == ()


def test_chain_pointing_into_the_fixed_part_stops() -> None:
    buf = bytearray(FIXED) + _sparse_cap(FIXED, [(0, 0x1000)], nxt=4)
    areas, rtype = decode_region_caps(buf, FIXED, 0x4000)
    assert areas == (SparseArea(0, 0x1000),) and rtype is None


@pytest.mark.parametrize(("text", "bdf"), [("00:03.0", "0000:00:03.0"),
                                           ("0000:02:1F.7", "0000:02:1f.7"),
                                           (" 0001:aa:00.1\n", "0001:aa:00.1")])
def test_normalize_bdf(text: str, bdf: str) -> None:
    assert _sysfs.normalize_bdf(text) == bdf


@pytest.mark.parametrize("text", ["0000:00:20.0", "00:03", "0000:00:03.8", "edu", ""])
def test_bad_bdf_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        _sysfs.normalize_bdf(text)


def _fake_device(root: str, bdf: str, *, group: int = 5, driver: str | None = "vfio-pci",
                 cdev: str | None = None, header_type: int = 0) -> None:
    dev = os.path.join(root, "sys/devices/pci0000:00", bdf)
    os.makedirs(dev, exist_ok=True)
    links = os.path.join(root, "sys/bus/pci/devices")
    os.makedirs(links, exist_ok=True)
    os.symlink(dev, os.path.join(links, bdf))
    groups = os.path.join(root, "sys/kernel/iommu_groups", str(group), "devices")
    os.makedirs(groups, exist_ok=True)
    os.symlink(dev, os.path.join(groups, bdf))
    os.symlink(os.path.join(root, "sys/kernel/iommu_groups", str(group)),
               os.path.join(dev, "iommu_group"))
    if driver:
        drv = os.path.join(root, "sys/bus/pci/drivers", driver)
        os.makedirs(drv, exist_ok=True)
        os.symlink(drv, os.path.join(dev, "driver"))
    if cdev:
        os.makedirs(os.path.join(dev, "vfio-dev", cdev))
    config = bytearray(64)
    config[0x0E] = header_type
    with open(os.path.join(dev, "config"), "wb") as f:
        f.write(config)


def test_choose_backend_prefers_iommufd_only_with_cdev(tmp_path) -> None:
    root = str(tmp_path)
    _fake_device(root, "0000:00:03.0", cdev="vfio0")
    backend, why = choose_backend("00:03.0", root)
    assert backend == "legacy" and "no /dev/iommu" in why
    os.makedirs(os.path.join(root, "dev/vfio/devices"))
    open(os.path.join(root, "dev/iommu"), "w").close()
    backend, why = choose_backend("00:03.0", root)
    assert backend == "legacy" and "no VFIO device cdev" in why
    open(os.path.join(root, "dev/vfio/devices/vfio0"), "w").close()
    backend, why = choose_backend("00:03.0", root)
    assert backend == "iommufd" and "/dev/vfio/devices/vfio0" in why


def test_group_blockers_name_host_drivers_but_not_bridges(tmp_path) -> None:
    root = str(tmp_path)
    _fake_device(root, "0000:01:00.0", group=7, driver="pcieport", header_type=1)
    _fake_device(root, "0000:02:01.0", group=7, driver="vfio-pci")
    _fake_device(root, "0000:02:02.0", group=7, driver="e1000")
    _fake_device(root, "0000:02:03.0", group=7, driver=None)
    problems = _sysfs.group_blockers(root, 7)
    assert [(p["device"], p["driver"], p["kind"]) for p in problems] == [
        ("0000:02:02.0", "e1000", "host-driver")]


def test_open_device_rejects_unknown_backend_and_missing_device(tmp_path) -> None:
    from pyvfio.errors import DeviceNotFound

    with pytest.raises(UsageError):
        open_device("0000:00:03.0", "vfio-user", root=str(tmp_path))
    with pytest.raises(DeviceNotFound):
        open_device("0000:00:03.0", root=str(tmp_path))


def test_not_bound_to_vfio_on_a_fake_root(tmp_path) -> None:
    from pyvfio.errors import NotBoundToVfio

    root = str(tmp_path)
    _fake_device(root, "0000:00:05.0", driver="e1000e")
    with pytest.raises(NotBoundToVfio) as exc:
        open_device("0000:00:05.0", "legacy", root=root)
    assert "e1000e" in str(exc.value) and "pyvfio bind 0000:00:05.0" in str(exc.value)


# --- the register accessors, over a plain file standing in for the device fd ----------------


def test_register_accessors_read_write_and_refuse(tmp_path: Path) -> None:
    from pyvfio.device import RegionFlag, RegionInfo
    from pyvfio.errors import KernelError
    from pyvfio.kernel.device import KernelDevice

    # The region is 16 bytes at file offset 0x100; the file ends 2 bytes into
    # it, so wider reads there come back short, as from a misbehaving driver.
    path = tmp_path / "fd"
    path.write_bytes(bytes(0x100) + bytes(range(1, 15)))
    fd = os.open(path, os.O_RDWR)
    try:
        dev = KernelDevice("0000:00:00.0", fd)
        info = RegionInfo(index=0, flags=RegionFlag.READ | RegionFlag.WRITE, size=16,
                          offset=0x100)
        acc = dev._region_int_accessors(info)
        read32, write32 = acc[4]
        read16, write16 = acc[2]
        assert read32(0) == 0x04030201 and read16(12) == 0x0E0D
        write32(4, 0x1_DEADBEEF)  # masked to the width, little-endian
        assert path.read_bytes()[0x104:0x108] == bytes.fromhex("efbeadde")
        assert read32(4) == 0xDEADBEEF
        with pytest.raises(UsageError, match="4-byte access at 0xd is outside region 0"):
            read32(13)
        with pytest.raises(UsageError, match="outside region 0"):
            write16(-2, 0)
        os.truncate(path, 0x10E)  # now the region's last 2 bytes are past the end
        with pytest.raises(KernelError, match="short pread: fewer than 4 bytes at 0xc"):
            read32(12)
    finally:
        os.close(fd)
