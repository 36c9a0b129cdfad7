"""Fixtures for the user's-eye tests of the finished commands: short socket
paths (sun_path holds 107 bytes; pytest's tmp_path can be longer), an
in-process ``pyvfio serve edu`` equivalent, and fake peers that are not
vfio-user servers."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvfio.devices.edu import EduDevice
from pyvfio.devices.model import PciDeviceModel
from pyvfio.user.server import Server


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pyvfio-cli-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(sockdir: Path) -> Iterator[Callable[[PciDeviceModel], str]]:
    """``serve(model) -> socket path`` on an in-process :class:`Server`."""
    server = Server().start()
    models: list[PciDeviceModel] = []

    def add(model: PciDeviceModel) -> str:
        path = str(sockdir / f"dev{len(models)}.sock")
        models.append(model)
        server.add(model, path)
        return path

    yield add
    server.close()
    for m in models:
        close = getattr(m, "close", None)
        if close is not None:
            close()


@pytest.fixture
def edu_socket(serve: Callable[[PciDeviceModel], str]) -> str:
    return serve(EduDevice(dma_delay=0.002))


class FakePeer:
    """A UNIX socket server that is not a vfio-user server: ``behaviour`` is
    "close" (accept, close at once), "garbage" (answer HTTP), or "silent"
    (accept, read, never answer)."""

    def __init__(self, path: str, behaviour: str) -> None:
        self.path = path
        self.behaviour = behaviour
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.behaviour == "close":
                conn.close()
                continue
            self.conns.append(conn)
            if self.behaviour == "garbage":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)
        for c in self.conns:
            c.close()


@pytest.fixture
def fake_peer(sockdir: Path) -> Iterator[Callable[[str], str]]:
    peers: list[FakePeer] = []

    def make(behaviour: str) -> str:
        peer = FakePeer(str(sockdir / f"{behaviour}.sock"), behaviour)
        peers.append(peer)
        return peer.path

    yield make
    for p in peers:
        p.close()
