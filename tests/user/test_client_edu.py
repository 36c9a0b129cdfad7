"""The edu driver and ``pyvfio info``, unchanged, over the vfio-user client.

``pyvfio serve edu`` runs as its own process (as a user would run it); the
driver's self-test — the one that passes on the real kernel's edu in the
guest tests — runs as ``python -m pyvfio.drivers.edu --vfio-user PATH``, and
in-process with DMA mapped without fds (the emulated device then reaches the
buffers through DMA_READ/DMA_WRITE messages).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvfio.drivers.edu import selftest
from pyvfio.user.client import connect
from pyvfio.user.protocol import Command, Message

EXPECTED_STEPS = {
    "identify", "liveness", "factorial (polled)", "dma (polled)",
    "interrupt msi (raise/ack)", "factorial (msi interrupt)", "dma (msi interrupt)",
    "interrupt intx (raise/ack)", "factorial (intx interrupt)", "dma (intx interrupt)",
}


@pytest.fixture
def edu_socket(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "edu.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", "edu", "--socket", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if proc.poll() is not None:
                pytest.fail(f"pyvfio serve edu exited: {proc.stderr.read().decode()}"  # type: ignore[union-attr]
                            )
            assert time.monotonic() < deadline, "pyvfio serve edu did not create its socket"
            time.sleep(0.05)
        yield path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not os.path.exists(path), "the server left its socket behind"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=120)


def test_edu_driver_selftest_over_vfio_user(edu_socket: str) -> None:
    out = _run("pyvfio.drivers.edu", "--vfio-user", edu_socket, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["backend"] == "vfio-user"
    assert report["ok"] is True, [s for s in report["steps"] if not s["ok"]]
    assert {s["step"] for s in report["steps"]} == EXPECTED_STEPS
    assert all(s["ok"] for s in report["steps"])


def test_edu_selftest_with_dma_through_messages(edu_socket: str) -> None:
    with connect(edu_socket, share_dma_fds=False) as dev:
        served: list[int] = []
        serve = dev.dma_space.serve

        def counting(msg: Message) -> bytes:
            served.append(msg.command)
            return serve(msg)

        dev.dma_space.serve = counting  # type: ignore[method-assign]
        result = selftest(dev)
        failed = [s for s in result.steps if not s.ok]
        assert not failed, failed
    assert {s.name for s in result.steps} == EXPECTED_STEPS
    # every DMA of the three runs went through messages: RAM->device reads, device->RAM writes
    assert served.count(Command.DMA_READ) >= 3 and served.count(Command.DMA_WRITE) >= 3


def test_edu_selftest_twice_on_one_server(edu_socket: str) -> None:
    """A second client finds the device usable after the first went away."""
    for _ in range(2):
        out = _run("pyvfio.drivers.edu", "--vfio-user", edu_socket, "--json")
        assert json.loads(out.stdout)["ok"] is True, out.stdout + out.stderr


def test_pyvfio_info_over_vfio_user(edu_socket: str) -> None:
    out = _run("pyvfio", "info", "--vfio-user", edu_socket, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["backend"] == "vfio-user"
    assert info["device"] == edu_socket
    assert (info["ids"]["vendor"], info["ids"]["device"], info["ids"]["revision"]) == \
        ("1234", "11e8", "10")
    assert info["info"]["flag_names"] == ["RESET", "PCI"]
    regions = {r["name"]: r for r in info["regions"]}
    assert regions["BAR0"]["size"] == 1 << 20
    assert regions["CONFIG"]["size"] >= 256
    irqs = {i["name"]: i["count"] for i in info["irqs"]}
    assert irqs["INTX"] == 1 and irqs["MSI"] == 1 and irqs["MSIX"] == 0
    text = _run("pyvfio", "info", "--vfio-user", edu_socket)
    assert text.returncode == 0 and "vfio-user" in text.stdout


def test_pyvfio_info_without_server_is_one_line(tmp_path: Path) -> None:
    out = _run("pyvfio", "info", "--vfio-user", str(tmp_path / "none.sock"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "no vfio-user server" in out.stderr
    assert "Traceback" not in out.stderr
