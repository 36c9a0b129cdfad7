"""``pyvfio guest`` (run a command in a QEMU guest) and ``pyvfio demo``."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import Any

from pyvfio.cli import CommandFailed

KERNEL_HELP = ("debian (Debian's own: 6.1 on Debian 12, 6.12 on 13), pyvfio-6.12 (built on first "
               "use) or the path of a kernel image (vmlinuz-RELEASE finds its modules)")


GUEST_EPILOG = """\
examples:
  pyvfio guest -- pyvfio ls                       the guest's PCI devices
  pyvfio guest --kernel pyvfio-6.12 -- python -m pytest tests/guest -k iommufd
  pyvfio guest --noiommu --quiet -- pyvfio groups

exit status: the command's own in the guest; 2 bad usage or a guest that could
not boot (one line on stderr); 130 interrupted
"""

GUEST_KERNEL_EPILOG = """\
examples:
  pyvfio guest-kernel                             build if needed, print the path

exit status: 0 the kernel is there (its path on stdout), 2 it could not be built
"""

DEMO_EPILOG = """\
examples:
  pyvfio demo                                     with Debian's kernel
  pyvfio demo --kernel pyvfio-6.12                iommufd and the device cdev too

exit status: 0 every step passed, 1 a step failed, 2 the guest could not run,
130 interrupted
"""


def register(sub: Any) -> None:
    guest = sub.add_parser(
        "guest", epilog=GUEST_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="boot a real kernel under QEMU (Intel vIOMMU, standard PCI topology) and run a command",
        description=textwrap.fill("Boot a kernel under QEMU q35 with an Intel vIOMMU, the host's / shared "
        "read-only, and run COMMAND in this checkout with PYVFIO_GUEST=1. Exits with the "
        "command's exit status. Files the command writes to $PYVFIO_GUEST_OUT are kept "
        "on the host (the path is printed).", 78),
    )
    guest.add_argument("--kernel", default="debian", metavar="K", help=KERNEL_HELP)
    guest.add_argument("--topology", default="standard", choices=("standard", "none"),
                       help="PCI devices to add (default: standard, see pyvfio.testing.topology)")
    guest.add_argument("--noiommu", action="store_true",
                       help="no Intel vIOMMU; boot with vfio.enable_unsafe_noiommu_mode=1")
    guest.add_argument("--append", action="append", default=[], metavar="WORD",
                       help="extra kernel command-line word (repeatable)")
    guest.add_argument("--memory", type=int, default=1024, metavar="MIB", help="guest RAM")
    guest.add_argument("--smp", type=int, default=2, metavar="N", help="guest CPUs")
    guest.add_argument("--accel", choices=("kvm", "tcg"), default=None,
                       help="accelerator (default: probe KVM once, else TCG)")
    guest.add_argument("--timeout", type=float, default=600.0, metavar="S",
                       help="kill the guest after S seconds (default 600)")
    guest.add_argument("--quiet", action="store_true",
                       help="print only the command's output, not the boot console")
    guest.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                       help="the command to run in the guest")
    guest.set_defaults(func=run_guest)

    build = sub.add_parser(
        "guest-kernel", epilog=GUEST_KERNEL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="build the pyvfio-6.12 guest kernel if the cache is cold; print its path",
        description=textwrap.fill("Build (only when its cache is cold) the all-built-in 6.12 guest kernel "
        "from Debian's linux-source-6.12 and print the bzImage path.", 78),
    )
    build.set_defaults(func=run_guest_kernel)

    qemu = sub.add_parser(
        "guest-qemu",
        help="provision QEMU >= 10.1 (vfio-user-pci) if needed; print the command that runs it",
        description=textwrap.fill("Use the system's qemu-system-x86_64 if it is >= 10.1; otherwise unpack "
        "Debian's qemu-system-x86 (the next release's backports on Debian 12) with its "
        "libraries into ~/.cache/pyvfio/qemu and print its wrapper script. Nothing on the "
        "system is installed or changed.", 78),
        epilog="examples:\n  pyvfio guest-qemu\n  pyvfio guest-qemu --json\n"
               "  $(pyvfio guest-qemu) -device vfio-user-pci,help\n\n"
               "exit status: 0 ready, 2 could not provision (the reason is printed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    qemu.add_argument("--refresh", action="store_true",
                      help="ask the archive for a newer package even when one is cached")
    qemu.add_argument("--json", action="store_true", help="print a JSON object")
    qemu.set_defaults(func=run_guest_qemu)

    demo = sub.add_parser(
        "demo", epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the whole story in a real guest: list, check, bind edu, DMA and interrupts",
    )
    demo.add_argument("--kernel", default="debian", metavar="K", help=KERNEL_HELP)
    demo.add_argument("--act", choices=("all", "kernel", "vfio-user"), default="all",
                      help="kernel: host devices through kernel VFIO; vfio-user: a Python "
                      "device in a VM on QEMU >= 10.1 (pyvfio serve + vfio-user-pci); "
                      "default: both")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    demo.set_defaults(func=run_demo)


def run_guest(args: argparse.Namespace) -> int:
    from pyvfio.testing import guest, topology

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CommandFailed("no command given (pyvfio guest [options] -- COMMAND...)", 2)
    extra = list(args.append)
    if args.noiommu:
        extra.append("vfio.enable_unsafe_noiommu_mode=1")
    vm = guest.Guest(
        guest.kernel_by_name(args.kernel), topology.by_name(args.topology),
        iommu=not args.noiommu, cmdline_extra=extra, memory_mib=args.memory, smp=args.smp,
        accel=args.accel,
    )
    result = vm.run(cmd, timeout=args.timeout, echo=None if args.quiet else sys.stdout)
    if args.quiet:
        sys.stdout.write(result.output)
    kept = any(result.out_dir.iterdir())
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "?"
    print(f"pyvfio guest: {vm.kernel.name}/{result.accel}: exit {result.returncode}, "
          f"boot {boot}, total {result.wall_seconds:.1f} s"
          + (f"; output files in {result.out_dir}" if kept else ""), file=sys.stderr)
    if not kept:
        result.cleanup()
    return result.returncode


def run_guest_kernel(args: argparse.Namespace) -> int:
    from pyvfio.testing import kernel

    print(kernel.pyvfio_kernel().image)
    return 0


def run_guest_qemu(args: argparse.Namespace) -> int:
    from pyvfio.cli import print_json
    from pyvfio.testing import qemu

    found = qemu.ensure_qemu(refresh=args.refresh)  # errors: the CLI's one line (or JSON)
    if args.json:
        print_json(found.as_json())
    else:
        print(found.command)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("pyvfio.testing.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "pyvfio.testing.demo":
            raise
        raise CommandFailed("not available yet (pyvfio/testing/demo.py is not written)",
                            2) from None
    return int(demo.main(args) or 0)
