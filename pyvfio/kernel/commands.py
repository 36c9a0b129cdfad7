"""``pyvfio info``: open a device through VFIO and show what it reports."""

from __future__ import annotations

import argparse
from importlib import import_module
from typing import Any

from pyvfio.cli import CommandFailed, add_json_flag, print_json
from pyvfio.device import Device


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "info", help="open a device through VFIO and print its backend, IDs, regions and IRQs",
        description="Open a device (kernel VFIO by PCI address, a vfio-user socket, or fds "
                    "from the broker) and print its backend, IDs, regions (index, size, "
                    "flags, mmap areas) and IRQs (index, count, flags).")
    p.add_argument("bdf", nargs="?", help="PCI address (0000:00:03.0)")
    p.add_argument("--backend", choices=("auto", "legacy", "iommufd"), default="auto",
                   help="kernel backend: auto takes iommufd when /dev/iommu and the device "
                        "cdev exist (default: auto)")
    p.add_argument("--vfio-user", metavar="PATH", help="connect to a vfio-user server socket")
    p.add_argument("--broker", metavar="PATH",
                   help="ask the pyvfio broker on this socket for the device's fds")
    add_json_flag(p)
    p.set_defaults(func=run_info)


def open_for_args(args: argparse.Namespace) -> Device:
    if args.vfio_user:
        if args.broker:
            raise CommandFailed("--vfio-user and --broker exclude each other", 2)
        return import_module("pyvfio.user.client").connect(args.vfio_user)
    if not args.bdf:
        raise CommandFailed("info: a PCI address is needed (or --vfio-user PATH)", 2)
    if args.broker:
        return import_module("pyvfio.broker.client").open_device(
            args.broker, args.bdf, backend=args.backend)
    from pyvfio.kernel import open_device

    return open_device(args.bdf, args.backend, root=args.root)


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
