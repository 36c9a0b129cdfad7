#!/usr/bin/env python3
"""vfio-user benchmarks: pyvfio's server, client and DMA against C baselines.

Everything runs pinned to one CPU (this process with ``os.sched_setaffinity``,
the others under ``taskset -c``): on these VMs a wake-up across CPUs costs
about 50 us and would hide everything else.  The C programs beside this file
are compiled with gcc into a cache directory on first use.

Measured in one run:

* server: 4-byte REGION_READ round trips per second from the C client
  (``vfio_user_client.c``) against ``pyvfio serve edu`` (BAR0 offset 0, the
  edu ID register) and against the C echo server (``vfio_user_echo.c``,
  which does no work).  Goal: pyvfio >= 0.85x the C echo rate.
* client: the pyvfio client (``dev.bar(0).read32(0)`` through the Device API)
  against the C echo server, and the C client against it.  Goal: >= 0.85x.
* DMA: a model reading client memory through a mapped fd
  (``pyvfio.user.dma.DmaTable.readinto`` over a memfd the "client" filled,
  mmapped as the server maps DMA_MAP fds) against ``memmove`` of the same
  sizes between two buffers through ctypes.  Goal: >= 0.8x.

* the Python floors (``vfu_floor.py``): a bare Python server (``recvmsg``,
  one unpack, ``sendall``) answering the C client, and a bare Python client
  (``sendall`` + ``recvmsg``) against the C echo server.  Their ratios are
  what Python itself reaches here: a goal above them is out of any Python
  code's reach.

Round trips are measured in interleaved rounds (every variant once per round)
and the median is reported; each ratio is the median of the per-round ratios.

Usage: ``python benchmarks/vfio_user_bench.py [--iterations N] [--rounds R] [--json]``
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Measure this checkout's pyvfio, whatever an editable install points at.
sys.path.insert(0, str(HERE.parent))
CPU = 0


def build(name: str) -> Path:
    """Compile ``HERE/name.c`` with gcc -O2 into the cache (keyed by source hash)."""
    src = HERE / f"{name}.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyvfio-bench"
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / f"{name}-{digest}"
    if not exe.exists():
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
        tmp.rename(exe)
    return exe


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(CPU), *cmd]


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err.strip()}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no server at {path} after {timeout}s")


@contextmanager
def server(cmd: list[str], path: str) -> Iterator[None]:
    proc = subprocess.Popen(pinned(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_socket(path, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def floor_client(path: str, iterations: int) -> float:
    from vfu_floor import client  # benchmarks/vfu_floor.py

    return client(path, iterations)


def c_client_rate(client: Path, path: str, iterations: int) -> float:
    out = subprocess.run(pinned([str(client), path, str(iterations)]), check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return float(json.loads(out)["rate"])


def py_client_rate(path: str, iterations: int) -> float:
    """Round trips/s of ``dev.bar(0).read32(0)`` through the Device API."""
    from pyvfio.user.client import connect

    with connect(path) as dev:
        read32 = dev.bar(0).read32
        for _ in range(iterations // 10 + 1):
            read32(0)
        start = time.perf_counter()
        for _ in range(iterations):
            read32(0)
        return iterations / (time.perf_counter() - start)


class _InstantServer:
    """A socket stand-in, and stand-ins for the client's ``os.write`` and
    ``os.read`` of its fd, whose 'server' answers every REGION_READ at once
    in this thread: timing the client over them measures the client's own
    Python cost per call, free of scheduling noise."""

    def __init__(self) -> None:
        from pyvfio.user.protocol import HEADER, REGION_ACCESS

        self._header, self._access = HEADER, REGION_ACCESS
        self._last = b""

    def write(self, fd: int, data: bytes) -> int:
        self._last = data
        return len(data)

    def read(self, fd: int, size: int) -> bytes:
        msg_id = int.from_bytes(self._last[:2], "little")
        payload = self._last[16:32] + b"\xed" * self._access.unpack_from(self._last, 16)[2]
        return self._header.pack(msg_id, 9, 16 + len(payload), 1, 0) + payload

    # The socket itself, for the reader (the first call, before the fast
    # path knows the reader idle) and the connection.
    def sendall(self, data: bytes) -> None:
        self.write(-1, data)

    def recvmsg(self, bufsize: int, ancbufsize: int, flags: int) -> tuple[bytes, list[Any], int, None]:
        return self.read(-1, bufsize), [], 0, None

    def fileno(self) -> int:
        return -1

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


def py_client_cost_us(iterations: int) -> float:
    """Microseconds of Python per ``read32`` in the client, the socket taken out."""
    from pyvfio.device import DeviceFlag, DeviceInfo, Region, RegionFlag, RegionInfo
    from pyvfio.user.client import VfioUserDevice, connection
    from pyvfio.user.protocol import Capabilities, MessageReader

    sock: Any = _InstantServer()
    saved = connection._write, connection._read
    connection._write, connection._read = sock.write, sock.read
    try:
        dev = VfioUserDevice("instant", sock, MessageReader(sock), (0, 2), Capabilities(),
                             timeout=None, share_dma_fds=True, twin=None)
        dev._info = DeviceInfo(DeviceFlag.PCI, 9, 0)
        dev._regions[0] = Region(dev, RegionInfo(0, RegionFlag.READ | RegionFlag.WRITE, 0x1000))
        read32 = dev.bar(0).read32
        for _ in range(1000):
            read32(0)
        start = time.perf_counter()
        for _ in range(iterations):
            read32(0)
        return (time.perf_counter() - start) / iterations * 1e6
    finally:
        connection._write, connection._read = saved


def dma_rates(total: int, chunk: int, rounds: int) -> tuple[float, float]:
    """Bytes/s of DmaTable.readinto over an fd-mapped window, and of memmove."""
    from pyvfio.device import SharedMemory
    from pyvfio.user.dma import DmaTable
    from pyvfio.user.protocol import DmaMapFlag

    client = SharedMemory(total, "bench-client")
    try:
        client.view[:] = os.urandom(1 << 20) * (total >> 20)
        table = DmaTable()
        table.add(0x100000, total, DmaMapFlag.READ | DmaMapFlag.WRITE, client.fd, 0)
        dst = bytearray(chunk)
        dst_addr = ctypes.addressof((ctypes.c_char * chunk).from_buffer(dst))
        src_addr = client.address

        def model() -> None:
            for off in range(0, total, chunk):
                table.readinto(0x100000 + off, dst)

        def memcpy() -> None:
            for off in range(0, total, chunk):
                ctypes.memmove(dst_addr, src_addr + off, chunk)

        best = {"model": 0.0, "memcpy": 0.0}
        for fn in (model, memcpy):  # warm up page tables and caches
            fn()
        for _ in range(rounds):
            for name, fn in (("model", model), ("memcpy", memcpy)):
                start = time.perf_counter()
                fn()
                best[name] = max(best[name], total / (time.perf_counter() - start))
        assert bytes(dst) == bytes(client.view[total - chunk:total])
        table.remove_all()
        return best["model"], best["memcpy"]
    finally:
        client.close()


def interleaved(rounds: int, fns: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Every variant once per round, rounds in turn, so that load from other
    processes falls on all variants alike; all samples kept."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(fn())
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=100_000, help="round trips per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per variant (best is kept)")
    ap.add_argument("--dma-size", type=int, default=64 << 20, help="bytes read per DMA pass")
    ap.add_argument("--dma-chunk", type=int, default=1 << 20,
                    help="bytes the model reads per call (default 1 MiB)")
    ap.add_argument("--cpu", type=int, default=0,
                    help="the one CPU everything runs on (default 0; pick an idle one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    global CPU
    CPU = args.cpu
    if shutil.which("gcc") is None or shutil.which("taskset") is None:
        print("needs gcc and taskset", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CPU})
    echo, client = build("vfio_user_echo"), build("vfio_user_client")
    n, rounds = args.iterations, args.rounds
    results: dict[str, Any] = {"cpu": CPU, "iterations": n, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="pyvfio-bench-") as tmp:
        echo_sock, py_sock = f"{tmp}/echo.sock", f"{tmp}/pyvfio.sock"
        floor_sock = f"{tmp}/floor.sock"
        py_server = [sys.executable, "-m", "pyvfio", "serve", "edu", "--socket", py_sock]
        floor_server = [sys.executable, str(HERE / "vfu_floor.py"), "serve", floor_sock]
        with server([str(echo), echo_sock], echo_sock), server(py_server, py_sock), \
                server(floor_server, floor_sock):
            samples = interleaved(rounds, {
                "c_client_to_c_echo": lambda: c_client_rate(client, echo_sock, n),
                "c_client_to_pyvfio_server": lambda: c_client_rate(client, py_sock, n),
                "c_client_to_python_floor_server": lambda: c_client_rate(client, floor_sock, n),
                "pyvfio_client_to_c_echo": lambda: py_client_rate(echo_sock, n),
                "python_floor_client_to_c_echo": lambda: floor_client(echo_sock, n),
                "pyvfio_client_to_pyvfio_server": lambda: py_client_rate(py_sock, n // 2),
            })
    rates = {k: statistics.median(v) for k, v in samples.items()}
    results["round_trips_per_s"] = {k: round(v) for k, v in rates.items()}
    results["samples"] = {k: [round(x) for x in v] for k, v in samples.items()}
    # Ratios of the same round, then their median: a round that a burst of load
    # slowed slows both sides of its ratio.
    round_ratios = {
        "server": [a / b for a, b in zip(samples["c_client_to_pyvfio_server"],
                                         samples["c_client_to_c_echo"], strict=True)],
        "client": [a / b for a, b in zip(samples["pyvfio_client_to_c_echo"],
                                         samples["c_client_to_c_echo"], strict=True)],
        "server_floor": [a / b for a, b in zip(samples["c_client_to_python_floor_server"],
                                               samples["c_client_to_c_echo"], strict=True)],
        "client_floor": [a / b for a, b in zip(samples["python_floor_client_to_c_echo"],
                                               samples["c_client_to_c_echo"], strict=True)],
    }
    cost = min(py_client_cost_us(n) for _ in range(rounds))
    results["client_python_us_per_read32"] = round(cost, 2)
    base = rates["c_client_to_c_echo"]
    # A pass over the window takes milliseconds: many alternating passes, best kept,
    # so that a burst of load (or DAMON touching the pages) does not decide the figure.
    model, memcpy = dma_rates(args.dma_size, args.dma_chunk, max(4 * rounds, 12))
    results["dma_bytes_per_s"] = {"model_readinto_mapped_fd": round(model),
                                  "memmove": round(memcpy)}
    results["ratios"] = {
        "server": round(statistics.median(round_ratios["server"]), 3),
        "client": round(statistics.median(round_ratios["client"]), 3),
        "dma": round(model / memcpy, 3),
    }
    # What Python itself reaches on the same run (benchmarks/vfu_floor.py):
    # a goal above these is out of reach of any Python server or client.
    results["python_floors"] = {
        "server": round(statistics.median(round_ratios["server_floor"]), 3),
        "client": round(statistics.median(round_ratios["client_floor"]), 3),
    }
    results["goals"] = {"server": 0.85, "client": 0.85, "dma": 0.8}
    results["met"] = {k: results["ratios"][k] >= results["goals"][k] for k in results["goals"]}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"vfio-user round trips (4-byte REGION_READ), all on CPU {CPU}, median of {rounds} "
          f"interleaved rounds x {n}:")
    for k, v in rates.items():
        print(f"  {k:34s} {v:>10,.0f}/s  {v / base:5.2f}x C echo")
    print(f"  pyvfio client's own Python cost per read32 (socket taken out): {cost:.2f} us; "
          f"one C echo round trip: {1e6 / base:.2f} us")
    print(f"DMA: model reading an fd-mapped window {model / 1e9:6.2f} GB/s, memmove "
          f"{memcpy / 1e9:6.2f} GB/s")
    floors = results["python_floors"]
    for k, ratio in results["ratios"].items():
        goal = results["goals"][k]
        floor = f"; the Python floor {floors[k]:.2f}" if k in floors else ""
        print(f"  {k:8s} ratio {ratio:5.2f} (goal >= {goal}) "
              f"{'met' if ratio >= goal else 'NOT met'}{floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
