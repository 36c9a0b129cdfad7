"""``pyvfio info``: open a device through VFIO and show what it reports."""

from __future__ import annotations

import argparse
import textwrap
from importlib import import_module
from typing import Any

from pyvfio.cli import add_json_flag, check_root, print_json
from pyvfio.device import Device
from pyvfio.errors import UsageError

INFO_EPILOG = """\
examples:
  pyvfio info 0000:00:03.0                   a device bound to vfio-pci (pyvfio bind BDF)
  pyvfio info 0000:00:03.0 --backend legacy  force the container/group API
  pyvfio info --vfio-user /tmp/edu.sock      a vfio-user server (pyvfio serve edu --socket ...)
  pyvfio info --broker /run/pyvfio-broker.sock 0000:00:03.0 --json

exit status: 0 success, 2 the device could not be opened (one line on stderr says why;
with --json also {"error": {"message", "kind"}} on stdout), 130 interrupted
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "info", help="open a device through VFIO and print its backend, IDs, regions and IRQs",
        description=textwrap.fill(
            "Open a device (kernel VFIO by PCI address, a vfio-user socket, or fds from the "
            "broker) and print its backend, IDs, regions (index, size, flags, mmap areas) "
            "and IRQs (index, count, flags).", 78),
        epilog=INFO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(p)
    add_json_flag(p)
    p.set_defaults(func=run_info)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """The ways to name a device, shared with ``python -m pyvfio.drivers.edu``."""
    p.add_argument("bdf", nargs="?", metavar="BDF",
                   help="PCI address of a device bound to vfio-pci (0000:00:03.0; the "
                        "domain may be left out)")
    p.add_argument("--backend", choices=("auto", "legacy", "iommufd"), default="auto",
                   help="kernel backend: auto takes iommufd when /dev/iommu and the device "
                        "cdev exist, else legacy (default: auto)")
    p.add_argument("--vfio-user", metavar="PATH",
                   help="connect to the vfio-user server on this UNIX socket instead")
    p.add_argument("--broker", metavar="PATH",
                   help="ask the pyvfio broker on this socket for the device's fds")
    p.add_argument("--timeout", type=_positive_seconds, default=30.0, metavar="SECONDS",
                   help="vfio-user: how long to wait for the server's replies (default: 30)")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def open_for_args(args: argparse.Namespace) -> Device:
    """Open the device named by :func:`add_device_arguments`' options."""
    if args.vfio_user:
        if args.broker:
            raise UsageError("--vfio-user and --broker exclude each other")
        if args.bdf:
            raise UsageError(f"give either a PCI address ({args.bdf}) or --vfio-user PATH, "
                             "not both")
        return import_module("pyvfio.user.client").connect(
            args.vfio_user, timeout=getattr(args, "timeout", 30.0))
    if not args.bdf:
        raise UsageError("name a device: a PCI address (e.g. 0000:00:03.0), "
                         "--vfio-user PATH, or --broker PATH BDF")
    if args.broker:
        return import_module("pyvfio.broker.client").open_device(
            args.broker, args.bdf, backend=args.backend)
    from pyvfio.kernel import open_device

    return open_device(args.bdf, args.backend, root=check_root(args.root))


def run_info(args: argparse.Namespace) -> int:
    with open_for_args(args) as dev:
        data = dev.describe()
    if args.json:
        print_json(data)
        return 0
    print(format_info(data))
    return 0


def format_info(data: dict[str, Any]) -> str:
    lines = [f"device   {data['device']}",
             f"backend  {data['backend']} ({data.get('backend_reason') or 'n/a'})"]
    ids = data.get("ids")
    if ids:
        lines.append(f"ids      {ids['vendor']}:{ids['device']} subsystem "
                     f"{ids['subsystem_vendor']}:{ids['subsystem_device']} class {ids['class']} "
                     f"rev {ids['revision']}")
    info = data["info"]
    lines.append(f"flags    {'|'.join(info['flag_names']) or '-'}  regions {info['num_regions']}"
                 f"  irq indexes {info['num_irqs']}")
    lines.append("regions:")
    lines.append(f"  {'idx':>3} {'name':<7} {'size':>12}  {'flags':<22} mmap areas")
    for r in data["regions"]:
        if not r["size"]:
            continue
        areas = ", ".join(f"{a['offset']:#x}+{a['size']:#x}" for a in r["mmap_areas"]) or "-"
        lines.append(f"  {r['index']:>3} {r['name']:<7} {r['size']:>#12x}  "
                     f"{'|'.join(r['flag_names']):<22} {areas}")
    lines.append("irqs:")
    lines.append(f"  {'idx':>3} {'name':<6} {'count':>5}  flags")
    for i in data["irqs"]:
        lines.append(f"  {i['index']:>3} {i['name']:<6} {i['count']:>5}  "
                     f"{'|'.join(i['flag_names']) or '-'}")
    return "\n".join(lines)
