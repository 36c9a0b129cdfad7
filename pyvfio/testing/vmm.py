"""Python devices in real VMs: ``pyvfio serve`` on the host, QEMU's vfio-user-pci in a guest.

The pieces the whole-stack tests (tests/vmm), the demo and the benchmark share:

- :func:`start_server` runs ``pyvfio serve ... --control PATH`` as a process
  and waits until its control socket answers;
- :func:`attach_args` asks ``pyvfio qemu-args --json`` (the command itself,
  so its output is what gets tested) for the QEMU options of the served devices;
- :func:`vfio_user_guest` builds a :class:`~pyvfio.testing.guest.Guest` on the
  provisioned QEMU >= 10.1 (:mod:`pyvfio.testing.qemu`) with those options.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pyvfio.errors import PyvfioError
from pyvfio.testing import guest, qemu
from pyvfio.user.control import ControlClient

# PCI slot on the root bus for the first served device (the harness uses 0x1c-0x1e).
FIRST_SLOT = 0x06


class ServerStartError(PyvfioError):
    """``pyvfio serve`` exited, or its control socket did not answer in time."""


def start_server(control: Path, *, model: str | None = None, sockets: Sequence[Path] = (),
                 options: Sequence[str] = (), timeout: float = 60.0,
                 stderr: Path | None = None) -> subprocess.Popen[bytes]:
    """Run ``pyvfio serve [MODEL --socket S...] --control CONTROL`` in the
    background; return the process once the control socket answers."""
    argv = [sys.executable, "-m", "pyvfio", "serve"]
    if model:
        argv.append(model)
    for path in sockets:
        argv += ["--socket", str(path)]
    argv += [*options, "--control", str(control)]
    log = open(stderr, "wb") if stderr is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    finally:
        if stderr is not None:
            log.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = stderr.read_text(errors="replace") if stderr is not None else ""
            raise ServerStartError(f"pyvfio serve exited {proc.returncode}: {text.strip()}")
        try:
            with ControlClient(str(control), timeout=5) as ctl:
                ctl.execute("query-version")
            return proc
        except OSError:
            time.sleep(0.1)
    stop_server(proc)
    raise ServerStartError(f"pyvfio serve: no control socket at {control} after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; return the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def attach_args(sockets: Sequence[Path], *, plain_ram: bool = False, memory_mib: int = 1024,
                addrs: Sequence[str] = ()) -> list[str]:
    """``pyvfio qemu-args --json`` for ``sockets`` with an Intel vIOMMU; each
    device at root-bus slot :data:`FIRST_SLOT` + n unless ``addrs`` says otherwise."""
    argv = [sys.executable, "-m", "pyvfio", "qemu-args", "--iommu", "--json",
            "--memory", str(memory_mib)]
    if plain_ram:
        argv.append("--plain-ram")
    for n, path in enumerate(sockets):
        argv += ["--socket", str(path),
                 "--addr", addrs[n] if n < len(addrs) else f"{FIRST_SLOT + n:#x}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise PyvfioError(f"pyvfio qemu-args failed ({out.returncode}): {out.stderr.strip()}")
    args = json.loads(out.stdout)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    return args


def slot_bdf(n: int = 0) -> str:
    """The guest BDF of the n-th device placed by :func:`attach_args`."""
    return f"0000:00:{FIRST_SLOT + n:02x}.0"


def vfio_user_guest(kernel: str, sockets: Sequence[Path], *, plain_ram: bool = False,
                    memory_mib: int = 1024, extra: Sequence[str] = (), smp: int = 1,
                    qmp: Path | None = None) -> guest.Guest:
    """A guest on QEMU >= 10.1 with one vfio-user-pci per socket (no standard topology;
    ``extra`` adds QEMU options, e.g. ``-device edu`` to compare with)."""
    provisioned = qemu.ensure_qemu()
    args = attach_args(sockets, plain_ram=plain_ram, memory_mib=memory_mib) if sockets else []
    return guest.Guest(guest.kernel_by_name(kernel), [*args, *extra], qemu=provisioned.command,
                       iommu_caching_mode=True, memory_mib=memory_mib, smp=smp, qmp=qmp)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
