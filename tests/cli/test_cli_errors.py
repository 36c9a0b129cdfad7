"""Error paths a user hits first: one line on stderr, exit status 2, no
traceback, and a message that says what is wrong and what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvfio.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.strip()


# --- pyvfio info -----------------------------------------------------------------------------


def test_info_without_a_device_says_how_to_name_one(capsys) -> None:
    code, out, err = run_cli(capsys, "info")
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith("pyvfio info: name a device")
    assert "--vfio-user PATH" in line and "0000:00:03.0" in line


def test_info_bad_pci_address(capsys) -> None:
    code, _, err = run_cli(capsys, "info", "garbage")
    assert code == 2
    assert one_line(err) == "pyvfio info: not a PCI address (DDDD:BB:DD.F): 'garbage'"


def test_info_no_such_device(capsys, tmp_path: Path) -> None:
    (tmp_path / "sys/bus/pci/devices").mkdir(parents=True)
    code, _, err = run_cli(capsys, "--root", str(tmp_path), "info", "0000:99:00.0")
    assert code == 2
    assert "no PCI device 0000:99:00.0" in one_line(err)


def test_info_bdf_and_vfio_user_exclude_each_other(capsys, edu_socket: str) -> None:
    code, _, err = run_cli(capsys, "info", "0000:00:03.0", "--vfio-user", edu_socket)
    assert code == 2
    assert "either a PCI address (0000:00:03.0) or --vfio-user" in one_line(err)


def test_info_vfio_user_and_broker_exclude_each_other(capsys) -> None:
    code, _, err = run_cli(capsys, "info", "--vfio-user", "/a", "--broker", "/b")
    assert code == 2
    assert one_line(err) == "pyvfio info: --vfio-user and --broker exclude each other"


def test_info_vfio_user_no_such_socket(capsys, sockdir: Path) -> None:
    path = str(sockdir / "nothing.sock")
    code, _, err = run_cli(capsys, "info", "--vfio-user", path)
    assert code == 2
    assert one_line(err) == f"pyvfio info: no vfio-user server at {path}: no such socket"


def test_info_vfio_user_regular_file(capsys, sockdir: Path) -> None:
    path = sockdir / "plain-file"
    path.write_text("not a socket")
    code, _, err = run_cli(capsys, "info", "--vfio-user", str(path))
    assert code == 2
    assert f"no vfio-user server listening at {path}" in one_line(err)


@pytest.mark.parametrize("behaviour, expect", [
    ("close", "is it a vfio-user server?"),
    ("garbage", "is not a vfio-user server: its first bytes b'HTTP/1.1 400 Ba"),
])
def test_info_socket_that_is_not_vfio_user(capsys, fake_peer: Callable[[str], str],
                                           behaviour: str, expect: str) -> None:
    path = fake_peer(behaviour)
    code, _, err = run_cli(capsys, "info", "--vfio-user", path, "--timeout", "5")
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"pyvfio info: {path}") and expect in line


def test_info_silent_peer_times_out_as_asked(capsys, fake_peer: Callable[[str], str]) -> None:
    path = fake_peer("silent")
    code, _, err = run_cli(capsys, "info", "--vfio-user", path, "--timeout", "0.3")
    assert code == 2
    assert one_line(err) == (f"pyvfio info: {path} did not answer VERSION within 0.3s (a server "
                             "that serves one client at a time may be busy)")


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_info_rejects_a_bad_timeout(capsys, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["info", "--vfio-user", "/x", "--timeout", value])
    assert exc.value.code == 2
    assert "--timeout" in capsys.readouterr().err


# --- pyvfio serve ----------------------------------------------------------------------------


def test_serve_needs_a_model(capsys) -> None:
    code, _, err = run_cli(capsys, "serve")
    assert code == 2
    assert one_line(err) == ("pyvfio serve: name a device model (edu, virtio-blk, virtio-rng), e.g. "
                             "pyvfio serve edu --socket /tmp/edu.sock")


def test_serve_needs_a_socket(capsys) -> None:
    code, _, err = run_cli(capsys, "serve", "edu")
    assert code == 2
    assert one_line(err) == "pyvfio serve: say where to listen: pyvfio serve edu --socket PATH"


def test_serve_unknown_model_names_the_known_ones(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "nosuchmodel", "--socket", "/tmp/never.sock"])
    assert exc.value.code == 2
    assert "invalid choice: 'nosuchmodel' (choose from 'edu', 'virtio-blk', 'virtio-rng')" in capsys.readouterr().err


def test_serve_missing_directory(capsys) -> None:
    code, _, err = run_cli(capsys, "serve", "edu", "--socket", "/nonexistent-dir/x.sock")
    assert code == 2
    assert one_line(err) == ("pyvfio serve: cannot create socket /nonexistent-dir/x.sock: "
                             "/nonexistent-dir does not exist")


def test_serve_parent_is_a_file(capsys, sockdir: Path) -> None:
    (sockdir / "f").write_text("")
    path = str(sockdir / "f" / "x.sock")
    code, _, err = run_cli(capsys, "serve", "edu", "--socket", path)
    assert code == 2
    assert one_line(err) == f"pyvfio serve: cannot create socket {path}: {sockdir / 'f'} is not a directory"


def test_serve_path_too_long(capsys, sockdir: Path) -> None:
    path = str(sockdir / ("x" * 120))
    code, _, err = run_cli(capsys, "serve", "edu", "--socket", path)
    assert code == 2
    assert "UNIX socket paths hold at most 107: use a shorter one" in one_line(err)


def test_serve_over_a_regular_file_refuses(capsys, sockdir: Path) -> None:
    path = sockdir / "keep-me"
    path.write_text("data")
    code, _, err = run_cli(capsys, "serve", "edu", "--socket", str(path))
    assert code == 2
    assert one_line(err).startswith(f"pyvfio serve: {path} exists and is not a socket: refusing")
    assert path.read_text() == "data"


def test_serve_second_socket_failing_removes_the_first(capsys, sockdir: Path) -> None:
    good = sockdir / "good.sock"
    code, _, err = run_cli(capsys, "serve", "edu", "--socket", str(good), "--socket",
                           "/nonexistent-dir/x.sock")
    assert code == 2 and "/nonexistent-dir does not exist" in err
    assert not good.exists()


def test_serve_negative_dma_delay(capsys) -> None:
    code, _, err = run_cli(capsys, "serve", "edu", "--socket", "/tmp/never.sock",
                           "--dma-delay", "-1")
    assert code == 2
    assert "--dma-delay must be 0 or more seconds" in one_line(err)
    assert not os.path.exists("/tmp/never.sock")


# --- real processes: the exit status and stderr a shell sees ---------------------------------


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_process_info_garbage() -> None:
    proc = _run("-m", "pyvfio", "info", "garbage")
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr) == "pyvfio info: not a PCI address (DDDD:BB:DD.F): 'garbage'"


def test_process_serve_missing_directory() -> None:
    proc = _run("-m", "pyvfio", "serve", "edu", "--socket", "/nonexistent-dir/x.sock")
    assert proc.returncode == 2
    assert "/nonexistent-dir does not exist" in one_line(proc.stderr)


def test_process_edu_driver_without_a_device() -> None:
    proc = _run("-m", "pyvfio.drivers.edu")
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("edu: cannot open the device: name a device")


def test_process_edu_driver_no_server_json() -> None:
    proc = _run("-m", "pyvfio.drivers.edu", "--vfio-user", "/nonexistent", "--json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert '"ok": false' in proc.stdout and "no vfio-user server at /nonexistent" in proc.stdout
