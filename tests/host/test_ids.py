"""pci.ids lookups: against the system's file and a small synthetic one."""

from __future__ import annotations

import pytest

from pyvfio.pci.ids import PciIds

from .conftest import SYSTEM_PCI_IDS

SAMPLE = b"""#
# comment line
0001  SafeNet (wrong ID)
1234  Example Vendor
# a comment inside a vendor block
\t11e8  Edu Device
\t\t1af4 1100  QEMU Virtual Machine
\t1111  Other Device
8086  Intel Corporation
\t100e  82540EM Gigabit Ethernet Controller
\t\t8086 001e  PRO/1000 MT Desktop Adapter

# List of known device classes, subclasses and programming interfaces
C 02  Network controller
\t00  Ethernet controller
C 0c  Serial bus controller
\t03  USB controller
\t\t30  XHCI
"""


@pytest.fixture
def sample(tmp_path) -> PciIds:
    path = tmp_path / "pci.ids"
    path.write_bytes(SAMPLE)
    return PciIds(str(path))


def test_sample_lookups(sample: PciIds) -> None:
    assert sample.vendor(0x1234) == "Example Vendor"
    assert sample.device(0x1234, 0x11E8) == "Edu Device"
    assert sample.device(0x1234, 0x1111) == "Other Device"
    assert sample.subsystem(0x1234, 0x11E8, 0x1AF4, 0x1100) == "QEMU Virtual Machine"
    assert sample.subsystem(0x1234, 0x1111, 0x1AF4, 0x1100) is None
    assert sample.device(0x8086, 0x100E) == "82540EM Gigabit Ethernet Controller"
    assert sample.class_name(0x020000) == "Ethernet controller"
    assert sample.class_name(0x0C0330) == "USB controller"
    assert sample.prog_if_name(0x0C0330) == "XHCI"
    assert sample.class_name(0x028000) == "Network controller"  # unknown subclass: base name
    assert sample.vendor(0xABCD) is None
    assert sample.device(0x1234, 0xBEEF) is None
    assert sample.class_name(0xFF0000) is None


def test_vendor_blocks_are_parsed_only_when_asked(sample: PciIds) -> None:
    assert sample.vendor(0x1234) == "Example Vendor"
    assert sample._vendors is not None
    assert all(v.devices is None for v in sample._vendors.values())
    sample.device(0x8086, 0x100E)
    assert sample._vendors[0x8086].devices is not None
    assert sample._vendors[0x1234].devices is None


def test_missing_file_gives_no_names(tmp_path) -> None:
    assert PciIds.find(str(tmp_path)) is None
    (tmp_path / "usr/share/hwdata").mkdir(parents=True)
    (tmp_path / "usr/share/hwdata/pci.ids").write_bytes(SAMPLE)
    found = PciIds.find(str(tmp_path))
    assert found is not None and found.path.endswith("hwdata/pci.ids")


@pytest.mark.skipif(SYSTEM_PCI_IDS is None, reason="the system has no pci.ids (package pci.ids)")
def test_system_database() -> None:
    ids = SYSTEM_PCI_IDS
    assert ids is not None
    assert ids.vendor(0x8086) == "Intel Corporation"
    assert "82540EM" in (ids.device(0x8086, 0x100E) or "")
    assert ids.vendor(0x10DE) == "NVIDIA Corporation"
    assert ids.class_name(0x030000) == "VGA compatible controller"
    assert ids.class_name(0x060400) == "PCI bridge"
