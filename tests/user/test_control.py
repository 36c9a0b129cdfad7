"""``pyvfio serve --control``: the QMP-like control socket, against a real server process.

Devices are added and removed over the socket while the server runs, real
vfio-user clients (pyvfio's own) attach to them, and the events, the unplug
blocker and every kind of malformed request are checked on the wire.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from vfu_raw import wait_until

from pyvfio.errors import ConnectionClosed
from pyvfio.user.client import connect


class Ctl:
    """A raw control-socket client: what a management tool would write."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()
        self.events: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "control connection closed"
        obj = json.loads(line)
        assert isinstance(obj, dict)
        return obj

    def send_raw(self, data: bytes) -> dict[str, Any]:
        self.sock.sendall(data)
        while True:
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, name: str, arguments: dict[str, Any] | None = None,
                id: Any = None) -> dict[str, Any]:
        req: dict[str, Any] = {"execute": name}
        if arguments is not None:
            req["arguments"] = arguments
        if id is not None:
            req["id"] = id
        return self.send_raw(json.dumps(req).encode() + b"\n")

    def wait_event(self, name: str) -> dict[str, Any]:
        for ev in self.events:
            if ev["event"] == name:
                self.events.remove(ev)
                return ev
        while True:
            msg = self.read()
            assert "event" in msg, msg
            if msg["event"] == name:
                return msg
            self.events.append(msg)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def server(tmp_path: Path):
    ctl = str(tmp_path / "ctl.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", "edu", "--socket",
                             str(tmp_path / "boot.sock"), "--control", ctl],
                            stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: os.path.exists(ctl) or proc.poll() is not None, 20)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    yield proc, ctl
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def test_greeting_models_and_the_device_given_on_the_command_line(server, tmp_path):
    _proc, path = server
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    c = Ctl(path)
    assert c.greeting["pyvfio"]["capabilities"] == ["events"]
    assert c.execute("query-version", id="v")["id"] == "v"
    models = c.execute("query-models")["return"]
    assert {"name": "edu", "description": models[0]["description"],
            "options": {"dma-delay": 0.1}} in models
    devices = c.execute("query-devices")["return"]
    assert devices == [{"id": "edu0", "model": "edu", "socket": str(tmp_path / "boot.sock"),
                        "clients-served": 0, "client": None}]
    names = {cmd["name"] for cmd in c.execute("query-commands")["return"]}
    assert {"device-add", "device-remove", "query-devices", "quit"} <= names
    c.close()


def test_add_attach_blocked_remove_detach_remove(server, tmp_path):
    _proc, path = server
    c = Ctl(path)
    watcher = Ctl(path)  # events go to every control client
    sock = str(tmp_path / "hot.sock")
    added = c.execute("device-add", {"model": "edu", "socket": sock, "id": "hot",
                                     "options": {"dma-delay": 0}}, id=7)
    assert added["id"] == 7
    assert added["return"]["id"] == "hot" and added["return"]["client"] is None
    assert watcher.wait_event("DEVICE_ADDED")["data"] == {"id": "hot", "model": "edu",
                                                          "socket": sock}
    dev = connect(sock)
    ev = watcher.wait_event("CLIENT_CONNECTED")
    assert ev["data"]["id"] == "hot" and ev["data"]["pid"] == os.getpid()
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert wait_until(lambda: (c.execute("query-devices")["return"][1]["client"] or {})
                      .get("negotiated") is True, 10)
    hot = c.execute("query-devices")["return"][1]
    assert hot["client"]["pid"] == os.getpid() and hot["clients-served"] == 1
    refused = c.execute("device-remove", {"id": "hot"})
    assert refused["error"]["class"] == "DeviceBusy"
    assert f"pid {os.getpid()}" in refused["error"]["desc"] and "device_del" in refused[
        "error"]["desc"]
    assert os.path.exists(sock)  # the refusal changed nothing
    assert dev.bar(0).read32(0) == 0x010000ED  # the client still works
    dev.close()
    gone = watcher.wait_event("CLIENT_DISCONNECTED")["data"]
    assert gone == {"id": "hot", "socket": sock, "pid": os.getpid()}
    removed = c.execute("device-remove", {"id": "hot"})
    assert removed["return"] == {"id": "hot", "disconnected-client": False}
    assert not os.path.exists(sock)
    assert watcher.wait_event("DEVICE_DELETED")["data"]["forced"] is False
    assert [d["id"] for d in c.execute("query-devices")["return"]] == ["edu0"]
    c.close()
    watcher.close()


def test_forced_remove_disconnects_the_client(server, tmp_path):
    _proc, path = server
    c = Ctl(path)
    sock = str(tmp_path / "f.sock")
    c.execute("device-add", {"model": "edu", "socket": sock})
    dev = connect(sock)
    c.wait_event("CLIENT_CONNECTED")
    removed = c.execute("device-remove", {"id": "edu1", "force": True})
    assert removed["return"] == {"id": "edu1", "disconnected-client": True}
    c.wait_event("CLIENT_DISCONNECTED")
    with pytest.raises((ConnectionClosed, OSError)):  # the server hung up on it
        dev.bar(0).read32(0)
    dev.close()
    assert not os.path.exists(sock)
    c.close()


@pytest.mark.parametrize(("raw", "error_class", "desc"), [
    (b"{not json\n", "GenericError", "JSON parse error"),
    (b"[1, 2]\n", "GenericError", "expected a JSON object"),
    (b'{"execute": 5}\n', "GenericError", "must name a command"),
    (b'{"execute": "query-devices", "extra": 1}\n', "GenericError", "unknown message key"),
    (b'{"execute": "query-devices", "arguments": []}\n', "GenericError", "JSON object"),
    (b'{"execute": "device_add"}\n', "CommandNotFound", "device_add"),
    (b'{"execute": "device-add", "arguments": {"model": "edu"}}\n', "InvalidParameter",
     "missing argument(s): socket"),
    (b'{"execute": "device-add", "arguments": {"model": "nope", "socket": "/x"}}\n',
     "InvalidParameter", "unknown model 'nope'"),
    (b'{"execute": "device-add", "arguments": {"model": "edu", "socket": "rel.sock"}}\n',
     "InvalidParameter", "absolute path"),
    (b'{"execute": "device-add", "arguments": {"model": "edu", "socket": "/x", "id": "1a"}}\n',
     "InvalidParameter", "start with a letter"),
    (b'{"execute": "device-add", "arguments": {"model": "edu", "socket": "/x", '
     b'"options": {"speed": 1}}}\n', "InvalidParameter", "no option 'speed'"),
    (b'{"execute": "device-add", "arguments": {"model": "edu", "socket": "/x", '
     b'"options": {"dma-delay": "fast"}}}\n', "InvalidParameter", "takes a float"),
    (b'{"execute": "device-add", "arguments": {"model": "edu", "socket": "/x", '
     b'"options": {"dma-delay": -1}}}\n', "InvalidParameter", "0 or more seconds"),
    (b'{"execute": "device-add", "arguments": {"model": "edu", "socket": '
     b'"/nonexistent-dir/x.sock"}}\n', "InvalidParameter", "does not exist"),
    (b'{"execute": "device-remove", "arguments": {"id": "ghost"}}\n', "DeviceNotFound",
     "devices: edu0"),
    (b'{"execute": "device-remove", "arguments": {"id": "edu0", "force": "yes"}}\n',
     "InvalidParameter", "true or false"),
    (b'{"execute": "quit", "arguments": {"now": true}}\n', "InvalidParameter", "unexpected"),
])
def test_malformed_requests_get_errors_and_change_nothing(server, tmp_path, raw, error_class,
                                                          desc):
    _proc, path = server
    c = Ctl(path)
    before = c.execute("query-devices")["return"]
    reply = c.send_raw(raw)
    assert reply["error"]["class"] == error_class, reply
    assert desc in reply["error"]["desc"], reply
    assert c.execute("query-devices")["return"] == before  # and the connection goes on
    assert not os.path.exists("/x")
    c.close()


def test_taken_socket_and_id_are_refused(server, tmp_path):
    _proc, path = server
    c = Ctl(path)
    taken = c.execute("device-add", {"model": "edu", "socket": str(tmp_path / "boot.sock")})
    assert taken["error"]["class"] == "InvalidParameter" and "edu0" in taken["error"]["desc"]
    c.execute("device-add", {"model": "edu", "socket": str(tmp_path / "a.sock"), "id": "a"})
    again = c.execute("device-add", {"model": "edu", "socket": str(tmp_path / "b.sock"),
                                     "id": "a"})
    assert "taken" in again["error"]["desc"] and not os.path.exists(tmp_path / "b.sock")
    c.close()


def test_oversized_line_ends_only_that_control_connection(server, tmp_path):
    proc, path = server
    c = Ctl(path)
    c.sock.sendall(b"x" * (70 * 1024))
    assert "longer than" in c.read()["error"]["desc"]
    assert c.file.readline() == b""  # closed
    c.close()
    other = Ctl(path)
    assert other.execute("query-devices")["return"][0]["id"] == "edu0"
    other.close()
    assert proc.poll() is None


def test_quit_stops_the_server_and_removes_every_socket(server, tmp_path):
    proc, path = server
    c = Ctl(path)
    c.execute("device-add", {"model": "edu", "socket": str(tmp_path / "q.sock")})
    assert c.execute("quit") == {"return": {}}
    assert proc.wait(10) == 0
    for name in ("ctl.sock", "boot.sock", "q.sock"):
        assert not (tmp_path / name).exists(), name
    c.close()


def test_control_only_server_and_a_live_control_socket_is_refused(tmp_path):
    ctl = str(tmp_path / "c.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", "--control", ctl],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: os.path.exists(ctl) or proc.poll() is not None, 20)
        c = Ctl(ctl)
        assert c.execute("query-devices")["return"] == []
        second = subprocess.run([sys.executable, "-m", "pyvfio", "serve", "--control", ctl],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 2 and "another server is listening" in second.stderr
        c.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not os.path.exists(ctl)
    bad = subprocess.run([sys.executable, "-m", "pyvfio", "serve", "--socket", "/tmp/x.sock"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "name a device model" in bad.stderr


def test_a_control_client_that_never_reads_is_dropped_not_waited_for(tmp_path):
    from pyvfio.user.control import SEND_TIMEOUT, ControlClient, ControlServer
    from pyvfio.user.server import Server

    path = str(tmp_path / "c.sock")
    server = Server()
    control = ControlServer(server, path, {}).start()
    stalled = socket.socket(socket.AF_UNIX)
    try:
        stalled.connect(path)  # and never reads
        with ControlClient(path) as reader:
            started = time.monotonic()
            for n in range(200):  # 6.4 MB of events: far more than the socket buffers
                control.emit("TEST", {"n": n, "pad": "x" * 32768})
            assert reader.wait_event("TEST", 60, {"n": 199})["data"]["n"] == 199
            assert time.monotonic() - started < SEND_TIMEOUT + 30
        stalled.settimeout(SEND_TIMEOUT + 10)
        while stalled.recv(1 << 20):  # what was sent before the drop, then EOF
            pass
    finally:
        stalled.close()
        control.close()
        server.close()


def test_device_add_passes_each_models_own_options(server, tmp_path):
    _proc, path = server
    c = Ctl(path)
    models = {m["name"]: m["options"] for m in c.execute("query-models")["return"]}
    assert models["virtio-blk"] == {"file": None, "read-only": False}
    assert models["virtio-rng"] == {"seed": None}
    no_file = c.execute("device-add", {"model": "virtio-blk", "socket": str(tmp_path / "b.sock")})
    assert no_file["error"]["class"] == "InvalidParameter"
    assert "needs a backing file" in no_file["error"]["desc"]
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    added = c.execute("device-add", {"model": "virtio-blk", "socket": str(tmp_path / "b.sock"),
                                     "options": {"file": str(disk), "read-only": True}})
    assert added["return"]["model"] == "virtio-blk"
    wrong = c.execute("device-add", {"model": "virtio-rng", "socket": str(tmp_path / "r.sock"),
                                     "options": {"seed": 7}})
    assert "takes a str" in wrong["error"]["desc"]
    c.close()


def test_remove_right_after_the_client_hangs_up_is_not_busy(server, tmp_path):
    """The client closes and device-remove follows at once, before the server
    has seen the EOF: a client that has hung up is leaving, not attached."""
    _proc, path = server
    c = Ctl(path)
    for n in range(5):
        sock = str(tmp_path / f"quick{n}.sock")
        assert "return" in c.execute("device-add", {"model": "edu", "socket": sock,
                                                    "id": f"quick{n}"})
        dev = connect(sock)
        assert dev.bar(0).read32(0) == 0x010000ED
        dev.close()
        removed = c.execute("device-remove", {"id": f"quick{n}"})
        assert removed.get("return") == {"id": f"quick{n}", "disconnected-client": False}, removed
        assert not os.path.exists(sock)
