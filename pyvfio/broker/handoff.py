"""Hand open devices to another process without a reset (seed 000's "local
migration"; QEMU's cpr-transfer does the same for a whole VM).

The sender passes, over a UNIX socket, every fd that keeps its devices alive
and working: the container and group fds or the iommufd, the device fds,
the memfds behind its DMA buffers, and the eventfds its interrupts signal.
The receiver rebuilds :class:`~pyvfio.device.Device` objects and
:class:`~pyvfio.device.DmaBuffer`\\ s around them and carries on.

Why nothing is reset or re-mapped: VFIO resets a device (and disables its
interrupts, clears bus mastering) only when the *last* reference to the
device file goes away, and the DMA mappings live in the container or IOAS,
not in the process.  The fds the receiver holds are the same open files, so
the device never sees a close; the mappings stay live and point at the same
memfd pages, which the receiver maps into its own address space with
:meth:`SharedMemory.from_fd`.  The receiver therefore must not map the
buffers again (the IOVAs are reserved in its allocator instead) and the
sender must not tear anything down: after the receiver acknowledges, the
sender drops its copies with :func:`release_without_teardown` (unless
``release=False``), which closes fds but does not unmap, disable IRQs or
reset.

Message (one frame of :mod:`pyvfio.broker.wire`, fds as SCM_RIGHTS; every
``fd`` field is an index into the message's fd list)::

    {"type": "pyvfio-handoff", "version": 1,
     "spaces":  [{"kind": "legacy",  "container": i},
                 {"kind": "iommufd", "iommufd": i, "ioas_id": n}],
     "devices": [{"name": "0000:00:03.0", "backend": "legacy", "space": 0,
                  "device": i, "group": i, "group_id": n,              # legacy
                  "dev_id": n, "pt_id": n,                             # iommufd
                  "irqs": {"1": [i, ...]}}],                           # index -> eventfds
     "buffers": [{"space": 0, "memfd": i, "size": n, "fd_offset": n, "iova": n,
                  "owner": 0}]}                                        # device index or null

answered by ``{"type": "pyvfio-handoff-ack", "devices": n, "buffers": n}``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from pyvfio.broker import wire
from pyvfio.device import Device, DmaBuffer, DmaSpace, EventFd, SharedMemory
from pyvfio.errors import ProtocolError, UsageError
from pyvfio.kernel.device import KernelDevice
from pyvfio.kernel.iommufd import Ioas, Iommufd, IommufdBinding, IommufdDevice
from pyvfio.kernel.legacy import Container, Group

__all__ = ["HANDOFF_VERSION", "receive_devices", "release_without_teardown", "send_devices"]

HANDOFF_VERSION = 1


class _FdTable:
    """Collects fds for one message, each once (devices sharing a container
    send it once)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._index: dict[int, int] = {}

    def add(self, fd: int) -> int:
        if fd < 0:
            raise UsageError(f"cannot hand over a closed fd ({fd})")
        if fd not in self._index:
            self._index[fd] = len(self.fds)
            self.fds.append(fd)
        return self._index[fd]


def _describe_space(space: DmaSpace | None, table: _FdTable) -> dict[str, Any]:
    if isinstance(space, Container):
        return {"kind": "legacy", "container": table.add(space.fd)}
    if isinstance(space, Ioas):
        return {"kind": "iommufd", "iommufd": table.add(space.iommufd.fileno()),
                "ioas_id": space.id}
    raise UsageError(f"cannot hand over a device whose DMA space is {type(space).__name__}; "
                     "only kernel VFIO devices (legacy container or iommufd IOAS) can be")


def build_message(devices: Sequence[Device],
                  buffers: Sequence[DmaBuffer] = ()) -> tuple[dict[str, Any], list[int]]:
    """The handoff message for ``devices`` and ``buffers`` and its fd list."""
    table = _FdTable()
    spaces: list[dict[str, Any]] = []
    space_index: dict[int, int] = {}

    def space_of(space: DmaSpace | None) -> int:
        key = id(space)
        if key not in space_index:
            space_index[key] = len(spaces)
            spaces.append(_describe_space(space, table))
        return space_index[key]

    out_devices: list[dict[str, Any]] = []
    for device in devices:
        if device.closed:
            raise UsageError(f"device {device.name} is closed")
        if not isinstance(device, KernelDevice):
            raise UsageError(f"{device.name} is a {type(device).__name__}; only kernel VFIO "
                             "devices can be handed over")
        entry: dict[str, Any] = {"name": device.name, "backend": device.backend,
                                 "space": space_of(device.dma), "device": table.add(device.fd)}
        if isinstance(device, IommufdDevice):
            entry.update(dev_id=device.dev_id, pt_id=device.pt_id)
        else:
            group = next((o for o in device.owners if isinstance(o, Group)), None)
            if group is None:
                raise UsageError(f"legacy device {device.name} has no group to hand over")
            entry.update(group=table.add(group.fd), group_id=group.id)
        # The eventfds are what the kernel signals: they travel with the device.
        entry["irqs"] = {str(index): [table.add(e.fileno()) for e in eventfds]
                         for index, eventfds in device.irq_eventfds.items()}
        out_devices.append(entry)
    owners = {id(b): n for n, d in enumerate(devices) for b in d.dma_buffers}
    out_buffers = []
    for buf in buffers:
        if buf.memory.closed:
            raise UsageError(f"{buf!r} is closed")
        out_buffers.append({"space": space_of(buf.space), "memfd": table.add(buf.memory.fd),
                            "size": buf.size, "fd_offset": buf.memory.fd_offset,
                            "iova": buf.iova, "owner": owners.get(id(buf))})
    body = {"type": "pyvfio-handoff", "version": HANDOFF_VERSION, "spaces": spaces,
            "devices": out_devices, "buffers": out_buffers}
    return body, table.fds


def send_devices(sock: socket.socket, devices: Sequence[Device],
                 buffers: Sequence[DmaBuffer] = (), *, release: bool = True,
                 timeout: float | None = 60.0) -> None:
    """Hand ``devices`` and ``buffers`` to the process at the other end of
    ``sock`` and wait for its acknowledgement.

    With ``release`` (the default) this process then lets go of them with
    :func:`release_without_teardown`: the objects are closed here, the
    device keeps running there.  If the receiver does not acknowledge, an
    error is raised and nothing is released (the devices are still ours).
    Buffers passed here that belong to a device keep that ownership on the
    other side; the others are returned to the receiver's caller.
    """
    body, fds = build_message(devices, buffers)
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        wire.send_message(sock, body, fds)
        ack = wire.recv_message(sock)
    finally:
        sock.settimeout(old)
    wire.close_fds(ack.fds)
    if ack.body.get("type") != "pyvfio-handoff-ack":
        raise ProtocolError(f"receiver did not acknowledge the handoff: {ack.body!r}")
    if release:
        release_without_teardown(devices, buffers)


def release_without_teardown(devices: Sequence[Device],
                             buffers: Sequence[DmaBuffer] = ()) -> None:
    """Close this process's fds of handed-over devices and buffers *without*
    the usual teardown (no IRQ disable, no DMA unmap, no reset): the
    receiver's copies keep the device, its interrupts and its mappings live."""
    for device in devices:
        if not device.closed:
            for owner in getattr(device, "owners", ()):
                if isinstance(owner, IommufdBinding):
                    # Closing our iommufd fd is fine; destroying the IOAS is
                    # not: it is the receiver's address space now.
                    owner.own_ioas = False
                    if owner.ioas is not None:
                        owner.ioas.owned = False
        device.release()
    for buf in buffers:
        buf.release()  # munmap + close the memfd; the pages stay pinned by the mapping


def _index(entry: dict[str, Any], key: str, fds: list[int], required: bool = True) -> int:
    value = entry.get(key)
    if value is None and not required:
        return -1
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(fds):
        raise ProtocolError(f"handoff field {key!r} is not an fd index: {value!r}")
    return fds[value]


def _int(entry: dict[str, Any], key: str, minimum: int = 0) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ProtocolError(f"handoff field {key!r} must be an integer >= {minimum}: {value!r}")
    return value


def receive_devices(sock: socket.socket, *, root: str = "/", timeout: float | None = 60.0
                    ) -> tuple[list[Device], list[DmaBuffer]]:
    """Receive a handoff from ``sock``: rebuild the devices and buffers,
    acknowledge, and return them.  Nothing is mapped or reset: the mappings
    are already live in the container/IOAS the fds keep alive, so each
    buffer's IOVA is only reserved in the space's allocator."""
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        msg = wire.recv_message(sock, max_fds=wire.MAX_FDS)
    finally:
        sock.settimeout(old)
    used: set[int] = set()
    try:
        devices, buffers = _rebuild(msg.body, msg.fds, root, used)
    except BaseException:
        wire.close_fds([fd for fd in msg.fds if fd not in used])
        raise
    # fds the message carried but nothing used (should not happen) are closed.
    wire.close_fds([fd for fd in msg.fds if fd not in used])
    wire.send_message(sock, {"type": "pyvfio-handoff-ack", "devices": len(devices),
                             "buffers": len(buffers)})
    return devices, buffers


def _rebuild(body: dict[str, Any], fds: list[int], root: str,
             used: set[int]) -> tuple[list[Device], list[DmaBuffer]]:
    if body.get("type") != "pyvfio-handoff" or body.get("version") != HANDOFF_VERSION:
        raise ProtocolError(f"not a version-{HANDOFF_VERSION} pyvfio handoff: "
                            f"type={body.get('type')!r} version={body.get('version')!r}")
    spaces_in, devices_in, buffers_in = (body.get(k) for k in ("spaces", "devices", "buffers"))
    if not (isinstance(spaces_in, list) and isinstance(devices_in, list)
            and isinstance(buffers_in, list)):
        raise ProtocolError("handoff 'spaces', 'devices' and 'buffers' must be arrays")

    def take(entry: dict[str, Any], key: str, required: bool = True) -> int:
        fd = _index(entry, key, fds, required)
        if fd >= 0:
            used.add(fd)
        return fd

    spaces: list[DmaSpace] = []
    space_owners: list[Any] = []  # what closes each space: Container / Iommufd
    built: list[Device] = []
    try:
        for entry in spaces_in:
            if not isinstance(entry, dict):
                raise ProtocolError("handoff space entries must be objects")
            if entry.get("kind") == "legacy":
                container = Container.from_fd(take(entry, "container"), root=root)
                spaces.append(container)
                space_owners.append(container)
            elif entry.get("kind") == "iommufd":
                ifd = Iommufd.from_fd(take(entry, "iommufd"), owned=True)
                spaces.append(ifd.ioas(_int(entry, "ioas_id", 1), owned=False))
                space_owners.append(ifd)
            else:
                raise ProtocolError(f"unknown space kind {entry.get('kind')!r}")
        groups: dict[int, Group] = {}
        for entry in devices_in:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ProtocolError("handoff device entries must be objects with a name")
            n = _int(entry, "space")
            if n >= len(spaces):
                raise ProtocolError(f"device {entry['name']} names space {n} of {len(spaces)}")
            space = spaces[n]
            device_fd = take(entry, "device")
            device: KernelDevice
            if isinstance(space, Container):
                group_fd = take(entry, "group")
                group = groups.get(group_fd)
                if group is None:
                    group = Group.from_fd(group_fd, _int(entry, "group_id", -1), root=root,
                                          container=space)
                    group._owns_container = False  # the session list below closes it
                    groups[group_fd] = group
                else:
                    group.acquire()
                device = KernelDevice.from_fd(device_fd, entry["name"], dma=space,
                                              owners=[group], backend="legacy",
                                              backend_reason="handed over by another process")
            else:
                assert isinstance(space, Ioas) and isinstance(space.iommufd, Iommufd)
                binding = IommufdBinding(space.iommufd, space, own_ioas=False, own_iommufd=False)
                device = IommufdDevice(entry["name"], device_fd, binding, _int(entry, "dev_id"),
                                       _int(entry, "pt_id"),
                                       backend_reason="handed over by another process")
            built.append(device)
            irqs = entry.get("irqs", {})
            if not isinstance(irqs, dict):
                raise ProtocolError("handoff 'irqs' must be an object")
            for index, members in irqs.items():
                if not isinstance(members, list):
                    raise ProtocolError("handoff IRQ entries must be arrays of fd indexes")
                eventfds = [EventFd(take({"fd": m}, "fd")) for m in members]
                device.adopt_irq(int(index), eventfds)
        # A space closes after the last of its devices, whichever that is.
        for n, owner in enumerate(space_owners):
            space_owner = _SpaceOwner(owner, built, spaces[n])
            users = [d for d in built if d.dma is spaces[n]]
            for d in users:
                assert isinstance(d, KernelDevice)
                d.owners.append(space_owner)
            if not users:
                owner.close()
        buffers: list[DmaBuffer] = []
        for entry in buffers_in:
            if not isinstance(entry, dict):
                raise ProtocolError("handoff buffer entries must be objects")
            n = _int(entry, "space")
            if n >= len(spaces):
                raise ProtocolError(f"buffer names space {n} of {len(spaces)}")
            space = spaces[n]
            size, iova = _int(entry, "size", 1), _int(entry, "iova")
            memory = SharedMemory.from_fd(take(entry, "memfd"), size, _int(entry, "fd_offset"))
            space.allocator.reserve(iova, size)  # mapped already: only book the range
            buf = DmaBuffer(space, memory, iova)
            owner = entry.get("owner")
            if isinstance(owner, int) and not isinstance(owner, bool) and 0 <= owner < len(built):
                built[owner].adopt_buffer(buf)
            buffers.append(buf)
    except BaseException:
        for d in built:
            release_without_teardown([d])
        raise
    return built, buffers


class _SpaceOwner:
    """Closes a handed-over container or iommufd once every device using it
    has closed (devices close their owners in order, this one last)."""

    def __init__(self, owner: Container | Iommufd, devices: list[Device],
                 space: DmaSpace) -> None:
        self.owner = owner
        self.devices = devices
        self.space = space

    def fds(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        if all(d.closed for d in self.devices if d.dma is self.space):
            self.owner.close()
