"""`pyvfio serve` and `pyvfio broker` stop on SIGTERM whichever thread the
kernel gives it to.

A process-directed signal goes to any thread that does not block it, and
Python runs the handler only in the main thread, between bytecodes.  A main
thread waiting in ``select``/``accept`` then slept on until a client came
(``serve`` with a client just gone hung this way under load; systemd would
SIGKILL it after its timeout and leave the socket behind).  Here the race is
made certain: the command runs in a process whose main thread blocks SIGTERM
while another thread, idle, does not, so the kernel must hand the signal to
that thread.  The command must still stop within seconds and clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvfio.testing.fakesysfs import FakeSysfs

CHECKOUT = Path(__file__).resolve().parents[2]

# Runs pyvfio.cli.main(argv) with SIGTERM blocked in the main thread only.
_WRAPPER = """
import signal, sys, threading
sys.path.insert(0, {checkout!r})
from pyvfio.cli import main

started = threading.Event()

def idle():  # takes the signal: it is the only thread that does not block it
    started.set()
    threading.Event().wait()

threading.Thread(target=idle, daemon=True).start()
started.wait()
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
sys.exit(main(sys.argv[1:]))
"""


def _run_until_socket(argv: list[str], socket_path: Path, tmp_path: Path) -> subprocess.Popen[str]:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_WRAPPER.format(checkout=str(CHECKOUT)))
    proc = subprocess.Popen([sys.executable, str(wrapper), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no socket"
        time.sleep(0.05)
    time.sleep(0.3)  # past listen(): into the wait
    return proc


def _stopped_by_sigterm(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("SIGTERM taken by another thread did not stop the command")
    return proc.returncode, err


def test_serve_stops_on_a_sigterm_another_thread_took(sockdir: Path, tmp_path: Path) -> None:
    path = sockdir / "edu.sock"
    proc = _run_until_socket(["serve", "edu", "--socket", str(path)], path, tmp_path)
    code, err = _stopped_by_sigterm(proc)
    assert code == 0, err
    assert not path.exists()


def test_broker_stops_on_a_sigterm_another_thread_took(sockdir: Path, tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "root")
    fake.add_standard_drivers()
    policy = sockdir / "policy.toml"
    policy.write_text("[broker]\nmax_clients = 4\n")
    policy.chmod(0o644)
    path = sockdir / "broker.sock"
    proc = _run_until_socket(["--root", fake.root, "broker", "--socket", str(path),
                              "--policy", str(policy), "--log", str(tmp_path / "audit.log")],
                             path, tmp_path)
    code, err = _stopped_by_sigterm(proc)
    assert code == 0, err
    assert not path.exists()


def test_stop_on_signals_restores_and_forget_unsets_only_its_own_fd() -> None:
    from pyvfio.sockets import forget_wakeup_fd, stop_on_signals

    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    before = signal.getsignal(signal.SIGTERM)
    stopped: list[bool] = []
    try:
        with stop_on_signals(lambda: stopped.append(True), w, [signal.SIGTERM]) as received:
            assert signal.set_wakeup_fd(w) == w  # it is ours while the block runs
            signal.raise_signal(signal.SIGTERM)
            assert received == [signal.SIGTERM] and stopped == [True]
            assert os.read(r, 8) == bytes([signal.SIGTERM])  # the C handler wrote it
            forget_wakeup_fd(w + 1000)  # not the wake-up fd: left alone
            assert signal.set_wakeup_fd(w) == w
            forget_wakeup_fd(w)  # about to close it: unset
            assert signal.set_wakeup_fd(-1) == -1
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        os.close(r)
        os.close(w)
