"""Fake host roots for the host-management tests (see pyvfio.testing.fakesysfs).

Addresses used across the tests:

- group 1: ``0000:00:01.0`` PCIe root port on pcieport (a bridge, alone)
- group 12: ``0000:01:00.0`` GPU on nouveau + ``0000:01:00.1`` its HDMI audio on snd_hda_intel
- group 7: ``0000:02:00.0`` PCIe-to-PCI bridge (no driver), ``0000:03:01.0`` edu (no driver),
  ``0000:03:02.0`` e1000 on e1000 (QEMU's bridged topology)
- group 20: ``0000:04:00.0`` ConnectX VF on mlx5_core (mlx5_vfio_pci in modules.alias)
- group 30: ``0000:05:00.0`` NIC already on vfio-pci, held open by pid 4242 (qemu-system-x86)
- group 31: ``0000:06:00.0`` edu alone, no driver
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from pyvfio.pci.ids import PciIds
from pyvfio.testing.fakesysfs import FakeSysfs

ROOT_PORT = "0000:00:01.0"
GPU = "0000:01:00.0"
AUDIO = "0000:01:00.1"
PCI_BRIDGE = "0000:02:00.0"
EDU_BRIDGED = "0000:03:01.0"
E1000_BRIDGED = "0000:03:02.0"
MLX_VF = "0000:04:00.0"
BUSY_NIC = "0000:05:00.0"
EDU = "0000:06:00.0"

SYSTEM_PCI_IDS = PciIds.find("/")


def build_standard(fake: FakeSysfs) -> FakeSysfs:
    fake.add_standard_drivers(variant=True)
    fake.add_device(ROOT_PORT, 0x8086, 0xA110, 0x060400, group=1, driver="pcieport")
    fake.add_device(GPU, 0x10DE, 0x1B80, 0x030000, group=12, driver="nouveau",
                    subsystem=(0x10DE, 0x119E), revision=0xA1, numa_node=0)
    fake.add_device(AUDIO, 0x10DE, 0x10F0, 0x040300, group=12, driver="snd_hda_intel",
                    subsystem=(0x10DE, 0x119E), revision=0xA1, reset_methods=("bus",))
    fake.add_device(PCI_BRIDGE, 0x1B36, 0x000E, 0x060400, group=7)
    fake.add_device(EDU_BRIDGED, 0x1234, 0x11E8, 0x00FF00, group=7, revision=0x10, reset_methods=())
    fake.add_device(E1000_BRIDGED, 0x8086, 0x100E, 0x020000, group=7, driver="e1000",
                    subsystem=(0x1AF4, 0x1100), revision=0x03)
    fake.add_device(MLX_VF, 0x15B3, 0x101E, 0x020000, group=20, driver="mlx5_core")
    fake.add_device(BUSY_NIC, 0x8086, 0x10D3, 0x020000, group=30, driver="vfio-pci")
    fake.add_process(4242, "qemu-system-x86", ["/dev/vfio/vfio", "/dev/vfio/30"])
    fake.add_process(17, "bash", ["/dev/tty1"])
    fake.add_device(EDU, 0x1234, 0x11E8, 0x00FF00, group=31, revision=0x10)
    return fake


@pytest.fixture
def fake(tmp_path) -> Iterator[FakeSysfs]:
    """The standard topology, with the fake kernel installed for its root."""
    f = FakeSysfs(tmp_path / "root", noiommu=False,
                  pci_ids=SYSTEM_PCI_IDS.path if SYSTEM_PCI_IDS else None)
    build_standard(f)
    with f:
        yield f


@pytest.fixture
def bare(tmp_path) -> Iterator[FakeSysfs]:
    """An empty fake root with the standard drivers, for custom topologies."""
    f = FakeSysfs(tmp_path / "bare", noiommu=False)
    f.add_standard_drivers(variant=True)
    with f:
        yield f


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run the block with the effective uid of the user nobody (seteuid, so
    this root process can come back)."""
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def nobody_tree() -> Iterator[FakeSysfs]:
    """A small tree, fake kernel installed, that the user nobody can read but
    not write (0755 and 0644, owned by root), in a directory of its own outside
    tmp_path (whose parents nobody may not search): ``0000:00:03.0`` without a
    driver, ``0000:00:04.0`` on e1000, ``0000:00:05.0`` on vfio-pci."""
    base = tempfile.mkdtemp(prefix="pyvfio-rights-")
    os.chmod(base, 0o755)
    fake = FakeSysfs(os.path.join(base, "root"), noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=3)
    fake.add_device("0000:00:04.0", 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    fake.add_device("0000:00:05.0", 0x8086, 0x100E, 0x020000, group=5, driver="vfio-pci")
    for dirpath, dirnames, _ in os.walk(base):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    try:
        with fake:
            yield fake
    finally:
        shutil.rmtree(base, ignore_errors=True)
