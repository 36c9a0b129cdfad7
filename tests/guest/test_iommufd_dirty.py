"""HWPT dirty tracking and the dirty bitmap, against iommufd's mock domain.

QEMU's VT-d model offers no dirty tracking (``test_iommufd.py`` checks the
clear refusal), so the real kernel paths - ``IOMMU_HWPT_ALLOC`` with
``DIRTY_TRACKING``, ``IOMMU_HWPT_SET_DIRTY_TRACKING``,
``IOMMU_HWPT_GET_DIRTY_BITMAP`` with and without clearing - are driven on the
mock IOMMU that ``CONFIG_IOMMUFD_TEST`` exposes through ``IOMMU_TEST_CMD`` on
``/dev/iommu`` (the kernel's own selftest, tools/testing/selftests/iommu, does
the same).  ``IOMMU_TEST_OP_DIRTY`` plays the device: it sets the dirty bit
of chosen PTEs, as a DMA write would.

The mock IOMMU is reachable only when no real IOMMU driver is active: 6.12's
iommu core offers the mock device to the first registered IOMMU (VT-d's
``dmar0`` in the default guest), which refuses it.  So these tests run in the
guest booted without the vIOMMU (``noiommu``); in the default guest the
refusal is checked to come with that explanation.
"""

from __future__ import annotations

import mmap
import os

import pytest

from pyvfio.device import SharedMemory
from pyvfio.errors import KernelError
from pyvfio.kernel.iommufd import Iommufd, IommufdUnavailable, MockDevice
from pyvfio.uapi import iommufd as U

pytestmark = pytest.mark.guest
noiommu_guest = pytest.mark.guest_config("noiommu")

MOCK_PAGE = mmap.PAGESIZE // 2  # MOCK_IO_PAGE_SIZE: the mock domain's PTE size
BASE = U.MOCK_APERTURE_START
LENGTH = 64 * mmap.PAGESIZE


@pytest.fixture
def iommufd(guest_kernel: str) -> Iommufd:
    if not os.path.exists("/dev/iommu"):
        assert guest_kernel != "pyvfio-6.12"
        pytest.skip(f"kernel {os.uname().release} has no iommufd (no /dev/iommu)")
    return Iommufd.open()


def mock_device(ifd: Iommufd, pt_id: int, guest_kernel: str) -> MockDevice:
    try:
        return ifd.mock_domain(pt_id)
    except IommufdUnavailable as exc:
        assert guest_kernel != "pyvfio-6.12", f"pyvfio-6.12 is built with IOMMUFD_TEST: {exc}"
        pytest.skip(str(exc))


@noiommu_guest
def test_dirty_bitmap_on_a_mock_domain(iommufd: Iommufd, guest_kernel: str) -> None:
    mem = SharedMemory(LENGTH)
    with iommufd as ifd, ifd.alloc_ioas() as ioas:
        ioas.map(BASE, mem)
        idev = mock_device(ifd, ioas.id, guest_kernel)  # a device to allocate the HWPT for
        info = ifd.hw_info(idev.idev_id)
        assert info.type == U.HwInfoType.SELFTEST and info.dirty_tracking
        with ifd.alloc_hwpt(idev.idev_id, ioas.id,
                            flags=U.HwptAllocFlag.DIRTY_TRACKING) as hwpt:
            user = mock_device(ifd, hwpt.id, guest_kernel)  # attached to the dirty HWPT
            assert user.hwpt_id == hwpt.id
            hwpt.set_dirty_tracking(True)
            pages = LENGTH // MOCK_PAGE
            written = [0, 1, 7, 64, 65, pages - 1]
            assert ifd.mock_set_dirty(hwpt.id, BASE, LENGTH, MOCK_PAGE, written) == len(written)
            # Peek without clearing, then read-and-clear, then nothing is left.
            expect = [BASE + n * MOCK_PAGE for n in written]
            assert hwpt.read_dirty(BASE, LENGTH, MOCK_PAGE, clear=False) == expect
            assert hwpt.read_dirty(BASE, LENGTH, MOCK_PAGE) == expect
            assert hwpt.read_dirty(BASE, LENGTH, MOCK_PAGE) == []
            # At CPU-page granularity a page is dirty when any of its PTEs is.
            ifd.mock_set_dirty(hwpt.id, BASE, LENGTH, MOCK_PAGE, [3, 64, 65])
            assert hwpt.read_dirty(BASE, LENGTH, mmap.PAGESIZE) == [
                BASE + mmap.PAGESIZE * 1, BASE + mmap.PAGESIZE * 32]
            hwpt.set_dirty_tracking(False)
            user.close()
        idev.close()
        ioas.unmap_all()
    mem.close()


@noiommu_guest
def test_dirty_tracking_refused_for_a_device_without_it(iommufd: Iommufd,
                                                        guest_kernel: str) -> None:
    with iommufd as ifd, ifd.alloc_ioas() as ioas:
        try:
            idev = ifd.mock_domain(ioas.id, dev_flags=1)  # MOCK_FLAGS_DEVICE_NO_DIRTY
        except IommufdUnavailable as exc:
            assert guest_kernel != "pyvfio-6.12", str(exc)
            pytest.skip(str(exc))
        assert not ifd.hw_info(idev.idev_id).dirty_tracking
        with pytest.raises(KernelError, match="does not support dirty tracking") as err:
            ifd.alloc_hwpt(idev.idev_id, ioas.id, flags=U.HwptAllocFlag.DIRTY_TRACKING)
        assert err.value.errno == 95  # EOPNOTSUPP
        idev.close()


def test_mock_domain_behind_a_real_iommu_explains(iommufd: Iommufd, guest_kernel: str) -> None:
    """The default guest has VT-d: the mock IOMMU cannot take its device."""
    with iommufd as ifd, ifd.alloc_ioas() as ioas:
        assert any(n.startswith("dmar") for n in os.listdir("/sys/class/iommu"))
        with pytest.raises(IommufdUnavailable, match=r"probed by the real IOMMU.*dmar"):
            ifd.mock_domain(ioas.id)
