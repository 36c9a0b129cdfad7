"""A kubelet stand-in for testing device plugins, on the same ``api.proto``.

It does what kubelet's device manager (kubernetes
``pkg/kubelet/cm/devicemanager``) does with a plugin, and no more:

- serves ``Registration`` on ``kubelet.sock`` in a device-plugins directory;
  a ``Register`` with a version other than ``v1beta1``, a bad resource name
  or a resource another live plugin holds is refused with an error status;
- on a good ``Register`` it dials ``DIR/endpoint``, asks
  ``GetDevicePluginOptions`` and follows ``ListAndWatch`` in a thread, keeping
  the latest device list of each resource;
- :meth:`Kubelet.admit` picks devices the way kubelet does for a container
  request (healthy devices only; ``GetPreferredAllocation`` when the plugin
  offers it, taking its answer only if it is a valid choice) and calls
  ``Allocate``;
- :meth:`Kubelet.restart` removes every file in the directory (kubelet's
  ``removeContents`` at start, which takes the plugins' sockets too) and
  serves a new ``kubelet.sock``.

Needs the ``k8s`` extra (grpcio).  Usage::

    with Kubelet(plugin_dir) as kubelet:
        ...start the plugin...
        kubelet.wait_for(lambda k: k.healthy("pyvfio.io/edu"), timeout=10)
        response = kubelet.admit("pyvfio.io/edu", 1)
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from pyvfio.k8s.config import check_resource_name
from pyvfio.k8s.v1beta1 import api_pb2 as api
from pyvfio.k8s.v1beta1 import api_pb2_grpc as api_grpc

__all__ = ["Kubelet", "PluginEndpoint"]

CHECKPOINT = "kubelet_internal_checkpoint"


@dataclass
class PluginEndpoint:
    """One registered plugin as the stand-in sees it."""

    resource: str
    endpoint: str
    options: Any
    channel: grpc.Channel
    stub: api_grpc.DevicePluginStub
    devices: dict[str, Any] = field(default_factory=dict)  # ID -> api.Device
    updates: int = 0  # ListAndWatch responses received
    stream_error: str | None = None  # why ListAndWatch ended (None while it runs)
    registrations: int = 1
    _call: Any = None

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self.channel.close()


class Kubelet(api_grpc.RegistrationServicer):
    """The stand-in; a context manager (``start()`` / ``stop()``)."""

    def __init__(self, plugin_dir: str) -> None:
        self.plugin_dir = plugin_dir
        self.socket = os.path.join(plugin_dir, "kubelet.sock")
        self.plugins: dict[str, PluginEndpoint] = {}
        self.registrations: list[tuple[str, str]] = []  # (resource, endpoint), every attempt
        self.refusals: list[str] = []
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    # ---- lifecycle ----

    def start(self) -> Kubelet:
        os.makedirs(self.plugin_dir, exist_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4,
                                                        thread_name_prefix="kubelet"))
        api_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port("unix:" + self.socket)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0.5).wait()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        with self._cond:
            plugins, self.plugins = list(self.plugins.values()), {}
        for p in plugins:
            p.close()

    def restart(self) -> None:
        """Stop, wipe the directory as kubelet does at start, serve again."""
        self.stop()
        for name in os.listdir(self.plugin_dir):
            if name != CHECKPOINT:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(self.plugin_dir, name))
        self.start()

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- Registration ----

    def Register(self, request: Any, context: Any) -> Any:
        resource = request.resource_name
        self.registrations.append((resource, request.endpoint))
        if request.version != "v1beta1":
            self._refuse(context, f"unsupported API version {request.version!r}")
        why = check_resource_name(resource)
        if why is not None:
            self._refuse(context, f"invalid resource name {resource!r}: {why}")
        if "/" in request.endpoint or not request.endpoint:
            self._refuse(context, f"endpoint {request.endpoint!r} must be a file name")
        path = os.path.join(self.plugin_dir, request.endpoint)
        channel = grpc.insecure_channel("unix:" + path)
        stub = api_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(api.Empty(), timeout=5)
        except grpc.RpcError as exc:
            channel.close()
            self._refuse(context, f"cannot dial the plugin at {path}: {exc.details()}")
        with self._cond:
            old = self.plugins.get(resource)
            plugin = PluginEndpoint(resource, request.endpoint, options, channel, stub,
                                    registrations=(old.registrations + 1) if old else 1)
            self.plugins[resource] = plugin
            self._cond.notify_all()
        if old is not None:
            old.close()
        plugin._call = stub.ListAndWatch(api.Empty())
        threading.Thread(target=self._follow, args=(plugin,), daemon=True,
                         name=f"kubelet-law-{resource}").start()
        return api.Empty()

    def _refuse(self, context: Any, message: str) -> NoReturn:
        self.refusals.append(message)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        raise AssertionError("context.abort returned")  # it raises

    def _follow(self, plugin: PluginEndpoint) -> None:
        try:
            for response in plugin._call:
                with self._cond:
                    plugin.devices = {d.ID: d for d in response.devices}
                    plugin.updates += 1
                    self._cond.notify_all()
            with self._cond:
                plugin.stream_error = "the plugin ended the stream"
                self._cond.notify_all()
        except grpc.RpcError as exc:
            with self._cond:
                plugin.stream_error = exc.details() or str(exc.code())
                self._cond.notify_all()

    # ---- what tests ask ----

    def wait_for(self, predicate: Callable[[Kubelet], Any], timeout: float = 20.0) -> Any:
        """Wait until ``predicate(self)`` is truthy; return its value.
        Raises :class:`TimeoutError` naming what was seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"kubelet stand-in: condition not met in {timeout}s; "
                                       f"plugins: {self.describe()}")
                self._cond.wait(min(left, 0.2))

    def describe(self) -> dict[str, Any]:
        return {r: {"endpoint": p.endpoint, "updates": p.updates, "error": p.stream_error,
                    "devices": {i: d.health for i, d in p.devices.items()}}
                for r, p in self.plugins.items()}

    def devices(self, resource: str) -> dict[str, str]:
        """ID -> health of ``resource``'s latest ListAndWatch list."""
        p = self.plugins.get(resource)
        return {} if p is None else {i: d.health for i, d in p.devices.items()}

    def healthy(self, resource: str) -> list[str]:
        return sorted(i for i, h in self.devices(resource).items() if h == "Healthy")

    def admit(self, resource: str, count: int, *, must_include: tuple[str, ...] = ()) -> Any:
        """Choose ``count`` healthy devices as kubelet does and Allocate them
        for one container; returns the ``ContainerAllocateResponse``.
        Raises :class:`grpc.RpcError` when the plugin refuses, and
        :class:`LookupError` when too few healthy devices exist."""
        plugin = self.plugins[resource]
        available = self.healthy(resource)
        if len(available) < count:
            raise LookupError(f"{resource}: {count} wanted, {len(available)} healthy")
        chosen = sorted(available)[:count]
        if plugin.options.get_preferred_allocation_available:
            reply = plugin.stub.GetPreferredAllocation(api.PreferredAllocationRequest(
                container_requests=[api.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=list(must_include),
                    allocation_size=count)]), timeout=10)
            picked = list(reply.container_responses[0].deviceIDs)
            # kubelet takes the preference only when it is a valid answer.
            if len(picked) == count and set(picked) <= set(available) \
                    and set(must_include) <= set(picked):
                chosen = picked
        return self.allocate(resource, chosen)

    def allocate(self, resource: str, ids: list[str]) -> Any:
        """Allocate exactly ``ids`` (kubelet may pick any advertised IDs)."""
        plugin = self.plugins[resource]
        reply = plugin.stub.Allocate(api.AllocateRequest(
            container_requests=[api.ContainerAllocateRequest(devices_ids=ids)]), timeout=30)
        return reply.container_responses[0]
