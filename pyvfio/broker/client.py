"""The unprivileged side: ask the broker for devices and get ready ``Device``s.

>>> from pyvfio.broker.client import open_device
>>> with open_device("/run/pyvfio-broker.sock", "0000:00:03.0") as dev:   # doctest: +SKIP
...     print(hex(dev.bar(0).read32(0)))

:func:`open_device` is the one-call form.  :class:`BrokerSession` opens
several devices that share one address space (one container, or one iommufd
and IOAS), which is what a VMM wants::

    with BrokerSession(path) as session:
        a = session.open_device("0000:00:03.0")
        b = session.open_device("0000:02:01.0")    # same container / IOAS as a
        buf = a.dma_alloc(4096)                     # visible to both

The session's connection is the lease: the broker reserves the devices'
IOMMU groups for it until it ends.  A device from :func:`open_device` owns
its session and ends it when closed.  Refusals raise
:class:`~pyvfio.errors.BrokerRefused` with the broker's reason and, when the
host was the cause, its diagnosis in ``problems``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Any

from pyvfio.broker import wire
from pyvfio.broker.policy import normalize_address
from pyvfio.device import Device
from pyvfio.errors import BrokerRefused, ClosedError, ProtocolError, PyvfioError, UsageError
from pyvfio.kernel.device import KernelDevice
from pyvfio.kernel.iommufd import Ioas, Iommufd, IommufdBinding, IommufdDevice
from pyvfio.kernel.legacy import Container, Group
from pyvfio.sockets import connect_error

__all__ = ["BrokerSession", "open_device", "qemu_args"]

_MAX_REPLY_FDS = 4  # container/iommufd, group, device

#: Seconds to connect and see the broker's greeting and hello reply: a peer
#: that is not a broker (or a wedged one) is reported, not waited on forever.
HANDSHAKE_TIMEOUT = 5.0


def looks_like_vfio_user(head: bytes) -> bool:
    """Whether ``head`` (a peer's first bytes) is a vfio-user reply header:
    a command number the spec defines and the reply type in the flags
    (docs/interop/vfio-user.rst, "Header")."""
    if len(head) < 16:
        return False
    command = int.from_bytes(head[2:4], "little")
    size = int.from_bytes(head[4:8], "little")
    flags = int.from_bytes(head[8:12], "little")
    return 1 <= command <= 18 and 16 <= size <= 1 << 20 and flags & 0xF == 1


class BrokerSession:
    """One connection to the broker, one address space for its devices."""

    def __init__(self, socket_path: str, *, timeout: float | None = 120.0,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Connect and check that a pyvfio broker answered, within
        ``handshake_timeout`` seconds (connect, greeting and hello); then each
        request may take ``timeout`` (``None``: no limit; opening a managed
        device rebinds drivers, which takes a while).

        Raises :class:`BrokerRefused` naming the path when nothing usable is
        there (no socket, permission denied, a full broker) and
        :class:`ProtocolError` when something that is not a pyvfio broker
        answered (a vfio-user server, another service) or nothing answered."""
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.peer = self._handshake(handshake_timeout)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(timeout)
        self.backend: str | None = None
        self.setup = True
        self.root = "/"
        self._container: Container | None = None
        self._groups: dict[int, Group] = {}
        self._iommufd: Iommufd | None = None  # shared by the session's devices
        self._ioas: Ioas | None = None
        self._raw: dict[str, dict[str, int]] = {}  # setup=False: roles -> fds per device
        self.devices: dict[str, Device] = {}
        self._closed = False

    # ---- protocol ----

    def _handshake(self, timeout: float) -> dict[str, Any]:
        """Connect, send hello at once, and read the greeting and hello's
        reply.  Sending first makes a peer that is not a broker show itself
        without a wait: a vfio-user server rejects the bytes (an error reply
        or a closed connection) where a silent wait would only time out."""
        path = self.socket_path
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            raise BrokerRefused(connect_error(path, exc, "pyvfio broker")) from None
        with contextlib.suppress(OSError):
            wire.send_message(self.sock, {"op": "hello"})
        not_broker = f"{path} is not a pyvfio broker"
        try:
            head = self.sock.recv(64, socket.MSG_PEEK)
        except TimeoutError:
            raise ProtocolError(f"{path} did not greet within {timeout:g}s: not a pyvfio broker "
                                "(a vfio-user server waits like this: use --vfio-user PATH for "
                                "one)", errno.ETIMEDOUT) from None
        except ConnectionResetError:
            head = b""
        except OSError as exc:
            raise ProtocolError(f"{not_broker}: {exc.strerror or exc}") from None
        if not head:
            raise ProtocolError(f"{not_broker}: it closed the connection without a greeting "
                                "(a vfio-user server does that to a request it cannot parse; "
                                "use --vfio-user PATH for one)", errno.EPROTO)
        if looks_like_vfio_user(head):
            raise ProtocolError(f"{not_broker}: a vfio-user server answered (use --vfio-user "
                                "PATH for it)", errno.EPROTO)
        try:
            greeting = wire.recv_message(self.sock, max_fds=0)
        except TimeoutError:
            raise ProtocolError(f"{not_broker}: its first bytes {head[:16]!r} are not a broker "
                                "greeting", errno.EPROTO) from None
        except (PyvfioError, OSError) as exc:
            raise ProtocolError(f"{not_broker}: its first bytes {head[:16]!r} are not a broker "
                                f"greeting ({exc})", errno.EPROTO) from None
        body = greeting.body
        if body.get("ok") is False:  # turned away (busy): say why
            reason = str(body.get("reason") or "the broker gave no reason")
            raise BrokerRefused(f"{path}: {body.get('error', 'refused')}: {reason}")
        if body.get("op") != "greeting" or body.get("server") != "pyvfio-broker":
            raise ProtocolError(f"{not_broker}: its first message {body!r} is not a broker "
                                "greeting", errno.EPROTO)
        try:
            return self._read_reply()
        except TimeoutError:
            raise ProtocolError(f"the broker at {path} greeted but did not answer hello within "
                                f"{timeout:g}s", errno.ETIMEDOUT) from None

    def _read_reply(self) -> dict[str, Any]:
        reply = wire.recv_message(self.sock, max_fds=_MAX_REPLY_FDS)
        wire.close_fds(reply.fds)
        if not reply.body.get("ok"):
            raise BrokerRefused(str(reply.body.get("reason") or "the broker gave no reason"))
        return reply.body

    def request(self, body: dict[str, Any]) -> wire.Message:
        """Send one request and return the reply (raising on an error reply)."""
        if self._closed:
            raise ClosedError("broker session is closed")
        try:
            wire.send_message(self.sock, body)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The broker may have said why before hanging up (e.g. "busy").
            try:
                reply = wire.recv_message(self.sock, max_fds=_MAX_REPLY_FDS)
            except (OSError, PyvfioError):
                raise BrokerRefused(f"the broker closed the connection: {exc}") from None
        else:
            reply = wire.recv_message(self.sock, max_fds=_MAX_REPLY_FDS)
        if not reply.body.get("ok"):
            wire.close_fds(reply.fds)
            kind = reply.body.get("error", "error")
            reason = str(reply.body.get("reason") or "the broker gave no reason")
            if kind == "bad-request":
                raise ProtocolError(f"broker: {reason}", int(reply.body.get("errno")
                                                              or errno.EINVAL))
            raise BrokerRefused(reason if kind == "refused" else f"{kind}: {reason}",
                                reply.body.get("problems") or [])
        return reply

    def hello(self) -> dict[str, Any]:
        """The broker's protocol version and who it thinks we are."""
        return self.request({"op": "hello"}).body

    def allowed(self) -> list[dict[str, Any]]:
        """The devices the policy allows us (address, id, IOMMU group, backends)."""
        devices = self.request({"op": "list"}).body.get("devices", [])
        return list(devices) if isinstance(devices, list) else []

    # ---- devices ----

    def open_device(self, bdf: str, *, backend: str = "auto") -> Device:
        """Ask for ``bdf`` and return it as a ready :class:`Device` in this
        session's address space."""
        address = normalize_address(bdf)
        reply = self._open(address, backend, setup=True)
        fds = dict(zip(reply.body["fds"], reply.fds, strict=True))
        try:
            device = self._build(address, reply.body, fds)
        except BaseException:
            wire.close_fds(list(fds.values()))
            raise
        self.devices[address] = device
        return device

    def open_fds(self, bdf: str, *, backend: str = "auto") -> dict[str, int]:
        """Ask for ``bdf`` *without* set-up, for a VMM that does its own (QEMU's
        ``-object iommufd,fd=N -device vfio-pci,fd=M``): iommufd + an unbound
        cdev fd, or container + a group not yet in it.  Returns role -> fd of
        the fds that came with this device (shared ones only the first time);
        they stay owned by the session (see :meth:`qemu_args`)."""
        address = normalize_address(bdf)
        reply = self._open(address, backend, setup=False)
        fds = dict(zip(reply.body["fds"], reply.fds, strict=True))
        self._raw[address] = {**fds, "group_id": int(reply.body.get("iommu_group", -1))}
        return fds

    def _open(self, address: str, backend: str, setup: bool) -> wire.Message:
        if backend not in ("auto", "legacy", "iommufd"):
            raise UsageError(f"backend must be auto, legacy or iommufd, not {backend!r}")
        reply = self.request({"op": "open", "device": address, "backend": backend,
                              "setup": setup})
        roles = reply.body.get("fds")
        if (not isinstance(roles, list) or len(roles) != len(reply.fds)
                or not all(isinstance(r, str) for r in roles)):
            wire.close_fds(reply.fds)
            raise ProtocolError(f"broker reply names fds {roles!r} but {len(reply.fds)} came")
        self.backend = str(reply.body["backend"])
        self.setup = setup
        return reply

    def _build(self, address: str, body: dict[str, Any], fds: dict[str, int]) -> Device:
        if body["backend"] == "legacy":
            return self._build_legacy(address, body, fds)
        return self._build_iommufd(address, body, fds)

    def _build_legacy(self, address: str, body: dict[str, Any], fds: dict[str, int]) -> Device:
        if "container" in fds:
            self._container = Container.from_fd(fds.pop("container"), root=self.root)
        if self._container is None:
            raise ProtocolError("broker sent a legacy device without a container")
        group_id = int(body["group_id"])
        if "group" in fds:
            # The session keeps one reference (the broker sends a group once
            # per session) and each device of the group takes another.
            self._groups[group_id] = Group.from_fd(fds.pop("group"), group_id, root=self.root,
                                                   container=self._container)
        group = self._groups.get(group_id)
        if group is None or group.closed:
            raise ProtocolError(f"broker sent no fd for group {group_id} and the session "
                                "has none")
        group.acquire()
        try:
            return KernelDevice.from_fd(fds.pop("device"), address, dma=self._container,
                                        owners=[group], backend="legacy",
                                        backend_reason="fds passed by the pyvfio broker")
        except BaseException:
            group.close()
            raise

    def _build_iommufd(self, address: str, body: dict[str, Any], fds: dict[str, int]) -> Device:
        if "iommufd" in fds:
            self._iommufd = Iommufd.from_fd(fds.pop("iommufd"), owned=True)
            self._ioas = self._iommufd.ioas(int(body["ioas_id"]), owned=False)
        if self._iommufd is None or self._ioas is None or self._iommufd.closed:
            raise ProtocolError("broker sent an iommufd device without an iommufd")
        # The session owns the iommufd (and the IOAS, which dies with it).
        binding = IommufdBinding(self._iommufd, self._ioas, own_ioas=False, own_iommufd=False)
        device = IommufdDevice(address, fds.pop("device"), binding, int(body["dev_id"]),
                               int(body["pt_id"]),
                               backend_reason="fds passed by the pyvfio broker")
        return device

    def close_device(self, device: Device) -> None:
        """Close ``device`` and tell the broker to drop its copy."""
        device.close()
        address = device.name
        if self.devices.pop(address, None) is not None and not self._closed:
            try:
                self.request({"op": "close", "device": address})
            except (OSError, ProtocolError, BrokerRefused):
                pass

    # ---- QEMU ----

    def qemu_args(self) -> list[str]:
        """QEMU arguments that use this session's fds (after :meth:`open_fds`).

        iommufd (QEMU 9.0+): ``-object iommufd,id=iommufd0,fd=N`` and one
        ``-device vfio-pci,iommufd=iommufd0,fd=M`` per device.  Legacy: the
        container/group objects proposed with seed 000 (not in upstream QEMU)
        ``-object vfio-container,id=ct0,fd=C -object vfio-group,id=grpN,fd=G,
        container=ct0 -device vfio-pci,host=BDF,group=grpN``.  The fds must be
        inherited by QEMU: :meth:`inheritable_fds` clears close-on-exec."""
        return qemu_args(self.backend or "legacy", self._raw)

    @property
    def passed_fds(self) -> dict[str, dict[str, int]]:
        """What :meth:`open_fds` received: address -> {role: fd, "group_id": n}."""
        return {a: dict(f) for a, f in self._raw.items()}

    def inheritable_fds(self) -> list[int]:
        """Mark every fd of :meth:`open_fds` inheritable and return them."""
        out = []
        for fds in self._raw.values():
            for role, fd in fds.items():
                if role != "group_id":
                    os.set_inheritable(fd, True)
                    out.append(fd)
        return out

    # ---- lifetime ----

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the devices still open, then end the session (the broker
        releases its copies and leases)."""
        if self._closed:
            return
        for device in list(self.devices.values()):
            device.close()
        self.devices.clear()
        for fds in self._raw.values():
            wire.close_fds([fd for role, fd in fds.items() if role != "group_id"])
        self._raw.clear()
        # The address space goes last: after every device and group.
        for group in self._groups.values():
            group.close()
        self._groups.clear()
        if self._container is not None:
            self._container.close()
            self._container = None
        if self._iommufd is not None:
            self._iommufd.close()
            self._iommufd = self._ioas = None
        self._closed = True
        self.sock.close()

    def __enter__(self) -> BrokerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SessionOwner:
    """Ends a one-call :func:`open_device` session after the device's fds are
    closed, so the broker (which may restore a managed device's host driver)
    sees the device released."""

    def __init__(self, session: BrokerSession) -> None:
        self.session = session

    def fds(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self.session.devices.clear()  # the device is closing itself
        self.session.close()


def open_device(socket_path: str, bdf: str, *, backend: str = "auto") -> Device:
    """Get ``bdf`` from the broker at ``socket_path`` as a ready device, in one
    call.  The device owns its broker session: closing it ends the lease."""
    session = BrokerSession(socket_path)
    try:
        device = session.open_device(bdf, backend=backend)
    except BaseException:
        session.close()
        raise
    owners = getattr(device, "owners", None)
    if isinstance(owners, list):
        owners.append(_SessionOwner(session))
    return device


def qemu_args(backend: str, devices: dict[str, dict[str, int]]) -> list[str]:
    """QEMU arguments for fds passed without set-up.  ``devices`` maps each
    PCI address to the fds that came with it ("iommufd"/"container" once,
    "group" once per group, "device" for iommufd) and its "group_id"."""
    args: list[str] = []
    if backend == "iommufd":
        iommufd = next((f["iommufd"] for f in devices.values() if "iommufd" in f), None)
        if iommufd is None:
            raise UsageError("no iommufd fd was passed; open a device with open_fds() first")
        args += ["-object", f"iommufd,id=iommufd0,fd={iommufd}"]
        for n, (address, fds) in enumerate(devices.items()):
            del address  # QEMU names an fd-passed device after the fd, not its address
            args += ["-device", f"vfio-pci,id=hostdev{n},iommufd=iommufd0,fd={fds['device']}"]
        return args
    container = next((f["container"] for f in devices.values() if "container" in f), None)
    if container is None:
        raise UsageError("no container fd was passed; open a device with open_fds() first")
    args += ["-object", f"vfio-container,id=ct0,fd={container}"]
    for fds in devices.values():
        if "group" in fds:
            args += ["-object", f"vfio-group,id=grp{fds['group_id']},fd={fds['group']},"
                                f"container=ct0"]
    groups = {a: f["group_id"] for a, f in devices.items()}
    for n, (address, group_id) in enumerate(groups.items()):
        args += ["-device", f"vfio-pci,id=hostdev{n},host={address},group=grp{group_id}"]
    return args

