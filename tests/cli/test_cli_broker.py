"""A root daemon never clobbers, and clients never hang (issue 14).

`pyvfio broker` removes nothing but a socket it can prove stale, and refuses a
symlink, a non-socket, an unsafe directory and a policy others can write,
before it changes anything.  Broker and vfio-user clients wait a bounded time
and say what answered; errors name the path and a hint."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvfio.broker.audit import AuditLog
from pyvfio.broker.client import BrokerSession
from pyvfio.broker.policy import Policy, PolicyError
from pyvfio.broker.server import Broker
from pyvfio.cli import main
from pyvfio.errors import BrokerRefused, ProtocolError
from pyvfio.testing.fakesysfs import FakeSysfs

CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture
def host(tmp_path: Path) -> str:
    fake = FakeSysfs(tmp_path / "root")
    fake.add_standard_drivers()
    return fake.root


@pytest.fixture
def policy(sockdir: Path) -> Path:
    path = sockdir / "policy.toml"
    path.write_text("[broker]\nmax_clients = 4\n")
    path.chmod(0o644)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def running_broker(host: str, sockdir: Path) -> Iterator[str]:
    path = str(sockdir / "broker.sock")
    broker = Broker(path, Policy(), root=host, audit=AuditLog(None, io.StringIO()))
    broker.listen()
    thread = threading.Thread(target=broker.serve_forever, daemon=True)
    thread.start()
    yield path
    broker.stop()
    thread.join(10)


# --- the daemon's socket path ----------------------------------------------------------------


def test_a_regular_file_at_the_socket_path_is_kept(capsys, host: str, sockdir: Path,
                                                   policy: Path) -> None:
    victim = sockdir / "important"
    victim.write_text("data")
    code, _, err = run(capsys, "--root", host, "broker", "--socket", str(victim),
                       "--policy", str(policy))
    assert code == 2
    assert err == (f"pyvfio broker: {victim} exists and is not a socket: refusing to remove it "
                   "(remove it yourself if it is not needed, or choose another path)\n")
    assert victim.read_text() == "data"


def test_a_symlink_at_the_socket_path_is_refused(capsys, host: str, sockdir: Path,
                                                 policy: Path) -> None:
    """Even a link to a stale socket: following it would remove the target."""
    target = sockdir / "real.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(target))
    dead.close()
    link = sockdir / "link.sock"
    link.symlink_to(target)
    code, _, err = run(capsys, "broker", "--socket", str(link), "--policy", str(policy),
                       "--root", host)
    assert code == 2 and f"refusing to listen at {link}: it is a symlink" in err
    assert link.is_symlink() and stat.S_ISSOCK(target.lstat().st_mode)


def test_a_directory_others_can_write_is_refused(capsys, host: str, sockdir: Path,
                                                 policy: Path) -> None:
    shared = sockdir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    code, _, err = run(capsys, "broker", "--socket", str(shared / "b.sock"), "--policy",
                       str(policy), "--root", host)
    assert code == 2
    assert f"its directory {shared} is writable by others (owner" in err
    assert f"chmod go-w {shared}" in err
    assert os.listdir(shared) == []


def test_a_sticky_directory_like_tmp_is_allowed(host: str, sockdir: Path) -> None:
    sticky = sockdir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    broker = Broker(str(sticky / "b.sock"), Policy(), root=host,
                    audit=AuditLog(None, io.StringIO()))
    broker.listen()
    broker.stop()
    broker._shutdown()
    assert os.listdir(sticky) == []


def test_a_policy_others_can_write_is_refused(capsys, host: str, sockdir: Path,
                                              policy: Path) -> None:
    policy.chmod(0o666)
    code, _, err = run(capsys, "broker", "--socket", str(sockdir / "b.sock"), "--policy",
                       str(policy), "--root", host)
    assert code == 2
    assert err == (f"pyvfio broker: policy {policy} is writable by others (mode 0666): "
                   f"refusing it (chmod go-w {policy})\n")
    assert not (sockdir / "b.sock").exists()
    with pytest.raises(PolicyError, match="writable by others"):
        Policy.load(policy)


def test_missing_socket_directory_is_named(capsys, host: str, policy: Path) -> None:
    code, _, err = run(capsys, "broker", "--socket", "/nonexistent/b.sock", "--policy",
                       str(policy), "--root", host)
    assert code == 2
    assert err == ("pyvfio broker: cannot create socket /nonexistent/b.sock: /nonexistent does "
                   "not exist\n")


def test_a_live_broker_is_left_alone(capsys, host: str, policy: Path,
                                     running_broker: str) -> None:
    code, _, err = run(capsys, "broker", "--socket", running_broker, "--policy", str(policy),
                       "--root", host)
    assert code == 2 and f"another broker is already listening on {running_broker}" in err
    with BrokerSession(running_broker) as session:  # still answering
        assert session.hello()["version"] == 1


def test_the_broker_removes_only_its_own_socket(host: str, sockdir: Path) -> None:
    """If the path was replaced while it ran, stopping leaves the new file."""
    path = sockdir / "b.sock"
    broker = Broker(str(path), Policy(), root=host, audit=AuditLog(None, io.StringIO()))
    broker.listen()
    path.unlink()
    path.write_text("someone else's")
    broker.stop()
    broker._shutdown()
    assert path.read_text() == "someone else's"


# --- clients: bounded waits, and they say what answered ----------------------------------------


def test_broker_client_against_a_vfio_user_server(edu_socket: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="not a pyvfio broker") as exc:
        BrokerSession(edu_socket, handshake_timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert "--vfio-user PATH" in str(exc.value)


def test_broker_client_against_a_silent_peer(fake_peer: Callable[[str], str]) -> None:
    path = fake_peer("silent")
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match=f"{path} did not greet within 0.3s"):
        BrokerSession(path, handshake_timeout=0.3)
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("behaviour, expect", [
    ("close", "it closed the connection without a greeting"),
    ("garbage", "its first bytes b'HTTP/1.1 400 Bad' are not a broker greeting"),
])
def test_broker_client_against_other_peers(fake_peer: Callable[[str], str], behaviour: str,
                                           expect: str) -> None:
    path = fake_peer(behaviour)
    with pytest.raises(ProtocolError, match="is not a pyvfio broker") as exc:
        BrokerSession(path, handshake_timeout=2)
    assert expect in str(exc.value)


def test_broker_client_against_a_broker_refusing_it(host: str, sockdir: Path) -> None:
    path = str(sockdir / "full.sock")
    broker = Broker(path, Policy.from_toml("[broker]\nmax_clients = 1\n"), root=host,
                    audit=AuditLog(None, io.StringIO()))
    broker.listen()
    thread = threading.Thread(target=broker.serve_forever, daemon=True)
    thread.start()
    try:
        with BrokerSession(path), pytest.raises(BrokerRefused, match="busy: too many clients"):
            BrokerSession(path)
    finally:
        broker.stop()
        thread.join(10)


def test_cli_broker_open_on_a_vfio_user_socket_ends(capsys, edu_socket: str) -> None:
    t0 = time.monotonic()
    code, _, err = run(capsys, "broker-open", "--socket", edu_socket, "--list")
    assert code == 2 and time.monotonic() - t0 < 15
    assert err.startswith(f"pyvfio broker-open: {edu_socket} did not greet within 5s: not a "
                          "pyvfio broker")
    code, _, err = run(capsys, "info", "--broker", edu_socket, "00:03.0")
    assert code == 2 and "not a pyvfio broker" in err


def test_cli_info_vfio_user_on_a_broker_socket(capsys, running_broker: str) -> None:
    t0 = time.monotonic()
    code, _, err = run(capsys, "info", "--vfio-user", running_broker)
    assert code == 2 and time.monotonic() - t0 < 5
    assert err == (f"pyvfio info: {running_broker} is a pyvfio broker, not a vfio-user server: "
                   f"use --broker {running_broker} BDF\n")


def test_cli_broker_open_errors_name_the_path(capsys, sockdir: Path) -> None:
    code, _, err = run(capsys, "broker-open", "--socket", "/nonexistent/b.sock", "--list")
    assert code == 2
    assert err == ("pyvfio broker-open: no pyvfio broker at /nonexistent/b.sock: the directory "
                   "/nonexistent does not exist\n")
    plain = sockdir / "plain"
    plain.write_text("")
    code, _, err = run(capsys, "broker-open", "--socket", str(plain), "--list")
    assert code == 2 and err == f"pyvfio broker-open: no pyvfio broker at {plain}: it is not a socket\n"


@pytest.fixture
def private_socket(serve: Callable[..., str]) -> Iterator[str]:
    """A vfio-user socket in a directory others can enter, the socket 0600 root."""
    from pyvfio.devices.edu import EduDevice

    d = tempfile.mkdtemp(prefix="pyvfio-perm-", dir="/tmp")
    os.chmod(d, 0o755)
    path = serve(EduDevice())
    target = os.path.join(d, "edu.sock")
    os.rename(path, target)
    os.chmod(target, 0o600)
    yield target
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="no system python3")
@pytest.mark.parametrize("argv, what", [
    (["info", "--vfio-user"], "vfio-user"),
    (["broker-open", "--list", "--socket"], "broker"),
])
def test_permission_denied_as_nobody_names_the_socket_and_what_to_change(
        private_socket: str, argv: list[str], what: str) -> None:
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "/usr/bin/python3", "-m", "pyvfio", *argv, private_socket],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(CHECKOUT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"pyvfio {argv[0]}: cannot connect to {private_socket} (owner root, "
                           "mode 0600): permission denied for nobody (uid 65534); the socket's "
                           f"owner and mode (and search permission on {os.path.dirname(private_socket)}) "
                           "must allow it\n")


def test_process_broker_open_on_a_vfio_user_socket(edu_socket: str) -> None:
    """The whole process ends (no hang), exit 2, one line."""
    proc = subprocess.run([sys.executable, "-m", "pyvfio", "broker-open", "--socket", edu_socket,
                           "--list"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "not a pyvfio broker" in proc.stderr
