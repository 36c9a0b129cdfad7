"""Helpers shared by the kernel guest tests (tests/guest/test_kernel_*.py).

They run inside a guest with the standard topology
(:mod:`pyvfio.testing.topology`); ``vfio_bound`` binds a device to vfio-pci
for one test and puts its boot driver back afterwards, so tests do not
depend on each other's order.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator


def current_driver(bdf: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/driver"))
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def vfio_bound(bdf: str) -> Iterator[str]:
    """Bind ``bdf`` to vfio-pci (through pyvfio.host when it is there, else by
    sysfs) and restore its original driver on exit."""
    original = current_driver(bdf)
    if original == "vfio-pci":
        yield bdf
        return
    try:
        from pyvfio.host import bind, restore
    except ImportError:
        bind = restore = None  # type: ignore[assignment]
    if bind is not None:
        bind([bdf], driver="vfio-pci")
        try:
            yield bdf
        finally:
            restore([bdf])
        return
    base = f"/sys/bus/pci/devices/{bdf}"
    if original:
        _write(f"{base}/driver/unbind", bdf)
    _write(f"{base}/driver_override", "vfio-pci")
    _write("/sys/bus/pci/drivers_probe", bdf)
    try:
        yield bdf
    finally:
        _write(f"{base}/driver/unbind", bdf)
        _write(f"{base}/driver_override", "\n")
        if original:
            _write(f"/sys/bus/pci/drivers/{original}/bind", bdf)


def send_fds_to_child(code: str, fds: dict[str, int]) -> subprocess.Popen[str]:
    """Start ``python -c code SOCKFD`` and send it ``fds`` over SCM_RIGHTS, with
    their names as a JSON list in the same message (what the children in the
    fd-passing tests expect).  The caller still owns and closes its copies."""
    parent, child = socket.socketpair()
    with parent, child:
        proc = subprocess.Popen([sys.executable, "-c", code, str(child.fileno())],
                                pass_fds=[child.fileno()], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        names = list(fds)
        socket.send_fds(parent, [json.dumps(names).encode()], [fds[n] for n in names])
    return proc
