"""Persisted bindings: bind --persist, apply, persist list/forget, the boot unit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pyvfio.cli import main
from pyvfio.host.persist import PersistedBindings, unit_text
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import AUDIO, E1000_BRIDGED, EDU, EDU_BRIDGED, GPU


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _fresh_boot(fake: FakeSysfs) -> None:
    """What a reboot does to the fake: a new boot_id, /run emptied, every
    device back on the driver that claims it at boot."""
    import shutil

    fake.reboot()
    shutil.rmtree(fake.p("run"), ignore_errors=True)
    boot = {GPU: "nouveau", AUDIO: "snd_hda_intel", E1000_BRIDGED: "e1000", EDU: None, EDU_BRIDGED: None}
    for bdf, driver in boot.items():
        dev = fake.devices[bdf]
        if dev.driver is not None:
            fake.write(fake.p(f"sys/bus/pci/drivers/{dev.driver}/unbind"), bdf)
        fake.write(fake.p(f"sys/bus/pci/devices/{bdf}/driver_override"), "\n")
        if driver:
            fake.write(fake.p(f"sys/bus/pci/drivers/{driver}/bind"), bdf)
        assert fake.devices[bdf].driver == driver


def test_persist_then_apply_after_a_reboot(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "bind", "--persist", "--group", GPU)
    assert code == 0, err
    assert f"recorded in {fake.p('etc/pyvfio/bindings.json')}: {GPU}" in out
    data = json.loads(Path(fake.p("etc/pyvfio/bindings.json")).read_text())
    assert data == {"version": 1, "bindings": [
        {"device": GPU, "vendor_id": "10de", "device_id": "1b80", "driver": None, "group": True}]}
    code, out, _ = run(capsys, "--root", fake.root, "bind", "--persist", EDU, "--driver", "vfio-pci")
    assert code == 0
    code, out, _ = run(capsys, "--root", fake.root, "persist", "list", "--json")
    assert [(e["device"], e["driver"], e["group"]) for e in json.loads(out)] == [
        (GPU, None, True), (EDU, "vfio-pci", False)]

    _fresh_boot(fake)
    fake.writes.clear()
    code, out, _ = run(capsys, "--root", fake.root, "apply", "--dry-run")
    assert code == 0 and fake.writes == [] and fake.devices[GPU].driver == "nouveau"
    code, out, err = run(capsys, "--root", fake.root, "apply", "--json")
    assert code == 0, err
    statuses = {b["device"]: b["status"] for b in json.loads(out)["bindings"]}
    assert statuses == {GPU: "bound", EDU: "bound"}
    assert {fake.devices[b].driver for b in (GPU, AUDIO, EDU)} == {"vfio-pci"}
    code, out, _ = run(capsys, "--root", fake.root, "apply")
    assert code == 0 and f"{GPU}: already:" in out


def test_apply_keeps_the_safety_checks(fake: FakeSysfs, capsys) -> None:
    code, _, _ = run(capsys, "--root", fake.root, "bind", "--persist", "--group", EDU_BRIDGED)
    assert code == 0
    _fresh_boot(fake)
    fake.add_netdev(E1000_BRIDGED, "ens2")
    fake.add_ipv4_route("ens2", "10.1.0.0", 16)
    fake.writes.clear()
    code, out, _ = run(capsys, "--root", fake.root, "apply")
    assert code == 1 and f"{EDU_BRIDGED}: refused:" in out and "ens2" in out
    assert fake.writes == [] and fake.devices[E1000_BRIDGED].driver == "e1000"
    code, out, _ = run(capsys, "--root", fake.root, "apply", "--force")
    assert code == 0 and fake.devices[E1000_BRIDGED].driver == "vfio-pci"


def test_another_card_in_the_slot_is_not_bound(fake: FakeSysfs, capsys) -> None:
    config = PersistedBindings(fake.p("etc/pyvfio"))
    config.save([{"device": EDU, "vendor_id": "8086", "device_id": "10d3", "driver": None,
                  "group": False}])
    code, out, _ = run(capsys, "--root", fake.root, "apply", "--json")
    (b,) = json.loads(out)["bindings"]
    assert code == 1 and b["status"] == "changed" and "1234:11e8" in b["message"]
    assert fake.writes == []


def test_forget(fake: FakeSysfs, capsys) -> None:
    run(capsys, "--root", fake.root, "bind", "--persist", EDU)
    code, _, err = run(capsys, "--root", fake.root, "persist", "forget", GPU)
    assert code == 2 and f"no persisted binding of {GPU}" in err
    code, out, _ = run(capsys, "--root", fake.root, "persist", "forget", "06:00.0")
    assert code == 0 and "forgotten" in out and fake.devices[EDU].driver == "vfio-pci"
    assert PersistedBindings(fake.p("etc/pyvfio")).load() == []
    code, out, _ = run(capsys, "--root", fake.root, "apply")
    assert code == 0 and "no persisted bindings" in out


def test_a_broken_configuration_is_refused_before_binding(fake: FakeSysfs, capsys) -> None:
    Path(fake.p("etc/pyvfio")).mkdir(parents=True)
    Path(fake.p("etc/pyvfio/bindings.json")).write_text("{not json")
    code, _, err = run(capsys, "--root", fake.root, "bind", "--persist", EDU)
    assert code == 2 and "bindings.json" in err and fake.writes == []


def test_the_unit_is_package_data_and_runs_apply_early(capsys) -> None:
    text = unit_text()
    assert f"ExecStart={sys.executable} -m pyvfio apply" in text
    before = next(line for line in text.splitlines() if line.startswith("Before="))
    assert "libvirtd.service" in before and "kubelet.service" in before
    assert "DefaultDependencies=no" in text and "Type=oneshot" in text
    code, out, _ = run(capsys, "apply", "--print-unit")
    assert code == 0 and out == text
