"""Persisted bindings at their edges: where the file lives, files that are not
ours, its exact format, ``persist list``/``forget`` output, and what ``apply``
says of each binding."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pyvfio.cli import main
from pyvfio.errors import NotPermitted, UsageError
from pyvfio.host.persist import ApplyResult, PersistedBindings, apply, config_dir_for
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import AUDIO, EDU, GPU


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_dir_is_the_flag_then_the_environment_then_under_the_root(monkeypatch) -> None:
    monkeypatch.delenv("PYVFIO_CONFIG_DIR", raising=False)
    assert config_dir_for("/r") == "/r/etc/pyvfio"
    monkeypatch.setenv("PYVFIO_CONFIG_DIR", "")
    assert config_dir_for("/r") == "/r/etc/pyvfio"
    monkeypatch.setenv("PYVFIO_CONFIG_DIR", "/env")
    assert config_dir_for("/r") == "/env"
    assert config_dir_for("/r", "/flag") == "/flag"


@pytest.mark.parametrize(("content", "message"), [
    ('["a list"]', "is not a pyvfio binding configuration"),
    ('{"version": 1}', "is not a pyvfio binding configuration"),
    ('{"version": 1, "bindings": {}}', "is not a pyvfio binding configuration"),
    ('{"version": 2, "bindings": []}', "has version 2; this pyvfio reads version 1"),
    ('{"bindings": []}', "has version None; this pyvfio reads version 1"),
    ('{"version": 1, "bindings": [{"driver": null}]}', "a binding without a device"),
    ('{"version": 1, "bindings": ["0000:01:00.0"]}', "a binding without a device"),
    ('{"version": 1, "bindings": [{"device": 7}]}', "a binding without a device"),
    ("{not json", "unreadable binding configuration"),
])
def test_a_file_that_is_not_ours_names_itself(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bindings.json").write_text(content)
    config = PersistedBindings(str(tmp_path))
    with pytest.raises(UsageError) as exc:
        config.load()
    assert message in str(exc.value) and str(tmp_path / "bindings.json") in str(exc.value)


def test_a_missing_file_is_no_bindings_and_addresses_are_normalized(tmp_path: Path) -> None:
    config = PersistedBindings(str(tmp_path / "nothing-yet"))
    assert config.path == str(tmp_path / "nothing-yet" / "bindings.json")
    assert config.load() == []
    os.makedirs(config.directory)
    Path(config.path).write_text('{"version": 1, "bindings": [{"device": "6:0.0", "group": false}]}')
    assert config.load() == [{"device": EDU, "group": False}]


def test_the_file_is_sorted_indented_and_complete(tmp_path: Path) -> None:
    config = PersistedBindings(str(tmp_path / "etc" / "pyvfio"))
    config.save([{"device": EDU, "group": False}, {"device": GPU, "group": True}])
    text = Path(config.path).read_text()
    assert text == json.dumps({"version": 1, "bindings": [  # by address
        {"device": GPU, "group": True}, {"device": EDU, "group": False}]},
        indent=1, sort_keys=True) + "\n"
    assert stat.S_IMODE(os.stat(config.path).st_mode) == 0o644 & ~_umask()
    assert os.listdir(config.directory) == ["bindings.json"]  # no temporary file left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_unwritable_directory_is_refused_by_name(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        ro = "/proc/self"  # even root cannot create files there
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        ro = str(tmp_path / "ro")
    config = PersistedBindings(os.path.join(ro, "etc", "pyvfio"))
    with pytest.raises(NotPermitted) as exc:
        config.check_writable()
    assert str(exc.value).startswith(f"cannot write the binding configuration in {config.directory} (")
    assert "is not writable; use --config-dir or $PYVFIO_CONFIG_DIR); nothing was changed" in str(exc.value)
    PersistedBindings(str(tmp_path / "new" / "dir")).check_writable()  # creatable: fine


def test_persist_list_text(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "persist", "list")
    assert code == 0
    assert out.splitlines()[-1] == f"(0 in {fake.p('etc/pyvfio/bindings.json')})"
    assert run(capsys, "--root", fake.root, "bind", "--persist", "--group", GPU)[0] == 0
    assert run(capsys, "--root", fake.root, "bind", "--persist", EDU, "--driver", "vfio-pci")[0] == 0
    code, out, _ = run(capsys, "--root", fake.root, "persist", "list")
    lines = out.splitlines()
    assert [line.split() for line in lines[:3]] == [
        ["DEVICE", "IDS", "DRIVER", "GROUP"],
        [GPU, "10de:1b80", "(best)", "yes"],
        [EDU, "1234:11e8", "vfio-pci", "no"],
    ]
    assert lines[3] == f"(2 in {fake.p('etc/pyvfio/bindings.json')})"


def test_persist_list_and_forget_take_the_config_dir(fake: FakeSysfs, capsys, tmp_path: Path) -> None:
    elsewhere = str(tmp_path / "elsewhere")
    PersistedBindings(elsewhere).save([{"device": EDU, "vendor_id": "1234", "device_id": "11e8",
                                        "driver": None, "group": False}])
    code, out, _ = run(capsys, "--root", fake.root, "persist", "list", "--json", "--config-dir", elsewhere)
    assert code == 0 and [e["device"] for e in json.loads(out)] == [EDU]
    code, out, _ = run(capsys, "--root", fake.root, "persist", "list", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(capsys, "--root", fake.root, "persist", "forget", EDU, "--config-dir", elsewhere)
    assert code == 0 and PersistedBindings(elsewhere).load() == []


def test_persist_forget_all_and_its_output(fake: FakeSysfs, capsys) -> None:
    code, _, err = run(capsys, "--root", fake.root, "persist", "forget")
    assert code == 2 and err == "pyvfio persist: name the devices to forget, or use --all\n"
    code, out, _ = run(capsys, "--root", fake.root, "persist", "forget", "--all")
    assert code == 0 and out == "nothing to forget\n"
    assert not os.path.exists(fake.p("etc/pyvfio/bindings.json"))  # nothing removed: not written
    run(capsys, "--root", fake.root, "bind", "--persist", EDU)
    run(capsys, "--root", fake.root, "bind", "--persist", "--group", GPU)
    code, out, _ = run(capsys, "--root", fake.root, "persist", "forget", "--all", "--json")
    assert code == 0 and json.loads(out) == {"forgotten": [GPU, EDU]}
    assert PersistedBindings(fake.p("etc/pyvfio")).load() == []
    run(capsys, "--root", fake.root, "bind", "--persist", "--group", GPU)
    code, out, _ = run(capsys, "--root", fake.root, "persist", "forget", GPU)
    assert code == 0
    assert out == f"{GPU}: forgotten (still bound now; pyvfio restore {GPU} puts it back)\n"


def test_apply_says_what_it_did_with_each_binding(fake: FakeSysfs, capsys) -> None:
    config = PersistedBindings(fake.p("etc/pyvfio"))
    config.save([
        {"device": EDU, "vendor_id": "1234", "device_id": "11e8", "driver": None, "group": False},
        {"device": "0000:09:00.0", "vendor_id": "8086", "device_id": "10d3", "driver": None,
         "group": False},
        {"device": GPU, "driver": None, "group": True},  # no IDs recorded: applied as is
    ])
    results = {r.device: r for r in apply(root=fake.root)}
    assert results["0000:09:00.0"].status == "absent" and not results["0000:09:00.0"].ok
    assert "0000:09:00.0" in results["0000:09:00.0"].message
    assert results[EDU].status == "bound" and results[EDU].ok
    assert results[EDU].message == f"{EDU} -> vfio-pci"
    assert results[GPU].message == f"{GPU} -> vfio-pci, {AUDIO} -> vfio-pci"
    assert [d["device"] for d in results[GPU].devices] == [GPU, AUDIO]
    again = {r.device: r for r in apply(root=fake.root)}
    assert again[EDU].status == "already" and again[EDU].ok
    assert again[EDU].message == f"{EDU} on vfio-pci"
    assert again[EDU].as_dict() == {"device": EDU, "status": "already", "message": again[EDU].message,
                                    "devices": again[EDU].devices, "problems": []}
    code, out, _ = run(capsys, "--root", fake.root, "apply")
    assert code == 1  # the absent one
    assert f"0000:09:00.0: absent: {results['0000:09:00.0'].message}\n" in out
    assert f"{EDU}: already: {EDU} on vfio-pci\n" in out


def test_apply_lists_every_reason_of_a_refusal(fake: FakeSysfs, capsys) -> None:
    PersistedBindings(fake.p("etc/pyvfio")).save([{"device": GPU, "driver": None, "group": False}])
    (result,) = apply(root=fake.root)
    assert result.status == "refused" and not result.ok and len(result.problems) >= 1
    code, out, _ = run(capsys, "--root", fake.root, "apply")
    lines = out.splitlines()
    assert code == 1 and lines[0] == f"{GPU}: refused: {result.message}"
    assert lines[1:] == [f"    also: {p.get('kind')}: {p['reason']}" for p in result.problems[1:]]


def test_apply_result_ok_only_when_in_place() -> None:
    for status, ok in (("bound", True), ("already", True), ("refused", False), ("changed", False),
                       ("absent", False), ("failed", False)):
        assert ApplyResult("0000:01:00.0", status, "m").ok is ok


def test_forgetting_bindings_that_are_not_there_names_them_all(tmp_path: Path) -> None:
    config = PersistedBindings(str(tmp_path))
    config.save([{"device": EDU, "group": False}])
    with pytest.raises(UsageError) as exc:
        config.forget([GPU, EDU, "1:0.1"])
    assert str(exc.value) == f"no persisted binding of {GPU}, {AUDIO} in {config.path}"
    assert config.load() == [{"device": EDU, "group": False}]  # nothing removed
