"""Ctrl-C and closed pipes against real processes: the edu driver and
``pyvfio serve`` end with one line (exit 130 for an interrupt) and never a
traceback, also when the interrupt lands in the middle of a DMA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


@pytest.fixture
def served_edu(sockdir: Path) -> Iterator[str]:
    """``pyvfio serve edu`` in its own process, with a slow DMA engine (1 s),
    so a DMA is in flight long enough to interrupt it."""
    path = sockdir / "edu.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", "edu", "--socket", str(path),
                             "--dma-delay", "1"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(path)
        yield str(path)
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert not path.exists()


def test_ctrl_c_during_a_dma_says_interrupted(served_edu: str) -> None:
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pyvfio.drivers.edu", "--vfio-user",
                             served_edu, "--interrupts", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # identify, liveness, factorial: the DMA step is next
        lines.append(line)
        if "factorial (polled)" in line:
            break
    time.sleep(0.5)  # inside the 1 s DMA
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (lines, out, err)
    assert err == "edu: interrupted after 3 step(s)\n"
    assert "FAIL" not in out and "dma" not in out


def test_ctrl_c_while_waiting_for_a_server(sockdir: Path) -> None:
    """A server that accepts and never answers: the driver waits for VERSION;
    Ctrl-C ends the wait with one line."""
    import socket

    path = str(sockdir / "silent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pyvfio.drivers.edu", "--vfio-user", path,
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        conn, _ = listener.accept()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        conn.close()
    finally:
        listener.close()
    assert proc.returncode == 130 and err == "edu: interrupted\n"
    import json

    assert json.loads(out)["error"]["kind"] == "interrupted"


def test_edu_driver_into_head(served_edu: str) -> None:
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f'"$PY" -m pyvfio.drivers.edu --vfio-user {served_edu} --interrupts "" | head -2'],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PY": sys.executable})
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 2


@pytest.mark.parametrize("argv", [["ls", "--root", "/"], ["groups"], ["serve", "--list"],
                                  ["info", "--vfio-user", "/nonexistent"],
                                  ["broker-open", "--socket", "/nonexistent", "--list"]])
def test_ctrl_c_in_any_command_is_one_line_and_130(argv: list[str]) -> None:
    """SIGINT delivered as a command starts, through the one handler in
    pyvfio.cli (the commands run too briefly to interrupt from outside)."""
    code = ("import os, signal, sys\n"
            "from pyvfio import cli\n"
            "real = cli.run_command\n"
            "def interrupted_at_start(prog, func, **kw):\n"
            "    def body():\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        return func()\n"
            "    return real(prog, body, **kw)\n"
            "cli.run_command = interrupted_at_start\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130 and proc.stderr == f"pyvfio {argv[0]}: interrupted\n"
