#!/usr/bin/env python3
"""Host inventory speed: ``pyvfio ls --json`` and ``pyvfio groups --json``
against ``lspci -A linux-sysfs -O sysfs.path=DIR/sys/bus/pci -vmmnnk`` on the
same generated sysfs tree (pyvfio.testing.fakesysfs: devices with uevent,
config, resource, driver and iommu_group links, the system's pci.ids linked in).

Each command runs as its own process (interpreter start-up included for
pyvfio, as an operator would see it); the commands run interleaved, several
rounds.  Two figures per command: CPU time (user + system of the child, the
least of the runs), which is what the work costs and holds still on a shared
machine, and wall time (fastest run, median in brackets).  Before timing, the script checks that lspci really read the tree: it
must print one ``Slot:`` record per generated device.

    python3 benchmarks/host_inventory.py [--sizes 1000,2500,5000,10000] [--runs 5]

Output: per size, the wall time of each command, the ratio pyvfio/lspci
(below 1.0 means pyvfio is faster) and microseconds per device; then a
straight-line fit over the sizes, t = fixed + per_device * n, for each tool:
a good fit with a constant per-device cost is linear growth, and the fixed
part is process start-up (for pyvfio: the interpreter and imports).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyvfio.pci.ids import PciIds
from pyvfio.testing.fakesysfs import FakeSysfs


def build_tree(directory: str, count: int) -> None:
    ids = PciIds.find("/")
    fake = FakeSysfs(directory, pci_ids=ids.path if ids else None, noiommu=False)
    fake.add_standard_drivers()
    fake.populate(count)


def run_once(cmd: list[str]) -> tuple[float, float, bytes]:
    """Wall time and CPU time (user + system, from the child's rusage) of one
    run.  On a shared, loaded machine the wall time mostly measures the
    queue for a CPU; the CPU time measures the work done."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False, timeout=300)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, proc.stdout


@dataclass
class Timing:
    wall: float  # fastest run
    cpu: float  # least CPU of the runs
    wall_median: float
    out: bytes


def timed_interleaved(cmds: list[list[str]], runs: int) -> list[Timing]:
    """Run the commands in turn, ``runs`` rounds, so that load from other
    processes hits all of them alike; keep the least disturbed run."""
    walls: list[list[float]] = [[] for _ in cmds]
    cpus: list[list[float]] = [[] for _ in cmds]
    outs: list[bytes] = [b""] * len(cmds)
    for _ in range(runs):
        for i, cmd in enumerate(cmds):
            wall, cpu, outs[i] = run_once(cmd)
            walls[i].append(wall)
            cpus[i].append(cpu)
    return [Timing(min(w), min(c), statistics.median(w), o)
            for w, c, o in zip(walls, cpus, outs, strict=True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,2500,5000,10000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", metavar="DIR", help="build the trees under DIR and keep them")
    args = ap.parse_args()
    if shutil.which("lspci") is None:
        raise SystemExit("lspci (pciutils) is not installed")
    sizes = [int(s) for s in args.sizes.split(",")]
    base = args.keep or tempfile.mkdtemp(prefix="pyvfio-bench-")
    pyvfio = [sys.executable, "-m", "pyvfio"]
    rows = []
    try:
        for n in sizes:
            root = os.path.join(base, f"tree-{n}")
            if not os.path.isdir(os.path.join(root, "sys")):
                t0 = time.perf_counter()
                build_tree(root, n)
                print(f"built {n} devices in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            lspci_cmd = ["lspci", "-A", "linux-sysfs", "-O", f"sysfs.path={root}/sys/bus/pci", "-vmmnnk"]
            ls_cmd = [*pyvfio, "--root", root, "ls", "--json"]
            groups_cmd = [*pyvfio, "--root", root, "groups", "--json"]
            lspci, ls, groups = timed_interleaved([lspci_cmd, ls_cmd, groups_cmd], args.runs)
            slots = lspci.out.count(b"\nSlot:") + lspci.out.startswith(b"Slot:")
            if slots != n:
                raise SystemExit(f"lspci read {slots} devices from {root}, expected {n}")
            if ls.out.count(b'"device": ') != n:
                raise SystemExit("pyvfio ls --json did not list every device")
            rows.append((n, lspci, ls, groups))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    startup = timed_interleaved([[sys.executable, "-c", "import pyvfio.cli; pyvfio.cli.build_parser(['ls'])"]],
                                args.runs)[0]
    print(f"{args.runs} interleaved runs per command; CPU = least user+system time of the runs, "
          f"wall = fastest run (median)")
    print(f"pyvfio start-up alone (interpreter, imports, parser): CPU {startup.cpu:.3f} s, "
          f"wall {startup.wall:.3f} s")
    print(f"{'devices':>8} | {'CPU s: lspci':>12} {'ls':>6} {'groups':>6} | {'ls/lspci':>8} "
          f"{'groups/lspci':>12} | {'wall s: lspci':>20} {'ls':>15} {'groups':>15} | "
          f"{'ls/lspci':>8} {'groups/lspci':>12}")
    for n, lspci, ls, groups in rows:
        print(f"{n:>8} | {lspci.cpu:>12.3f} {ls.cpu:>6.3f} {groups.cpu:>6.3f} | "
              f"{ls.cpu / lspci.cpu:>8.2f} {groups.cpu / lspci.cpu:>12.2f} | "
              f"{lspci.wall:>12.3f} ({lspci.wall_median:.3f}) {ls.wall:>6.3f} ({ls.wall_median:.3f}) "
              f"{groups.wall:>6.3f} ({groups.wall_median:.3f}) | "
              f"{ls.wall / lspci.wall:>8.2f} {groups.wall / lspci.wall:>12.2f}")
    if len(rows) >= 2:
        print("least-squares fit of CPU time, t = fixed + per_device * n:")
        ns = [r[0] for r in rows]
        fits = {}
        cpu_times = {"lspci": [r[1].cpu for r in rows], "pyvfio ls": [r[2].cpu for r in rows],
                     "pyvfio groups": [r[3].cpu for r in rows]}
        for name, times in cpu_times.items():
            fixed, per_device = _fit(ns, times)
            fits[name] = per_device
            print(f"  {name:<14} fixed {fixed * 1e3:7.1f} ms   per device {per_device * 1e6:6.1f} us")
        for name in ("pyvfio ls", "pyvfio groups"):
            print(f"  per-device cost {name} / lspci: {fits[name] / fits['lspci']:.2f}")
    return 0


def _fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Ordinary least squares: (intercept, slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


if __name__ == "__main__":
    sys.exit(main())
