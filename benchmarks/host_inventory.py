#!/usr/bin/env python3
"""Host inventory speed: ``pyvfio ls --json`` and ``pyvfio groups --json``
against ``lspci -A linux-sysfs -O sysfs.path=DIR/sys/bus/pci -vmmnnk`` on the
same generated sysfs tree (pyvfio.testing.fakesysfs: devices with uevent,
config, resource, driver and iommu_group links, the system's pci.ids linked in).

Each command runs as its own process (interpreter start-up included for
pyvfio, as an operator would see it); the commands run interleaved and the
figure is the fastest of several runs (the least disturbed on a shared
machine), with the median beside it.  Before timing, the script checks that lspci really read the tree: it
must print one ``Slot:`` record per generated device.

    python3 benchmarks/host_inventory.py [--sizes 1000,2500,5000,10000] [--runs 5]

Output: per size, the median wall time of each command, the ratio
pyvfio/lspci (below 1.0 means pyvfio is faster) and microseconds per device
(flat across sizes means the cost grows linearly).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyvfio.pci.ids import PciIds
from pyvfio.testing.fakesysfs import FakeSysfs


def build_tree(directory: str, count: int) -> None:
    ids = PciIds.find("/")
    fake = FakeSysfs(directory, pci_ids=ids.path if ids else None, noiommu=False)
    fake.add_standard_drivers()
    fake.populate(count)


def run_once(cmd: list[str]) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False, timeout=300)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    return elapsed, proc.stdout


def timed_interleaved(cmds: list[list[str]], runs: int) -> list[tuple[float, float, bytes]]:
    """Run the commands in turn, ``runs`` rounds, so that load from other
    processes on a shared machine hits all of them alike.  Returns, per
    command, the fastest and the median time and the last output: the fastest
    run is the least disturbed one."""
    times: list[list[float]] = [[] for _ in cmds]
    outs: list[bytes] = [b""] * len(cmds)
    for _ in range(runs):
        for i, cmd in enumerate(cmds):
            t, outs[i] = run_once(cmd)
            times[i].append(t)
    return [(min(t), statistics.median(t), o) for t, o in zip(times, outs, strict=True)]


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
            (t_lspci, m_lspci, out_lspci), (t_ls, m_ls, out_ls), (t_groups, m_groups, _) = \
                timed_interleaved([lspci_cmd, ls_cmd, groups_cmd], args.runs)
            slots = out_lspci.count(b"\nSlot:") + out_lspci.startswith(b"Slot:")
            if slots != n:
                raise SystemExit(f"lspci read {slots} devices from {root}, expected {n}")
            if out_ls.count(b'"device": ') != n:
                raise SystemExit("pyvfio ls --json did not list every device")
            rows.append((n, t_lspci, t_ls, t_groups, m_lspci, m_ls, m_groups))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    startup, _, _ = timed_interleaved([[sys.executable, "-c", "import pyvfio.cli; pyvfio.cli.build_parser()"]],
                                      args.runs)[0]
    print(f"fastest of {args.runs} interleaved runs (median in brackets); "
          f"pyvfio start-up alone (import + parser): {startup:.3f} s")
    print(f"{'devices':>8} {'lspci s':>15} {'ls s':>15} {'groups s':>15} {'ls/lspci':>9} "
          f"{'groups/lspci':>13} {'lspci us/dev':>13} {'ls us/dev':>10} {'groups us/dev':>14}")
    for n, t_lspci, t_ls, t_groups, m_lspci, m_ls, m_groups in rows:
        print(f"{n:>8} {t_lspci:>6.3f} ({m_lspci:.3f}) {t_ls:>6.3f} ({m_ls:.3f}) "
              f"{t_groups:>6.3f} ({m_groups:.3f}) {t_ls / t_lspci:>9.2f} "
              f"{t_groups / t_lspci:>13.2f} {t_lspci / n * 1e6:>13.1f} {t_ls / n * 1e6:>10.1f} "
              f"{t_groups / n * 1e6:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
