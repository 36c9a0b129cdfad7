"""``pyvfio qemu-args``: the QEMU options that attach a device ``pyvfio serve`` serves.

QEMU's vfio-user client (``vfio-user-pci``, QEMU >= 10.1) has three rules that
are easy to get wrong, and this module writes them down once:

- the device takes only QEMU's JSON syntax for its socket:
  ``-device '{"driver":"vfio-user-pci","socket":{"path":P,"type":"unix"}}'``
  (``socket=P`` in the key=value syntax is rejected);
- guest RAM must be shared with the server for it to map the fds QEMU sends:
  ``-object memory-backend-memfd,share=on`` and ``-machine memory-backend=``.
  Never ``share=off``: QEMU 11.1 then still sends the fd, of memory the guest
  never sees, and DMA is silently wrong.  With plain ``-m`` RAM (no backend)
  every DMA is a DMA_READ/DMA_WRITE message to QEMU: correct, but slower;
- with an Intel vIOMMU QEMU aborts at boot unless it has ``caching-mode=on``
  (so that it hears of every mapping and can forward it as DMA_MAP).

:func:`qemu_args` returns the options as an argv list; the command prints them
shell-quoted (``--json``: as a JSON list).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from pyvfio.errors import UsageError

__all__ = ["MEMORY_BACKEND_ID", "qemu_args", "register", "vfio_user_device_json"]

MEMORY_BACKEND_ID = "pyvfio-ram"
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")  # QEMU's id_wellformed()


def vfio_user_device_json(socket_path: str, *, device_id: str | None = None,
                          bus: str | None = None, addr: str | None = None) -> str:
    """The JSON ``-device`` value for one ``vfio-user-pci`` on ``socket_path``."""
    device: dict[str, Any] = {"driver": "vfio-user-pci",
                              "socket": {"path": socket_path, "type": "unix"}}
    if device_id is not None:
        if not _QEMU_ID.fullmatch(device_id):
            raise UsageError(f"device id {device_id!r}: QEMU ids start with a letter and hold "
                             "letters, digits, '-', '.' and '_'")
        device["id"] = device_id
    if bus is not None:
        device["bus"] = bus
    if addr is not None:
        device["addr"] = addr
    return json.dumps(device, separators=(",", ":"))


def qemu_args(sockets: Sequence[str], *, memory_mib: int | None = 1024,
              iommu: bool = False, ids: Sequence[str] = (), bus: str | None = None,
              addrs: Sequence[str] = ()) -> list[str]:
    """QEMU options for one ``vfio-user-pci`` per socket path.

    ``memory_mib`` sizes the shared memfd guest RAM (it must equal ``-m``);
    ``None`` leaves RAM alone (plain RAM: DMA by message).  ``iommu`` adds the
    Intel vIOMMU with ``caching-mode=on`` (the machine must be q35 with
    ``kernel-irqchip=split`` for its ``intremap=on``).  ``ids``/``addrs`` give
    each device a QEMU id / PCI address, in socket order.  Raises
    :class:`UsageError` for no socket, a socket path that is not absolute, or
    more ids or addresses than sockets.
    """
    if not sockets:
        raise UsageError("no socket: give the path of each device pyvfio serve listens on")
    for path in sockets:
        if not path.startswith("/"):
            raise UsageError(f"socket {path!r}: give an absolute path (QEMU resolves a "
                             "relative one against its own working directory)")
    if len(ids) > len(sockets) or len(addrs) > len(sockets):
        raise UsageError(f"{len(ids)} id(s) and {len(addrs)} address(es) for "
                         f"{len(sockets)} socket(s): at most one of each per socket")
    if memory_mib is not None and memory_mib < 1:
        raise UsageError(f"memory {memory_mib} MiB: give the guest's RAM size in MiB")
    argv: list[str] = []
    if memory_mib is not None:
        argv += ["-m", str(memory_mib),
                 "-object", f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={memory_mib}M,"
                            "share=on",
                 "-machine", f"memory-backend={MEMORY_BACKEND_ID}"]
    if iommu:
        # Before the devices it translates for.
        argv += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
    for n, path in enumerate(sockets):
        argv += ["-device", vfio_user_device_json(
            path, device_id=ids[n] if n < len(ids) else None, bus=bus,
            addr=addrs[n] if n < len(addrs) else None)]
    return argv


EPILOG = """\
examples:
  pyvfio qemu-args --socket /run/edu.sock
  pyvfio qemu-args --socket /run/edu.sock --memory 4096 --iommu
  qemu-system-x86_64 -M q35,kernel-irqchip=split ... $(pyvfio qemu-args --socket /run/edu.sock)
  pyvfio qemu-args --socket /run/a.sock --socket /run/b.sock --json

The RAM options (shared memfd) let the server map guest memory; --plain-ram
leaves them out, and then every DMA travels as a message through QEMU.
--memory must equal the guest's -m, which the output sets.

exit status: 0 printed, 2 bad arguments
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "qemu-args", help="print the QEMU options that attach a device pyvfio serve serves",
        description=textwrap.fill("Print the QEMU (>= 10.1) options that attach vfio-user devices: the "
        "vfio-user-pci device in QEMU's JSON syntax (one per --socket), guest RAM in a shared "
        "memfd (share=on) so the server can map it, and with --iommu the Intel vIOMMU with "
        "caching-mode=on, which vfio-user-pci requires.", 78),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", dest="sockets", action="append", default=[], metavar="PATH",
                        required=True, help="the socket pyvfio serve listens on (repeatable)")
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB",
                        help="guest RAM in MiB (default 1024); also sets -m")
    parser.add_argument("--plain-ram", action="store_true",
                        help="leave guest RAM alone: DMA goes as messages through QEMU")
    parser.add_argument("--iommu", action="store_true",
                        help="add -device intel-iommu with caching-mode=on")
    parser.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                        help="QEMU id of the device (repeatable, in --socket order)")
    parser.add_argument("--bus", metavar="BUS", help="QEMU bus for the devices (e.g. a "
                        "pcie-root-port's id)")
    parser.add_argument("--addr", dest="addrs", action="append", default=[], metavar="SLOT",
                        help="PCI slot[.fn] of the device (repeatable, in --socket order)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of arguments")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    argv = qemu_args(args.sockets, memory_mib=None if args.plain_ram else args.memory,
                     iommu=args.iommu, ids=args.ids, bus=args.bus, addrs=args.addrs)
    if args.json:
        json.dump(argv, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(shlex.join(argv))
    return 0
