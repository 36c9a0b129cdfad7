"""``check --all`` reads only what a diagnosis needs (the lean inventory; a
named check reads each device whole), and ``bind --persist --json`` reports
the entries it recorded."""

from __future__ import annotations

import json

import pytest

import pyvfio.host.model as model
from pyvfio.cli import main
from pyvfio.host.persist import PersistedBindings
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import EDU, GPU


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _attributes_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    names: list[str] = []
    real = model._read_at

    def spy(dir_fd: int, name: str) -> str | None:
        names.append(name)
        return real(dir_fd, name)

    monkeypatch.setattr(model, "_read_at", spy)
    return names


def test_check_all_reads_a_lean_inventory(fake: FakeSysfs, capsys, monkeypatch) -> None:
    names = _attributes_read(monkeypatch)
    _, out, _ = run(capsys, "--root", fake.root, "check", "--all", "--json")
    checked = {d["device"] for d in json.loads(out)}
    assert checked == {a for a, d in fake.devices.items() if not d.is_bridge}
    assert names and not {"driver_override", "numa_node", "reset_method"} & set(names)
    names.clear()
    run(capsys, "--root", fake.root, "check", EDU)
    assert {"driver_override", "reset_method"} <= set(names)


def test_bind_persist_json_reports_the_recorded_entries(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "bind", "--persist", "--group", "--json", GPU)
    assert code == 0, err
    persisted = json.loads(out)["persisted"]
    saved = PersistedBindings(fake.p("etc/pyvfio")).load()
    assert [e["device"] for e in persisted] == [GPU] and persisted == saved
    assert persisted[0]["group"] is True and persisted[0]["vendor_id"] == f"{fake.devices[GPU].vendor:04x}"
