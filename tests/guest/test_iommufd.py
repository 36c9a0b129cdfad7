"""The iommufd backend on a real kernel: IOAS alloc/map/unmap/copy/ranges,
options, device cdev bind/attach/detach, HW info, HWPT allocation, edu's DMA
through an IOAS, the ``auto`` backend choice, one iommufd shared by two
devices, and iommufd + cdev fds passed over SCM_RIGHTS to another process.

They run on both guest kernels: on ``pyvfio-6.12`` they must run (a missing
``/dev/iommu`` there is a failure); on Debian's kernels (6.1, 6.12) the iommufd tests skip
because they are built without CONFIG_IOMMUFD, and the backend-choice test checks that
``auto`` falls back to legacy and says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import time
from collections.abc import Iterator

import pytest

from pyvfio.device import SharedMemory
from pyvfio.drivers import edu as E
from pyvfio.errors import ClosedError, IovaRangeError, KernelError
from pyvfio.kernel import open_device
from pyvfio.kernel.iommufd import Iommufd, IommufdDevice, cdev_for, open_cdev_device
from pyvfio.testing import kconfig
from pyvfio.testing.topology import E1000_BRIDGED, EDU, EDU_BRIDGED
from pyvfio.uapi import iommufd as U

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = pytest.mark.guest

HAS_IOMMUFD = os.path.exists("/dev/iommu")
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)  # x86's interrupt range: never a DMA target
PAGE = 4096


@pytest.fixture
def need_iommufd(guest_kernel: str) -> None:
    if guest_kernel == "pyvfio-6.12":
        assert HAS_IOMMUFD, "the pyvfio-6.12 guest kernel is built with IOMMUFD: /dev/iommu missing"
    kconfig.require_feature(HAS_IOMMUFD, "CONFIG_IOMMUFD", feature="iommufd, /dev/iommu")


@pytest.fixture
def edu(need_iommufd: None) -> Iterator[IommufdDevice]:
    with helpers.vfio_bound(EDU), open_cdev_device(EDU) as dev:
        yield dev


def edu_dma(dev: IommufdDevice, src: int, dst: int, count: int, to_ram: bool) -> None:
    """One edu DMA by its registers (for IOVAs no DmaBuffer describes)."""
    bar = dev.bar(0)
    bar.write32(E.REG_DMA_SRC, src)
    bar.write32(E.REG_DMA_DST, dst)
    bar.write32(E.REG_DMA_COUNT, count)
    bar.write32(E.REG_DMA_CMD, E.DMA_START | (E.DMA_TO_RAM if to_ram else 0))
    deadline = time.monotonic() + 10
    while bar.read32(E.REG_DMA_CMD) & E.DMA_START:
        assert time.monotonic() < deadline, "edu DMA did not finish"
        time.sleep(0.001)


def round_trip(dev: IommufdDevice, src_iova: int, dst_iova: int, count: int) -> None:
    """RAM(src) -> edu buffer -> RAM(dst)."""
    E.Edu(dev)  # checks the IDs, enables bus mastering
    edu_dma(dev, src_iova, E.DMA_BUFFER_ADDR, count, to_ram=False)
    edu_dma(dev, E.DMA_BUFFER_ADDR, dst_iova, count, to_ram=True)


# --- backend choice (both kernels) -----------------------------------------------------------


def test_auto_backend_choice_says_why(guest_kernel: str) -> None:
    if guest_kernel == "pyvfio-6.12":
        assert HAS_IOMMUFD
    with helpers.vfio_bound(EDU), open_device(EDU) as dev:
        if HAS_IOMMUFD:
            assert dev.backend == "iommufd"
            assert isinstance(dev, IommufdDevice)
            assert cdev_for(EDU).path in dev.backend_reason
            assert "/dev/iommu" in dev.backend_reason
        else:
            assert dev.backend == "legacy"
            assert "no /dev/iommu" in dev.backend_reason
        assert E.Edu(dev).liveness(0x12345678) == (~0x12345678) & 0xFFFFFFFF


def test_iommufd_backend_requested_where_there_is_none(guest_kernel: str) -> None:
    if HAS_IOMMUFD:
        pytest.skip("this kernel has iommufd; the refusal is for kernels without it")
    from pyvfio.kernel.iommufd import IommufdUnavailable

    with helpers.vfio_bound(EDU), pytest.raises(IommufdUnavailable, match="/dev/iommu"):
        open_device(EDU, "iommufd")


# --- IOAS without devices --------------------------------------------------------------------


@contextlib.contextmanager
def shared_memory(size: int) -> Iterator[SharedMemory]:
    mem = SharedMemory(size)
    try:
        yield mem
    finally:
        mem.close()


def test_ioas_map_unmap_and_ranges(need_iommufd: None) -> None:
    with Iommufd.open() as ifd, ifd.alloc_ioas() as ioas, shared_memory(4 * PAGE) as mem:
        ranges, alignment = ioas.query_ranges()
        # "A fresh empty IOAS will have a full range" (iommufd.h).
        assert ranges == [(0, (1 << 64) - 1)]
        assert 1 <= alignment <= PAGE
        ioas.map(0x100000, mem)
        with pytest.raises(IovaRangeError, match="0x100000\\+0x1000 is already mapped"):
            ioas.map(0x100000, mem, size=PAGE)
        chosen = ioas.map_user(mem.address, PAGE, readable=True, writable=False)
        assert chosen % PAGE == 0 and not 0x100000 <= chosen < 0x104000
        assert ioas.unmap(chosen, PAGE) == PAGE
        with pytest.raises(IovaRangeError, match="no mapping lies wholly inside") as gone:
            ioas.unmap(chosen, PAGE)
        assert gone.value.errno == errno.ENOENT
        # Unmapping must cover whole earlier mappings: a part of one is refused.
        with pytest.raises(IovaRangeError, match="must cover whole earlier mappings"):
            ioas.unmap(0x100000, PAGE)
        ioas.map(0x200000, mem, offset=PAGE, size=PAGE)
        assert ioas.unmap_all() == 5 * PAGE
        assert ioas.unmap_all() == 0


def test_repeated_map_unmap_then_use_after_destroy(need_iommufd: None) -> None:
    """The map/unmap fast path still reports the kernel's errors, and a
    destroyed IOAS refuses a primed repeat even when iommufd has given its ID
    to a new IOAS (which must not receive the mapping)."""
    with Iommufd.open() as ifd, shared_memory(PAGE) as mem:
        ioas = ifd.alloc_ioas()
        for _ in range(3):
            ioas.map(0x100000, mem)
            assert ioas.unmap(0x100000, PAGE) == PAGE
        ioas.map(0x100000, mem)
        with pytest.raises(IovaRangeError, match="already mapped"):
            ioas.map(0x100000, mem)
        assert ioas.unmap(0x100000, PAGE) == PAGE
        with pytest.raises(IovaRangeError, match="no mapping lies wholly inside"):
            ioas.unmap(0x100000, PAGE)
        old_id = ioas.id
        ioas.close()
        successor = ifd.alloc_ioas()
        with pytest.raises(ClosedError):
            ioas.map(0x100000, mem)
        with pytest.raises(ClosedError):
            ioas.unmap(0x100000, PAGE)
        assert successor.unmap_all() == 0, f"IOAS {old_id}'s map reached IOAS {successor.id}"
        successor.map(0x100000, mem)
        ifd.close()
        with pytest.raises(ClosedError):  # the iommufd itself is gone
            successor.map(0x100000, mem)


def test_ioas_allow_iovas_steers_kernel_chosen_iovas(need_iommufd: None) -> None:
    with Iommufd.open() as ifd, ifd.alloc_ioas() as ioas, shared_memory(PAGE) as mem:
        ioas.allow_iovas([(0x4000000, 0x4FFFFFF)])
        iova = ioas.map_user(mem.address, PAGE)
        assert 0x4000000 <= iova <= 0x4FFFFFF - PAGE + 1
        ioas.unmap(iova, PAGE)
        ioas.allow_iovas([])  # cleared


def test_ioas_copy_shares_one_pinning(need_iommufd: None) -> None:
    with Iommufd.open() as ifd, ifd.alloc_ioas() as src, ifd.alloc_ioas() as dst, \
            shared_memory(2 * PAGE) as mem:
        src.map(0x300000, mem)
        iova = dst.copy_from(src, 0x300000, 2 * PAGE)
        assert dst.unmap(iova, 2 * PAGE) == 2 * PAGE
        fixed = dst.copy_from(src, 0x300000, 2 * PAGE, iova=0x500000)
        assert fixed == 0x500000
        # The header says the source must be exactly one MAP; 6.12 takes any
        # range the source's mappings cover, and refuses what they do not.
        part = dst.copy_from(src, 0x300000 + PAGE, PAGE)
        assert dst.unmap(part, PAGE) == PAGE
        with pytest.raises(IovaRangeError, match="not covered by mappings") as exc:
            dst.copy_from(src, 0x300000 + PAGE, 2 * PAGE)
        assert exc.value.errno == errno.ENOENT
        # The copy outlives the source mapping: the pages stay pinned for dst.
        src.unmap_all()
        assert dst.unmap(0x500000, 2 * PAGE) == 2 * PAGE


def test_options_and_vfio_compat_ioas(need_iommufd: None) -> None:
    with Iommufd.open() as ifd, ifd.alloc_ioas() as ioas:
        assert ifd.get_option(U.OptionId.HUGE_PAGES, ioas.id) == 1  # the default
        ioas.set_huge_pages(False)
        assert ifd.get_option(U.OptionId.HUGE_PAGES, ioas.id) == 0
        assert ifd.get_option(U.OptionId.RLIMIT_MODE) in (0, 1)
        ifd.vfio_compat_ioas(U.VfioIoasOp.SET, ioas.id)
        assert ifd.vfio_compat_ioas(U.VfioIoasOp.GET) == ioas.id
        ifd.vfio_compat_ioas(U.VfioIoasOp.CLEAR)
        with pytest.raises(KernelError) as exc:
            ifd.vfio_compat_ioas(U.VfioIoasOp.GET)
        assert exc.value.errno == errno.ENODEV  # no compat IOAS any more


def test_destroy_and_use_after_close(need_iommufd: None) -> None:
    with Iommufd.open() as ifd:
        ioas = ifd.alloc_ioas()
        ioas_id = ioas.id
        ioas.close()
        with pytest.raises(ClosedError):
            ioas.unmap_all()
        with pytest.raises(KernelError) as exc:
            ifd.destroy(ioas_id)
        assert exc.value.errno == errno.ENOENT and f"object {ioas_id}" in str(exc.value)
    with pytest.raises(ClosedError):
        ifd.alloc_ioas()


def test_map_file(need_iommufd: None) -> None:
    """IOMMU_IOAS_MAP_FILE is Linux 6.13+: older kernels get an error that says so."""
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    with Iommufd.open() as ifd, ifd.alloc_ioas() as ioas, shared_memory(2 * PAGE) as mem:
        if release < (6, 13):
            with pytest.raises(KernelError, match=r"added in 6\.13") as exc:
                ioas.map_file(mem, PAGE)
            assert exc.value.errno == errno.ENOTTY
            return
        iova = ioas.map_file(mem, PAGE, start=PAGE, iova=0x600000)
        assert iova == 0x600000
        assert ioas.unmap(iova, PAGE) == PAGE


# --- a device through its cdev ---------------------------------------------------------------


def test_cdev_bind_attach_detach_and_ranges(edu: IommufdDevice) -> None:
    assert edu.backend == "iommufd"
    assert edu.dev_id > 0 and edu.pt_id > 0
    assert edu.fds()["iommufd"] == edu.iommufd.fileno()
    attached = edu.ioas.iova_ranges
    # Attaching the device narrowed the full range: the MSI window is reserved.
    assert attached != [(0, (1 << 64) - 1)]
    assert not any(s <= MSI_WINDOW[0] and MSI_WINDOW[1] <= e for s, e in attached)
    edu.detach()
    assert edu.pt_id == 0
    assert edu.ioas.iova_ranges == [(0, (1 << 64) - 1)]  # no device, no restriction
    hwpt_id = edu.attach(edu.ioas)
    assert hwpt_id > 0 and edu.ioas.iova_ranges == attached


def test_hw_info_is_intel_vtd(edu: IommufdDevice) -> None:
    info = edu.hw_info()
    assert info.type == U.HwInfoType.INTEL_VTD, info
    vtd = info.vtd
    assert vtd is not None and vtd.cap_reg != 0 and vtd.ecap_reg != 0
    assert edu.describe()["iommufd"]["hw_info"]["type"] == "INTEL_VTD"


def test_hwpt_alloc_attach_and_dma_through_it(edu: IommufdDevice) -> None:
    info = edu.hw_info()
    with edu.alloc_hwpt() as hwpt:
        assert edu.attach(hwpt) == hwpt.id
        with edu.dma_alloc(PAGE, below=E.DMA_ADDR_LIMIT) as a, \
                edu.dma_alloc(PAGE, below=E.DMA_ADDR_LIMIT) as b:
            a.write(os.urandom(PAGE))
            round_trip(edu, a.iova, b.iova, E.DMA_MAX_COUNT)
            assert b.read(0, E.DMA_MAX_COUNT) == a.read(0, E.DMA_MAX_COUNT)
        edu.attach(edu.ioas)  # off the HWPT before it is destroyed
    if info.dirty_tracking:
        with edu.alloc_hwpt(dirty_tracking=True) as dirty:
            dirty.set_dirty_tracking(True)
    else:
        # QEMU's VT-d model has no second-stage dirty bits: the clear refusal,
        # and the kernel agrees when asked directly.
        with pytest.raises(KernelError, match="reports no dirty tracking") as exc:
            edu.alloc_hwpt(dirty_tracking=True)
        assert exc.value.errno == errno.EOPNOTSUPP
        with pytest.raises(KernelError) as raw:
            edu.iommufd.alloc_hwpt(edu.dev_id, edu.ioas.id,
                                   flags=U.HwptAllocFlag.DIRTY_TRACKING)
        assert raw.value.errno == errno.EOPNOTSUPP


def test_edu_selftest_over_iommufd(edu: IommufdDevice) -> None:
    result = E.selftest(edu)
    failed = {s.name: s.detail for s in result.steps if not s.ok}
    assert not failed
    assert result.ok


def test_edu_dma_at_kernel_chosen_iova_and_through_a_copy(edu: IommufdDevice) -> None:
    ioas = edu.ioas
    ioas.allow_iovas([(0x1000000, E.DMA_ADDR_LIMIT - 1)])  # edu drives 28 address bits
    pattern = bytes(range(256)) * 16
    with shared_memory(PAGE) as src, shared_memory(PAGE) as dst:
        src.view[:] = pattern
        src_iova = ioas.map_user(src.address, PAGE, writable=False)
        dst_iova = ioas.map_user(dst.address, PAGE)
        assert min(src_iova, dst_iova) >= 0x1000000 and max(src_iova, dst_iova) < E.DMA_ADDR_LIMIT
        round_trip(edu, src_iova, dst_iova, E.DMA_MAX_COUNT)
        assert bytes(dst.view[:E.DMA_MAX_COUNT]) == pattern[:E.DMA_MAX_COUNT]
        ioas.unmap(src_iova, PAGE)
        ioas.unmap(dst_iova, PAGE)
        # IOAS_COPY from a second, unattached IOAS of the same iommufd: the
        # device reads the pattern through the copied mapping.
        with edu.iommufd.alloc_ioas() as staging, shared_memory(PAGE) as out:
            staging.map(0x7000000, dst)
            copied = ioas.copy_from(staging, 0x7000000, PAGE, iova=0x2000000)
            ioas.map(0x3000000, out)
            round_trip(edu, copied, 0x3000000, E.DMA_MAX_COUNT)
            assert bytes(out.view[:E.DMA_MAX_COUNT]) == pattern[:E.DMA_MAX_COUNT]
            ioas.unmap(copied, PAGE)
            ioas.unmap(0x3000000, PAGE)
    ioas.allow_iovas([])


# --- one iommufd, two devices ----------------------------------------------------------------


@contextlib.contextmanager
def group_bound(*bdfs: str) -> Iterator[None]:
    from pyvfio.host import bind, restore

    bind(list(bdfs), driver="vfio-pci", group=True)
    try:
        yield
    finally:
        restore(list(bdfs))


def test_one_iommufd_and_ioas_shared_by_two_devices(need_iommufd: None) -> None:
    """EDU (own group) and EDU_BRIDGED (a group with the bridge and the e1000,
    all moved to vfio-pci) on one iommufd and one IOAS: a buffer mapped once
    is reached by both."""
    pattern = os.urandom(E.DMA_MAX_COUNT)
    with group_bound(EDU_BRIDGED, E1000_BRIDGED), helpers.vfio_bound(EDU), \
            Iommufd.open() as ifd, ifd.alloc_ioas() as ioas:
        first = open_cdev_device(EDU, iommufd=ifd, ioas=ioas)
        with first, open_cdev_device(EDU_BRIDGED, iommufd=ifd, ioas=ioas) as second:
            assert first.iommufd is second.iommufd is ifd
            assert first.ioas is second.ioas is ioas and first.dev_id != second.dev_id
            with first.dma_alloc(PAGE, below=E.DMA_ADDR_LIMIT) as a, \
                    first.dma_alloc(PAGE, below=E.DMA_ADDR_LIMIT) as b, \
                    second.dma_alloc(PAGE, below=E.DMA_ADDR_LIMIT) as c:
                a.write(pattern)
                round_trip(first, a.iova, b.iova, len(pattern))   # edu 1: a -> b
                round_trip(second, b.iova, c.iova, len(pattern))  # edu 2: b -> c
                assert c.read(0, len(pattern)) == pattern
            first.close()  # the shared IOAS and iommufd stay: second still works
            assert not ioas.closed and not ifd.closed
            with second.dma_alloc(PAGE, below=E.DMA_ADDR_LIMIT) as d:
                d.write(pattern)
                round_trip(second, d.iova, d.iova, 64)
        assert ioas.unmap_all() == 0  # every buffer was unmapped by its device


# --- fds passed to another process (seed 003's `-object iommufd,fd=N`) -----------------------

_CHILD = r"""
import json, os, socket, sys
from pyvfio.drivers.edu import selftest
from pyvfio.kernel.iommufd import Iommufd, device_from_fds
sock = socket.socket(fileno=int(sys.argv[1]))
msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
fd = dict(zip(json.loads(msg), fds))
held = sorted(os.readlink(f"/proc/self/fd/{n}") for n in fds)
# This process opens nothing under /dev: it binds the handed-over cdev to the
# handed-over iommufd, allocates an IOAS there and drives edu.
with Iommufd.from_fd(fd["iommufd"]) as iommufd:
    with device_from_fds(iommufd.fileno(), fd["device"], "0000:00:03.0") as dev:
        result = selftest(dev)
        info = {"backend": dev.backend, "dev_id": dev.dev_id, "ioas": dev.ioas.id}
print(json.dumps({"result": result.as_dict(), "held": held, "device": info}))
"""


def test_iommufd_and_cdev_fds_passed_over_scm_rights(need_iommufd: None) -> None:
    with helpers.vfio_bound(EDU):
        cdev = cdev_for(EDU)
        fds = {"iommufd": os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC),
               "device": os.open(cdev.path, os.O_RDWR | os.O_CLOEXEC)}
        try:
            proc = helpers.send_fds_to_child(_CHILD, fds)
        finally:
            for f in fds.values():
                os.close(f)  # the sender lets go before the receiver even starts
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    data = json.loads(out.strip().splitlines()[-1])
    assert data["held"] == sorted(["/dev/iommu", cdev.path])
    assert data["device"]["backend"] == "iommufd" and data["device"]["dev_id"] > 0
    assert [s for s in data["result"]["steps"] if not s["ok"]] == []
    assert data["result"]["ok"] is True


def _raw_ioctl(fd: int, request: int, struct: ctypes.Structure, size: int,
               tail: bytes = b"") -> bytearray:
    """``ioctl(fd, request, buf)`` with ``struct``'s bytes cut or extended to
    ``size`` (extension bytes from ``tail``) and ``size`` in its first field."""
    data = bytearray(bytes(struct))[:size] + tail
    data[0:4] = size.to_bytes(4, "little")
    import fcntl
    fcntl.ioctl(fd, request, data)
    return data


def test_struct_sizes_are_the_kernel_minimum(need_iommufd: None) -> None:
    """iommufd checks each command's ``size``: below the struct's size it is
    EINVAL, above it the extra bytes must be zero (else E2BIG).  So our size is
    accepted, one byte less is refused, and a zero-filled larger one is taken:
    pyvfio's ``sizeof`` is exactly the kernel's."""
    fd = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
    mem = SharedMemory(PAGE)
    try:
        alloc = U.iommu_ioas_alloc()
        n = ctypes.sizeof(alloc)
        out = _raw_ioctl(fd, U.IOMMU_IOAS_ALLOC, alloc, n)
        ioas_id = int.from_bytes(out[8:12], "little")
        assert ioas_id > 0
        with pytest.raises(OSError) as exc:
            _raw_ioctl(fd, U.IOMMU_IOAS_ALLOC, alloc, n - 1)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError) as exc:
            _raw_ioctl(fd, U.IOMMU_IOAS_ALLOC, alloc, n + 4, b"\x01\0\0\0")
        assert exc.value.errno == errno.E2BIG
        assert int.from_bytes(_raw_ioctl(fd, U.IOMMU_IOAS_ALLOC, alloc, n + 4,
                                         b"\0\0\0\0")[8:12], "little") > ioas_id

        user_va = mem.address
        flags = U.IoasMapFlag.FIXED_IOVA | U.IoasMapFlag.READABLE | U.IoasMapFlag.WRITEABLE
        m = U.iommu_ioas_map(flags=flags, ioas_id=ioas_id, user_va=user_va, length=PAGE,
                             iova=0x100000)
        n = ctypes.sizeof(m)
        for size, tail, err in ((n - 1, b"", errno.EINVAL), (n + 8, b"\xff" * 8, errno.E2BIG)):
            with pytest.raises(OSError) as exc:
                _raw_ioctl(fd, U.IOMMU_IOAS_MAP, m, size, tail)
            assert exc.value.errno == err, size
        out = _raw_ioctl(fd, U.IOMMU_IOAS_MAP, m, n)
        assert int.from_bytes(out[32:40], "little") == 0x100000  # the fixed IOVA
        with pytest.raises(OSError) as exc:  # mapped: the same IOVA again is taken
            _raw_ioctl(fd, U.IOMMU_IOAS_MAP, m, n)
        assert exc.value.errno == errno.EEXIST
    finally:
        os.close(fd)  # frees the IOASes and their mappings
        mem.close()
