"""``pyvfio bind`` in text: each device's line (changed, already there, dry
run), the dry-run footer only on a dry run, ``--driver``, ``--persist`` with
``--config-dir``; ``check`` without devices, and ``check --all`` in text."""

from __future__ import annotations

import json

import pytest

from pyvfio.cli import main
from pyvfio.host.model import Host
from pyvfio.host.persist import PersistedBindings
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import E1000_BRIDGED, EDU, MLX_VF


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _result_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("0000:")]


def test_bind_says_where_each_device_went_and_where_it_already_was(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "bind", E1000_BRIDGED)
    assert code == 0, err
    assert _result_lines(out) == [f"{E1000_BRIDGED}: e1000 -> now on vfio-pci"]
    assert "dry run" not in out
    code, out, err = run(capsys, "--root", fake.root, "bind", EDU, E1000_BRIDGED)
    assert code == 0, err
    assert _result_lines(out) == [f"{E1000_BRIDGED}: already on vfio-pci", f"{EDU}: no driver -> now on vfio-pci"]


def test_a_dry_run_says_what_would_happen(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "bind", "--dry-run", E1000_BRIDGED)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{E1000_BRIDGED}: e1000 would go to vfio-pci"
    assert lines[1].startswith("    ") and "dry run: nothing was changed" in lines
    assert fake.devices[E1000_BRIDGED].driver == "e1000"


def test_bind_takes_the_driver_asked_for(fake: FakeSysfs, capsys) -> None:
    host = Host(fake.root)
    assert host.best_driver(host.device(MLX_VF)) != "vfio-pci"  # else this proves nothing
    code, out, err = run(capsys, "--root", fake.root, "bind", "--driver", "vfio-pci", MLX_VF)
    assert code == 0, err
    assert _result_lines(out) == [f"{MLX_VF}: mlx5_core -> now on vfio-pci"]
    assert fake.devices[MLX_VF].driver == "vfio-pci"


def test_bind_persist_records_in_the_config_dir_given(fake: FakeSysfs, capsys, tmp_path) -> None:
    conf = str(tmp_path / "conf")
    code, out, err = run(capsys, "--root", fake.root, "bind", "--persist", "--config-dir", conf, EDU)
    assert code == 0, err
    assert [e["device"] for e in PersistedBindings(conf).load()] == [EDU]
    assert PersistedBindings(fake.p("etc/pyvfio")).load() == []
    assert f"recorded in {PersistedBindings(conf).path}: {EDU}" in out


def test_check_needs_devices_or_all_and_all_is_text_unless_json(fake: FakeSysfs, capsys) -> None:
    code, _, err = run(capsys, "--root", fake.root, "check")
    assert code == 2 and err.rstrip("\n").endswith(": name the devices to check, or use --all")
    _, out, _ = run(capsys, "--root", fake.root, "check", "--all")
    assert out and not out.lstrip().startswith(("[", "{")) and EDU in out


def test_a_dry_run_of_a_device_without_driver(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "bind", "--dry-run", EDU)
    assert code == 0, err
    assert _result_lines(out) == [f"{EDU}: no driver would go to vfio-pci"]


def test_bind_persist_checks_the_config_dir_before_binding(fake: FakeSysfs, capsys) -> None:
    unwritable = "/proc/self/pyvfio-conf"  # even root cannot create it
    code, _, err = run(capsys, "--root", fake.root, "bind", "--persist", "--config-dir", unwritable, EDU)
    assert code != 0 and unwritable in err
    assert fake.devices[EDU].driver is None and fake.writes == []
    code, out, err = run(capsys, "--root", fake.root, "bind", "--persist", "--config-dir", unwritable,
                         "--dry-run", EDU)
    assert code == 0, err
    assert f"would record in {unwritable}/bindings.json: {EDU}" in out


def test_bind_json_without_persist_reports_no_entries(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "bind", "--json", EDU)
    assert code == 0, err
    assert json.loads(out)["persisted"] == []


def test_bound_but_not_ready_says_why_and_fails(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "bind", "--driver", "pci-stub", EDU)
    assert fake.devices[EDU].driver == "pci-stub"
    (diag,) = json.loads(run(capsys, "--root", fake.root, "check", "--json", EDU)[1])
    assert diag["ready"] is False and diag["problems"]  # pci-stub is no vfio driver
    assert code == 1
    assert [line for line in out.splitlines() if ": not ready: " in line] == [
        f"{EDU}: not ready: {p['reason']}" for p in diag["problems"]]
    assert out.count("    fix: ") == len(diag["problems"])


def test_a_dry_run_restore_shows_the_override_cleared(fake: FakeSysfs, capsys) -> None:
    run(capsys, "--root", fake.root, "bind", EDU)
    code, out, err = run(capsys, "--root", fake.root, "restore", "--dry-run", EDU)
    assert code == 0, err
    assert f"write '(empty: clear)' to {fake.p(f'sys/bus/pci/devices/{EDU}/driver_override')}" in out


def test_check_names_the_driver_a_device_is_on_or_none(fake: FakeSysfs, capsys) -> None:
    run(capsys, "--root", fake.root, "bind", "--driver", "pci-stub", MLX_VF)
    assert fake.devices[MLX_VF].driver == "pci-stub"
    _, out, _ = run(capsys, "--root", fake.root, "check", "--json", EDU, MLX_VF)
    reasons = {d["device"]: [p["reason"] for p in d["problems"]] for d in json.loads(out)}
    assert f"{EDU} is not bound to a vfio driver (no driver)" in reasons[EDU]
    assert f"{MLX_VF} is not bound to a vfio driver (pci-stub)" in reasons[MLX_VF]


def test_binding_again_over_a_record_from_an_earlier_boot(fake: FakeSysfs, capsys) -> None:
    from pyvfio.host.binding import BindState

    run(capsys, "--root", fake.root, "bind", EDU)
    state = BindState(fake.p("run/pyvfio/bind"))
    record = state.load(EDU)
    assert record is not None
    record["boot_id"] = "an-earlier-boot"
    state.save(record)
    code, out, err = run(capsys, "--root", fake.root, "bind", EDU)
    assert code == 0, err
    assert _result_lines(out) == [f"{EDU}: already on vfio-pci"]


def test_binding_again_completes_a_record_a_crash_left_unfinished(fake: FakeSysfs, capsys) -> None:
    from pyvfio.host.binding import BindState

    run(capsys, "--root", fake.root, "bind", EDU)
    state = BindState(fake.p("run/pyvfio/bind"))
    record = state.load(EDU)
    assert record is not None and record["phase"] == "bound"
    record["phase"] = "binding"  # the process died after the probe, before the last save
    state.save(record)
    run(capsys, "--root", fake.root, "bind", "--dry-run", EDU)
    unchanged = state.load(EDU)
    assert unchanged is not None and unchanged["phase"] == "binding"  # a dry run writes nothing
    code, out, err = run(capsys, "--root", fake.root, "bind", EDU)
    assert code == 0, err
    assert _result_lines(out) == [f"{EDU}: already on vfio-pci"]
    done = state.load(EDU)
    assert done is not None and done["phase"] == "bound" and done["original_driver"] is None


def test_rebinding_names_the_first_original_driver(fake: FakeSysfs, capsys) -> None:
    run(capsys, "--root", fake.root, "bind", E1000_BRIDGED)
    code, out, err = run(capsys, "--root", fake.root, "bind", "--driver", "pci-stub", E1000_BRIDGED)
    assert code == 1, err  # pci-stub is no vfio driver: bound, not ready
    assert fake.devices[E1000_BRIDGED].driver == "pci-stub"
    assert _result_lines(out)[0] == f"{E1000_BRIDGED}: e1000 -> now on pci-stub"
