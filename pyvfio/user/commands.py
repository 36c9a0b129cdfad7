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
import textwrap
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from pyvfio.devices.model import PciDeviceModel
from pyvfio.errors import UsageError

__all__ = ["MODELS", "register"]


def _edu(args: argparse.Namespace) -> PciDeviceModel:
    from pyvfio.devices.edu import EduDevice

    return EduDevice(dma_delay=args.dma_delay)


def _virtio_rng(args: argparse.Namespace) -> PciDeviceModel:
    from pyvfio.devices.virtio.rng import SeededSource, VirtioRng

    if args.seed is not None:
        # Text, so the control socket can pass it too; "7" and 7 give one stream.
        return VirtioRng(SeededSource(str(args.seed).encode()))
    return VirtioRng()


def _virtio_blk(args: argparse.Namespace) -> PciDeviceModel:
    from pyvfio.devices.virtio.blk import VirtioBlk

    if not args.file:
        raise UsageError("virtio-blk needs a backing file: pyvfio serve virtio-blk --file "
                         "disk.img --socket PATH (create one with truncate -s 64M disk.img)")
    return VirtioBlk(args.file, read_only=args.read_only)


MODELS: dict[str, tuple[Callable[[argparse.Namespace], PciDeviceModel], str]] = {
    "edu": (_edu, "QEMU's edu teaching device (1234:11e8): factorial, IRQs, 4 KiB DMA engine"),
    "virtio-rng": (_virtio_rng, "virtio entropy device (1af4:1044) for the guest's virtio_rng "
                   "driver; --seed N for a reproducible stream"),
    "virtio-blk": (_virtio_blk, "virtio block device (1af4:1042) backed by --file F for the "
                   "guest's virtio_blk driver"),
}


SERVE_EPILOG = """\
examples:
  pyvfio serve edu --socket /tmp/edu.sock                     one edu device
  pyvfio serve edu --socket /tmp/a.sock --socket /tmp/b.sock  two independent ones
  pyvfio serve virtio-rng --socket /tmp/rng.sock             the guest's virtio_rng binds it
  pyvfio serve virtio-blk --file disk.img --socket /tmp/blk.sock
                                                              a disk for the guest's virtio_blk
  pyvfio serve --list                                         the models there are

then, from another shell:
  pyvfio info --vfio-user /tmp/edu.sock
  python -m pyvfio.drivers.edu --vfio-user /tmp/edu.sock

Runs in the foreground until Ctrl-C or SIGTERM (exit 0) and removes its socket
files. A stale socket left by a killed server is replaced; one with a live
server behind it is refused (exit 2).
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "serve", help="serve an emulated device over vfio-user",
        description=textwrap.fill(
            "Serve an emulated PCI device on a UNIX socket with the vfio-user protocol, "
            "one client at a time per socket (later clients wait their turn). Models: "
            + "; ".join(f"{name}: {text}" for name, (_f, text) in MODELS.items()), 78),
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", choices=sorted(MODELS), metavar="MODEL",
                        help=f"the device model: {', '.join(sorted(MODELS))}")
    parser.add_argument("--socket", "--socket-path", dest="sockets", action="append",
                        metavar="PATH", help="socket path to listen on (repeat to serve "
                        "several independent devices)")
    parser.add_argument("--dma-delay", type=float, default=0.1, metavar="SECONDS",
                        help="edu: delay between the DMA start command and the transfer "
                        "(default: 0.1, as QEMU)")
    parser.add_argument("--file", metavar="PATH",
                        help="virtio-blk: the backing file or block device (its size in "
                        "512-byte sectors is the disk's capacity)")
    parser.add_argument("--read-only", action="store_true",
                        help="virtio-blk: open --file read-only and offer VIRTIO_BLK_F_RO")
    parser.add_argument("--seed", metavar="TEXT",
                        help="virtio-rng: serve a reproducible stream (BLAKE2b keyed with "
                        "TEXT, over a counter) instead of os.urandom; for tests, never for "
                        "real entropy")
    parser.add_argument("--list", action="store_true", help="list the device models and exit")
    parser.add_argument("--control", metavar="PATH",
                        help="also listen for JSON control commands on PATH (mode 0600; "
                        "QMP-like: device-add, device-remove, query-devices, client "
                        "events); MODEL and --socket are then optional")
    parser.set_defaults(func=run)

    from pyvfio.user import control, qemu_args

    qemu_args.register(sub)
    control.register(sub)


def _raise_fd_limit() -> None:
    """Each client file behind DMA windows holds one fd (up to 256 per
    client), each eventfd one more, each client its sockets: take the hard
    limit.  Running out is survived (the accept loop turns clients away)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# The serve options each model takes (argparse dests); the control socket's
# device-add accepts these as "options", with the command line's values as defaults.
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {"edu": ("dma_delay",), "virtio-rng": ("seed",),
                                             "virtio-blk": ("file", "read_only")}


def check_model_args(args: argparse.Namespace) -> None:
    """Refuse model option values no model can use (before anything is served)."""
    if getattr(args, "dma_delay", 0) < 0:
        raise UsageError(f"--dma-delay must be 0 or more seconds, not {args.dma_delay}")


def control_models(args: argparse.Namespace) -> dict[str, Any]:
    """The models as :class:`pyvfio.user.control.ModelType`, built from :data:`MODELS`."""
    from pyvfio.user.control import ModelType

    def creator(factory: Callable[[argparse.Namespace], PciDeviceModel]
                ) -> Callable[[Any], PciDeviceModel]:
        def create(options: Any) -> PciDeviceModel:
            ns = argparse.Namespace(**{**vars(args), **options})
            check_model_args(ns)
            return factory(ns)
        return create

    return {name: ModelType(name, text, creator(factory),
                            {k: getattr(args, k) for k in MODEL_OPTIONS.get(name, ())
                             if hasattr(args, k)})
            for name, (factory, text) in MODELS.items()}


def _version() -> str:
    from pyvfio import __version__

    return __version__


def run(args: argparse.Namespace) -> int:
    from pyvfio.user.server import Server

    if args.list:
        for name, (_f, text) in MODELS.items():
            print(f"{name:11} {text}")
        return 0
    control_path = getattr(args, "control", None)
    if not args.model and not control_path:
        raise UsageError(f"name a device model ({', '.join(sorted(MODELS))}), e.g. "
                         "pyvfio serve edu --socket /tmp/edu.sock")
    if args.model and not args.sockets:
        raise UsageError(f"say where to listen: pyvfio serve {args.model} --socket PATH")
    if args.sockets and not args.model:
        raise UsageError("name the device model to serve on --socket, e.g. "
                         "pyvfio serve edu --socket /tmp/edu.sock")
    if args.file and args.model != "virtio-blk":
        raise UsageError(f"--file is for virtio-blk, not {args.model}")
    if args.model == "virtio-blk" and len(args.sockets or ()) > 1:
        raise UsageError("virtio-blk serves one --file on one --socket; run one server per "
                         "disk (or add more with the control socket)")
    check_model_args(args)
    factory = MODELS[args.model][0] if args.model else None
    _raise_fd_limit()
    server = Server()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        server.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    models: list[PciDeviceModel] = []
    control = None
    try:
        started: list[tuple[Any, PciDeviceModel]] = []
        for path in args.sockets or ():
            assert factory is not None
            model = factory(args)
            models.append(model)
            started.append((server.add(model, path), model))
            print(f"pyvfio: serving {args.model} on {path}", file=sys.stderr, flush=True)
        if control_path:
            from pyvfio.user.control import ControlServer

            def on_quit() -> None:
                stop.set()
                server.stop()

            control = ControlServer(server, control_path, control_models(args),
                                    version=_version(), on_quit=on_quit)
            for ds, model in started:
                control.adopt(ds, args.model, model)
            control.start()
            print(f"pyvfio: control socket on {control_path}", file=sys.stderr, flush=True)
        server.serve_forever()
        if stop.is_set():
            served = sum(ds.clients_served for ds in server.devices)
            print(f"pyvfio: stopped serving {args.model or 'devices'} ({served} client(s) "
                  "served)",
                  file=sys.stderr, flush=True)
    finally:
        if control is not None:
            control.close()
            models += control.models_served()
        server.close()
        for model in models:
            close = getattr(model, "close", None)
            if close is not None:
                close()
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0
