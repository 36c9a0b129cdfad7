"""A group vfio registered (no device cdevs, no alias) with one member on a
driver and one on none: the driven member is the one that registered it."""

from __future__ import annotations

from pyvfio.host import Host
from pyvfio.testing.fakesysfs import FakeSysfs


def test_a_driverless_member_does_not_hide_the_registering_driver(bare: FakeSysfs) -> None:
    bare.add_driver("oot_vfio", vfio=True)  # no aliases in modules.alias
    bare.add_device("0000:01:00.0", 0x1D0F, 0xEFA0, 0x020000, group=4, driver="oot_vfio")
    bare.add_device("0000:01:00.1", 0x1234, 0x11E8, 0x00FF00, group=4)  # no driver
    d = Host(bare.root).diagnose("0000:01:00.0")
    assert d.driver_kind == "vfio-variant" and d.best_driver == "oot_vfio"
    assert any(e["source"] == "/sys/class/vfio/4" and "0000:01:00.0 (oot_vfio) is its only member"
               in e["says"] for e in d.evidence)
