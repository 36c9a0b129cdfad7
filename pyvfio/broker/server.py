"""The broker daemon: opens VFIO device nodes for clients the policy allows and
passes them the ready fds.

Runs as root on a UNIX socket; clients need no permission on ``/dev/vfio/*``
or ``/dev/iommu``.  Each connection is a *session*, identified by the kernel
(``SO_PEERCRED``/``SO_PEERGROUPS``), never by what the client writes.  A
session gets one address space, shared by all its devices: one container
(legacy) or one iommufd with one IOAS (iommufd).  The session is a lease: the
groups of its devices are reserved for it until it disconnects, then the
broker closes its own copies of the fds and (for ``managed`` devices) puts
the host driver back.

Why the broker keeps copies: it needs the session's container or iommufd to
add further devices to the same address space, and the lease table needs to
know which groups are taken.  What it cannot do is revoke the client's
copies: a client that disconnects but keeps its fds still holds the device,
and the next client asking for that group is refused with the host's
"in use" diagnosis naming that process.

One thread per connection; decisions that touch the lease table or open
nodes are serialised by one lock.  A bad request gets an error reply and the
session goes on; a frame that breaks the stream (oversized, fds where none
belong) ends the session; a client that vanishes ends it too.  No exception
from one client reaches another.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from pyvfio.broker import wire
from pyvfio.broker.audit import AuditLog
from pyvfio.broker.policy import DeviceIdentity, Policy, normalize_address
from pyvfio.errors import (
    ConnectionClosed,
    DeviceInUse,
    DeviceNotFound,
    HostStateError,
    KernelError,
    NotBoundToVfio,
    ProtocolError,
    PyvfioError,
    UsageError,
)
from pyvfio.sockets import forget_wakeup_fd, listen_error, prepare_listen_path

__all__ = ["PROTOCOL_VERSION", "Broker"]

PROTOCOL_VERSION = 1

#: The first message on every accepted connection (docs/broker.md): a client
#: knows from it that a pyvfio broker answered.  A refused connection gets an
#: error reply (``"ok": false``, e.g. ``"error": "busy"``) in its place.
GREETING = {"ok": True, "op": "greeting", "server": "pyvfio-broker", "version": PROTOCOL_VERSION}
_BACKEND_CHOICES = ("auto", "legacy", "iommufd")
_OPS = ("hello", "open", "close", "list")


class _Refused(Exception):
    """A request the broker says no to: ``kind`` is the reply's ``error``."""

    def __init__(self, reason: str, problems: list[dict[str, Any]] | None = None,
                 kind: str = "refused", err: int = errno.EPERM) -> None:
        super().__init__(reason)
        self.reason = reason
        self.problems = list(problems or [])
        self.kind = kind
        self.errno = err


@dataclass
class _DeviceLease:
    address: str
    group: int
    fd: int
    backend: str


@dataclass
class _Session:
    """The broker's side of one client connection."""

    number: int
    conn: socket.socket
    peer: wire.PeerCredentials
    backend: str | None = None
    setup: bool = True
    container: Any = None  # pyvfio.kernel.legacy.Container
    groups: dict[int, Any] = field(default_factory=dict)  # group id -> legacy Group
    iommufd: Any = None  # pyvfio.kernel.iommufd.Iommufd
    ioas_id: int | None = None
    devices: dict[str, _DeviceLease] = field(default_factory=dict)
    leased_groups: set[int] = field(default_factory=set)
    managed: list[str] = field(default_factory=list)  # devices the broker bound for us


def identify(root: str, address: str) -> DeviceIdentity:
    """Vendor, device and IOMMU group of ``address``, read from sysfs."""
    base = os.path.join(root, "sys/bus/pci/devices", address)
    if not os.path.isdir(base):
        raise _Refused(f"no PCI device {address} on this host", kind="refused",
                       err=errno.ENODEV)
    try:
        with open(os.path.join(base, "vendor")) as f:
            vendor = int(f.read().strip(), 16)
        with open(os.path.join(base, "device")) as f:
            device = int(f.read().strip(), 16)
    except (OSError, ValueError) as exc:
        raise _Refused(f"cannot read the IDs of {address}: {exc}", kind="failed",
                       err=errno.EIO) from None
    try:
        group_link = os.readlink(os.path.join(base, "iommu_group"))
        group: int | None = int(os.path.basename(group_link))
    except (OSError, ValueError):
        group = None
    return DeviceIdentity(address, vendor, device, group)


class Broker:
    """``Broker(socket_path, policy).serve_forever()``; :meth:`stop` from
    another thread (or a signal handler) ends it and releases every session.

    ``root`` is where sysfs and ``/dev`` are read (a fake tree in unit tests);
    ``audit`` receives one record per decision.
    """

    def __init__(self, socket_path: str, policy: Policy, *, root: str = "/",
                 audit: AuditLog | None = None, socket_mode: int = 0o666) -> None:
        self.socket_path = socket_path
        self.policy = policy
        self.root = root
        self.audit = audit or AuditLog()
        self.socket_mode = socket_mode
        self._lock = threading.Lock()  # lease table + opening nodes
        self._sessions: dict[int, _Session] = {}
        self._group_owner: dict[int, _Session] = {}
        self._threads: set[threading.Thread] = set()
        self._next = 1
        self._listener: socket.socket | None = None
        # What serve_forever waits on: the listener and a pipe that wakes it
        # (made in listen(), so no fd appears later, closed in _shutdown()).
        self._wake: tuple[int, int] | None = None
        self._waiting: selectors.BaseSelector | None = None
        # stop() may run in any thread while _shutdown() closes the pipe: a
        # write to a closed fd number could land in a file opened since.
        self._wake_lock = threading.Lock()
        self._created: os.stat_result | None = None  # the socket file we bound
        self._stopping = threading.Event()

    # ---- lifetime ----

    def listen(self) -> None:
        """Bind and listen (separate from :meth:`serve_forever` so a caller
        knows the socket exists before clients connect)."""
        if self._listener is not None:
            return
        prepare_listen_path(self.socket_path, "broker")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o077)  # no window where the socket has looser permissions
            try:
                sock.bind(self.socket_path)
            except OSError as exc:
                raise listen_error(self.socket_path, exc) from None
            finally:
                os.umask(old)
            self._created = os.lstat(self.socket_path)
            os.chmod(self.socket_path, self.socket_mode)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._waiting = selectors.DefaultSelector()
        self._waiting.register(sock, selectors.EVENT_READ)
        self._waiting.register(self._wake[0], selectors.EVENT_READ)
        self.audit.record("start", "info", reason=f"listening on {self.socket_path}",
                          policy=self.policy.source, rules=len(self.policy.rules))

    def serve_forever(self) -> None:
        self.listen()
        listener = self._listener
        assert listener is not None
        waiting, wake = self._waiting, self._wake
        assert waiting is not None and wake is not None
        try:
            while not self._stopping.is_set():
                ready = [key.fileobj for key, _ in waiting.select()]
                if wake[0] in ready:  # stop() or a signal (wakeup_fd): look again
                    with contextlib.suppress(OSError):
                        os.read(wake[0], 64)
                if listener not in ready or self._stopping.is_set():
                    continue
                try:
                    conn, _ = listener.accept()
                except OSError:
                    if self._stopping.is_set():
                        break
                    raise
                self._start_session(conn)
        finally:
            self._shutdown()

    def wakeup_fd(self) -> int:
        """The write end (non-blocking) of the pipe :meth:`serve_forever`
        waits on besides the socket, for :func:`signal.set_wakeup_fd` (see
        :func:`pyvfio.sockets.stop_on_signals`).  Exists from :meth:`listen`
        until :meth:`serve_forever` returns."""
        if self._wake is None:
            raise RuntimeError("the broker is not listening")
        return self._wake[1]

    def stop(self) -> None:
        """End :meth:`serve_forever`: stop accepting, disconnect every client
        (their sessions are released), remove the socket."""
        self._stopping.set()
        with self._wake_lock:
            if self._wake is not None:
                with contextlib.suppress(OSError):
                    os.write(self._wake[1], b"x")
        listener = self._listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass

    def _shutdown(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            try:
                s.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.close()
        with self._wake_lock:
            wake, self._wake = self._wake, None
        if wake is not None:
            forget_wakeup_fd(wake[1])
            for fd in wake:
                os.close(fd)
        self._remove_socket()
        self.audit.record("stop", "info", reason="broker stopped")

    def _remove_socket(self) -> None:
        """Remove the socket we bound, and only that: if something else now
        sits at the path (another broker's socket, a file), leave it."""
        created, self._created = self._created, None
        if created is None:
            return
        try:
            st = os.lstat(self.socket_path)
        except OSError:
            return
        if (st.st_ino, st.st_dev) == (created.st_ino, created.st_dev):
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ---- sessions ----

    def _start_session(self, conn: socket.socket) -> None:
        try:
            peer = wire.peer_credentials(conn)
        except OSError as exc:
            conn.close()
            self.audit.record("connect", "error", reason=f"SO_PEERCRED failed: {exc}")
            return
        with self._lock:
            if len(self._sessions) >= self.policy.max_clients:
                full = True
            else:
                full = False
                session = _Session(self._next, conn, peer)
                self._next += 1
                self._sessions[session.number] = session
        if full:
            reason = f"too many clients (max_clients = {self.policy.max_clients})"
            self.audit.record("connect", "refused", peer, reason=reason)
            try:
                conn.settimeout(1)
                wire.send_message(conn, {"ok": False, "error": "busy", "reason": reason,
                                         "errno": errno.EAGAIN})
            except OSError:
                pass
            conn.close()
            return
        self.audit.record("connect", "info", peer, session=session.number)
        try:
            # Speak first, so a client can tell what answered at once: a
            # vfio-user client (which expects a VERSION reply) and our own
            # client (which expects this) both see it before they wait.
            conn.settimeout(5)
            wire.send_message(conn, GREETING)
            conn.settimeout(None)
        except OSError:
            pass  # the session's first recv sees the broken connection
        thread = threading.Thread(target=self._run_session, args=(session,),
                                  name=f"broker-session-{session.number}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _run_session(self, session: _Session) -> None:
        why = "client disconnected"
        try:
            while not self._stopping.is_set():
                try:
                    msg = wire.recv_message(session.conn, max_fds=0)
                except wire.FramingError as exc:
                    why = f"dropped: {exc}"
                    self.audit.record("bad-request", "refused", session.peer, reason=str(exc))
                    self._reply_error(session, "bad-request", str(exc), exc.errno)
                    break
                except ProtocolError as exc:
                    self.audit.record("bad-request", "refused", session.peer, reason=str(exc))
                    self._reply_error(session, "bad-request", str(exc), exc.errno)
                    continue
                except (ConnectionClosed, OSError) as exc:
                    if not isinstance(exc, ConnectionClosed):
                        why = f"connection error: {exc}"
                    break
                self._handle(session, msg.body)
        except Exception as exc:  # a bug must cost one session, not the broker
            why = f"internal error: {type(exc).__name__}: {exc}"
            self.audit.record("disconnect", "error", session.peer, reason=why)
        finally:
            self._release(session, why)
            session.conn.close()
            self._threads.discard(threading.current_thread())

    def _reply_error(self, session: _Session, kind: str, reason: str, err: int = errno.EINVAL,
                     problems: list[dict[str, Any]] | None = None, op: str | None = None) -> None:
        body: dict[str, Any] = {"ok": False, "error": kind, "reason": reason, "errno": err}
        if op:
            body["op"] = op
        if problems:
            body["problems"] = problems
        try:
            wire.send_message(session.conn, body)
        except OSError:
            pass

    def _handle(self, session: _Session, body: dict[str, Any]) -> None:
        op = body.get("op")
        if op not in _OPS:
            reason = f"unknown op {op!r}; expected one of {list(_OPS)}"
            self.audit.record("bad-request", "refused", session.peer, reason=reason)
            self._reply_error(session, "bad-request", reason)
            return
        try:
            if op == "hello":
                self._send(session, {"ok": True, "op": "hello", "version": PROTOCOL_VERSION,
                                     "uid": session.peer.uid, "gid": session.peer.gid,
                                     "pid": session.peer.pid, "user": session.peer.user_name})
            elif op == "list":
                self._send(session, {"ok": True, "op": "list", "devices": self._allowed(session)})
            elif op == "open":
                self._open(session, body)
            else:
                self._close_device(session, body)
        except _Refused as exc:
            self._reply_error(session, exc.kind, exc.reason, exc.errno, exc.problems, op=op)

    def _send(self, session: _Session, body: dict[str, Any], fds: list[int] | None = None) -> None:
        wire.send_message(session.conn, body, fds or [])

    # ---- requests ----

    def _parse_open(self, session: _Session, body: dict[str, Any]) -> tuple[str, str, bool]:
        unknown = set(body) - {"op", "device", "backend", "setup"}
        if unknown:
            raise _Refused(f"unknown field(s) {sorted(unknown)} in open", kind="bad-request",
                           err=errno.EINVAL)
        device = body.get("device")
        try:
            address = normalize_address(device) if isinstance(device, str) else None
        except UsageError:
            address = None
        if address is None:
            raise _Refused(f"'device' must be a PCI address (DDDD:BB:DD.F), not {device!r}",
                           kind="bad-request", err=errno.EINVAL)
        backend = body.get("backend", "auto")
        if backend not in _BACKEND_CHOICES:
            raise _Refused(f"'backend' must be one of {list(_BACKEND_CHOICES)}, not {backend!r}",
                           kind="bad-request", err=errno.EINVAL)
        setup = body.get("setup", True)
        if not isinstance(setup, bool):
            raise _Refused(f"'setup' must be true or false, not {setup!r}", kind="bad-request",
                           err=errno.EINVAL)
        return address, backend, setup

    def _open(self, session: _Session, body: dict[str, Any]) -> None:
        try:
            address, backend, setup = self._parse_open(session, body)
        except _Refused as exc:
            self.audit.record("open", "refused", session.peer, device=body.get("device"),
                              reason=exc.reason)
            raise
        try:
            reply, fds = self._grant(session, address, backend, setup)
        except _Refused as exc:
            self.audit.record("open", "error" if exc.kind == "failed" else "refused",
                              session.peer, device=address, backend=backend, reason=exc.reason,
                              problems=exc.problems or None)
            raise
        self.audit.record("open", "granted", session.peer, device=address,
                          backend=reply["backend"], rule=reply.get("rule"),
                          reason=reply.get("reason"), fds=",".join(reply["fds"]) or "-")
        try:
            self._send(session, reply, fds)
        except OSError:
            pass  # the client vanished; _run_session's next read sees it and releases

    def _grant(self, session: _Session, address: str, backend: str,
               setup: bool) -> tuple[dict[str, Any], list[int]]:
        dev = identify(self.root, address)
        decision = self.policy.decide(session.peer, dev, backend)
        if not decision.allowed or decision.rule is None:
            raise _Refused(decision.reason)
        if dev.iommu_group is None:
            raise _Refused(f"{address} has no IOMMU group (no IOMMU, or no-IOMMU mode "
                           f"before binding); the broker only hands out isolated devices")
        with self._lock:
            if address in session.devices:
                raise _Refused(f"{address} is already open in this session", kind="bad-request",
                               err=errno.EBUSY)
            if len(session.devices) >= self.policy.max_devices_per_client:
                raise _Refused(f"this session already has {len(session.devices)} devices "
                               f"(max_devices_per_client = "
                               f"{self.policy.max_devices_per_client})", err=errno.EMFILE)
            owner = self._group_owner.get(dev.iommu_group)
            if owner is not None and owner is not session:
                raise _Refused(
                    f"IOMMU group {dev.iommu_group} of {address} is leased to another broker "
                    f"client (user {owner.peer.user_name}, pid {owner.peer.pid})",
                    [{"device": address, "kind": "in-use", "driver": None,
                      "reason": f"leased by the broker to pid {owner.peer.pid}",
                      "fix": f"wait for pid {owner.peer.pid} to disconnect"}],
                    err=errno.EBUSY)
            chosen = self._choose_backend(session, address, backend, decision.backends)
            if session.backend is not None and setup != session.setup:
                raise _Refused("'setup' must be the same for every device of a session",
                               kind="bad-request", err=errno.EINVAL)
            if owner is None:
                self._ensure_ready(session, address, decision.rule.managed)
            try:
                reply, fds = self._open_nodes(session, address, dev.iommu_group, chosen, setup)
            except HostStateError as exc:
                raise _Refused(str(exc), exc.problems, err=errno.EBUSY) from None
            except (KernelError, PyvfioError, OSError) as exc:
                raise _Refused(f"opening {address} failed: {exc}", kind="failed",
                               err=getattr(exc, "errno", None) or errno.EIO) from None
            session.backend = chosen
            session.setup = setup
            self._group_owner[dev.iommu_group] = session
            session.leased_groups.add(dev.iommu_group)
        reply.update({"ok": True, "op": "open", "device": address, "backend": chosen,
                      "iommu_group": dev.iommu_group, "setup": setup,
                      "rule": decision.rule.label, "reason": decision.reason})
        return reply, fds

    def _choose_backend(self, session: _Session, address: str, asked: str,
                        allowed: tuple[str, ...]) -> str:
        if session.backend is not None:
            if asked not in ("auto", session.backend):
                raise _Refused(f"this session uses the {session.backend} backend (one address "
                               f"space per session); cannot open {address} with {asked}",
                               kind="bad-request", err=errno.EINVAL)
            return session.backend
        if asked != "auto":
            return asked
        from pyvfio.kernel import choose_backend

        try:
            auto, _why = choose_backend(address, self.root)
        except (PyvfioError, OSError):
            auto = "legacy"
        if auto in allowed:
            return auto
        return allowed[0]

    def _ensure_ready(self, session: _Session, address: str, managed: bool) -> None:
        """The host diagnosis: viable, not in use, on a vfio driver.  For a
        ``managed`` rule, bind the device to its vfio driver first."""
        from pyvfio.host import bind, require_ready

        try:
            require_ready(address, root=self.root)
            return
        except NotBoundToVfio as exc:
            if not managed:
                raise _Refused(str(exc), exc.problems) from None
            first = exc
        except HostStateError as exc:  # NotViable, DeviceInUse, node missing
            raise _Refused(str(exc), exc.problems,
                           err=errno.EBUSY if isinstance(exc, DeviceInUse) else errno.EPERM
                           ) from None
        except (DeviceNotFound, UsageError) as exc:
            raise _Refused(str(exc), err=errno.ENODEV) from None
        try:
            bind([address], root=self.root)
        except HostStateError as exc:
            raise _Refused(f"{first}; binding it (managed) failed: {exc}",
                           exc.problems or first.problems) from None
        session.managed.append(address)
        self.audit.record("bind", "info", session.peer, device=address,
                          reason="managed device bound to its vfio driver")
        try:
            require_ready(address, root=self.root)
        except HostStateError as exc:
            raise _Refused(str(exc), exc.problems) from None

    def _open_nodes(self, session: _Session, address: str, group_id: int, backend: str,
                    setup: bool) -> tuple[dict[str, Any], list[int]]:
        """Open what the client needs and return the reply fields and the fds
        (the broker's copies stay in the session)."""
        if backend == "legacy":
            return self._open_legacy(session, address, group_id, setup)
        return self._open_iommufd(session, address, group_id, setup)

    def _open_legacy(self, session: _Session, address: str, group_id: int,
                     setup: bool) -> tuple[dict[str, Any], list[int]]:
        from pyvfio.kernel.legacy import Container, Group

        roles: list[str] = []
        fds: list[int] = []
        new_container = session.container is None
        if new_container:
            session.container = Container(root=self.root)
            roles.append("container")
            fds.append(session.container.fd)
        group = session.groups.get(group_id)
        new_group = group is None
        try:
            if group is None:
                group = Group(group_id, root=self.root)
                try:
                    if setup:
                        group.attach(session.container, bdf=address)
                except BaseException:
                    group.close()
                    raise
                session.groups[group_id] = group
                roles.append("group")
                fds.append(group.fd)
            reply: dict[str, Any] = {}
            if setup:
                device_fd = group.get_device_fd(address)
                session.devices[address] = _DeviceLease(address, group_id, device_fd, "legacy")
                roles.append("device")
                fds.append(device_fd)
            else:
                session.devices[address] = _DeviceLease(address, group_id, -1, "legacy")
        except BaseException:
            if new_group and group is not None and group_id in session.groups:
                session.groups.pop(group_id).close()
            if new_container and not session.groups:
                session.container.close()
                session.container = None
            raise
        reply.update({"fds": roles, "group_id": group_id})
        return reply, fds

    def _open_iommufd(self, session: _Session, address: str, group_id: int,
                      setup: bool) -> tuple[dict[str, Any], list[int]]:
        from pyvfio.kernel import iommufd as K

        roles: list[str] = []
        fds: list[int] = []
        new_iommufd = session.iommufd is None
        if new_iommufd:
            session.iommufd = K.Iommufd.open(self.root)
            roles.append("iommufd")
            fds.append(session.iommufd.fd)
        reply: dict[str, Any] = {}
        device_fd = -1
        try:
            cdev = K.cdev_for(address, self.root)
            try:
                device_fd = os.open(cdev.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise DeviceInUse(f"{cdev.path} ({address}) is already open") from None
                raise KernelError.from_oserror(exc, "open", cdev.path) from None
            if setup:
                target = f"device {address}"
                dev_id = K.bind_iommufd(device_fd, session.iommufd, target)
                if session.ioas_id is None:
                    ioas = session.iommufd.alloc_ioas()
                    ioas.owned = False  # the IOAS lives as long as the client's iommufd
                    session.ioas_id = ioas.id
                pt_id = K.attach_pt(device_fd, session.ioas_id, target)
                reply.update({"ioas_id": session.ioas_id, "dev_id": dev_id, "pt_id": pt_id})
            reply["cdev"] = cdev.name
        except BaseException:
            if device_fd >= 0:
                os.close(device_fd)
            if new_iommufd and not session.devices:
                session.iommufd.close()
                session.iommufd = None
                session.ioas_id = None
            raise
        session.devices[address] = _DeviceLease(address, group_id, device_fd, "iommufd")
        roles.append("device")
        fds.append(device_fd)
        reply["fds"] = roles
        return reply, fds

    def _close_device(self, session: _Session, body: dict[str, Any]) -> None:
        device = body.get("device")
        try:
            address = normalize_address(device) if isinstance(device, str) else ""
        except UsageError:
            address = ""
        with self._lock:
            lease = session.devices.pop(address, None)
        if lease is None:
            reason = f"{device!r} is not open in this session"
            self.audit.record("close", "refused", session.peer, device=device, reason=reason)
            raise _Refused(reason, kind="bad-request", err=errno.ENOENT)
        if lease.fd >= 0:
            os.close(lease.fd)
        self.audit.record("close", "info", session.peer, device=address,
                          reason="client closed the device")
        self._send(session, {"ok": True, "op": "close", "device": address})

    def _allowed(self, session: _Session) -> list[dict[str, Any]]:
        base = os.path.join(self.root, "sys/bus/pci/devices")
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return []
        out = []
        for name in names:
            try:
                dev = identify(self.root, name)
            except _Refused:
                continue
            decision = self.policy.decide(session.peer, dev)
            if decision.allowed and decision.rule is not None:
                out.append({"device": name, "id": f"{dev.vendor:04x}:{dev.device:04x}",
                            "iommu_group": dev.iommu_group, "backends": list(decision.backends),
                            "managed": decision.rule.managed, "rule": decision.rule.label})
        return out

    # ---- release ----

    def _release(self, session: _Session, why: str) -> None:
        """Close the broker's copies of the session's fds (device fds, then
        groups, then the container / iommufd: the kernel's teardown order),
        drop its leases, restore managed devices."""
        with self._lock:
            devices = list(session.devices.values())
            session.devices.clear()
        for lease in devices:
            if lease.fd >= 0:
                try:
                    os.close(lease.fd)
                except OSError:
                    pass
        for group in session.groups.values():
            try:
                group.close()
            except OSError:
                pass
        session.groups.clear()
        for space in (session.container, session.iommufd):
            if space is not None:
                try:
                    space.close()
                except OSError:
                    pass
        session.container = session.iommufd = None
        restored: list[str] = []
        if session.managed:
            from pyvfio.host import restore

            for address in session.managed:
                try:
                    restore([address], root=self.root)
                    restored.append(address)
                except (PyvfioError, OSError) as exc:
                    self.audit.record("release", "error", session.peer, device=address,
                                      reason=f"restoring the host driver failed: {exc}")
        with self._lock:  # the group is free only once the driver is back
            for group_id in session.leased_groups:
                if self._group_owner.get(group_id) is session:
                    del self._group_owner[group_id]
            session.leased_groups.clear()
        self.audit.record("release", "info", session.peer,
                          device=",".join(d.address for d in devices) or None,
                          reason=why + (f"; restored {','.join(restored)}" if restored else ""),
                          session=session.number)
        with self._lock:  # counted against max_clients until fully released
            self._sessions.pop(session.number, None)
