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


def test_lookups_are_cached_per_id(sample: PciIds) -> None:
    assert sample.vendor(0x1234) == "Example Vendor"
    assert sample._devices == {}  # no device looked at yet
    sample.device(0x8086, 0x100E)
    sample.subsystem(0x8086, 0x100E, 0x8086, 0x001E)
    assert set(sample._vendors) == {0x1234, 0x8086}
    assert set(sample._devices) == {(0x8086, 0x100E)}
    assert sample._classes is None


def test_lookups_stay_inside_their_block(sample: PciIds) -> None:
    """A device of one vendor is not found under another; a subsystem line of
    one device is not found under the next."""
    assert sample.device(0x0001, 0x11E8) is None
    assert sample.device(0x8086, 0x11E8) is None
    assert sample.subsystem(0x1234, 0x1111, 0x1AF4, 0x1100) is None


def test_missing_file_gives_no_names(tmp_path) -> None:
    assert PciIds.find(str(tmp_path)) is None
    (tmp_path / "usr/share/hwdata").mkdir(parents=True)
    (tmp_path / "usr/share/hwdata/pci.ids").write_bytes(SAMPLE)
    found = PciIds.find(str(tmp_path))
    assert found is not None and found.path.endswith("hwdata/pci.ids")


@pytest.mark.skipif(SYSTEM_PCI_IDS is None, reason="the system has no pci.ids (package pci.ids)")
def test_agrees_with_a_full_parse_of_the_system_file() -> None:
    """Every vendor, device and subsystem of the real file, found by the lazy
    search, equals a straightforward line-by-line parse."""
    assert SYSTEM_PCI_IDS is not None
    ids = PciIds(SYSTEM_PCI_IDS.path)
    vendors: dict[int, str] = {}
    devices: dict[tuple[int, int], str] = {}
    subsystems: dict[tuple[int, int, int, int], str] = {}
    vendor = device = -1
    with open(SYSTEM_PCI_IDS.path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("C "):
                break
            if not line or line.startswith("#"):
                continue
            if line.startswith("\t\t"):
                ids_part, name = line[2:].split("  ", 1)
                sv, sd = (int(x, 16) for x in ids_part.split())
                subsystems.setdefault((vendor, device, sv, sd), name)
            elif line.startswith("\t"):
                code, name = line[1:].split("  ", 1)
                device = int(code, 16)
                devices.setdefault((vendor, device), name)
            else:
                code, name = line.split("  ", 1)
                vendor = int(code, 16)
                vendors[vendor] = name
    assert len(vendors) > 1000 and len(devices) > 10000
    assert all(ids.vendor(v) == name for v, name in vendors.items())
    assert all(ids.device(v, d) == name for (v, d), name in devices.items())
    assert all(ids.subsystem(*key) == name for key, name in list(subsystems.items())[::7])


@pytest.mark.skipif(SYSTEM_PCI_IDS is None, reason="the system has no pci.ids (package pci.ids)")
def test_system_database() -> None:
    ids = SYSTEM_PCI_IDS
    assert ids is not None
    assert ids.vendor(0x8086) == "Intel Corporation"
    assert "82540EM" in (ids.device(0x8086, 0x100E) or "")
    assert ids.vendor(0x10DE) == "NVIDIA Corporation"
    assert ids.class_name(0x030000) == "VGA compatible controller"
    assert ids.class_name(0x060400) == "PCI bridge"
