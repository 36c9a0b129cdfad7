"""Thousands of devices: the inventory stays complete and consistent."""

from __future__ import annotations

import json

import pytest

from pyvfio.cli import main
from pyvfio.host import Host
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import SYSTEM_PCI_IDS

COUNT = 3000


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> FakeSysfs:
    fake = FakeSysfs(tmp_path_factory.mktemp("big"), noiommu=False,
                     pci_ids=SYSTEM_PCI_IDS.path if SYSTEM_PCI_IDS else None)
    fake.add_standard_drivers()
    fake.populate(COUNT, seed=7)
    return fake


def test_ls_and_groups_cover_every_device(big: FakeSysfs, capsys) -> None:
    assert main(["--root", big.root, "ls", "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)
    assert len(devices) == COUNT and len({d["device"] for d in devices}) == COUNT
    assert main(["--root", big.root, "groups", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert sum(len(g["devices"]) for g in groups) == COUNT
    by_address = {d["device"]: d for d in devices}
    for g in groups:
        assert all(by_address[a]["iommu_group"] == g["group"] for a in g["devices"])
        # A GPU group holds its audio function on snd_hda_intel: never viable.
        drivers = {by_address[a]["driver"] for a in g["devices"]}
        assert g["viable"] == (drivers <= {None, "pcieport"})


def test_names_are_looked_up_once_per_id(big: FakeSysfs) -> None:
    host = Host(big.root)
    for dev in host.devices():
        dev.as_dict(host.ids)
    if host.ids is None:
        pytest.skip("the system has no pci.ids (package pci.ids)")
    devices = host.devices()
    assert set(host.ids._vendors) == {d.vendor_id for d in devices}
    assert set(host.ids._devices) <= {(d.vendor_id, d.device_id) for d in devices}


def test_diagnose_and_bind_a_gpu_among_thousands(big: FakeSysfs) -> None:
    host = Host(big.root)
    gpu = next(d for d in host.devices() if d.vendor_id == 0x10DE and d.address.endswith(".0"))
    d = host.diagnose(gpu.address)
    assert not d.viable and len(d.members) == 2
    with big:
        from pyvfio.host import bind, restore

        bind(gpu.address, root=big.root, group=True)
        assert Host(big.root).diagnose(gpu.address).ready
        restore(all_devices=True, root=big.root)
    assert Host(big.root).device(gpu.address).driver == "nouveau"
