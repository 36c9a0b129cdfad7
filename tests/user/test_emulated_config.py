"""pyvfio.pci.emulated: write masks, BAR sizing, capabilities, hooks."""

from __future__ import annotations

import pytest

from pyvfio.errors import UsageError
from pyvfio.pci.config import CapId, ConfigSpace
from pyvfio.pci.emulated import BarKind, BarSpec, EmulatedConfig


def make() -> EmulatedConfig:
    return EmulatedConfig(0x1234, 0x5678, class_code=0x020000, revision=3, interrupt_pin=1)


def test_header():
    c = make()
    assert c.get(0, 4) == 0x56781234 and c.get(8, 4) == 0x02000003
    assert c.get(0x3D, 1) == 1
    c.write(0, b"\0\0\0\0")
    assert c.get(0, 4) == 0x56781234


@pytest.mark.parametrize("kind, size, prefetch, low, high", [
    (BarKind.MEM32, 4096, False, 0xFFFFF000, None),
    (BarKind.MEM32, 1 << 20, True, 0xFFF00008, None),
    (BarKind.MEM64, 1 << 33, True, 0x0000000C, 0xFFFFFFFE),
    (BarKind.IO, 32, False, 0xFFFFFFE1, None),
])
def test_bar_sizing(kind, size, prefetch, low, high):
    c = make()
    c.add_bar(BarSpec(2, size, kind, prefetch))
    c.write(0x18, b"\xff" * 4)
    if high is not None:
        c.write(0x1C, b"\xff" * 4)
        assert c.get(0x1C, 4) == high
    assert c.get(0x18, 4) == low


def test_bar_address():
    c = make()
    c.add_bar(BarSpec(0, 1 << 16, BarKind.MEM64))
    c.write(0x10, (0xFEDC0000).to_bytes(4, "little"))
    c.write(0x14, (0x12).to_bytes(4, "little"))
    assert c.bar_address(0) == 0x12FEDC0000


@pytest.mark.parametrize("spec", [
    lambda: BarSpec(6, 4096), lambda: BarSpec(0, 3000), lambda: BarSpec(5, 4096, BarKind.MEM64),
    lambda: BarSpec(0, 8), lambda: BarSpec(0, 1 << 32),
])
def test_bad_bars(spec):
    with pytest.raises(UsageError):
        spec()


def test_overlapping_64bit_bar():
    c = make()
    c.add_bar(BarSpec(0, 4096, BarKind.MEM64))
    with pytest.raises(UsageError):
        c.add_bar(BarSpec(1, 4096))


def test_capability_chain_is_walkable():
    c = EmulatedConfig(1, 2, size=4096)
    pm = c.add_pm()
    msi = c.add_msi(4, per_vector_mask=True)
    msix = c.add_msix(8, 2, 0, 2, 0x1000)
    exp = c.add_pcie()
    cs = ConfigSpace.from_bytes(bytes(c.data))
    found = [(cap.id, cap.offset) for cap in cs.capabilities()]
    assert found == [(CapId.PM, pm), (CapId.MSI, msi), (CapId.MSIX, msix), (CapId.EXP, exp)]
    assert c.get(6, 2) & 0x10
    assert c.get(msi + 2, 2) == (2 << 1) | 0x80 | 0x100
    assert c.get(msix + 2, 2) == 7 and c.get(msix + 8, 4) == 0x1002


def test_msi_control_writes():
    c = make()
    off = c.add_msi(8)
    c.write(off + 2, (0xFFFF).to_bytes(2, "little"))
    assert c.get(off + 2, 2) == 0x0071 | (3 << 1) | 0x80  # enable + MME writable only
    assert c.msi_enabled
    c.write(off + 4, b"\xff\xff\xff\xff")
    assert c.get(off + 4, 4) == 0xFFFFFFFC


def test_w1c_status_and_pm():
    c = make()
    c.set(6, 2, 0x8000 | 0x10)
    c.write(6, (0x8000).to_bytes(2, "little"))
    assert c.get(6, 2) == 0x10
    pm = c.add_pm()
    c.write(pm + 4, (0x0003).to_bytes(2, "little"))
    assert c.get(pm + 4, 2) & 3 == 3


def test_flr_hook_and_reset():
    c = EmulatedConfig(1, 2, size=4096)
    c.add_pcie()
    initial = c.snapshot()
    calls = []
    c.on_flr(lambda: calls.append(1))
    c.write(4, b"\x06\x00")
    exp = c.caps[CapId.EXP]
    c.write(exp + 8, (0x8000).to_bytes(2, "little"))
    assert calls == [1] and not c.get(exp + 8, 2) & 0x8000
    c.reset_state(initial)
    assert c.get(4, 2) == 0


def test_out_of_range_access():
    c = make()
    with pytest.raises(UsageError):
        c.read(255, 2)
    with pytest.raises(UsageError):
        c.write(-1, b"x")
