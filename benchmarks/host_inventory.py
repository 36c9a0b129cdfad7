#!/usr/bin/env python3
"""Host inventory speed: ``pyvfio ls --json``, ``pyvfio groups --json`` and
the whole-host diagnosis ``pyvfio check --all --json`` against ``lspci -A linux-sysfs -O sysfs.path=DIR/sys/bus/pci -vmmnnk`` on the
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

# The pyvfio commands timed against lspci -vmmnnk.  `check --all` is the
# whole-host diagnosis of issue 11: every device, every group, every problem
# kind, including the host's uses (route tables, mountinfo, swaps: read once).
COMMANDS = {
    "ls": ["ls", "--json"],
    "groups": ["groups", "--json"],
    "check --all": ["check", "--all", "--json"],
}


def build_tree(directory: str, count: int) -> None:
    """``count`` devices, plus what a real host uses of them: every NIC has an
    interface, every fourth one an address and routes; every NVMe disk a
    namespace with a partition, every fourth one mounted, one swap; one
    device-mapper volume; a framebuffer on the first GPU.  So the whole-host
    diagnosis reads route tables, mountinfo and swaps of a realistic size."""
    ids = PciIds.find("/")
    fake = FakeSysfs(directory, pci_ids=ids.path if ids else None, noiommu=False)
    fake.add_standard_drivers()
    addresses = fake.populate(count)
    nics = disks = 0
    for address in addresses:
        dev = fake.devices[address]
        if dev.class_code >> 8 == 0x0200:
            iface = f"eth{nics}"
            fake.add_netdev(address, iface)
            if nics % 4 == 0:
                fake.add_ipv4_route(iface, f"10.{nics >> 8 & 255}.{nics & 255}.0", 24)
                fake.add_ipv6_address(iface, f"2001:db8::{nics:x}", 64)
            nics += 1
        elif dev.class_code >> 8 == 0x0108:
            disk = f"nvme{disks}n1"
            fake.add_block(address, disk, 2 * disks, subdir=f"nvme/nvme{disks}")
            fake.add_block(address, f"{disk}p1", 2 * disks + 1, parent=disk)
            if disks % 4 == 0:
                fake.add_mount(f"259:{2 * disks + 1}", f"/srv/d{disks}", f"/dev/{disk}p1")
            elif disks == 1:
                fake.add_swap(f"/dev/{disk}p1")
            elif disks == 2:
                fake.add_dm("dm-0", "vg0-lv0", 0, on=[f"{disk}p1"])
            disks += 1
        elif dev.class_code >> 8 == 0x0300 and not os.path.exists(fake.p("sys/class/graphics/fb0")):
            fake.set_boot_vga(address)
            fake.add_framebuffer(0, address)
    fake.add_ipv4_route("eth0", "0.0.0.0", 0, gateway="10.0.0.1")


def run_once(cmd: list[str], ok_codes: tuple[int, ...] = (0,)) -> tuple[float, float, bytes]:
    """Wall time and CPU time (user + system, from the child's rusage) of one
    run.  On a shared, loaded machine the wall time mostly measures the
    queue for a CPU; the CPU time measures the work done."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False, timeout=300)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in ok_codes:
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
            # `check` exits 1 when some device is not ready: that is an answer.
            wall, cpu, outs[i] = run_once(cmd, (0, 1) if "check" in cmd else (0,))
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
            cmds = [lspci_cmd, *([*pyvfio, "--root", root, *argv] for argv in COMMANDS.values())]
            timings = timed_interleaved(cmds, args.runs)
            lspci = timings[0]
            slots = lspci.out.count(b"\nSlot:") + lspci.out.startswith(b"Slot:")
            if slots != n:
                raise SystemExit(f"lspci read {slots} devices from {root}, expected {n}")
            by_name = dict(zip(COMMANDS, timings[1:], strict=True))
            if by_name["ls"].out.count(b'"device": ') != n:
                raise SystemExit("pyvfio ls --json did not list every device")
            diagnosed = by_name["check --all"].out.count(b'"best_driver": ')
            if diagnosed < n * 0.8 or b'"active-netdev"' not in by_name["check --all"].out:
                raise SystemExit(f"pyvfio check --all diagnosed {diagnosed} of {n} devices, "
                                 "or missed the host's uses")
            rows.append((n, lspci, by_name))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    startup = timed_interleaved([[sys.executable, "-c", "import pyvfio.cli; pyvfio.cli.build_parser(['ls'])"]],
                                args.runs)[0]
    print(f"{args.runs} interleaved runs per command; CPU = least user+system time of the runs, "
          f"wall = fastest run (median)")
    print(f"pyvfio start-up alone (interpreter, imports, parser): CPU {startup.cpu:.3f} s, "
          f"wall {startup.wall:.3f} s")
    names = list(COMMANDS)
    print(f"{'devices':>8} | {'lspci':>7} " + " ".join(f"{k:>12}" for k in names)
          + " | ratio to lspci: " + " ".join(f"{k:>12}" for k in names))
    for n, lspci, by_name in rows:
        for label, attr in (("CPU s", "cpu"), ("wall s", "wall")):
            base_t = getattr(lspci, attr)
            print(f"{n:>8} | {base_t:>7.3f} "
                  + " ".join(f"{getattr(by_name[k], attr):>12.3f}" for k in names)
                  + f" | {label:<15} " + " ".join(f"{getattr(by_name[k], attr) / base_t:>12.2f}" for k in names))
    if len(rows) >= 2:
        print("least-squares fit of CPU time, t = fixed + per_device * n:")
        ns = [r[0] for r in rows]
        fits = {}
        cpu_times = {"lspci": [r[1].cpu for r in rows]}
        for k in names:
            cpu_times[f"pyvfio {k}"] = [r[2][k].cpu for r in rows]
        for name, times in cpu_times.items():
            fixed, per_device = _fit(ns, times)
            fits[name] = per_device
            print(f"  {name:<20} fixed {fixed * 1e3:7.1f} ms   per device {per_device * 1e6:6.1f} us")
        for k in names:
            print(f"  per-device cost pyvfio {k} / lspci: {fits[f'pyvfio {k}'] / fits['lspci']:.2f}")
    return 0


def _fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Ordinary least squares: (intercept, slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


if __name__ == "__main__":
    sys.exit(main())
