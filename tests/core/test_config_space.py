"""PCI config space parsing and capability walks, including hostile data."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyvfio.pci.config import CapId, ConfigSpace, ExtCapId


def make_config() -> bytearray:
    cfg = bytearray(4096)
    cfg[0:4] = bytes.fromhex("3412e811")
    cfg[6] = 0x10  # capability list present
    cfg[0x34] = 0x40
    cfg[0x40:0x42] = bytes([CapId.MSI, 0x60])
    cfg[0x60:0x62] = bytes([CapId.EXP, 0x00])
    cfg[0x100:0x104] = (ExtCapId.ERR | (1 << 16) | (0x140 << 20)).to_bytes(4, "little")
    cfg[0x140:0x144] = (ExtCapId.DSN | (1 << 16)).to_bytes(4, "little")
    return cfg


def test_walks_standard_and_extended() -> None:
    caps = list(ConfigSpace.from_bytes(make_config()).capabilities())
    assert [(c.name, c.offset) for c in caps] == [
        ("MSI", 0x40), ("EXP", 0x60), ("ERR", 0x100), ("DSN", 0x140)]
    assert caps[2].version == 1


def test_loop_in_list_ends_walk() -> None:
    cfg = make_config()
    cfg[0x61] = 0x40  # EXP points back at MSI
    caps = list(ConfigSpace.from_bytes(cfg[:256]).capabilities())
    assert [c.offset for c in caps] == [0x40, 0x60]


def test_writes_through_bytearray() -> None:
    cfg = make_config()
    space = ConfigSpace.from_bytes(cfg)
    space.enable_bus_master()
    assert space.read16(4) & 0x6 == 0x6
    assert space.find_capability(CapId.MSIX) is None
    found = space.find_capability(ExtCapId.DSN, extended=True)
    assert found is not None and found.offset == 0x140


@given(st.binary(min_size=256, max_size=4096))
def test_arbitrary_bytes_never_hang_or_crash(data: bytes) -> None:
    caps = list(ConfigSpace.from_bytes(data).capabilities())
    # each capability appears at most once: the walk cannot loop
    assert len({c.offset for c in caps}) == len(caps)
