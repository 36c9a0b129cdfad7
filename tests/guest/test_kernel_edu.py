"""edu end to end over the legacy backend, on a real kernel in the guest:
every driver step, regions, BAR mmap, config capabilities, IRQ info, reset."""

from __future__ import annotations

import errno
import os

import pytest

from pyvfio.device import IrqFlag, IrqIndex, RegionFlag, RegionIndex
from pyvfio.drivers.edu import Edu, selftest
from pyvfio.errors import KernelError
from pyvfio.kernel import open_device
from pyvfio.pci.config import CapId
from pyvfio.testing.topology import EDU

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = pytest.mark.guest


@pytest.fixture
def edu_dev():
    with helpers.vfio_bound(EDU), open_device(EDU, "legacy") as dev:
        yield dev


def test_edu_selftest_every_step_passes(edu_dev) -> None:
    result = selftest(edu_dev)
    steps = {s.name: s for s in result.steps}
    expected = ["identify", "liveness", "factorial (polled)", "dma (polled)",
                "interrupt msi (raise/ack)", "factorial (msi interrupt)", "dma (msi interrupt)",
                "interrupt intx (raise/ack)", "factorial (intx interrupt)", "dma (intx interrupt)"]
    assert list(steps) == expected
    failed = {n: s.detail for n, s in steps.items() if not s.ok}
    assert not failed
    assert result.ok and result.as_dict()["ok"] is True
    assert edu_dev.backend == "legacy"


def test_edu_driver_api_directly(edu_dev) -> None:
    edu = Edu(edu_dev)
    assert edu.ident == 0x010000ED
    assert edu.liveness(0xA5A5A5A5) == 0x5A5A5A5A
    assert edu.factorial(5) == 120
    # Bus mastering was enabled through config space.
    assert edu_dev.config.read16(0x04) & 0x4
    with edu_dev.dma_alloc(4096, below=1 << 28) as a, edu_dev.dma_alloc(4096, below=1 << 28) as b:
        a.write(bytes(range(256)) * 8)
        edu.dma_to_device(a, 2048, device_offset=16)
        edu.dma_from_device(b, 2048, device_offset=16)
        assert b.read(0, 2048) == bytes(range(256)) * 8
        assert a.iova < 1 << 28 and b.iova < 1 << 28 and a.iova != b.iova


def test_region_info_and_bar_mmap_reads_id(edu_dev) -> None:
    bar0 = edu_dev.region_info(RegionIndex.BAR0)
    assert bar0.size == 1 << 20
    assert bar0.flags & (RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP) == (
        RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP)
    assert [(a.offset, a.size) for a in bar0.mmap_areas] == [(0, 1 << 20)]
    cfg = edu_dev.region_info(RegionIndex.CONFIG)
    assert cfg.size == 256 and not cfg.mmappable
    assert edu_dev.region_info(RegionIndex.BAR1).size == 0
    assert edu_dev.region_info(RegionIndex.VGA).size == 0
    with edu_dev.bar(0).mmap() as m:
        assert m.read32(0) == 0x010000ED
        m.write32(4, 0x0F0F0F0F)
        assert m.read32(4) == 0xF0F0F0F0
        assert edu_dev.bar(0).read32(4) == 0xF0F0F0F0  # same register through pread


def test_config_space_capability_walk(edu_dev) -> None:
    cfg = edu_dev.config
    assert (cfg.vendor_id, cfg.device_id) == (0x1234, 0x11E8)
    assert cfg.class_code == 0x00FF00
    caps = [c.id for c in cfg.capabilities()]
    assert CapId.MSI in caps
    assert CapId.MSIX not in caps


def test_irq_info(edu_dev) -> None:
    irqs = {i.index: i for i in edu_dev.irqs()}
    assert irqs[IrqIndex.INTX].count == 1
    assert irqs[IrqIndex.INTX].flags & IrqFlag.AUTOMASKED
    assert irqs[IrqIndex.MSI].count == 1
    assert irqs[IrqIndex.MSIX].count == 0


def test_reset_without_reset_support_is_a_kernel_error(edu_dev) -> None:
    # edu has no FLR/PM reset: the kernel reports no RESET flag and refuses.
    from pyvfio.device import DeviceFlag

    assert not edu_dev.info.flags & DeviceFlag.RESET
    with pytest.raises(KernelError) as exc:
        edu_dev.reset()
    assert exc.value.errno == errno.EINVAL
    assert "VFIO_DEVICE_RESET on device 0000:00:03.0" in str(exc.value)


def test_container_info(edu_dev) -> None:
    container = edu_dev.dma
    info = container.info()
    assert info["page_sizes"] & 4096
    assert info["iova_ranges"] and all(s <= e for s, e in info["iova_ranges"])
    # The x86 MSI window is reserved: it splits the ranges.
    assert not container.allocator.contains(0xFEE00000, 4096)
    assert info["dma_avail"] > 0
    assert container.extensions()["TYPE1v2"] is True
    fds = edu_dev.fds()
    assert set(fds) == {"device", "group", "container"}


def test_describe_matches_info_json(edu_dev) -> None:
    data = edu_dev.describe()
    assert data["backend"] == "legacy" and data["ids"]["vendor"] == "1234"
    assert data["regions"][0]["mmap_areas"] == [{"offset": 0, "size": 1 << 20}]
    assert [i["count"] for i in data["irqs"]][:3] == [1, 1, 0]


def test_pyvfio_info_command(capsys) -> None:
    import json

    from pyvfio.cli import main

    with helpers.vfio_bound(EDU):
        assert main(["info", EDU, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["device"] == EDU and data["backend_reason"]
        if not os.path.exists("/dev/iommu"):  # Debian 6.1: legacy only, and it says why
            assert data["backend"] == "legacy" and "no /dev/iommu" in data["backend_reason"]
        assert main(["info", EDU]) == 0
        text = capsys.readouterr().out
        assert "BAR0" in text and "0x100000" in text and "MSI" in text


def test_edu_module_cli_json() -> None:
    import json
    import subprocess
    import sys

    with helpers.vfio_bound(EDU):
        proc = subprocess.run([sys.executable, "-m", "pyvfio.drivers.edu", EDU, "--json",
                               "--backend", "legacy"], capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True and data["device"] == EDU and len(data["steps"]) == 10
    assert all(s["ok"] for s in data["steps"])


def test_edu_module_cli_not_bound_fails_cleanly() -> None:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pyvfio.drivers.edu", EDU, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    data = json.loads(proc.stdout)
    assert data["ok"] is False and "pyvfio bind" in data["error"]["message"]
