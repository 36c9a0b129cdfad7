"""The control socket of ``pyvfio serve --control PATH``: a device server run as a service.

A JSON protocol in the manner of QEMU's QMP, on a UNIX stream socket (mode
0600: whoever may connect may add devices).  Each message is one JSON object
on one line.

On connect the server sends a greeting::

    {"pyvfio": {"version": "0.1.0", "capabilities": ["events"]}}

A command and its answers (``id`` is optional and echoed as given)::

    -> {"execute": "device-add", "arguments": {"model": "edu", "socket": "/run/edu.sock"}, "id": 1}
    <- {"return": {"id": "edu0", "model": "edu", "socket": "/run/edu.sock", ...}, "id": 1}
    -> {"execute": "device-remove", "arguments": {"id": "edu0"}, "id": 2}
    <- {"error": {"class": "DeviceBusy", "desc": "edu0: a client (pid 4242) is attached; ..."}, "id": 2}

Commands:

``query-version``
    ``{"version": "0.1.0"}``
``query-commands``
    ``[{"name": "device-add"}, ...]``
``query-models``
    ``[{"name": "edu", "description": "...", "options": {"dma-delay": 0.1}}]``
``query-devices``
    ``[{"id", "model", "socket", "clients-served", "client": null | {"pid", "uid", "gid",
    "negotiated", "connected-at", "dma-windows", "dma-windows-mapped", "dma-bytes"}}]``;
    a window is *mapped* when the client passed an fd for it (shared guest RAM),
    otherwise the server reaches it with DMA_READ/DMA_WRITE messages
``device-add`` ``{"model", "socket", "id"?, "options"?}``
    serve a new device on ``socket``; ``options`` are the model's (the ``serve``
    options, dashes or underscores); returns the device as ``query-devices`` does
``device-remove`` ``{"id", "force"?: false}``
    stop serving a device and remove its socket file.  Refused with
    ``DeviceBusy`` while a client is attached (the "unplug blocker": detach it
    from the VM first, e.g. QMP ``device_del``); ``force`` disconnects the client
``quit``
    stop the whole server (as SIGTERM does)

Errors have a ``class``: ``GenericError`` (malformed message), ``CommandNotFound``,
``InvalidParameter``, ``DeviceNotFound``, ``DeviceBusy``.

Events go to every connected control client::

    {"event": "CLIENT_CONNECTED", "data": {"id": "edu0", "socket": "...", "pid": 4242},
     "timestamp": {"seconds": 1764450000, "microseconds": 123456}}

``CLIENT_CONNECTED`` and ``CLIENT_DISCONNECTED`` (a vfio-user client came or
went), ``DEVICE_ADDED`` and ``DEVICE_DELETED``.

A malformed message gets an error and the connection goes on; a line over
:data:`MAX_LINE` bytes ends that control connection.  Neither touches the
devices or the other control clients.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import queue
import re
import select
import socket
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyvfio.devices.model import PciDeviceModel
from pyvfio.errors import PyvfioError, UsageError
from pyvfio.user.server import Connection, DeviceServer, Server

__all__ = ["MAX_LINE", "ControlClient", "ControlError", "ControlServer", "ModelType",
           "control_request"]

log = logging.getLogger("pyvfio.user.control")

MAX_LINE = 64 * 1024
MAX_CLIENTS = 16
SEND_TIMEOUT = 5.0  # seconds a control client may leave a reply or event unread
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


class ControlError(PyvfioError):
    """A control command failed; ``error_class`` is the QMP-style class sent to the client."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class


@dataclass(frozen=True)
class ModelType:
    """A device model the control socket can instantiate.

    ``create(options)`` builds one from model options (``options`` holds only
    keys of ``defaults``, with values of the same types); it raises
    :class:`UsageError` (or ValueError) for a bad value.
    """

    name: str
    description: str
    create: Callable[[Mapping[str, Any]], PciDeviceModel]
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Device:
    id: str
    model: str
    ds: DeviceServer
    instance: PciDeviceModel
    created: bool = False  # by device-add (the control socket closes it), not adopted


def _now() -> dict[str, int]:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1_000_000)}


def _peer(sock: socket.socket) -> tuple[int, int, int] | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class _Client:
    """One control connection: a reader thread; writes are serialized."""

    def __init__(self, owner: ControlServer, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock
        self._wlock = threading.Lock()
        self.closed = False

    def send(self, obj: Mapping[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self._wlock:
            if self.closed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        try:
            buf = b""
            while not self.closed:
                chunk = self.sock.recv(65536)  # recv, not recvmsg: fds sent to us are dropped
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self.send(self.owner.handle_line(line))
                        if self.owner.quit_requested.is_set():
                            self.owner.on_quit()  # after the reply is on its way
                if len(buf) > MAX_LINE:
                    self.send({"error": {"class": "GenericError",
                                         "desc": f"message longer than {MAX_LINE} bytes"}})
                    break
        except OSError:
            pass
        except Exception:  # a bug must not take the server down
            log.exception("control connection failed")
        finally:
            self.close()
            self.sock.close()
            self.owner._client_ended(self)


class ControlServer:
    """The control socket of one :class:`~pyvfio.user.server.Server`.

    >>> control = ControlServer(server, "/run/pyvfio.ctl", models)   # doctest: +SKIP
    >>> control.start()                                               # doctest: +SKIP

    ``models`` maps model names to :class:`ModelType`.  Devices served before
    the control socket existed are adopted with :meth:`adopt`.  The methods
    :meth:`add_device`, :meth:`remove_device` and :meth:`describe` are the
    commands, callable from Python too; they raise :class:`ControlError`.
    """

    def __init__(self, server: Server, path: str, models: Mapping[str, ModelType], *,
                 version: str = "", on_quit: Callable[[], None] | None = None) -> None:
        self.server = server
        self.path = path
        self.models = dict(models)
        self.version = version
        self.on_quit = on_quit or server.stop
        self._lock = threading.RLock()  # the device table
        self._devices: dict[str, _Device] = {}
        self._clients: list[_Client] = []
        self._clients_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.quit_requested = threading.Event()
        self._events: queue.SimpleQueue[tuple[str, dict[str, Any], dict[str, int]] | None] = (
            queue.SimpleQueue())
        self._emitter: threading.Thread | None = None
        self._connected_at: weakref.WeakKeyDictionary[Connection, str] = (
            weakref.WeakKeyDictionary())
        self._peers: weakref.WeakKeyDictionary[Connection, tuple[int, int, int]] = (
            weakref.WeakKeyDictionary())
        self._commands: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "query-version": lambda a: {"version": self.version},
            "query-commands": lambda a: [{"name": n} for n in sorted(self._commands)],
            "query-models": lambda a: [
                {"name": m.name, "description": m.description,
                 "options": {k.replace("_", "-"): v for k, v in m.defaults.items()}}
                for m in self.models.values()],
            "query-devices": lambda a: self.describe(),
            "device-add": self._cmd_add,
            "device-remove": self._cmd_remove,
            "quit": self._cmd_quit,
        }

    # ---- lifecycle ----

    def start(self) -> ControlServer:
        """Listen on :attr:`path` (mode 0600) and serve control clients in the background.
        Raises :class:`UsageError` naming the path when it cannot listen there."""
        _prepare_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bound under a temporary name and renamed once listening: whoever
        # waits for the path to appear can connect at once.
        staging = os.path.join(os.path.dirname(os.path.abspath(self.path)),
                               f".{os.path.basename(self.path)}.{os.getpid()}")
        old_umask = os.umask(0o177)
        try:
            sock.bind(staging)
            sock.listen(8)
            os.rename(staging, self.path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise UsageError(f"cannot create control socket {self.path}: "
                             f"{exc.strerror or exc}") from exc
        finally:
            os.umask(old_umask)
        self._listener = sock
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"pyvfio control {self.path}")
        self._thread.start()
        self._emitter = threading.Thread(target=self._send_events, daemon=True,
                                         name=f"pyvfio control events {self.path}")
        self._emitter.start()
        return self

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closed:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.warning("%s: accept failed: %s", self.path, exc)
                time.sleep(0.1)
                continue
            with self._clients_lock:
                if len(self._clients) >= MAX_CLIENTS:
                    with contextlib.suppress(OSError):
                        sock.sendall(b'{"error":{"class":"GenericError","desc":"too many '
                                     b'control clients"}}\n')
                    sock.close()
                    continue
                # Sends time out; receives wait (a control client may sit idle).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                struct.pack("ll", int(SEND_TIMEOUT), 0))
                client = _Client(self, sock)
                # The greeting goes out before the client can receive any event:
                # an event emitted meanwhile must not arrive first.
                client.send({"pyvfio": {"version": self.version, "capabilities": ["events"]}})
                self._clients.append(client)
            threading.Thread(target=client.run, daemon=True,
                             name=f"pyvfio control client {self.path}").start()

    def _client_ended(self, client: _Client) -> None:
        with self._clients_lock, contextlib.suppress(ValueError):
            self._clients.remove(client)

    def close(self) -> None:
        """Stop listening, end every control connection and remove the socket file.
        The devices keep being served (the :class:`Server` owns them)."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            client.close()
        self._events.put(None)
        for thread in (self._thread, self._emitter):
            if thread is not None and thread is not threading.current_thread():
                thread.join(5)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- events ----

    def emit(self, event: str, data: Mapping[str, Any]) -> None:
        """Queue ``event`` for every control client; one thread sends events in
        the order they happened.  A client that does not read for
        :data:`SEND_TIMEOUT` seconds is disconnected rather than holding the others up."""
        self._events.put((event, dict(data), _now()))

    def _send_events(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            event, data, stamp = item
            message = {"event": event, "data": data, "timestamp": stamp}
            with self._clients_lock:
                clients = list(self._clients)
            for client in clients:
                client.send(message)

    def _on_client(self, what: str, ds: DeviceServer, conn: Connection) -> None:
        device = self._by_server(ds)
        data: dict[str, Any] = {"id": device.id if device else None, "socket": ds.path}
        if what == "connected":
            self._connected_at[conn] = _iso_now()
            peer = _peer(conn.sock)
            if peer is not None:
                self._peers[conn] = peer
        peer = self._peers.get(conn)  # gone from the socket once the client hung up
        if peer is not None:
            data["pid"] = peer[0]
        # Queued: the vfio-user thread holds the device server's lock here and
        # must not wait for control clients.
        self._events.put(("CLIENT_CONNECTED" if what == "connected" else "CLIENT_DISCONNECTED",
                          data, _now()))

    # ---- the device table ----

    def _by_server(self, ds: DeviceServer) -> _Device | None:
        with self._lock:
            return next((d for d in self._devices.values() if d.ds is ds), None)

    def _new_id(self, model: str) -> str:
        n = 0
        while f"{model}{n}" in self._devices:
            n += 1
        return f"{model}{n}"

    def adopt(self, ds: DeviceServer, model: str, instance: PciDeviceModel,
              device_id: str | None = None) -> str:
        """Put a device already served by :attr:`server` under control; return its id."""
        with self._lock:
            device_id = device_id or self._new_id(model)
            self._devices[device_id] = _Device(device_id, model, ds, instance)
            ds.on_client = self._on_client
        return device_id

    def models_served(self) -> list[PciDeviceModel]:
        """The model instances device-add created and that are still served (the
        caller closes them after closing the server)."""
        with self._lock:
            return [d.instance for d in self._devices.values() if d.created]

    def describe(self, device_id: str | None = None) -> Any:
        """``query-devices``: every device (or one, by id) with its client."""
        with self._lock:
            devices = list(self._devices.values()) if device_id is None else [
                self._get(device_id)]
        out = []
        for d in devices:
            conn = d.ds.connection
            client: dict[str, Any] | None = None
            if conn is not None:
                peer = _peer(conn.sock)
                windows = conn.dma.mappings
                client = {
                    "pid": peer[0] if peer else None, "uid": peer[1] if peer else None,
                    "gid": peer[2] if peer else None, "negotiated": conn.negotiated,
                    "dma-windows": len(windows),
                    "dma-windows-mapped": sum(1 for w in windows if w.mapped),
                    "dma-bytes": sum(w.size for w in windows),
                }
                started = self._connected_at.get(conn)
                if started is not None:
                    client["connected-at"] = started
            out.append({"id": d.id, "model": d.model, "socket": d.ds.path,
                        "clients-served": d.ds.clients_served, "client": client})
        return out if device_id is None else out[0]

    def _get(self, device_id: str) -> _Device:
        device = self._devices.get(device_id)
        if device is None:
            known = ", ".join(sorted(self._devices)) or "none"
            raise ControlError("DeviceNotFound", f"no device {device_id!r} (devices: {known})")
        return device

    def add_device(self, model: str, socket_path: str, device_id: str | None = None,
                   options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``device-add``: serve a new ``model`` instance on ``socket_path``."""
        mtype = self.models.get(model)
        if mtype is None:
            raise ControlError("InvalidParameter", f"unknown model {model!r} (models: "
                               + ", ".join(sorted(self.models)) + ")")
        if not socket_path.startswith("/"):
            raise ControlError("InvalidParameter", f"socket {socket_path!r}: give an absolute "
                               "path (the server's working directory is not the client's)")
        if device_id is not None and not _ID.fullmatch(device_id):
            raise ControlError("InvalidParameter", f"id {device_id!r}: start with a letter; "
                               "letters, digits, '-', '.', '_'; at most 64")
        values = _model_options(mtype, options or {})
        with self._lock:
            if device_id is not None and device_id in self._devices:
                raise ControlError("InvalidParameter", f"id {device_id!r} is taken")
            for d in self._devices.values():
                if os.path.abspath(d.ds.path) == os.path.abspath(socket_path):
                    raise ControlError("InvalidParameter",
                                       f"{socket_path}: device {d.id} is served there")
            try:
                instance = mtype.create(values)
            except (UsageError, ValueError) as exc:
                raise ControlError("InvalidParameter", f"{model}: {exc}") from None
            try:
                ds = self.server.add(instance, socket_path)
            except (UsageError, OSError) as exc:
                _close_model(instance)
                raise ControlError("InvalidParameter", str(exc)) from None
            new_id = self.adopt(ds, model, instance, device_id)
            self._devices[new_id].created = True
            described = self.describe(new_id)
        self.emit("DEVICE_ADDED", {"id": new_id, "model": model, "socket": socket_path})
        return dict(described)

    def remove_device(self, device_id: str, force: bool = False) -> dict[str, Any]:
        """``device-remove``: refused with ``DeviceBusy`` while a client is attached
        unless ``force``, which disconnects it."""
        if not force:
            self._let_a_leaving_client_go(device_id)
        with self._lock:
            device = self._get(device_id)
            conn = device.ds.connection
            if conn is not None and not force:
                peer = _peer(conn.sock)
                who = f"a client (pid {peer[0]})" if peer else "a client"
                raise ControlError(
                    "DeviceBusy", f"{device_id}: {who} is attached to {device.ds.path}; detach "
                    "it first (QEMU: device_del), or remove with force to disconnect it")
            del self._devices[device_id]
        self.server.remove(device.ds)
        _close_model(device.instance)
        self.emit("DEVICE_DELETED", {"id": device_id, "socket": device.ds.path,
                                     "forced": conn is not None})
        return {"id": device_id, "disconnected-client": conn is not None}

    def _let_a_leaving_client_go(self, device_id: str, limit: float = 2.0) -> None:
        """A client that has closed its end of the socket is leaving: give its
        connection's thread up to ``limit`` seconds to see the EOF, so that a
        ``device-remove`` sent just after the client hung up is not refused
        with ``DeviceBusy``.  Waits without the table lock: the leaving thread
        reports the disconnection through it."""
        with self._lock:
            device = self._devices.get(device_id)
            conn = device.ds.connection if device is not None else None
        if conn is None or conn.thread is None or conn.thread is threading.current_thread():
            return
        poller = select.poll()
        try:
            poller.register(conn.sock, select.POLLRDHUP)
            hung_up = bool(poller.poll(0))
        except (OSError, ValueError):  # the thread already closed the socket: ending
            hung_up = True
        if hung_up:
            conn.thread.join(limit)

    # ---- commands ----

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line -> the reply object (never raises)."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"error": {"class": "GenericError", "desc": f"JSON parse error: {exc}"}}
        if not isinstance(request, dict):
            return {"error": {"class": "GenericError",
                              "desc": "expected a JSON object like {\"execute\": ...}"}}
        reply: dict[str, Any] = {}
        if "id" in request:
            reply["id"] = request["id"]
        name = request.get("execute")
        arguments = request.get("arguments", {})
        unknown = set(request) - {"execute", "arguments", "id"}
        try:
            if not isinstance(name, str):
                raise ControlError("GenericError", "'execute' must name a command")
            if unknown:
                raise ControlError("GenericError", "unknown message key(s): "
                                   + ", ".join(sorted(unknown)))
            if not isinstance(arguments, dict):
                raise ControlError("GenericError", "'arguments' must be a JSON object")
            command = self._commands.get(name)
            if command is None:
                raise ControlError("CommandNotFound", f"the command {name} has not been found")
            reply["return"] = command(arguments)
        except ControlError as exc:
            reply["error"] = {"class": exc.error_class, "desc": str(exc)}
        except Exception as exc:  # a bug: answered, logged, contained
            log.exception("control command %r failed", name)
            reply["error"] = {"class": "GenericError", "desc": f"internal error: {exc}"}
        return reply

    def _cmd_add(self, a: Mapping[str, Any]) -> Any:
        _only(a, {"model", "socket", "id", "options"}, {"model", "socket"})
        for key in ("model", "socket"):
            if not isinstance(a[key], str):
                raise ControlError("InvalidParameter", f"'{key}' must be a string")
        if "id" in a and not isinstance(a["id"], str):
            raise ControlError("InvalidParameter", "'id' must be a string")
        options = a.get("options", {})
        if not isinstance(options, dict):
            raise ControlError("InvalidParameter", "'options' must be a JSON object")
        return self.add_device(a["model"], a["socket"], a.get("id"), options)

    def _cmd_remove(self, a: Mapping[str, Any]) -> Any:
        _only(a, {"id", "force"}, {"id"})
        if not isinstance(a["id"], str):
            raise ControlError("InvalidParameter", "'id' must be a string")
        force = a.get("force", False)
        if not isinstance(force, bool):
            raise ControlError("InvalidParameter", "'force' must be true or false")
        return self.remove_device(a["id"], force)

    def _cmd_quit(self, a: Mapping[str, Any]) -> Any:
        _only(a, set(), set())
        self.quit_requested.set()
        return {}


def _only(arguments: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
    extra = set(arguments) - allowed
    if extra:
        raise ControlError("InvalidParameter", "unexpected argument(s): "
                           + ", ".join(sorted(extra)))
    missing = required - set(arguments)
    if missing:
        raise ControlError("InvalidParameter", "missing argument(s): "
                           + ", ".join(sorted(missing)))


def _model_options(mtype: ModelType, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``options`` against the model's defaults (name and type); return them
    merged over the defaults."""
    values = dict(mtype.defaults)
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in mtype.defaults:
            known = ", ".join(k.replace("_", "-") for k in mtype.defaults) or "none"
            raise ControlError("InvalidParameter",
                               f"{mtype.name}: no option {key!r} (options: {known})")
        default = mtype.defaults[name]
        want: tuple[type, ...] = (str,) if default is None else (type(default),)
        if isinstance(default, float):
            want = (int, float)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, want):
            raise ControlError("InvalidParameter", f"{mtype.name}: option {key!r} takes a "
                               f"{want[-1].__name__}, not {json.dumps(value)}")
        values[name] = value
    return values


def _close_model(instance: PciDeviceModel) -> None:
    close = getattr(instance, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _prepare_path(path: str) -> None:
    """Replace a stale control socket; refuse a live one or a file that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"control socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a server that died left it
        return
    finally:
        probe.close()
    raise UsageError(f"control socket {path}: another server is listening there")


# --- a client ---------------------------------------------------------------------------------


class ControlClient:
    """A connection to a control socket that keeps the events it reads.

    >>> with ControlClient("/run/pyvfio.ctl") as ctl:              # doctest: +SKIP
    ...     ctl.execute("device-add", {"model": "edu", "socket": "/run/edu.sock"})
    ...     ctl.wait_event("CLIENT_CONNECTED", timeout=60)

    :meth:`execute` returns the command's ``return`` value or raises
    :class:`ControlError` (the server's error class and text); OSError when the
    socket cannot be reached; TimeoutError after ``timeout`` seconds of silence.
    """

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self.greeting = self._read()
        if "pyvfio" not in self.greeting:
            self.close()
            raise ControlError("GenericError", f"{path}: not a pyvfio control socket "
                               f"(greeting {self.greeting!r})")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline(MAX_LINE + 1)
        if not line:
            raise ControlError("GenericError", f"{self.path}: the server closed the connection")
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ControlError("GenericError", f"{self.path}: not a JSON object: {line!r}")
        return obj

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        self._next_id += 1
        request: dict[str, Any] = {"execute": name, "id": self._next_id}
        if arguments is not None:
            request["arguments"] = dict(arguments)
        self.sock.sendall((json.dumps(request) + "\n").encode())
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._next_id:
                continue
            if "error" in reply:
                error = reply["error"]
                raise ControlError(str(error.get("class", "GenericError")),
                                   str(error.get("desc", "")))
            return reply.get("return")

    def wait_event(self, name: str, timeout: float = 60.0,
                   match: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The first event ``name`` (whose ``data`` has the items of ``match``),
        already received or within ``timeout`` seconds; TimeoutError otherwise."""
        def fits(ev: dict[str, Any]) -> bool:
            data = ev.get("data", {})
            return ev.get("event") == name and all(data.get(k) == v
                                                   for k, v in (match or {}).items())
        for ev in self.events:
            if fits(ev):
                self.events.remove(ev)
                return ev
        deadline = time.monotonic() + timeout
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.path}: no {name} event within {timeout:.0f} s")
                self.sock.settimeout(left)
                try:
                    msg = self._read()
                except TimeoutError:
                    raise TimeoutError(
                        f"{self.path}: no {name} event within {timeout:.0f} s") from None
                if "event" not in msg:
                    continue
                if fits(msg):
                    return msg
                self.events.append(msg)
        finally:
            self.sock.settimeout(old)

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def control_request(path: str, execute: str, arguments: Mapping[str, Any] | None = None,
                    timeout: float = 10.0) -> Any:
    """Send one command to the control socket at ``path``; return its ``return``
    value (see :class:`ControlClient`)."""
    with ControlClient(path, timeout) as client:
        return client.execute(execute, arguments)


def _iso_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
