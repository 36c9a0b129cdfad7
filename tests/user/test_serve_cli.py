"""``pyvfio serve``: a real server process; SIGTERM/SIGINT end it cleanly and
remove the socket; its fd count is back to the start after hostile clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from vfu_raw import RawClient, wait_until

from pyvfio.testing.fds import fd_targets
from pyvfio.user import protocol as P


def start(*sockets: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "pyvfio", "serve", "edu"]
    for s in sockets:
        args += ["--socket", s]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    assert wait_until(lambda: all(listening(s) for s in sockets) or proc.poll() is not None, 20)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def listening(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def server_fds(pid: int) -> set[str]:
    return fd_targets(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_and_stop(tmp_path, sig):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    proc = start(a, b)
    try:
        ca, cb = RawClient(a), RawClient(b)
        ca.write32(0, 4, 1)
        assert cb.read32(0, 4) == 0  # two independent devices
        assert ca.read32(0, 4) == 0xFFFFFFFE
        ca.close()
        cb.close()
    finally:
        proc.send_signal(sig)
        assert proc.wait(10) == 0
    assert not os.path.exists(a) and not os.path.exists(b)


def test_server_process_fd_count_is_restored(tmp_path):
    path = str(tmp_path / "e.sock")
    proc = start(path)
    try:
        c = RawClient(path)
        c.read32(0, 0)
        c.close()
        time.sleep(0.2)
        base = server_fds(proc.pid)
        for _ in range(3):
            c = RawClient(path)
            fds = [os.eventfd(0) for _ in range(20)]
            c.send(P.Command.DEVICE_SET_IRQS, P.IrqSet(0, 0x24, 0, 1).pack(), fds[:1])
            c.send(P.Command.REGION_READ, P.RegionAccess(0, 0, 4).pack(), fds)
            c.send(P.Command.DMA_MAP, P.DmaMap(0x1000, 0x1000).pack(), fds[:1])
            c.send_raw(P.HEADER.pack(1, 10, 1 << 20, 0, 0) + b"half")
            for f in fds:
                os.close(f)
            c.close()
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.close()
        assert wait_until(lambda: server_fds(proc.pid) == base, 10), \
            sorted(server_fds(proc.pid) ^ base)
        c = RawClient(path)
        assert c.read32(0, 0) == 0x010000ED
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path):
    path = str(tmp_path / "s.sock")
    proc = start(path)
    try:
        out = subprocess.run([sys.executable, "-m", "pyvfio", "serve", "edu", "--socket", path],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 2 and "another vfio-user server is already listening" in out.stderr
    finally:
        proc.kill()
        proc.wait(10)
    assert os.path.exists(path)  # killed: the socket file is stale now
    proc = start(path)
    proc.terminate()
    assert proc.wait(10) == 0


def test_help_and_list():
    out = subprocess.run([sys.executable, "-m", "pyvfio", "serve", "--help"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0 and "--socket" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pyvfio", "serve", "--list"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0 and out.stdout.startswith("edu")
    out = subprocess.run([sys.executable, "-m", "pyvfio", "serve", "edu"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 2 and "--socket" in out.stderr
