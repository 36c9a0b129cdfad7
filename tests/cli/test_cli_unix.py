"""Every command behaves like a well-made Unix tool (issue 14): a reader that
goes away ends it quietly, a root that is not a host tree is an error, global
options work after the subcommand, output the terminal cannot encode is
escaped, and with --json errors are a JSON object on stdout too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvfio.cli import error_kind, error_object, main
from pyvfio.errors import DeviceNotFound, NotViable, UsageError
from pyvfio.testing.fakesysfs import FakeSysfs

EDU = "0001:fe:03.0"
NIC = "0001:fe:04.0"


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[FakeSysfs]:
    """A fake host of 300 devices (more output than a pipe buffer holds) with
    a pci.ids whose vendor name is not ASCII."""
    ids = tmp_path / "pci.ids"
    ids.write_text("1234  Société Générale de Périphériques\n\t11e8  Édu device\n"
                   "8086  Intel Corporation\n\t100e  82540EM Gigabit Ethernet Controller\n"
                   "C 00  Unclassified device\nC 02  Network controller\n", encoding="utf-8")
    fake = FakeSysfs(tmp_path / "root", noiommu=False, pci_ids=str(ids))
    fake.add_standard_drivers()
    fake.add_device(EDU, 0x1234, 0x11E8, 0x00FF00, group=3, revision=0x10)
    fake.add_device(NIC, 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    fake.populate(300, start_group=100)
    with fake:
        yield fake


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def pyvfio(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pyvfio", *argv]


def shell(command: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``command`` through a real shell pipe; ``$PY`` is this Python."""
    full_env = {**os.environ, "PY": sys.executable, **(env or {})}
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


# --- pipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    "ls", "ls --json", "groups", "groups --json", f"check {EDU} {NIC} --json",
    "--help", "ls --help",
])
def test_reader_going_away_is_a_quiet_exit_0(tree: FakeSysfs, command: str) -> None:
    """`pyvfio ls | head -1` as lspci behaves: no message, exit 0.
    (pipefail makes the shell report pyvfio's own exit status.)"""
    if command.startswith("check"):  # its output is short: make the reader leave first
        cmd = f'$PY -m pyvfio --root {tree.root} {command} | (exec 0<&-; true)'
    else:
        cmd = f"$PY -m pyvfio --root {tree.root} {command} | head -1"
    proc = shell(cmd)
    assert proc.stderr == ""
    assert proc.returncode == 0 or (command.startswith("check") and proc.returncode == 1)


def test_check_into_a_closed_pipe_keeps_its_answer(tree: FakeSysfs) -> None:
    """A broken pipe is not an error (exit 0), but check's answer was 1 (not
    ready) or 0; what matters is no traceback and no "Broken pipe" line."""
    proc = shell(f"$PY -m pyvfio --root {tree.root} check {EDU} | (exec 0<&-; sleep 0.2)")
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr


# --- roots -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["ls"], ["groups"], ["check", EDU], ["bind", "--dry-run", EDU],
                                     ["restore", "--all"]])
def test_nonexistent_root_is_an_error(capsys, command: list[str]) -> None:
    code, out, err = run(capsys, "--root", "/nonexistent", *command)
    assert code == 2 and out == ""
    assert err == f"pyvfio {command[0]}: root /nonexistent does not exist\n"


def test_a_directory_that_is_not_a_host_tree(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "--root", str(tmp_path), "ls")
    assert code == 2
    assert err == (f"pyvfio ls: {tmp_path}/sys/bus/pci does not exist, so {tmp_path} is not a "
                   "host tree: give the directory that holds sys/, dev/ and proc/\n")


def test_root_that_is_a_file(capsys, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    code, _, err = run(capsys, "--root", str(tmp_path / "f"), "groups")
    assert code == 2 and err == f"pyvfio groups: root {tmp_path / 'f'} is not a directory\n"


def test_empty_pyvfio_root_is_an_error_not_the_real_host(capsys, monkeypatch) -> None:
    monkeypatch.setenv("PYVFIO_ROOT", "")
    code, out, err = run(capsys, "ls")
    assert code == 2 and out == ""
    assert "PYVFIO_ROOT set but empty" in err and err.count("\n") == 1


def test_info_and_edu_driver_check_the_root(capsys) -> None:
    from pyvfio.drivers import edu

    code, _, err = run(capsys, "--root", "/nonexistent", "info", EDU)
    assert code == 2 and err == "pyvfio info: root /nonexistent does not exist\n"
    assert edu.main([EDU, "--root", "/nonexistent"]) == 2
    assert "root /nonexistent does not exist" in capsys.readouterr().err


def test_vfio_user_needs_no_host_tree(capsys, monkeypatch, edu_socket: str) -> None:
    monkeypatch.setenv("PYVFIO_ROOT", "/nonexistent")
    code, out, _ = run(capsys, "info", "--vfio-user", edu_socket, "--json")
    assert code == 0 and json.loads(out)["backend"] == "vfio-user"


# --- global options after the subcommand -----------------------------------------------------


def test_root_after_the_subcommand(tree: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "ls", "--root", tree.root, "--json", EDU)
    assert code == 0 and [d["device"] for d in json.loads(out)] == [EDU]
    code, out, _ = run(capsys, "check", EDU, "--root", tree.root, "--json")
    assert code == 1 and json.loads(out)[0]["device"] == EDU


def test_root_after_the_subcommand_wins(tree: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", "/nonexistent", "ls", "--root", tree.root, EDU)
    assert code == 0 and EDU in out


def test_every_subcommand_takes_root_after_it() -> None:
    from pyvfio.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, p in sub.choices.items():
        assert any("--root" in a.option_strings for a in p._actions), name


# --- ls --------------------------------------------------------------------------------------


def test_ls_names_a_device_once(tree: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", tree.root, "ls", "1:fe:03.0", EDU, "0001:FE:03.0", "--json")
    assert code == 0 and [d["device"] for d in json.loads(out)] == [EDU]
    code, out, _ = run(capsys, "--root", tree.root, "ls", EDU, EDU)
    assert out.count(EDU) == 1


def test_ascii_terminal_gets_escaped_names(tree: FakeSysfs) -> None:
    proc = subprocess.run(pyvfio("--root", tree.root, "ls", EDU), capture_output=True, text=True,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"}, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "Soci\\xe9t\\xe9 G\\xe9n\\xe9rale" in proc.stdout


def test_json_keeps_non_ascii_names_exact(tree: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", tree.root, "ls", EDU, "--json")
    assert code == 0 and json.loads(out)[0]["vendor_name"] == "Société Générale de Périphériques"


# --- JSON errors -----------------------------------------------------------------------------


def test_error_kinds() -> None:
    assert error_kind(UsageError("x")) == "usage"
    assert error_kind(DeviceNotFound("x")) == "device-not-found"
    assert error_kind(PermissionError(13, "x")) == "permission"
    assert error_kind(KeyboardInterrupt()) == "interrupted"
    assert error_object(PermissionError(13, "Permission denied"), "no")["error"] == {
        "message": "no", "kind": "permission", "errno": "EACCES"}
    assert error_object(NotViable("bad", [{"device": EDU}]))["error"]["problems"] == [
        {"device": EDU}]


@pytest.mark.parametrize("argv, kind, message", [
    (["check", "09:00.0", "--json"], "device-not-found", "no PCI device 0000:09:00.0"),
    (["ls", "zz", "--json"], "usage", "not a PCI address"),
    (["check", "--json", "0000:00:03.0", "--root", "/nonexistent"], "usage",
     "root /nonexistent does not exist"),
    (["info", "--json"], "usage", "name a device"),
    (["restore", "--json"], "usage", "name the devices to restore, or use --all"),
])
def test_json_errors_are_an_object_on_stdout(tree: FakeSysfs, capsys, argv: list[str], kind: str,
                                             message: str) -> None:
    code, out, err = run(capsys, "--root", tree.root, *argv)
    assert code == 2
    error = json.loads(out)["error"]
    assert error["kind"] == kind and message in error["message"]
    assert err.count("\n") == 1 and message in err  # the human line stays on stderr


def test_json_usage_error_from_argparse(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", "--json", "--no-such-flag", EDU])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": {"message": "unrecognized arguments: --no-such-flag",
                                         "kind": "usage"}}
    assert "unrecognized arguments" in err


def test_json_bind_refusal_has_the_problems(tree: FakeSysfs, capsys, tmp_path: Path) -> None:
    tree.add_device("0001:fe:05.0", 0x8086, 0x100E, 0x020000, group=3, driver="e1000")
    code, out, _ = run(capsys, "--root", tree.root, "bind", EDU, "--json",
                       "--state-dir", str(tmp_path / "state"))
    assert code == 1
    error = json.loads(out)["error"]
    assert error["kind"] == "not-viable"
    assert error["problems"][0]["device"] == "0001:fe:05.0"


def test_process_json_error_and_status(tree: FakeSysfs) -> None:
    proc = subprocess.run(pyvfio("--root", tree.root, "check", "--json", "09:00.0"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["kind"] == "device-not-found"


# --- dry runs --------------------------------------------------------------------------------


def test_dry_runs_say_would_and_show_paths_under_the_root(tree: FakeSysfs, capsys,
                                                          tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    code, out, _ = run(capsys, "--root", tree.root, "bind", NIC, "--dry-run", "--state-dir", state)
    assert code == 0 and tree.writes == []
    assert f"{NIC}: e1000 would go to vfio-pci" in out
    assert f"write '{NIC}' to {tree.root}/sys/bus/pci/drivers/e1000/unbind" in out
    assert "/sys/" not in out.replace(tree.root + "/sys/", "")  # no path outside the root
    code, out, _ = run(capsys, "--root", tree.root, "bind", NIC, "--state-dir", state)
    assert code == 0
    code, out, _ = run(capsys, "--root", tree.root, "restore", "--all", "--dry-run",
                       "--state-dir", state)
    assert code == 0
    assert f"{NIC}: would be restored to e1000" in out and "restored to" not in out.replace(
        "would be restored to", "")
    assert out.endswith("dry run: nothing was changed\n")
    assert tree.devices[NIC].driver == "vfio-pci"
