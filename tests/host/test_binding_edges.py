"""Binding at its edges: the bind records' store (foreign or broken records,
a missing directory, the file's mode and format), the state directory's
precedence, what bind refuses before any write, and restore's errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pyvfio.errors import BindError, NoIommu, UsageError
from pyvfio.host import BindState, bind, restore, state_dir_for
from pyvfio.host.binding import BindResult
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import E1000_BRIDGED, EDU, EDU_BRIDGED, PCI_BRIDGE, ROOT_PORT


def _edit_bind_record(fake: FakeSysfs, address: str, **changes: str) -> BindState:
    """Change fields of the bind record pyvfio keeps for ``address``, on disk;
    returns the record store."""
    state = BindState(fake.p("run/pyvfio/bind"))
    record = state.load(address)
    assert record is not None
    record.update(changes)
    Path(state.path(address)).write_text(json.dumps(record))
    return state

def test_state_dir_is_the_flag_then_the_environment_then_under_the_root(monkeypatch) -> None:
    monkeypatch.delenv("PYVFIO_STATE_DIR", raising=False)
    assert state_dir_for("/r") == "/r/run/pyvfio/bind"
    monkeypatch.setenv("PYVFIO_STATE_DIR", "")
    assert state_dir_for("/r") == "/r/run/pyvfio/bind"
    monkeypatch.setenv("PYVFIO_STATE_DIR", "/env")
    assert state_dir_for("/r") == "/env"
    assert state_dir_for("/r", "/flag") == "/flag"


def test_a_record_store_without_a_directory_is_empty(tmp_path: Path) -> None:
    state = BindState(str(tmp_path / "none"))
    assert state.addresses() == [] and state.load(EDU) is None
    state.remove(EDU)  # nothing to remove: fine
    assert not os.path.exists(state.directory)


def test_records_are_private_sorted_json_named_by_address(tmp_path: Path) -> None:
    state = BindState(str(tmp_path / "bind"), boot_id="boot-1")
    record = {"device": EDU, "original_driver": None, "phase": "bound"}
    state.save(record)
    path = Path(state.path(EDU))
    assert path.name == f"{EDU}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state.directory).st_mode) == 0o700
    assert path.read_text() == json.dumps(
        {"boot_id": "boot-1", "device": EDU, "original_driver": None, "phase": "bound"},
        indent=1, sort_keys=True) + "\n"
    assert state.load(EDU) == {**record, "boot_id": "boot-1"}
    Path(state.directory, "notes.txt").write_text("not a record")
    state.save({"device": PCI_BRIDGE})
    assert state.addresses() == [PCI_BRIDGE, EDU]
    state.remove(EDU)
    assert state.addresses() == [PCI_BRIDGE]
    BindState(state.directory).save({"device": ROOT_PORT})  # no boot id known: none recorded
    assert "boot_id" not in json.loads(Path(state.path(ROOT_PORT)).read_text())


@pytest.mark.parametrize(("content", "message"), [
    ("{broken", "unreadable bind record"),
    ('{"device": "0000:00:01.0"}', "is not for 0000:06:00.0"),
    ('["0000:06:00.0"]', "is not for 0000:06:00.0"),
])
def test_a_broken_or_foreign_record_is_refused(tmp_path: Path, content: str, message: str) -> None:
    state = BindState(str(tmp_path))
    Path(state.path(EDU)).write_text(content)
    with pytest.raises(BindError) as exc:
        state.load(EDU)
    assert message in str(exc.value) and state.path(EDU) in str(exc.value)


@pytest.mark.parametrize(("recorded", "now", "stale"), [
    ("a", "b", True), ("a", "a", False), (None, "b", False), ("a", None, False), ("", "b", False),
])
def test_stale_only_when_both_boot_ids_are_known_and_differ(recorded: str | None, now: str | None,
                                                            stale: bool) -> None:
    assert BindState("/x", boot_id=now).is_stale({"device": EDU, "boot_id": recorded}) is stale


def test_bind_result_as_dict_copies_its_lists() -> None:
    r = BindResult(EDU, None, "vfio-pci", True, ["write x"], [{"kind": "mounted"}])
    d = r.as_dict()
    assert d == {"device": EDU, "original_driver": None, "driver": "vfio-pci", "changed": True,
                 "steps": ["write x"], "forced": [{"kind": "mounted"}]}
    d["steps"].append("y")
    d["forced"][0]["kind"] = "z"
    assert r.steps == ["write x"] and r.forced == [{"kind": "mounted"}]


def test_bind_refuses_before_any_write(fake: FakeSysfs) -> None:
    with pytest.raises(UsageError, match="name at least one device to bind"):
        bind([], root=fake.root)
    with pytest.raises(BindError) as exc:
        bind(PCI_BRIDGE, root=fake.root)
    assert str(exc.value) == (f"{PCI_BRIDGE} is a PCI bridge; vfio-pci does not take bridges "
                              "(bind the endpoints behind it, or use --group on one of them)")
    assert fake.writes == []


def test_bind_group_named_by_its_bridge_takes_the_endpoints(fake: FakeSysfs) -> None:
    fake.add_device("0000:07:00.0", 0x1B36, 0x000E, 0x060400, group=40)
    fake.add_device("0000:08:01.0", 0x1234, 0x11E8, 0x00FF00, group=40)
    results = bind("0000:07:00.0", root=fake.root, group=True)  # a single string works too
    assert [r.device for r in results] == ["0000:08:01.0"]
    assert fake.devices["0000:08:01.0"].driver == "vfio-pci"
    assert fake.devices["0000:07:00.0"].driver is None


def test_bind_without_an_iommu_group_on_a_host_without_iommu(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "r", iommu=False, noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
    with fake, pytest.raises(NoIommu) as exc:
        bind("00:04.0", root=fake.root)
    assert str(exc.value).startswith("no IOMMU: 0000:00:04.0 has no IOMMU group; boot with intel_iommu=on")
    assert fake.writes == []


def test_restore_of_a_record_from_an_earlier_boot(fake: FakeSysfs) -> None:
    bind(EDU, root=fake.root)
    state = _edit_bind_record(fake, EDU, boot_id="an-earlier-boot")
    with pytest.raises(BindError) as exc:
        restore([EDU], root=fake.root, dry_run=True)
    assert f"the record of {EDU} is from an earlier boot" in str(exc.value)
    assert state.load(EDU) is not None  # a dry run removes nothing
    with pytest.raises(BindError):
        restore([EDU], root=fake.root)
    assert state.load(EDU) is None
    assert fake.devices[EDU].driver == "vfio-pci"  # nothing restored


def test_restore_reports_every_device_it_could_not_restore(fake: FakeSysfs) -> None:
    bind([EDU, EDU_BRIDGED], root=fake.root, group=True)
    with pytest.raises(BindError) as exc:
        restore(["0000:09:00.0", EDU], root=fake.root)
    assert "no binding of 0000:09:00.0 is recorded" in str(exc.value)
    assert fake.devices[EDU].driver is None  # the one it could restore was restored


def test_restore_usage_and_every_error_in_one_message(fake: FakeSysfs) -> None:
    with pytest.raises(UsageError) as usage:
        restore([], root=fake.root)
    assert str(usage.value) == "name the devices to restore, or use --all"
    state_dir = fake.p("run/pyvfio/bind")
    with pytest.raises(BindError) as exc:
        restore(["0000:09:00.0", "0000:0a:00.0"], root=fake.root)
    assert str(exc.value) == (f"no binding of 0000:09:00.0 is recorded in {state_dir}; "
                              f"no binding of 0000:0a:00.0 is recorded in {state_dir}")


def test_a_stale_record_does_not_stop_the_others(fake: FakeSysfs) -> None:
    bind([EDU_BRIDGED], root=fake.root, group=True)  # EDU_BRIDGED and E1000_BRIDGED
    bind(EDU, root=fake.root)
    _edit_bind_record(fake, EDU_BRIDGED, boot_id="an-earlier-boot")
    with pytest.raises(BindError) as exc:
        restore(all_devices=True, root=fake.root)
    assert str(exc.value) == (f"the record of {EDU_BRIDGED} is from an earlier boot (bindings do not "
                              "survive a reboot); removed it, nothing to restore")
    assert fake.devices[E1000_BRIDGED].driver == "e1000" and fake.devices[EDU].driver is None


def test_a_restore_that_fails_names_the_device(fake: FakeSysfs) -> None:
    bind(EDU, root=fake.root)
    _edit_bind_record(fake, EDU, original_driver="gone_driver")  # unloaded since the bind
    with pytest.raises(BindError) as exc:
        restore([EDU], root=fake.root)
    assert str(exc.value).startswith(f"{EDU}: ") and "gone_driver" in str(exc.value)


def test_restore_write_sequence_and_result(fake: FakeSysfs) -> None:
    from .conftest import GPU

    bind(GPU, root=fake.root, group=True)
    fake.writes.clear()
    (gpu, _) = restore([GPU, "0000:01:00.1"], root=fake.root)
    # Back through its own driver's bind file: no probe of the whole bus.
    assert fake.writes[:4] == [
        (f"sys/bus/pci/devices/{GPU}/driver_override", "nouveau"),
        ("sys/bus/pci/drivers/vfio-pci/unbind", GPU),
        ("sys/bus/pci/drivers/nouveau/bind", GPU),
        (f"sys/bus/pci/devices/{GPU}/driver_override", "\n"),
    ]
    assert ("sys/bus/pci/drivers_probe", GPU) not in fake.writes
    assert gpu.as_dict() == {"device": GPU, "original_driver": "vfio-pci", "driver": "nouveau",
                             "changed": True, "steps": gpu.steps, "forced": []}


def test_restore_of_a_device_already_back_is_unchanged(fake: FakeSysfs) -> None:
    bind(EDU, root=fake.root)
    fake.write(fake.p(f"sys/bus/pci/devices/{EDU}/driver_override"), "\n")
    fake.write(fake.p("sys/bus/pci/drivers/vfio-pci/unbind"), EDU)
    (r,) = restore([EDU], root=fake.root)
    assert r.as_dict()["changed"] is False and r.original_driver is None and r.driver is None


def test_a_failed_driver_bind_falls_back_to_a_probe(fake: FakeSysfs) -> None:
    bind(EDU, root=fake.root)
    _edit_bind_record(fake, EDU, original_driver="gone_driver")
    fake.writes.clear()
    with pytest.raises(BindError):
        restore([EDU], root=fake.root)
    assert ("sys/bus/pci/drivers_probe", EDU) in fake.writes  # the bus picks, then it is checked
