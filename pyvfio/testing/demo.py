"""The main job: the whole story on a real kernel, step by step.

On the host, :func:`main` boots a guest (:mod:`pyvfio.testing.guest`, the
standard topology of :mod:`pyvfio.testing.topology`) and runs this module
inside it with ``--inside``; in the guest :func:`story` runs the steps, each
a real ``pyvfio`` command whose output is shown as it happens:

1. ``pyvfio ls``                      -- the devices, drivers and IOMMU groups
2. ``pyvfio check EDU``               -- edu is not ready: no vfio driver yet
3. ``pyvfio check EDU_BRIDGED``       -- its group is not viable: the e1000 beside it
4. ``pyvfio bind EDU``                -- edu to vfio-pci, recording how to undo it
5. ``pyvfio info EDU``                -- opened through VFIO: backend, regions, IRQs
6. ``python -m pyvfio.drivers.edu``   -- the userspace driver: DMA and interrupts
7. ``pyvfio restore EDU``             -- the original driver back

Then the full stack (act 2): on the host ``pyvfio serve --control`` serves an
edu device *written in Python* (:mod:`pyvfio.devices.edu`); ``pyvfio
qemu-args`` prints how to attach it; a second guest boots on QEMU >= 10.1
(:mod:`pyvfio.testing.qemu`) with a ``vfio-user-pci`` on that socket, and in
it the guest's own kernel enumerates the Python device, binds it to vfio-pci,
and pyvfio drives it over the guest's kernel VFIO (:func:`vfio_user_steps`).
``pyvfio demo --act kernel`` or ``--act vfio-user`` runs one act.

A step "passes" when its exit status is the expected one (``check`` is
expected to say no) and its output says what it should; the run exits
non-zero if any step did not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, cast

from pyvfio.testing.topology import E1000_BRIDGED, EDU, EDU_BRIDGED


@dataclass(frozen=True)
class DemoStep:
    title: str
    argv: tuple[str, ...]
    expect_rc: int
    expect_text: tuple[str, ...] = ()


def steps() -> list[DemoStep]:
    py = sys.executable
    cli = (py, "-m", "pyvfio")
    return [
        DemoStep("List the PCI devices, their drivers and IOMMU groups", (*cli, "ls"), 0,
                 ("1234:11e8",)),
        DemoStep("Check edu: not ready yet, it has no vfio driver", (*cli, "check", EDU), 1,
                 (EDU,)),
        DemoStep("Check the bridged edu: its group is not viable (the e1000 beside it)",
                 (*cli, "check", EDU_BRIDGED), 1, (E1000_BRIDGED, "e1000")),
        DemoStep("Bind edu to vfio-pci (recorded, so it can be restored)",
                 (*cli, "bind", EDU), 0, (EDU,)),
        DemoStep("Open edu through VFIO and show what the kernel reports",
                 (*cli, "info", EDU), 0, ("BAR0", "MSI")),
        DemoStep("Drive edu from Python: factorial, DMA through the IOMMU, MSI and INTx",
                 (py, "-m", "pyvfio.drivers.edu", EDU), 0, ("edu self-test: ok",)),
        DemoStep("Restore edu's original driver", (*cli, "restore", EDU), 0, (EDU,)),
    ]


def vfio_user_steps(bdf: str) -> list[DemoStep]:
    """Act 2, in the guest: the edu at ``bdf`` is the host's Python model over vfio-user."""
    py = sys.executable
    cli = (py, "-m", "pyvfio")
    return [
        DemoStep("The guest's kernel enumerated the Python device (1234:11e8, vfio-user-pci "
                 "in QEMU)", (*cli, "ls"), 0, ("1234:11e8", bdf)),
        DemoStep("Bind it to the guest's vfio-pci", (*cli, "bind", bdf), 0, (bdf,)),
        DemoStep("Open it through the guest's kernel VFIO", (*cli, "info", bdf), 0,
                 ("BAR0", "MSI")),
        DemoStep("Drive it: registers, DMA through the guest's IOMMU and QEMU to the Python "
                 "model, interrupts back", (py, "-m", "pyvfio.drivers.edu", bdf), 0,
                 ("edu self-test: ok",)),
        DemoStep("Give it back to no driver", (*cli, "restore", bdf), 0, (bdf,)),
    ]


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def story(selected: Sequence[DemoStep] | None = None) -> int:
    """Run the steps here (inside the guest); return the number that failed."""
    failed = 0
    results = []
    for n, step in enumerate(selected or steps(), 1):
        shown = " ".join(a if a != sys.executable else "python3" for a in step.argv)
        _banner(f"step {n}: {step.title}")
        print(f"$ {shown}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(list(step.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300)
        sys.stdout.write(proc.stdout)
        missing = [t for t in step.expect_text if t not in proc.stdout]
        ok = proc.returncode == step.expect_rc and not missing
        why = "" if ok else (f" (exit {proc.returncode}, expected {step.expect_rc}"
                             + (f"; output lacks {missing}" if missing else "") + ")")
        print(f"--> {'ok' if ok else 'FAILED'}: exit {proc.returncode} in "
              f"{time.monotonic() - t0:.1f} s{why}", flush=True)
        results.append((step.title, ok))
        failed += not ok
    _banner("summary")
    for title, ok in results:
        print(f"  [{'ok' if ok else 'FAIL':>4}] {title}")
    print(f"demo: {'every step passed' if not failed else f'{failed} step(s) failed'}",
          flush=True)
    return failed


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``pyvfio demo``: boot the guest and run :func:`story` in it (or, with
    ``--inside`` / in a guest, run the story right here)."""
    if isinstance(args, argparse.Namespace):
        kernel = getattr(args, "kernel", "debian")
        rest = list(getattr(args, "demo_args", []) or [])
        if getattr(args, "act", None):
            rest += ["--act", args.act]
    else:
        kernel, rest = "debian", list(args or [])
    inside = "--inside" in rest or os.environ.get("PYVFIO_GUEST") == "1"
    if inside:
        if "--vfio-user" in rest:
            return 1 if story(vfio_user_steps(rest[rest.index("--vfio-user") + 1])) else 0
        return 1 if story() else 0
    act = "all"
    if "--act" in rest and rest.index("--act") + 1 < len(rest):
        act = rest[rest.index("--act") + 1]
    if act not in ("all", "kernel", "vfio-user"):
        print(f"demo: --act {act!r}: use kernel, vfio-user or all", file=sys.stderr)
        return 2
    rc = act_kernel(kernel) if act != "vfio-user" else 0
    if act != "kernel":
        rc = rc or act_vfio_user(kernel)
    return rc


def act_vfio_user(kernel: str) -> int:
    """Act 2 on the host: serve the Python edu, boot a QEMU >= 10.1 guest with it."""
    import json
    import shlex
    import tempfile
    from pathlib import Path

    from pyvfio.testing import qemu, vmm
    from pyvfio.user.control import ControlClient

    _banner("act 2: a device written in Python, in a real VM, driven by the guest's kernel")
    provisioned = qemu.ensure_qemu()
    print(f"demo: QEMU {provisioned.version} ({provisioned.suite or 'system'}): "
          f"{provisioned.command}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pyvfio-demo-") as tmp:
        control, sock = Path(tmp) / "ctl.sock", Path(tmp) / "edu.sock"
        print(f"$ pyvfio serve edu --socket {sock} --control {control} &", flush=True)
        server = vmm.start_server(control, model="edu", sockets=[sock],
                                  stderr=Path(tmp) / "serve.log")
        try:
            args = vmm.attach_args([sock])
            print(f"$ pyvfio qemu-args --socket {sock} --iommu --addr 0x6\n"
                  f"{shlex.join(args)}", flush=True)
            vm = vmm.vfio_user_guest(kernel, [sock])
            with ControlClient(str(control)) as ctl:
                result = vm.run([sys.executable, "-m", "pyvfio.testing.demo", "--inside",
                                 "--vfio-user", vmm.slot_bdf(0)], timeout=900,
                                echo=cast(IO[str], _ConsoleFilter(sys.stdout)))
                gone = ctl.wait_event("CLIENT_DISCONNECTED", timeout=60)
                _banner("the server's side: its control socket's events, and the device now")
                print(f"$ pyvfio control {control} --monitor")
                for event in [*ctl.events, gone]:
                    print(json.dumps(event))
                devices = ctl.execute("query-devices")
            print(f"$ pyvfio control {control} query-devices\n{json.dumps(devices, indent=2)}")
        finally:
            vmm.stop_server(server)
    try:
        print(f"\ndemo: vfio-user guest ({result.accel}) booted in "
              f"{result.boot_seconds or 0:.1f} s, whole run {result.wall_seconds:.1f} s, "
              f"exit {result.returncode}")
        return result.returncode
    finally:
        result.cleanup()


def act_kernel(kernel: str) -> int:
    """Act 1 on the host: the standard topology, kernel VFIO."""
    from pyvfio.testing import guest, topology

    print(f"demo: booting a {kernel} kernel under QEMU (q35, Intel vIOMMU) with edu, a "
          "bridged edu + e1000, and an e1000e; the host's / is shared read-only", flush=True)
    vm = guest.Guest(guest.kernel_by_name(kernel), topology.standard())
    result = vm.run([sys.executable, "-m", "pyvfio.testing.demo", "--inside"], timeout=600,
                    echo=cast(IO[str], _ConsoleFilter(sys.stdout)))
    try:
        print(f"\ndemo: guest ({result.accel}) booted in {result.boot_seconds or 0:.1f} s, "
              f"whole run {result.wall_seconds:.1f} s, exit {result.returncode}")
        return result.returncode
    finally:
        result.cleanup()


class _ConsoleFilter:
    """Echo the guest console from the start marker on (the boot messages
    before it are noise for the demo)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.started = False
        self.ended = False

    def write(self, text: str) -> int:
        if not self.started or self.ended:
            self.started = self.started or "PYVFIO-GUEST-START" in text
            return len(text)
        if "PYVFIO-GUEST-EXIT" in text:
            self.ended = True
            return len(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
