"""vfio's no-IOMMU mode on a real kernel: a guest booted without the Intel
vIOMMU and with ``vfio.enable_unsafe_noiommu_mode=1``.

The host diagnosis must say so loudly (the device is usable but nothing
isolates its DMA), the device opens through ``/dev/vfio/noiommu-N`` with a
legacy container of type ``VFIO_NOIOMMU_IOMMU`` (8) - which offers no DMA
mapping at all.  vfio gives no-IOMMU devices no cdev, so iommufd is not a
way in.  Debian's kernels (6.1, 6.12) are built without CONFIG_VFIO_NOIOMMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyvfio.drivers.edu import Edu
from pyvfio.errors import UsageError
from pyvfio.host import Host
from pyvfio.kernel.device import KernelDevice
from pyvfio.kernel.legacy import Container, Group
from pyvfio.testing import kconfig
from pyvfio.testing.topology import EDU
from pyvfio.uapi import vfio as V
from pyvfio.uapi.vfio_cdev import VFIO_NOIOMMU_IOMMU

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = [pytest.mark.guest, pytest.mark.guest_config("noiommu")]

NOIOMMU_PARAM = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"


@pytest.fixture(autouse=True)
def noiommu_mode(guest_kernel: str) -> None:
    if not os.path.exists(NOIOMMU_PARAM):
        assert guest_kernel != "pyvfio-6.12", "pyvfio-6.12 is built with CONFIG_VFIO_NOIOMMU"
        kconfig.require_feature(False, "CONFIG_VFIO_NOIOMMU",
                                feature=f"vfio's no-IOMMU mode, {NOIOMMU_PARAM}")
    with open(NOIOMMU_PARAM) as f:
        assert f.read().strip() == "Y", "the noiommu guest boots with the mode on"


def group_of(bdf: str) -> int:
    return int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group")))


def test_host_diagnosis_reports_noiommu_loudly() -> None:
    host = Host()
    assert not host.iommu_present() and host.noiommu_enabled()
    with helpers.vfio_bound(EDU):
        group = group_of(EDU)
        diag = Host().diagnose(EDU)
        assert diag.noiommu and diag.as_dict()["noiommu"] is True
        assert diag.group_node == f"/dev/vfio/noiommu-{group}"
        with open(f"/sys/kernel/iommu_groups/{group}/name") as f:
            assert f.read().strip() == "vfio-noiommu"
        text = subprocess.run([sys.executable, "-m", "pyvfio", "check", EDU],
                              capture_output=True, text=True, timeout=60)
        said = (text.stdout + text.stderr).lower()
        assert "no-iommu" in said and "unsafe" in said, said
        as_json = subprocess.run([sys.executable, "-m", "pyvfio", "check", "--json", EDU],
                                 capture_output=True, text=True, timeout=60)
        assert json.loads(as_json.stdout)[0]["noiommu"] is True


@contextlib.contextmanager
def noiommu_legacy_device(bdf: str) -> Iterator[tuple[KernelDevice, Container]]:
    group_id = group_of(bdf)
    node = f"/dev/vfio/noiommu-{group_id}"
    assert os.path.exists(node) and not os.path.exists(f"/dev/vfio/{group_id}")
    group = Group.from_fd(os.open(node, os.O_RDWR | os.O_CLOEXEC), group_id)
    container = Container(iommu_type=VFIO_NOIOMMU_IOMMU)
    try:
        group.attach(container, owns_container=True, bdf=bdf)
    except BaseException:
        group.close()
        container.close()
        raise
    dev = KernelDevice(bdf, group.get_device_fd(bdf), None, [group], backend="legacy",
                       backend_reason="no-IOMMU group")
    with dev:
        yield dev, container


def test_device_opens_through_dev_vfio_noiommu_with_container_type_8() -> None:
    with helpers.vfio_bound(EDU), noiommu_legacy_device(EDU) as (dev, container):
        # The container offers the no-IOMMU model and nothing that maps DMA.
        assert container.check_extension(VFIO_NOIOMMU_IOMMU)
        assert not container.check_extension(V.VFIO_TYPE1v2_IOMMU)
        assert container.iommu_type == VFIO_NOIOMMU_IOMMU
        assert dev.fds()["group"] >= 0
        edu = Edu(dev)  # MMIO works: nothing between the CPU and the BAR changed
        assert edu.ident == 0x010000ED
        assert edu.liveness(0x0F0F0F0F) == 0xF0F0F0F0
        assert edu.factorial(6) == 720
        assert dev.dma is None
        with pytest.raises(UsageError, match="no DMA address space"):
            dev.dma_alloc(4096)


def test_open_device_legacy_in_noiommu_mode() -> None:
    """``open_device(..., "legacy")`` finds the no-IOMMU group node itself."""
    from pyvfio.kernel import open_device

    with helpers.vfio_bound(EDU), open_device(EDU, "legacy") as dev:
        assert dev.backend == "legacy" and dev.dma is None
        assert f"/dev/vfio/noiommu-{group_of(EDU)}" in dev.backend_reason
        assert "UNSAFE" in dev.backend_reason
        assert Edu(dev).liveness(1) == 0xFFFFFFFE


def test_no_cdev_for_a_noiommu_device_and_auto_takes_the_group() -> None:
    """6.12 registers no-IOMMU vfio devices without a character device
    ("cdev does not support noiommu device"): the iommufd backend says so,
    and ``auto`` opens the device through its no-IOMMU group."""
    from pyvfio.kernel import open_device
    from pyvfio.kernel.iommufd import IommufdUnavailable, open_cdev_device

    with helpers.vfio_bound(EDU):
        entries = os.listdir(f"/sys/bus/pci/devices/{EDU}/vfio-dev")
        assert entries and all(not os.path.exists(f"/dev/vfio/devices/{n}") for n in entries)
        if os.path.exists("/dev/iommu"):
            with pytest.raises(IommufdUnavailable, match=r"no-IOMMU mode.*no cdev"):
                open_cdev_device(EDU)
        with open_device(EDU) as dev:
            assert dev.backend == "legacy" and dev.dma is None
            assert Edu(dev).factorial(5) == 120
