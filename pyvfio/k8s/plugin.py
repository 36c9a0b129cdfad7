"""The kubelet device plugin (API v1beta1) serving VFIO devices.

One gRPC server per resource, each on its own UNIX socket in kubelet's
device-plugins directory (``/var/lib/kubelet/device-plugins``), registered
with kubelet's ``Registration`` service on ``kubelet.sock`` there (the API's
``DevicePluginPath`` and ``KubeletSocket``; ``Version`` is ``"v1beta1"``).

Lifecycle, as kubelet expects it (kubernetes ``pkg/kubelet/cm/devicemanager``):

1. serve the plugin socket, then ``Register`` (kubelet dials back at once and
   opens ``ListAndWatch``);
2. kubelet restarts wipe the directory and re-create ``kubelet.sock``: a
   watcher thread polls (no inotify needed) for the plugin socket vanishing
   or ``kubelet.sock`` changing inode, then serves a fresh socket and
   registers again;
3. every ``health_interval`` seconds the host is diagnosed again
   (:class:`pyvfio.k8s.inventory.Inventory`); a change of any device's
   health, or a device appearing or leaving, is logged with the reason and
   sent on every open ``ListAndWatch`` stream;
4. :meth:`DevicePluginDaemon.stop` (SIGTERM/SIGINT in the command) stops the
   servers, removes the sockets this process created (checked by inode: a
   socket someone else made at the same path is left alone) and, in managed
   mode, restores the drivers it changed.

A malformed or unknown request gets a gRPC error status with the reason
(``NOT_FOUND`` for an ID never advertised, ``FAILED_PRECONDITION`` for a
device that is not ready now); it never stops the server.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from pyvfio.errors import PyvfioError, UsageError
from pyvfio.k8s.config import PluginConfig, ResourceConfig
from pyvfio.k8s.inventory import GroupDevice, Inventory, Scan, allocation_for
from pyvfio.k8s.v1beta1 import api_pb2 as api
from pyvfio.k8s.v1beta1 import api_pb2_grpc as api_grpc

__all__ = [
    "API_VERSION",
    "DEVICE_PLUGIN_PATH",
    "KUBELET_SOCKET",
    "DevicePluginDaemon",
    "ResourcePlugin",
    "socket_name",
]

API_VERSION = "v1beta1"
DEVICE_PLUGIN_PATH = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"
WATCH_INTERVAL = 0.5  # seconds between looks at the device-plugins directory
REGISTER_TIMEOUT = 10.0  # seconds for one Register call
REGISTER_RETRY = 5.0  # seconds between failed Register attempts

log = logging.getLogger("pyvfio.k8s")


def socket_name(resource: str) -> str:
    """The plugin socket's file name for ``resource``: ``pyvfio-`` and the
    name with ``/`` replaced by ``_`` (``pyvfio-pyvfio.io_edu.sock``)."""
    return "pyvfio-" + resource.replace("/", "_") + ".sock"


def _inode(path: str) -> tuple[int, int, int] | None:
    """Who ``path`` is: device, inode and change time (file systems reuse
    inode numbers at once, so a re-created socket can have the old one)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _clear_stale_socket(path: str) -> None:
    """Make ``path`` free for our socket, or refuse.  Only a socket nobody
    listens on (a previous instance that died) is removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise UsageError(f"cannot tell whether {path} is in use: {exc}") from None
    else:
        raise UsageError(f"{path} is served by another process (another device plugin "
                         "instance?); stop it first")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class ResourcePlugin(api_grpc.DevicePluginServicer):
    """The ``DevicePlugin`` service for one resource, and its socket."""

    def __init__(self, daemon: DevicePluginDaemon, resource: ResourceConfig) -> None:
        self.daemon = daemon
        self.resource = resource
        self.socket_path = os.path.join(daemon.plugin_dir, socket_name(resource.name))
        self._server: grpc.Server | None = None
        self._socket_id: tuple[int, int, int] | None = None
        self.registered_with: tuple[int, int, int] | None = None  # kubelet.sock's inode
        self.register_after = 0.0  # monotonic time of the next Register attempt

    # ---- socket and registration ----

    def serve(self) -> None:
        """Start serving on a fresh socket at :attr:`socket_path`."""
        self.close()
        _clear_stale_socket(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8,
                                                        thread_name_prefix="k8s-plugin"))
        api_grpc.add_DevicePluginServicer_to_server(self, server)
        if server.add_insecure_port("unix:" + self.socket_path) == 0:
            raise UsageError(f"cannot listen on {self.socket_path}")
        server.start()
        self._server = server
        self._socket_id = _inode(self.socket_path)
        self.registered_with = None
        log.info("%s: serving %s", self.resource.name, self.socket_path)

    def socket_gone(self) -> bool:
        return self._server is None or _inode(self.socket_path) != self._socket_id

    def register(self, kubelet_socket: str) -> None:
        """Register with kubelet; raises :class:`grpc.RpcError` on refusal."""
        with grpc.insecure_channel("unix:" + kubelet_socket) as channel:
            api_grpc.RegistrationStub(channel).Register(api.RegisterRequest(
                version=API_VERSION,
                endpoint=os.path.basename(self.socket_path),
                resource_name=self.resource.name,
                options=self.options(),
            ), timeout=REGISTER_TIMEOUT)

    def close(self) -> None:
        """Stop serving and remove the socket if it is still the one we made."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=1).wait()
        if self._socket_id is not None and _inode(self.socket_path) == self._socket_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self._socket_id = None
        self.registered_with = None

    # ---- the DevicePlugin service ----

    def options(self) -> api.DevicePluginOptions:
        return api.DevicePluginOptions(pre_start_required=False,
                                       get_preferred_allocation_available=True)

    def GetDevicePluginOptions(self, request: api.Empty, context: Any) -> api.DevicePluginOptions:
        return self.options()

    def _devices(self) -> dict[str, GroupDevice]:
        return self.daemon.inventory.last.devices.get(self.resource.name, {})

    def ListAndWatch(self, request: api.Empty, context: Any) -> Iterator[api.ListAndWatchResponse]:
        seen = -1
        while context.is_active() and not self.daemon.stopping.is_set():
            with self.daemon.changed:
                if self.daemon.generation == seen:
                    self.daemon.changed.wait(timeout=1.0)
                    continue
                seen = self.daemon.generation
                devices = list(self._devices().values())
            yield api.ListAndWatchResponse(devices=[_device_message(d) for d in devices])

    def GetPreferredAllocation(self, request: api.PreferredAllocationRequest,
                               context: Any) -> api.PreferredAllocationResponse:
        known = self._devices()
        out = []
        for req in request.container_requests:
            out.append(api.ContainerPreferredAllocationResponse(
                deviceIDs=preferred(known, list(req.available_deviceIDs),
                                    list(req.must_include_deviceIDs), req.allocation_size)))
        return api.PreferredAllocationResponse(container_responses=out)

    def Allocate(self, request: api.AllocateRequest, context: Any) -> api.AllocateResponse:
        responses = []
        with self.daemon.lock:
            wanted = [i for req in request.container_requests for i in req.devices_ids]
            known = self.daemon.recheck(self.resource.name, wanted)
            for req in request.container_requests:
                ids = list(req.devices_ids)
                if not ids:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{self.resource.name}: a container request names no device")
                unknown = [i for i in ids if i not in known]
                if unknown:
                    context.abort(grpc.StatusCode.NOT_FOUND,
                                  f"{self.resource.name}: unknown device ID(s) {unknown}; "
                                  f"advertised: {sorted(self._devices())}")
                sick = [known[i] for i in ids if not known[i].healthy]
                if sick:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"{self.resource.name}: {sick[0].id} is not ready: "
                                  f"{sick[0].reason}")
                devices = [known[i] for i in ids]
                try:
                    alloc = allocation_for(self.daemon.root, self.resource, devices)
                except PyvfioError as exc:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"{self.resource.name}: {exc}")
                for i in ids:
                    self.daemon.inventory.allocations[i] = "allocated"
                log.info("%s: allocate %s -> %s backend (%s): %s; %s", self.resource.name,
                         ",".join(ids), alloc.backend, alloc.backend_reason,
                         " ".join(alloc.device_nodes),
                         " ".join(f"{k}={v}" for k, v in alloc.envs.items()))
                responses.append(api.ContainerAllocateResponse(
                    envs=alloc.envs,
                    devices=[api.DeviceSpec(container_path=n, host_path=n, permissions="rw")
                             for n in alloc.device_nodes],
                    annotations={f"pyvfio.io/backend.{self.resource.name.replace('/', '_')}":
                                 alloc.backend},
                ))
        return api.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request: api.PreStartContainerRequest,
                          context: Any) -> api.PreStartContainerResponse:
        return api.PreStartContainerResponse()


def _device_message(d: GroupDevice) -> api.Device:
    msg = api.Device(ID=d.id, health=d.health)
    if d.numa_nodes:
        msg.topology.CopyFrom(api.TopologyInfo(nodes=[api.NUMANode(ID=n) for n in d.numa_nodes]))
    return msg


def preferred(known: dict[str, GroupDevice], available: list[str], must: list[str],
              size: int) -> list[str]:
    """The IDs the plugin would pick: ``must`` first, then available ones on
    the NUMA nodes of ``must`` (or of the node with the most available
    devices), then the rest, each part in ID order.  Each ID is a whole IOMMU
    group, so any pick keeps groups whole."""
    chosen = [i for i in must if i in available or i in known]
    rest = sorted(i for i in available if i not in chosen)

    def nodes(i: str) -> tuple[int, ...]:
        d = known.get(i)
        return d.numa_nodes if d else ()

    wanted = {n for i in chosen for n in nodes(i)}
    if not wanted and rest:
        counts: dict[int, int] = {}
        for i in rest:
            for n in nodes(i):
                counts[n] = counts.get(n, 0) + 1
        if counts:
            wanted = {max(sorted(counts), key=lambda n: counts[n])}
    rest.sort(key=lambda i: (not (set(nodes(i)) & wanted), i))
    for i in rest:
        if len(chosen) >= size:
            break
        chosen.append(i)
    return chosen[:max(size, len(must))]


class DevicePluginDaemon:
    """Serves every configured resource until :meth:`stop`.

    ``root``: the host root for sysfs, /dev and /proc (``/``); ``plugin_dir``:
    kubelet's device-plugins directory (its ``kubelet.sock`` is dialled)."""

    def __init__(self, config: PluginConfig, *, root: str = "/",
                 plugin_dir: str = DEVICE_PLUGIN_PATH) -> None:
        self.config = config
        self.root = root
        self.plugin_dir = plugin_dir
        self.kubelet_socket = os.path.join(plugin_dir, KUBELET_SOCKET)
        self.inventory = Inventory(config, root)
        self.plugins = [ResourcePlugin(self, r) for r in config.resources]
        self.lock = threading.RLock()  # scans and allocations
        self.changed = threading.Condition()  # generation bumps wake ListAndWatch streams
        self.generation = 0
        self.stopping = threading.Event()
        self.bound: list[str] = []  # devices managed mode moved to a vfio driver

    # ---- health ----

    def rescan(self, why: str) -> Scan:
        """Diagnose the host now; log and publish what changed."""
        with self.lock:
            before = self.inventory.last
            scan = self.inventory.scan()
            changes = _changes(before, scan)
            for line in changes:
                log.info("%s", line)
            for line in scan.conflicts:
                if line not in before.conflicts:
                    log.warning("%s", line)
            if changes:
                with self.changed:
                    self.generation += 1
                    self.changed.notify_all()
            return scan

    def recheck(self, resource: str, ids: list[str]) -> dict[str, GroupDevice]:
        """Diagnose ``ids`` of ``resource`` now (Allocate); log and publish
        what changed.  Returns the fresh devices of those IDs."""
        with self.lock:
            before = self.inventory.last
            fresh = self.inventory.recheck(resource, ids)
            changes = _changes(before, self.inventory.last)
            for line in changes:
                log.info("%s", line)
            if changes:
                with self.changed:
                    self.generation += 1
                    self.changed.notify_all()
            return fresh

    # ---- managed mode ----

    def bind_managed(self) -> None:
        """Bind the selected functions of managed resources to their best
        vfio driver, one IOMMU group at a time, through
        :func:`pyvfio.host.bind` (which refuses, before writing anything, a
        group that would stay non-viable or that is in use).  A refusal is
        logged and leaves that group unhealthy; the others go on."""
        from pyvfio.host import bind

        if not any(r.managed for r in self.config.resources):
            return
        previous = self.inventory.last
        scan = self.inventory.scan()
        self.inventory.last = previous  # the first rescan then logs every device as new
        for res in self.config.resources:
            if not res.managed:
                continue
            for d in scan.devices.get(res.name, {}).values():
                try:
                    results = bind(list(d.addresses), root=self.root)
                except PyvfioError as exc:
                    log.error("%s: managed mode could not bind %s: %s", res.name,
                              ",".join(d.addresses), exc)
                    continue
                for r in results:
                    if r.changed:
                        self.bound.append(r.device)
                        log.info("%s: managed mode bound %s: %s -> %s", res.name, r.device,
                                 r.original_driver or "no driver", r.driver)

    def restore_managed(self) -> None:
        from pyvfio.host import restore

        if not self.bound:
            return
        try:
            for r in restore(self.bound, root=self.root):
                log.info("managed mode restored %s to %s", r.device, r.driver or "no driver")
        except PyvfioError as exc:
            log.error("managed mode could not restore every device: %s", exc)
        self.bound = []

    # ---- running ----

    def start(self) -> None:
        """Bind (managed mode), diagnose, and serve every resource's socket."""
        if not os.path.isdir(self.plugin_dir):
            raise UsageError(f"kubelet's device-plugins directory {self.plugin_dir} does not "
                             "exist (is kubelet running, and is the directory mounted?)")
        for p in self.plugins:
            _clear_stale_socket(p.socket_path)  # refuse up front, before binding anything
        self.bind_managed()
        self.rescan("start")
        for p in self.plugins:
            p.serve()

    def watch_once(self) -> None:
        """One look at the directory: re-serve vanished sockets, (re-)register
        with a new or restarted kubelet."""
        kubelet = _inode(self.kubelet_socket)
        now = time.monotonic()
        for p in self.plugins:
            if p.socket_gone():
                log.info("%s: plugin socket %s is gone (kubelet restarted?); serving it again",
                         p.resource.name, p.socket_path)
                p.serve()
            if kubelet is None or p.registered_with == kubelet or now < p.register_after:
                continue
            try:
                p.register(self.kubelet_socket)
            except grpc.RpcError as exc:
                p.register_after = now + REGISTER_RETRY
                detail = exc.details() if hasattr(exc, "details") else str(exc)
                log.error("%s: registration with kubelet at %s failed: %s (retrying in %gs)",
                          p.resource.name, self.kubelet_socket, detail, REGISTER_RETRY)
                continue
            p.registered_with = kubelet
            log.info("%s: registered with kubelet at %s (endpoint %s)", p.resource.name,
                     self.kubelet_socket, os.path.basename(p.socket_path))

    def run(self) -> None:
        """:meth:`start`, then watch and re-diagnose until :meth:`stop`."""
        try:
            self.start()
            next_scan = time.monotonic() + self.config.health_interval
            waiting_logged = False
            while not self.stopping.is_set():
                if not os.path.exists(self.kubelet_socket) and not waiting_logged:
                    log.info("waiting for kubelet's %s", self.kubelet_socket)
                waiting_logged = not os.path.exists(self.kubelet_socket)
                self.watch_once()
                if time.monotonic() >= next_scan:
                    self.rescan("interval")
                    next_scan = time.monotonic() + self.config.health_interval
                self.stopping.wait(min(WATCH_INTERVAL, self.config.health_interval))
        finally:
            self.shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler: it only sets
        an event; the loop and the ListAndWatch streams look at it at least
        once a second)."""
        self.stopping.set()

    def shutdown(self) -> None:
        self.stopping.set()
        for p in self.plugins:
            p.close()
        self.restore_managed()
        log.info("stopped")


def _changes(before: Scan, after: Scan) -> list[str]:
    out = []
    for resource, devices in after.devices.items():
        old = before.devices.get(resource, {})
        for i, d in sorted(devices.items()):
            what = f"{resource} {i} (IOMMU group {d.group}: {','.join(d.addresses)})"
            prev = old.get(i)
            if prev is None:
                out.append(f"{what}: new, {d.health}" + (f": {d.reason}" if d.reason else ""))
            elif prev.health != d.health or (not d.healthy and prev.addresses != d.addresses):
                out.append(f"{what}: {prev.health} -> {d.health}"
                           + (f": {d.reason}" if d.reason else ""))
        for i in sorted(set(old) - set(devices)):
            out.append(f"{resource} {i}: gone (no longer selected or removed from the host)")
    return out
