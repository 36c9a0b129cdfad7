"""Managed binding against the fake kernel: records, rollback, restore."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from pyvfio.errors import BindError, DeviceInUse, NotViable
from pyvfio.host import BindState, Host, bind, restore
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import AUDIO, BUSY_NIC, E1000_BRIDGED, EDU, EDU_BRIDGED, GPU, MLX_VF, PCI_BRIDGE


def _state(fake: FakeSysfs) -> BindState:
    return BindState(fake.p("run/pyvfio/bind"))


def _override(fake: FakeSysfs, bdf: str) -> str:
    return open(fake.p(f"sys/bus/pci/devices/{bdf}/driver_override")).read().strip()


def test_bind_and_restore_one_device(fake: FakeSysfs) -> None:
    (result,) = bind(E1000_BRIDGED, root=fake.root, group=True)[-1:]
    assert result.device == E1000_BRIDGED and result.changed
    assert fake.devices[E1000_BRIDGED].driver == "vfio-pci"
    assert fake.devices[EDU_BRIDGED].driver == "vfio-pci"
    assert fake.devices[PCI_BRIDGE].driver is None  # bridges stay
    record = _state(fake).load(E1000_BRIDGED)
    assert record is not None
    assert (record["original_driver"], record["original_override"], record["phase"]) == ("e1000", None, "bound")
    assert Host(fake.root).diagnose(EDU_BRIDGED).ready
    restored = restore(all_devices=True, root=fake.root)
    assert {r.device for r in restored} == {E1000_BRIDGED, EDU_BRIDGED}
    assert fake.devices[E1000_BRIDGED].driver == "e1000"
    assert fake.devices[EDU_BRIDGED].driver is None
    assert _override(fake, E1000_BRIDGED) == "(null)" and _override(fake, EDU_BRIDGED) == "(null)"
    assert _state(fake).addresses() == []
    assert not os.path.exists(fake.p("dev/vfio/7"))


def test_the_write_sequence(fake: FakeSysfs) -> None:
    bind(EDU, root=fake.root)
    assert fake.writes == [
        (f"sys/bus/pci/devices/{EDU}/driver_override", "vfio-pci"),
        ("sys/bus/pci/drivers_probe", EDU),
    ]
    fake.writes.clear()
    bind([GPU, AUDIO], root=fake.root)
    assert fake.writes[:3] == [
        (f"sys/bus/pci/devices/{GPU}/driver_override", "vfio-pci"),
        ("sys/bus/pci/drivers/nouveau/unbind", GPU),
        ("sys/bus/pci/drivers_probe", GPU),
    ]


def test_dry_run_changes_nothing(fake: FakeSysfs) -> None:
    results = bind(GPU, root=fake.root, group=True, dry_run=True)
    assert fake.writes == []
    assert not os.path.exists(fake.p("run/pyvfio/bind"))
    assert [r.driver for r in results] == ["vfio-pci", "vfio-pci"]
    assert any("drivers/snd_hda_intel/unbind" in s for s in results[1].steps)


def test_refuses_to_leave_a_group_not_viable(fake: FakeSysfs) -> None:
    with pytest.raises(NotViable) as exc:
        bind(GPU, root=fake.root)
    assert AUDIO in str(exc.value) and "snd_hda_intel" in str(exc.value) and "--group" in str(exc.value)
    assert exc.value.problems[0]["device"] == AUDIO
    assert fake.writes == []


def test_refuses_a_group_in_use(fake: FakeSysfs) -> None:
    with pytest.raises(DeviceInUse, match=r"pid 4242 \(qemu-system-x86\)"):
        bind(BUSY_NIC, root=fake.root, driver="pci-stub")
    assert fake.writes == [] and fake.devices[BUSY_NIC].driver == "vfio-pci"


def test_variant_is_the_default_target(fake: FakeSysfs) -> None:
    bind(MLX_VF, root=fake.root)
    assert fake.devices[MLX_VF].driver == "mlx5_vfio_pci"
    bind(MLX_VF, root=fake.root, driver="vfio-pci")  # explicit choice wins; original kept
    assert fake.devices[MLX_VF].driver == "vfio-pci"
    restore(MLX_VF, root=fake.root)
    assert fake.devices[MLX_VF].driver == "mlx5_core"


def test_a_probe_failing_half_way_rolls_everything_back(fake: FakeSysfs) -> None:
    fake.fail_probe_devices.add(("vfio-pci", AUDIO))
    with pytest.raises(BindError) as exc:
        bind(GPU, root=fake.root, group=True)
    message = str(exc.value)
    assert f"binding {AUDIO} to vfio-pci failed" in message and "rolled back" in message
    assert fake.devices[GPU].driver == "nouveau" and fake.devices[AUDIO].driver == "snd_hda_intel"
    assert _override(fake, GPU) == "(null)" and _override(fake, AUDIO) == "(null)"
    assert _state(fake).addresses() == []
    assert not os.path.exists(fake.p("dev/vfio/12"))


def test_a_failed_rollback_says_so_and_keeps_the_record(fake: FakeSysfs) -> None:
    fake.fail_probe_devices |= {("vfio-pci", AUDIO), ("snd_hda_intel", AUDIO)}
    with pytest.raises(BindError, match=f"{AUDIO} NOT restored .*run pyvfio restore {AUDIO}"):
        bind(GPU, root=fake.root, group=True)
    assert fake.devices[GPU].driver == "nouveau"
    assert _state(fake).addresses() == [AUDIO]
    fake.fail_probe_devices.clear()
    restore(AUDIO, root=fake.root)
    assert fake.devices[AUDIO].driver == "snd_hda_intel"


def test_a_refused_write_rolls_back(fake: FakeSysfs) -> None:
    fake.fail_writes["sys/bus/pci/drivers/snd_hda_intel/unbind"] = errno.EIO
    with pytest.raises(BindError, match="Input/output error"):
        bind(GPU, root=fake.root, group=True)
    assert fake.devices[GPU].driver == "nouveau" and fake.devices[AUDIO].driver == "snd_hda_intel"
    assert _state(fake).addresses() == []


def test_restore_after_a_crash_mid_bind(fake: FakeSysfs) -> None:
    class Crash(BaseException):
        pass

    class CrashingWriter:
        def write(self, path: str, data: str) -> None:
            if path.endswith("drivers_probe"):
                raise Crash  # the process dies between unbind and probe
            fake.write(path, data)

    with pytest.raises(Crash):
        bind(E1000_BRIDGED, root=fake.root, host=Host(fake.root, writer=CrashingWriter()))
    assert fake.devices[E1000_BRIDGED].driver is None
    record = _state(fake).load(E1000_BRIDGED)
    assert record is not None and record["phase"] == "binding"
    restore(all_devices=True, root=fake.root)
    assert fake.devices[E1000_BRIDGED].driver == "e1000"
    assert _override(fake, E1000_BRIDGED) == "(null)"
    assert _state(fake).addresses() == []


def test_bind_again_keeps_the_first_original(fake: FakeSysfs) -> None:
    bind(EDU, root=fake.root)
    assert bind(EDU, root=fake.root)[0].changed is False
    record = _state(fake).load(EDU)
    assert record is not None and record["original_driver"] is None


def test_original_override_comes_back(bare: FakeSysfs) -> None:
    bare.add_device("0000:01:00.0", 0x8086, 0x100E, 0x020000, group=4, driver="e1000",
                    driver_override="e1000")
    bind("0000:01:00.0", root=bare.root)
    restore("0000:01:00.0", root=bare.root)
    assert _override(bare, "0000:01:00.0") == "e1000"
    assert bare.devices["0000:01:00.0"].driver == "e1000"


def test_records_are_atomic_json(fake: FakeSysfs) -> None:
    bind(EDU, root=fake.root)
    directory = fake.p("run/pyvfio/bind")
    assert os.listdir(directory) == [f"{EDU}.json"]
    with open(os.path.join(directory, f"{EDU}.json")) as f:
        record = json.load(f)
    assert record["device"] == EDU and record["target_driver"] == "vfio-pci"


def test_state_dir_override(fake: FakeSysfs, tmp_path, monkeypatch) -> None:
    bind(EDU, root=fake.root, state_dir=str(tmp_path / "explicit"))
    assert os.path.exists(tmp_path / "explicit" / f"{EDU}.json")
    monkeypatch.setenv("PYVFIO_STATE_DIR", str(tmp_path / "env"))
    restore(EDU, root=fake.root, state_dir=str(tmp_path / "explicit"))
    bind(EDU, root=fake.root)
    assert os.path.exists(tmp_path / "env" / f"{EDU}.json")


def _rebind_by_hand(fake: FakeSysfs, bdf: str, driver: str) -> None:
    current = fake.devices[bdf].driver
    fake.write(fake.p(f"sys/bus/pci/devices/{bdf}/driver_override"), driver)
    if current:
        fake.write(fake.p(f"sys/bus/pci/drivers/{current}/unbind"), bdf)
    fake.write(fake.p("sys/bus/pci/drivers_probe"), bdf)
    fake.write(fake.p(f"sys/bus/pci/devices/{bdf}/driver_override"), "\n")
    assert fake.devices[bdf].driver == driver


def test_records_from_an_earlier_boot_are_stale(fake: FakeSysfs) -> None:
    bind(E1000_BRIDGED, root=fake.root)  # records e1000 as the original
    fake.reboot()
    before = fake.writes[:]
    with pytest.raises(BindError, match="earlier boot"):
        restore(E1000_BRIDGED, root=fake.root)
    assert fake.writes == before  # nothing touched, the record is gone
    assert _state(fake).addresses() == []

    bind(E1000_BRIDGED, root=fake.root)
    fake.reboot()
    _rebind_by_hand(fake, E1000_BRIDGED, "pci-stub")  # this boot's state, made by hand
    bind(E1000_BRIDGED, root=fake.root)  # the stale record (e1000) must not count
    record = _state(fake).load(E1000_BRIDGED)
    assert record is not None and record["original_driver"] == "pci-stub"
    restore(all_devices=True, root=fake.root)
    assert fake.devices[E1000_BRIDGED].driver == "pci-stub"
    _rebind_by_hand(fake, E1000_BRIDGED, "e1000")


def test_restore_without_a_record(fake: FakeSysfs) -> None:
    with pytest.raises(BindError, match=r"no binding of 0000:06:00\.0 is recorded"):
        restore(EDU, root=fake.root)


def test_bridges_and_unloaded_drivers_are_refused(fake: FakeSysfs) -> None:
    with pytest.raises(BindError, match="is a PCI bridge"):
        bind(PCI_BRIDGE, root=fake.root)
    with pytest.raises(BindError, match=r"driver nvgrace_vfio is not loaded \(modprobe nvgrace_vfio\)"):
        bind(EDU, root=fake.root, driver="nvgrace_vfio")
    assert fake.writes == []


def test_real_writes_into_a_tree_that_does_not_react(fake: FakeSysfs) -> None:
    """Without the fake kernel the writes land in plain files: the probe
    "does not attach", so the bind must notice and roll back."""
    fake.uninstall()
    with pytest.raises(BindError, match="after drivers_probe its driver is e1000"):
        bind(E1000_BRIDGED, root=fake.root)
    assert Path(fake.p("sys/bus/pci/drivers_probe")).read_text() == E1000_BRIDGED
    assert _state(fake).addresses() == []
