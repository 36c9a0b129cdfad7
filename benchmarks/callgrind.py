#!/usr/bin/env python3
"""Instruction counts of pyvfio's hot paths, a measure machine noise cannot move.

    python benchmarks/callgrind.py [--n N] [--case NAME ...] [--json]

Each case runs under ``valgrind --tool=callgrind`` twice, once doing its
operation N times and once 2N times, in otherwise identical processes; the
difference of the two totals over N is the instructions one operation costs,
with interpreter start-up, imports and set-up cancelled out.  Counts are
repeatable for the same binaries and inputs whatever else the machine is
doing, so a regression shows even on a loaded machine where timings do not
(docs/testing.md has the figures).

Cases (the host-side hot paths; the kernel's own cost is not in them):

- ``mmio_read32`` / ``mmio_u32`` / ``mmio_floor``: a 4-byte register read
  through ``MappedRegion.read32``, through the typed view ``u32[i]``, and
  through a bare ``memoryview`` cast (the floor), over an anonymous mapping;
- ``pread_read32`` / ``pread_fn`` / ``pread_floor``: the kernel backend's
  ``read32`` closure (``KernelDevice._region_int_accessors``) over a memfd, a
  plain function that returns ``struct`` unpack of the ``os.pread`` (the least
  an int-returning function costs: the *function floor*), and bare ``os.pread``;
- ``dma_map_unmap`` / ``dma_fn`` / ``dma_floor``: ``Ioas.map`` + ``Ioas.unmap``
  of a 4 KiB buffer with the ioctl replaced by a C call that does nothing
  (``slice``), the same stand-in behind two plain functions, and called bare:
  what pyvfio's map/unmap costs in Python, beside the function floor;
- ``server_region_read``: ``pyvfio serve edu`` answering a 4-byte REGION_READ
  from the C client (``vfio_user_client.c``), against ``c_echo_region_read``,
  the C echo server (``vfio_user_echo.c``) answering the same client;
- ``client_read32``: pyvfio's client ``bar(0).read32(0)`` against the C echo
  server (the client side only), against ``c_client_read32``;
- ``py_floor_server`` / ``py_floor_client``: the Python floors of those two:
  a bare loop of ``recvmsg`` + ``sendall`` of the reply (answering the C
  client), and of ``os.write`` + ``os.read`` on the socket's fd (against the
  C echo server);
- ``host_diagnosis``: diagnosing every device of a generated sysfs tree, per
  device (``pyvfio.host.diagnosis.diagnose_many``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's pyvfio
sys.path.insert(0, str(HERE))

_COLLECTED = re.compile(rb"Collected : (\d+)")


def _valgrind(argv: list[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv]


# The same hash seed in every run: set and dict layouts (and so instruction
# counts) otherwise differ from process to process.
os.environ["PYTHONHASHSEED"] = "0"


def _collected(stderr: bytes) -> int:
    found = _COLLECTED.findall(stderr)
    if not found:
        raise RuntimeError(f"no callgrind total in: {stderr.decode(errors='replace')[-2000:]}")
    return int(found[-1])


# ---- in-process cases: run as `callgrind.py --run CASE N` under valgrind ----

def _mmio(n: int, how: str) -> None:
    from pyvfio.device import MappedRegion

    mapping = mmap.mmap(-1, 4096)
    region: Any = None  # MappedRegion only keeps it
    m = MappedRegion(region, 0, mapping)
    read32, u32, floor = m.read32, m.u32, memoryview(mapping).cast("I")
    if how == "read32":
        for _ in range(n):
            read32(0)
    elif how == "u32":
        for _ in range(n):
            u32[0]
    else:
        for _ in range(n):
            floor[0]


def _pread(n: int, how: str) -> None:
    from types import SimpleNamespace

    from pyvfio.device import RegionFlag, RegionInfo
    from pyvfio.kernel.device import KernelDevice

    fd = os.memfd_create("bench")
    os.ftruncate(fd, 4096)
    if how == "read32":
        fake: Any = SimpleNamespace(fd=fd, target="bench", name="bench")
        info = RegionInfo(0, RegionFlag.READ | RegionFlag.WRITE, 4096)
        read32 = KernelDevice._region_int_accessors(fake, info)[4][0]
        for _ in range(n):
            read32(0)
    elif how == "fn":
        pread, unpack = os.pread, struct.Struct("<I").unpack

        def read32_fn(offset: int) -> int:
            return unpack(pread(fd, 4, offset))[0]

        for _ in range(n):
            read32_fn(0)
    else:
        pread = os.pread
        for _ in range(n):
            pread(fd, 4, 0)


def _dma(n: int, how: str) -> None:
    import pyvfio.kernel.iommufd.ioas as ioas_module
    from pyvfio.device import SharedMemory
    from pyvfio.kernel.iommufd import Ioas, Iommufd

    ioctl: Any = slice  # a C call that takes (fd, request, arg) and does nothing
    ioas_module._fcntl_ioctl = ioctl
    r, _w = os.pipe()
    ioas = Ioas(Iommufd(r), 9, owned=False)
    memory = SharedMemory(4096)
    if how == "pyvfio":
        dmap, dunmap = ioas.map, ioas.unmap
        for _ in range(n):
            dmap(0x100000, memory)
            dunmap(0x100000, 4096)
        return
    m, u = object(), object()

    def map_fn(iova: int, memory: SharedMemory) -> None:
        ioctl(r, 1, m)

    def unmap_fn(iova: int, size: int) -> None:
        ioctl(r, 2, u)

    if how == "fn":
        for _ in range(n):
            map_fn(0x100000, memory)
            unmap_fn(0x100000, 4096)
    else:
        for _ in range(n):
            ioctl(r, 1, m)
            ioctl(r, 2, u)


def _diagnosis(n: int) -> None:
    from host_inventory import build_tree  # benchmarks/host_inventory.py

    from pyvfio.host.diagnosis import diagnose_many
    from pyvfio.host.model import Host

    with tempfile.TemporaryDirectory() as tmp:
        build_tree(tmp, n)
        host = Host(tmp)
        diagnose_many(host, [d.address for d in host.devices()])


IN_PROCESS: dict[str, Callable[[int], None]] = {
    "mmio_read32": lambda n: _mmio(n, "read32"),
    "mmio_u32": lambda n: _mmio(n, "u32"),
    "mmio_floor": lambda n: _mmio(n, "floor"),
    "pread_read32": lambda n: _pread(n, "read32"),
    "pread_fn": lambda n: _pread(n, "fn"),
    "pread_floor": lambda n: _pread(n, "floor"),
    "dma_map_unmap": lambda n: _dma(n, "pyvfio"),
    "dma_fn": lambda n: _dma(n, "fn"),
    "dma_floor": lambda n: _dma(n, "floor"),
    "host_diagnosis": _diagnosis,
}
# host_diagnosis builds a tree of N devices: its unit is a device, and N is scaled down.
SCALE = {"host_diagnosis": 0.01}


def run_in_process(case: str, n: int) -> int:
    res = subprocess.run(_valgrind([sys.executable, __file__, "--run", case, str(n)]),
                         capture_output=True, timeout=1800)
    if res.returncode:
        raise RuntimeError(f"{case} failed: {res.stderr.decode(errors='replace')[-2000:]}")
    return _collected(res.stderr)


# ---- vfio-user cases: a server and a client process, one of them under valgrind ----

def _wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no socket at {path}")
        time.sleep(0.1)
    time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    proc.terminate()
    try:
        _out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    return err or b""


def run_pair(case: str, n: int) -> int:
    from vfio_user_bench import build  # benchmarks/vfio_user_bench.py

    echo, client = build("vfio_user_echo"), build("vfio_user_client")
    with tempfile.TemporaryDirectory(prefix="pyvfio-cg-") as tmp:
        sock = f"{tmp}/s.sock"
        if case in ("server_region_read", "c_echo_region_read", "py_floor_server"):
            server_argv = {
                "server_region_read": [sys.executable, "-m", "pyvfio", "serve", "edu",
                                       "--socket", sock],
                "c_echo_region_read": [str(echo), sock],
                "py_floor_server": [sys.executable, __file__, "--run-floor-server", sock],
            }[case]
            proc = subprocess.Popen(_valgrind(server_argv), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            _wait_socket(sock, proc)
            subprocess.run([str(client), sock, str(n)], check=True, capture_output=True,
                           timeout=1800)
            return _collected(_stop(proc))
        proc = subprocess.Popen([str(echo), sock], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            _wait_socket(sock, proc)
            argv = {"client_read32": [sys.executable, __file__, "--run-client", sock, str(n)],
                    "py_floor_client": [sys.executable, __file__, "--run-floor-client", sock,
                                        str(n)],
                    }.get(case, [str(client), sock, str(n)])
            res = subprocess.run(_valgrind(argv), capture_output=True, timeout=1800)
            if res.returncode:
                raise RuntimeError(res.stderr.decode(errors="replace")[-2000:])
            return _collected(res.stderr)
        finally:
            _stop(proc)


def _client_loop(path: str, n: int) -> None:
    from pyvfio.user.client import connect

    with connect(path) as dev:
        read32 = dev.bar(0).read32
        for _ in range(n):
            read32(0)


def _floor_server(path: str) -> None:
    from vfu_floor import serve  # benchmarks/vfu_floor.py

    serve(path, connections=1)


def _floor_client(path: str, n: int) -> None:
    from vfu_floor import client  # benchmarks/vfu_floor.py

    client(path, n)


PAIRS = ("server_region_read", "c_echo_region_read", "py_floor_server", "client_read32",
         "c_client_read32", "py_floor_client")
CASES = (*IN_PROCESS, *PAIRS)


def per_op(case: str, n: int) -> float:
    n = max(1, int(n * SCALE.get(case, 1)))
    measure = run_pair if case in PAIRS else run_in_process
    return (measure(case, 2 * n) - measure(case, n)) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="operations in the shorter run")
    ap.add_argument("--case", action="append", choices=CASES, help="only these (repeatable)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--run-client", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--run-floor-server", help=argparse.SUPPRESS)
    ap.add_argument("--run-floor-client", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run:
        IN_PROCESS[args.run[0]](int(args.run[1]))
        return 0
    if args.run_client:
        _client_loop(args.run_client[0], int(args.run_client[1]))
        return 0
    if args.run_floor_server:
        _floor_server(args.run_floor_server)
        return 0
    if args.run_floor_client:
        _floor_client(args.run_floor_client[0], int(args.run_floor_client[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("needs valgrind (Debian package valgrind)", file=sys.stderr)
        return 2
    results = {case: round(per_op(case, args.n)) for case in (args.case or CASES)}
    ratios = {}
    for a, b in (("mmio_u32", "mmio_floor"), ("mmio_read32", "mmio_floor"),
                 ("pread_read32", "pread_floor"), ("pread_fn", "pread_floor"),
                 ("pread_read32", "pread_fn"), ("dma_map_unmap", "dma_floor"),
                 ("dma_fn", "dma_floor"), ("dma_map_unmap", "dma_fn"),
                 ("server_region_read", "c_echo_region_read"),
                 ("py_floor_server", "c_echo_region_read"),
                 ("server_region_read", "py_floor_server"),
                 ("client_read32", "c_client_read32"), ("py_floor_client", "c_client_read32"),
                 ("client_read32", "py_floor_client")):
        if a in results and b in results and results[b]:
            ratios[f"{a}/{b}"] = round(results[a] / results[b], 2)
    if args.json:
        print(json.dumps({"n": args.n, "instructions_per_op": results, "ratios": ratios},
                         indent=2))
        return 0
    print(f"instructions per operation (callgrind, (Ir(2N) - Ir(N)) / N, N = {args.n}):")
    for case, count in results.items():
        unit = "per device" if case in SCALE else "per op"
        print(f"  {case:22s} {count:>10,} {unit}")
    for name, ratio in ratios.items():
        print(f"  {name:40s} {ratio:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
