"""The first five minutes, as a new user types them in a shell:

    pyvfio serve edu --socket S &
    python -m pyvfio.drivers.edu --vfio-user S
    pyvfio info --vfio-user S
    kill -INT %1

Real processes through the installed ``pyvfio`` entry point, checking the
exit status and that every output reads right."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def pyvfio_command() -> list[str]:
    """The `pyvfio` entry point of the environment running the tests (a user's
    first command), not whatever `pyvfio` comes first on PATH."""
    exe = Path(sys.executable).parent / "pyvfio"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pyvfio"]


def test_serve_drive_info_stop(sockdir: Path) -> None:
    sock = str(sockdir / "x.sock")
    server = subprocess.Popen([*pyvfio_command(), "serve", "edu", "--socket", sock,
                               "--dma-delay", "0.01"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "pyvfio serve edu made no socket in 30 s"
            time.sleep(0.05)

        driver = subprocess.run([sys.executable, "-m", "pyvfio.drivers.edu", "--vfio-user", sock],
                                capture_output=True, text=True, timeout=120)
        assert driver.returncode == 0, driver.stdout + driver.stderr
        out = driver.stdout.splitlines()
        assert out[0] == f"edu self-test on {sock} (vfio-user: vfio-user server at {sock} " \
                         "(protocol 0.2))"
        assert len([line for line in out if line.startswith("  [  ok] ")]) == 10
        assert out[-1] == "edu self-test: ok (10/10 steps passed)"
        assert driver.stderr == ""

        info = subprocess.run([*pyvfio_command(), "info", "--vfio-user", sock],
                              capture_output=True, text=True, timeout=60)
        assert info.returncode == 0 and info.stderr == ""
        table = info.stdout
        assert f"device   {sock}\n" in table
        assert "ids      1234:11e8 subsystem 1af4:1100 class 00ff00 rev 10\n" in table
        assert "regions:\n" in table and "irqs:\n" in table
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            out, err = server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail("pyvfio serve did not stop on SIGINT")
    assert server.returncode == 0
    assert "Traceback" not in err
    assert err.splitlines() == [f"pyvfio: serving edu on {sock}",
                                "pyvfio: stopped serving edu (2 client(s) served)"]
    assert not os.path.exists(sock)
