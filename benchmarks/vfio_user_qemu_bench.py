#!/usr/bin/env python3
"""Guest-visible MMIO read rate: edu through vfio-user to pyvfio vs QEMU's built-in edu.

One guest on QEMU >= 10.1 (:mod:`pyvfio.testing.qemu`) has two edu devices:

* ``00:06.0`` -- ``vfio-user-pci`` on a socket of ``pyvfio serve edu`` on the
  host (options from ``pyvfio qemu-args``): each guest read of BAR0 traps into
  QEMU, which sends a REGION_READ message to the Python model and waits for
  the reply;
* ``00:07.0`` -- QEMU's own ``-device edu`` (C, in QEMU's process).

In the guest a small C program (``mmio_read.c``, compiled on the host and
run from the run share) mmaps each device's ``resource0`` and reads the ID
register (offset 0, checked to be 0x010000ed on every read) in a loop for
``--seconds``.  The devices take turns for ``--rounds`` rounds (so that load
from other processes hits both alike); the best round of each is reported,
with the ratio vfio-user/built-in.  Same guest, same run, same accelerator.

Usage: ``python benchmarks/vfio_user_qemu_bench.py [--rounds R] [--seconds S] [--json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pyvfio.testing import vmm

HERE = Path(__file__).resolve().parent
SERVED_BDF = vmm.slot_bdf(0)
BUILTIN_BDF = "0000:00:07.0"
EDU_ID = "0x010000ed"


def guest_script(rounds: int, seconds: float) -> str:
    return f"""
set -e
R=$PYVFIO_GUEST_OUT
for b in {SERVED_BDF} {BUILTIN_BDF}; do
  test "$(cat /sys/bus/pci/devices/$b/device)" = 0x11e8
  echo 1 > /sys/bus/pci/devices/$b/enable
done
for r in $(seq {rounds}); do
  for b in {SERVED_BDF} {BUILTIN_BDF}; do
    printf '{{"bdf": "%s", "round": %s, "result": ' $b $r
    $R/mmio_read /sys/bus/pci/devices/$b/resource0 {seconds} {EDU_ID} | tr -d '\\n'
    echo '}}'
  done
done
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--kernel", default="debian")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pyvfio-mmio-bench-"))
    try:
        run_dir = work / "run"
        (run_dir / "out").mkdir(parents=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(run_dir / "out/mmio_read"),
                        str(HERE / "mmio_read.c")], check=True)
        control, sock = work / "ctl.sock", work / "edu.sock"
        server = vmm.start_server(control, model="edu", sockets=[sock],
                                  stderr=work / "serve.log")
        try:
            vm = vmm.vfio_user_guest(args.kernel, [sock], extra=[
                "-device", f"edu,bus=pcie.0,addr={int(BUILTIN_BDF[8:10], 16):#x}"])
            result = vm.run(["sh", "-c", guest_script(args.rounds, args.seconds)],
                            timeout=600 + args.rounds * args.seconds * 4, run_dir=run_dir)
        finally:
            vmm.stop_server(server)
        if result.returncode != 0:
            print(result.output + result.console[-2000:], file=sys.stderr)
            return 1
        rows = [json.loads(line) for line in result.output.splitlines()
                if line.startswith('{"bdf"')]
        best = {bdf: max(r["result"]["per_second"] for r in rows if r["bdf"] == bdf)
                for bdf in (SERVED_BDF, BUILTIN_BDF)}
        report = {
            "accel": result.accel, "kernel": args.kernel, "rounds": args.rounds,
            "seconds_per_round": args.seconds,
            "vfio_user_pyvfio_reads_per_second": round(best[SERVED_BDF], 1),
            "builtin_edu_reads_per_second": round(best[BUILTIN_BDF], 1),
            "ratio": round(best[SERVED_BDF] / best[BUILTIN_BDF], 4),
            "rounds_detail": rows,
        }
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"guest MMIO reads of edu's ID register ({result.accel}, best of "
                  f"{args.rounds} x {args.seconds:g} s):")
            print(f"  vfio-user -> pyvfio serve edu : {best[SERVED_BDF]:12,.0f} /s")
            print(f"  QEMU built-in -device edu     : {best[BUILTIN_BDF]:12,.0f} /s")
            print(f"  ratio                         : {report['ratio']:.4f}")
        result.cleanup()
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
