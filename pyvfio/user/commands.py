"""``pyvfio serve``: serve emulated devices over vfio-user.

``pyvfio serve edu --socket PATH`` serves one edu device; repeat ``--socket``
to serve several independent instances from one process.  The command runs
in the foreground (vfio-user backends must not daemonize), ends cleanly on
SIGINT or SIGTERM and removes its socket files.
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from pyvfio.devices.model import PciDeviceModel

__all__ = ["MODELS", "register"]


def _edu(args: argparse.Namespace) -> PciDeviceModel:
    from pyvfio.devices.edu import EduDevice

    return EduDevice(dma_delay=args.dma_delay)


MODELS: dict[str, tuple[Callable[[argparse.Namespace], PciDeviceModel], str]] = {
    "edu": (_edu, "QEMU's edu teaching device (1234:11e8): factorial, IRQs, 4 KiB DMA engine"),
}


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "serve", help="serve an emulated device over vfio-user",
        description="Serve an emulated PCI device on a UNIX socket with the vfio-user "
        "protocol, until SIGINT/SIGTERM. Models: "
        + "; ".join(f"{name}: {text}" for name, (_f, text) in MODELS.items()),
    )
    parser.add_argument("model", nargs="?", choices=sorted(MODELS), help="the device model")
    parser.add_argument("--socket", "--socket-path", dest="sockets", action="append",
                        metavar="PATH", help="socket path to listen on (repeat to serve "
                        "several independent devices)")
    parser.add_argument("--dma-delay", type=float, default=0.1, metavar="SECONDS",
                        help="edu: delay between the DMA start command and the transfer "
                        "(QEMU: 0.1)")
    parser.add_argument("--list", action="store_true", help="list the device models and exit")
    parser.set_defaults(func=run)


def _raise_fd_limit() -> None:
    """Each fd-backed DMA window holds one fd while mapped (CPython's mmap
    keeps a dup), and each eventfd one more: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace) -> int:
    from pyvfio.cli import CommandFailed
    from pyvfio.user.server import Server

    if args.list:
        for name, (_f, text) in MODELS.items():
            print(f"{name:8} {text}")
        return 0
    if not args.model:
        raise CommandFailed("serve: name a device model (see --list)", 2)
    if not args.sockets:
        raise CommandFailed("serve: --socket PATH is required", 2)
    factory = MODELS[args.model][0]
    _raise_fd_limit()
    server = Server()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        server.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    models: list[PciDeviceModel] = []
    try:
        for path in args.sockets:
            model = factory(args)
            models.append(model)
            server.add(model, path)
            print(f"pyvfio: serving {args.model} on {path}", file=sys.stderr, flush=True)
        server.serve_forever()
    finally:
        server.close()
        for model in models:
            close = getattr(model, "close", None)
            if close is not None:
                close()
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0
