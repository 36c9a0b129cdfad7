"""``apply`` entry by entry: one binding that cannot be applied never stops the
ones after it, each entry's driver, the configuration and state directories
it was given, its defaults, and what ``pyvfio apply`` prints of each refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyvfio.cli import main
from pyvfio.host.model import Host
from pyvfio.host.persist import PersistedBindings, apply
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import E1000_BRIDGED, EDU, EDU_BRIDGED, GPU, MLX_VF, ROOT_PORT

ABSENT = "0000:00:00.0"  # sorts first: no device there


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _entry(device: str, *, ids: str | None = None, driver: str | None = None,
           group: bool = False) -> dict[str, object]:
    entry: dict[str, object] = {"device": device, "driver": driver, "group": group}
    if ids:
        entry["vendor_id"], entry["device_id"] = ids.split(":")
    return entry


def test_every_entry_is_tried_whatever_happened_to_the_one_before(fake: FakeSysfs, tmp_path: Path) -> None:
    config_dir, state_dir = str(tmp_path / "conf"), str(tmp_path / "state")
    PersistedBindings(config_dir).save([
        _entry(ABSENT),
        _entry(ROOT_PORT, ids="8086:1111"),  # another card in the slot now
        _entry(GPU),  # its audio function would stay on the host: refused
        _entry(MLX_VF, driver="vfio-pci"),  # not the variant driver it would get by default
        _entry(EDU),
    ])
    best = Host(fake.root).best_driver(Host(fake.root).device(MLX_VF))
    assert best != "vfio-pci"  # else the driver entry would prove nothing
    results = apply(root=fake.root, config_dir=config_dir, state_dir=state_dir)
    assert [(r.device, r.status) for r in results] == [
        (ABSENT, "absent"), (ROOT_PORT, "changed"), (GPU, "refused"), (MLX_VF, "bound"), (EDU, "bound")]
    assert results[1].message.startswith(f"{ROOT_PORT} is now 8086:a110, but the binding was recorded")
    assert results[2].problems and all(p["reason"] for p in results[2].problems)
    assert results[3].message == f"{MLX_VF} -> vfio-pci"
    assert fake.devices[MLX_VF].driver == "vfio-pci" and fake.devices[EDU].driver == "vfio-pci"
    # the records went to the state directory given, not the one under the root
    assert sorted(os.listdir(state_dir)) == sorted([f"{EDU}.json", f"{MLX_VF}.json"])
    assert not os.path.exists(fake.p("run/pyvfio/bind"))


def test_apply_reads_the_configuration_directory_it_is_given(fake: FakeSysfs, tmp_path: Path) -> None:
    PersistedBindings(str(tmp_path / "conf")).save([_entry(EDU)])
    assert apply(root=fake.root) == []  # nothing under the root
    (result,) = apply(root=fake.root, config_dir=str(tmp_path / "conf"))
    assert (result.device, result.status) == (EDU, "bound")


def test_an_unwritable_state_directory_fails_the_entry(fake: FakeSysfs) -> None:
    PersistedBindings(fake.p("etc/pyvfio")).save([_entry(EDU)])
    (result,) = apply(root=fake.root, state_dir="/proc/self/pyvfio-state")  # even root cannot
    assert result.status == "failed" and not result.ok
    assert "cannot write the bind records in /proc/self/pyvfio-state" in result.message
    assert fake.devices[EDU].driver is None and fake.writes == []


def test_no_iommu_refuses_the_entry_with_no_problem_list(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "r", iommu=False, noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
    with fake:
        PersistedBindings(fake.p("etc/pyvfio")).save([_entry("0000:00:04.0")])
        (result,) = apply(root=fake.root)
    assert result.status == "refused" and result.problems == []
    assert result.message.startswith("no IOMMU: 0000:00:04.0 has no IOMMU group")


def test_apply_does_not_force_unless_asked(fake: FakeSysfs) -> None:
    PersistedBindings(fake.p("etc/pyvfio")).save([_entry(EDU_BRIDGED, group=True)])
    fake.add_netdev(E1000_BRIDGED, "ens2")
    fake.add_ipv4_route("ens2", "10.1.0.0", 16)
    (result,) = apply(root=fake.root)
    assert result.status == "refused" and "ens2" in result.message
    assert fake.devices[E1000_BRIDGED].driver == "e1000" and fake.writes == []
    (result,) = apply(root=fake.root, force=True)
    assert result.status == "bound" and fake.devices[E1000_BRIDGED].driver == "vfio-pci"


def test_the_apply_command_passes_its_directories(fake: FakeSysfs, capsys, tmp_path: Path) -> None:
    conf, state = str(tmp_path / "conf"), str(tmp_path / "state")
    PersistedBindings(conf).save([_entry(EDU)])
    code, out, _ = run(capsys, "--root", fake.root, "apply", "--config-dir", conf, "--state-dir", state,
                       "--json")
    doc = json.loads(out)
    assert code == 0 and doc["dry_run"] is False
    assert [(b["device"], b["status"]) for b in doc["bindings"]] == [(EDU, "bound")]
    assert os.listdir(state) == [f"{EDU}.json"] and not os.path.exists(fake.p("run/pyvfio/bind"))
    code, out, _ = run(capsys, "--root", fake.root, "apply", "--config-dir", conf, "--dry-run", "--json")
    assert code == 0 and json.loads(out)["dry_run"] is True


def test_the_apply_command_prints_every_further_reason(fake: FakeSysfs, capsys) -> None:
    # a function alone of a group whose two other functions stay on a host driver
    fake.add_device("0000:0a:00.0", 0x1234, 0x11E8, 0x00FF00, group=40)
    fake.add_device("0000:0a:00.1", 0x8086, 0x100E, 0x020000, group=40, driver="e1000")
    fake.add_device("0000:0a:00.2", 0x8086, 0x100E, 0x020000, group=40, driver="e1000")
    PersistedBindings(fake.p("etc/pyvfio")).save([_entry(GPU), _entry("0000:0a:00.0")])
    results = apply(root=fake.root)
    many = [r for r in results if len(r.problems) >= 2]
    assert many, [r.problems for r in results]  # the test needs a refusal with several reasons
    code, out, _ = run(capsys, "--root", fake.root, "apply")
    expected = []
    for r in results:
        expected.append(f"{r.device}: {r.status}: {r.message}")
        expected += [f"    also: {p['kind']}: {p['reason']}" for p in r.problems[1:]]
    assert code == 1 and out.splitlines() == expected
    assert all(p["kind"] and p["reason"] for r in many for p in r.problems)


def test_the_apply_command_without_bindings(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "apply")
    assert code == 0 and out == "no persisted bindings\n"
