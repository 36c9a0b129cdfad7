"""``pyvfio serve``: serve emulated devices over vfio-user.

``pyvfio serve edu --socket PATH`` serves one edu device; repeat ``--socket``
to serve several independent instances from one process.  The command runs
in the foreground (vfio-user backends must not daemonize), ends cleanly on
SIGINT or SIGTERM and removes its socket files.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import textwrap
from collections.abc import Callable
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
  pyvfio serve --model mymodels:Checksum --socket /tmp/c.sock your own PciDeviceModel
  pyvfio serve edu --socket /run/vm1/edu.sock --socket-mode 0660 --socket-owner qemu:kvm
                                     as root, for a VMM running as user qemu

then, from another shell:
  pyvfio info --vfio-user /tmp/edu.sock
  python -m pyvfio.drivers.edu --vfio-user /tmp/edu.sock

Runs in the foreground until Ctrl-C or SIGTERM (exit 0) and removes its socket
files. A stale socket left by a killed server is replaced; one with a live
server behind it, or anything that is not a socket, is refused.

exit status: 0 stopped by Ctrl-C or SIGTERM, 2 bad usage or a socket that
cannot be created (one line on stderr)
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
    parser.add_argument("--model", dest="model_class", metavar="MODULE:CLASS",
                        help="serve your own model: a PciDeviceModel subclass, made with no "
                        "arguments (MODULE is imported from sys.path and the current directory)")
    parser.add_argument("--socket-mode", type=_socket_mode, metavar="MODE",
                        help="permissions of the socket files, octal (default: 0600 when "
                        "--socket-owner is given, else as the umask leaves them)")
    parser.add_argument("--socket-owner", type=_socket_owner, metavar="USER[:GROUP]",
                        help="owner of the socket files (as root: lets that user's VMM connect)")
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
                        "events; see docs/vfio-user-qemu.md); MODEL and --socket are then "
                        "optional")
    parser.add_argument("--json", action="store_true",
                        help="with --list: print the models as JSON (errors too)")
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


def _socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (e.g. 0660)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r} is outside 0000..0777")
    return mode


def _socket_owner(text: str) -> tuple[int, int]:
    """``USER[:GROUP]`` (names or numbers) -> (uid, gid); the group defaults
    to the user's primary group."""
    import grp
    import pwd

    user, _, group = text.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise argparse.ArgumentTypeError(f"no such user: {user!r}") from None
        uid, gid = int(user), -1
    else:
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise argparse.ArgumentTypeError(f"no such group: {group!r}") from None
    return uid, gid


def _model_factory(args: argparse.Namespace) -> tuple[str, Callable[[], PciDeviceModel]]:
    """The model to serve (name, factory), from MODEL or --model MODULE:CLASS."""
    if args.model and args.model_class:
        raise UsageError(f"name one model: {args.model} or --model {args.model_class}, not both")
    if args.model:
        factory = MODELS[args.model][0]
        return args.model, lambda: factory(args)
    if not args.model_class:
        raise UsageError(f"name a device model ({', '.join(sorted(MODELS))}), e.g. "
                         "pyvfio serve edu --socket /tmp/edu.sock")
    spec = args.model_class
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise UsageError(f"--model takes MODULE:CLASS (e.g. mymodels:Checksum), not {spec!r}")
    import importlib

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, "")  # `pyvfio serve --model mine:Dev` next to mine.py, as python -m does
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"--model {spec}: no module named {module_name!r} on sys.path "
                             "(run from its directory, or set PYTHONPATH)") from None
        raise UsageError(f"--model {spec}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # the user's module: report, never a traceback
        raise UsageError(f"--model {spec}: importing {module_name} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UsageError(f"--model {spec}: module {module_name} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, PciDeviceModel)):
        raise UsageError(f"--model {spec}: {class_name} is not a PciDeviceModel subclass")

    maker: Callable[[], PciDeviceModel] = cls  # a subclass made with no arguments

    def make() -> PciDeviceModel:
        try:
            return maker()
        except Exception as exc:
            raise UsageError(f"--model {spec}: {class_name}() failed: "
                             f"{type(exc).__name__}: {exc}") from None
    return getattr(cls, "name", None) or class_name, make


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
    from pyvfio.user.lifecycle import serve_until_signalled
    from pyvfio.user.server import Server

    if args.list and args.json:
        from pyvfio.cli import print_json

        print_json([{"model": name, "description": text} for name, (_f, text) in MODELS.items()])
        return 0
    if args.list:
        for name, (_f, text) in MODELS.items():
            print(f"{name:11} {text}")
        return 0
    if args.json:
        raise UsageError("--json goes with --list (a running server logs to stderr)")
    control_path = args.control
    factory: Callable[[], PciDeviceModel] | None = None
    if args.model or args.model_class or not control_path:
        name, factory = _model_factory(args)
        if not args.sockets:
            shown = args.model or f"--model {args.model_class}"
            raise UsageError(f"say where to listen: pyvfio serve {shown} --socket PATH")
    elif args.sockets:
        raise UsageError("name the device model to serve on --socket, e.g. "
                         "pyvfio serve edu --socket /tmp/edu.sock --control PATH")
    else:
        name = "devices"
    # (With only --control, --file is the default of a later device-add.)
    if args.file and (args.model_class or args.model not in (None, "virtio-blk")):
        raise UsageError(f"--file is for virtio-blk, not {args.model or args.model_class}")
    if args.model == "virtio-blk" and len(args.sockets or ()) > 1:
        raise UsageError("virtio-blk serves one --file on one --socket; run one server per "
                         "disk (or add more with the control socket)")
    check_model_args(args)
    mode = args.socket_mode
    if mode is None and args.socket_owner is not None:
        mode = 0o600
    _raise_fd_limit()
    server = Server()
    models: list[PciDeviceModel] = []
    control = None
    try:
        for path in args.sockets or ():
            assert factory is not None
            model = factory()
            models.append(model)
            _add_with_permissions(server, model, path, mode, args.socket_owner)
            print(f"pyvfio: serving {name} on {path}", file=sys.stderr, flush=True)
        if control_path:
            from pyvfio.user.control import ControlServer

            control = ControlServer(server, control_path, control_models(args),
                                    version=_version())
            for ds, model in zip(server.devices, models, strict=True):
                control.adopt(ds, name, model)
            control.start()
            print(f"pyvfio: control socket on {control_path}", file=sys.stderr, flush=True)
        signalled = serve_until_signalled(server)
        if signalled is not None or (control is not None and control.quit_requested.is_set()):
            served = sum(ds.clients_served for ds in server.devices)
            print(f"pyvfio: stopped serving {name} ({served} client(s) served)",
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
    return 0


def _add_with_permissions(server: Any, model: PciDeviceModel, path: str, mode: int | None,
                          owner: tuple[int, int] | None) -> None:
    """``server.add(model, path)``, the socket created owner-only (umask 077)
    when a mode or owner is asked for, so that there is no moment at which it
    is looser than asked; then chown and chmod."""
    if mode is None and owner is None:
        server.add(model, path)
        return
    old = os.umask(0o077)
    try:
        server.add(model, path)
    finally:
        os.umask(old)
    try:
        if owner is not None:
            os.chown(path, *owner)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as exc:
        raise UsageError(f"cannot set the owner or mode of {path}: {exc.strerror or exc}"
                         + (" (only root may give a file away)" if exc.errno == 1 else "")) from None
