"""``pyvfio ls`` column by column (the "-" placeholders, the group, the
header), ``ls -v`` of several devices, ``PciDevice.as_dict`` when sysfs lacks
the subsystem IDs or names exist, and what a restore that did not take says."""

from __future__ import annotations

import os

import pytest

from pyvfio.cli import main
from pyvfio.errors import BindError
from pyvfio.host.binding import BindState, bind, restore
from pyvfio.host.model import Host
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import BUSY_NIC, E1000_BRIDGED, EDU, GPU, SYSTEM_PCI_IDS, build_standard

HEADER = ["DEVICE", "IDS", "CLASS", "DRIVER", "GROUP", "CDEV", "NAME"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _columns(out: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The header words and, per device, its cells cut at the header's columns."""
    header, *rows = out.splitlines()
    names = header.split()
    starts = [header.index(n) for n in names]
    table = {}
    for row in rows:
        cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        table[cells[0]] = dict(zip(names, cells, strict=True))
    return names, table


def _without_subsystem(fake: FakeSysfs, address: str, attr: str) -> None:
    """sysfs without the attribute, and a uevent without PCI_SUBSYS_ID."""
    d = fake.p(fake.devices[address].sysfs_dir)
    os.unlink(f"{d}/{attr}")
    with open(f"{d}/uevent") as f:
        lines = [line for line in f if not line.startswith("PCI_SUBSYS_ID=")]
    with open(f"{d}/uevent", "w") as f:
        f.writelines(lines)


def test_ls_columns_and_their_placeholders(tmp_path, capsys) -> None:
    fake = FakeSysfs(tmp_path / "root", noiommu=False, cdev=True,
                     pci_ids=SYSTEM_PCI_IDS.path if SYSTEM_PCI_IDS else None)
    build_standard(fake)
    with fake:
        fake.remove_group_link(EDU)
        bind(GPU, root=fake.root, group=True)  # on vfio-pci: a cdev
        host = Host(fake.root)
        cdev = host.device(GPU).vfio_cdev
        assert cdev and host.device(EDU).iommu_group is None and host.device(EDU).vfio_cdev is None
        code, out, _ = run(capsys, "--root", fake.root, "ls")
    names, table = _columns(out)
    assert code == 0 and names == HEADER
    assert (table[EDU]["DRIVER"], table[EDU]["GROUP"], table[EDU]["CDEV"]) == ("-", "-", "-")
    assert (table[GPU]["DRIVER"], table[GPU]["GROUP"], table[GPU]["CDEV"]) == ("vfio-pci", "12", cdev)
    assert table[E1000_BRIDGED]["GROUP"] == "7" and table[BUSY_NIC]["GROUP"] == "30"


def test_ls_verbose_separates_devices_by_one_blank_line(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "ls", "-v", EDU, GPU)
    chunks = out.rstrip("\n").split("\n\n")
    assert code == 0 and len(chunks) == 2
    assert chunks[0].startswith(f"{EDU} ") and chunks[1].startswith(f"{GPU} ") and GPU not in chunks[0]
    assert all(line.strip() for chunk in chunks for line in chunk.splitlines())


def test_as_dict_without_subsystem_ids(fake: FakeSysfs) -> None:
    _without_subsystem(fake, GPU, "subsystem_vendor")
    _without_subsystem(fake, EDU, "subsystem_device")
    host = Host(fake.root)
    gpu, edu = host.device(GPU).as_dict(), host.device(EDU).as_dict()
    assert (gpu["subsystem_vendor_id"], gpu["subsystem_device_id"]) == (None, "119e")
    assert (edu["subsystem_vendor_id"], edu["subsystem_device_id"]) == ("0000", None)
    assert edu["vfio_cdev"] is None and edu["vfio_cdev_path"] is None


def test_as_dict_names_the_device_from_pci_ids(fake: FakeSysfs) -> None:
    host = Host(fake.root)
    ids = host.ids
    if ids is None:
        pytest.skip("no pci.ids on this host")
    name = ids.device(0x10DE, 0x1B80)
    if name is None:
        pytest.skip("this pci.ids does not name 10de:1b80")
    d = host.device(GPU).as_dict(ids)
    assert d["device_name"] == name and d["vendor_name"] == ids.vendor(0x10DE)


def test_as_dict_asks_no_subsystem_name_without_both_ids(fake: FakeSysfs) -> None:
    _without_subsystem(fake, GPU, "subsystem_device")
    host = Host(fake.root)
    if host.ids is None:
        pytest.skip("no pci.ids on this host")
    asked = []

    class Ids:
        def __getattr__(self, name: str):
            return getattr(host.ids, name)

        def subsystem(self, *args: object) -> str:
            asked.append(args)
            return "asked"

    d = host.device(GPU).as_dict(Ids())  # type: ignore[arg-type]
    assert asked == [] and d["subsystem_name"] is None


def test_a_restore_that_does_not_take_says_where_the_device_is(fake: FakeSysfs) -> None:
    state_dir = fake.p("run/pyvfio/bind")
    bind(E1000_BRIDGED, root=fake.root, group=True, force=True)
    assert fake.devices[E1000_BRIDGED].driver == "vfio-pci"
    fake.fail_probe_devices.add(("e1000", E1000_BRIDGED))
    with pytest.raises(BindError) as exc:
        restore(E1000_BRIDGED, root=fake.root)
    path = BindState(state_dir).path(E1000_BRIDGED)
    assert str(exc.value) == (f"{E1000_BRIDGED}: could not put {E1000_BRIDGED} back on e1000 (it is on "
                              f"no driver); record kept in {path}")
    assert os.path.exists(path) and fake.devices[E1000_BRIDGED].driver is None


def test_an_unreadable_vfio_dev_entry_does_not_hide_the_others(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "root", noiommu=False, cdev=True)
    build_standard(fake)
    with fake:
        bind(GPU, root=fake.root, group=True)
        cdev = Host(fake.root).device(GPU).vfio_cdev
        assert cdev
        for n in range(8):  # not links; some come before the real one in the listing
            with open(fake.p(f"sys/class/vfio-dev/broken{n}"), "w"):
                pass
        assert {d.address: d.vfio_cdev for d in Host(fake.root).devices()}[GPU] == cdev
