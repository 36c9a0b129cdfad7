"""iommufd DMA map+unmap: pyvfio against C, and against the legacy type1 path,
in the same guest run.

    python benchmarks/iommufd_bench.py [--seconds S] [--rounds N] [--kernel pyvfio-6.12] [--json]

Boots the standard guest on a kernel with iommufd (:mod:`pyvfio.testing.guest`),
binds edu to vfio-pci and measures 4 KiB map+unmap pairs per second of one
memfd page at a fixed IOVA, with edu attached so every pair really programs
(and invalidates) the vIOMMU's page table:

- ``iommufd``: ``Ioas.map`` + ``Ioas.unmap`` (IOMMU_IOAS_MAP/UNMAP on the
  device's IOAS, device opened through its cdev), and
  ``benchmarks/iommufd_bench.c`` doing the same ioctls;
- ``type1``: ``Container.map`` + ``Container.unmap`` (VFIO_IOMMU_MAP/UNMAP_DMA
  through the legacy container), and the same C program in type1 mode.

Prints pyvfio/C for each path and iommufd/type1 for each language.  The
*floor* is the same loop in Python calling bare ``fcntl.ioctl`` on structs
built outside the loop: ``floor/C`` is what CPython itself costs,
``pyvfio/floor`` what pyvfio costs on top (goal, issue 11: >= 0.9 on both
paths).  The *function floor* (``fn``) puts each of those ioctls behind a
plain Python function that checks nothing, as a ``map``/``unmap`` method
must be called: where ``fn/floor`` is below the goal, no method API meets it,
and ``py/fn`` is what pyvfio's own checks cost.  The sides
alternate round by round and each keeps its best round, so all see the same
load on a shared machine (TCG where there is no hardware KVM: absolute rates
are small, ratios are the point).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Measure this checkout's pyvfio, whatever an editable install points at.
sys.path.insert(0, str(HERE.parent))
from inguest import bind_vfio, rate, type1_structs  # noqa: E402  (benchmarks/inguest.py)

GOAL = 0.9  # pyvfio/floor, both paths
IOVA = 0x100000
BATCH = 64


def measure_pyvfio(bdf: str, mode: str, seconds: float) -> float:
    from pyvfio.device import SharedMemory
    from pyvfio.kernel import open_device

    memory = SharedMemory(4096)
    try:
        with open_device(bdf, "iommufd" if mode == "iommufd" else "legacy") as dev:
            space = dev.dma
            assert space is not None
            dmap, dunmap = space.map, space.unmap

            def pairs() -> None:
                for _ in range(BATCH):
                    dmap(IOVA, memory)
                    dunmap(IOVA, 4096)

            return rate(pairs, BATCH, seconds)
    finally:
        memory.close()


def measure_floor(bdf: str, mode: str, seconds: float, functions: bool = False) -> float:
    """Bare ``fcntl.ioctl`` calls on prebuilt structs: the Python floor; with
    ``functions``, each behind a plain Python function (the function floor)."""
    import ctypes
    import fcntl

    from pyvfio.device import SharedMemory
    from pyvfio.kernel import KernelDevice, open_device
    from pyvfio.kernel.iommufd import Ioas
    from pyvfio.uapi import iommufd as U
    from pyvfio.uapi import vfio as V

    memory = SharedMemory(4096)
    try:
        with open_device(bdf, "iommufd" if mode == "iommufd" else "legacy") as dev:
            assert isinstance(dev, KernelDevice)
            space, ioctl = dev.dma, fcntl.ioctl
            m: ctypes.Structure
            u: ctypes.Structure
            if isinstance(space, Ioas):
                fd, map_req, unmap_req = space.iommufd.fd, U.IOMMU_IOAS_MAP, U.IOMMU_IOAS_UNMAP
                m = U.new(U.iommu_ioas_map, ioas_id=space.id, user_va=memory.address,
                          length=4096, iova=IOVA,
                          flags=int(U.IoasMapFlag.READABLE | U.IoasMapFlag.WRITEABLE
                                    | U.IoasMapFlag.FIXED_IOVA))
                u = U.new(U.iommu_ioas_unmap, ioas_id=space.id, iova=IOVA, length=4096)
            else:
                fd, map_req, unmap_req = (dev.fds()["container"], V.VFIO_IOMMU_MAP_DMA,
                                          V.VFIO_IOMMU_UNMAP_DMA)
                m, u = type1_structs(memory.address, IOVA, 4096)

            def pairs() -> None:
                for _ in range(BATCH):
                    ioctl(fd, map_req, m)
                    ioctl(fd, unmap_req, u)

            def map_fn(iova: int, memory: object) -> None:
                ioctl(fd, map_req, m)

            def unmap_fn(iova: int, size: int) -> None:
                ioctl(fd, unmap_req, u)

            def function_pairs() -> None:
                for _ in range(BATCH):
                    map_fn(IOVA, memory)
                    unmap_fn(IOVA, 4096)

            return rate(function_pairs if functions else pairs, BATCH, seconds)
    finally:
        memory.close()


def measure_function_floor(bdf: str, mode: str, seconds: float) -> float:
    return measure_floor(bdf, mode, seconds, functions=True)


def measure_c(bdf: str, mode: str, seconds: float) -> float:
    exe = Path("/tmp/pyvfio-iommufd-bench")
    if not exe.exists():
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "iommufd_bench.c")],
                       check=True)
    res = subprocess.run([str(exe), mode, bdf, str(seconds)], check=True, capture_output=True,
                         text=True)
    return float(json.loads(res.stdout)["map_unmap"])


def inside(seconds: float, rounds: int, as_json: bool) -> int:
    from pyvfio.testing.topology import EDU

    if not os.path.exists("/dev/iommu"):
        print(f"kernel {os.uname().release} has no iommufd (/dev/iommu): run with "
              "--kernel pyvfio-6.12", file=sys.stderr)
        return 2
    bind_vfio(EDU)
    best: dict[tuple[str, str], float] = {}
    for _round in range(rounds):
        for mode in ("iommufd", "type1"):
            for lang, measure in (("pyvfio", measure_pyvfio), ("floor", measure_floor),
                                  ("fn", measure_function_floor), ("c", measure_c)):
                rate = measure(EDU, mode, seconds)
                best[lang, mode] = max(best.get((lang, mode), 0.0), rate)

    by_lang = {lang: round(best[lang, "iommufd"] / best[lang, "type1"], 3)
               for lang in ("pyvfio", "c")}

    def over(a: str, b: str) -> dict[str, float]:
        return {mode: round(best[a, mode] / best[b, mode], 3) for mode in ("iommufd", "type1")}

    report = {
        "kernel": os.uname().release, "seconds_per_measure": seconds, "rounds": rounds,
        "pairs_per_s": {f"{lang}_{mode}": round(v, 1) for (lang, mode), v in best.items()},
        "pyvfio_over_c": over("pyvfio", "c"),
        "floor_over_c": over("floor", "c"),
        "pyvfio_over_floor": over("pyvfio", "floor"),
        "function_floor_over_floor": over("fn", "floor"),
        "pyvfio_over_function_floor": over("pyvfio", "fn"),
        "iommufd_over_type1": by_lang,
        "goal": GOAL, "met": all(v >= GOAL for v in over("pyvfio", "floor").values()),
    }
    out_dir = os.environ.get("PYVFIO_GUEST_OUT")
    if out_dir:
        Path(out_dir, "iommufd_bench.json").write_text(json.dumps(report, indent=2))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"kernel {report['kernel']}: 4 KiB map+unmap pairs per second, best of {rounds} "
              f"rounds of {seconds} s")
        print(f"{'path':<9} {'pyvfio/s':>10} {'floor/s':>10} {'fn/s':>10} {'C/s':>10} "
              f"{'pyvfio/C':>9} {'floor/C':>8} {'py/floor':>8} {'fn/floor':>8} {'py/fn':>6}")
        for mode in ("iommufd", "type1"):
            print(f"{mode:<9} {best['pyvfio', mode]:>10.1f} {best['floor', mode]:>10.1f} "
                  f"{best['fn', mode]:>10.1f} {best['c', mode]:>10.1f} "
                  f"{over('pyvfio', 'c')[mode]:>9.3f} {over('floor', 'c')[mode]:>8.3f} "
                  f"{over('pyvfio', 'floor')[mode]:>8.3f} {over('fn', 'floor')[mode]:>8.3f} "
                  f"{over('pyvfio', 'fn')[mode]:>6.3f}")
        print(f"iommufd/type1: pyvfio {by_lang['pyvfio']:.3f}, C {by_lang['c']:.3f}")
        print(f"goal pyvfio/floor >= {GOAL} on both paths: "
              f"{'met' if report['met'] else 'NOT MET'}")
    return 0 if report["met"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating pyvfio/C rounds")
    p.add_argument("--kernel", default="pyvfio-6.12", help="guest kernel with iommufd")
    p.add_argument("--json", action="store_true")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inside or os.environ.get("PYVFIO_GUEST") == "1":
        return inside(args.seconds, args.rounds, args.json)
    from pyvfio.testing.guest import run_script_in_guest

    inner = ["--inside", "--seconds", str(args.seconds), "--rounds", str(args.rounds)]
    return run_script_in_guest(__file__, inner + (["--json"] if args.json else []), args.kernel,
                               quiet=args.json)


if __name__ == "__main__":
    sys.exit(main())
