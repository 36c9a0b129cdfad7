#!/usr/bin/env python3
"""virtio benchmarks: pyvfio's virtio-blk model behind its vfio-user server.

A virtio-blk device (``pyvfio.devices.virtio.blk``) on a file in ``/dev/shm``
is served in this process; pyvfio's client and the spec-written driver of
:mod:`pyvfio.testing.virtio` submit reads at a queue depth, one doorbell per
batch, and wait for the used ring.  Reported: requests per second and MB/s,
for guest memory the server maps (fd DMA, as with QEMU's ``memory-backend-memfd,
share=on``) and for memory reached by DMA_READ/DMA_WRITE messages (QEMU's plain
RAM).  Everything is pinned to one CPU, as in ``vfio_user_bench.py``.

Usage: ``python benchmarks/virtio_bench.py [--seconds S] [--depth N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

from pyvfio.devices.virtio.blk import VirtioBlk
from pyvfio.testing.virtio import DESC_F_NEXT, DESC_F_WRITE, VirtioDriver
from pyvfio.user.client import connect
from pyvfio.user.server import Server

DISK_BYTES = 64 << 20


def run_reads(path: str, *, share_fds: bool, size: int, depth: int, seconds: float
              ) -> dict[str, float]:
    dev = connect(path, share_dma_fds=share_fds)
    try:
        drv = VirtioDriver(dev)
        drv.negotiate()
        q = drv.setup_queue(0, size=max(64, 4 * depth))
        drv.driver_ok()
        buf = dev.dma_alloc(depth * (size + 4096))
        for i in range(depth):
            base = buf.iova + i * (size + 4096)
            buf.view[i * (size + 4096):i * (size + 4096) + 16] = struct.pack("<IIQ", 0, 0, 0)
            q.write_desc(3 * i, base, 16, DESC_F_NEXT, 3 * i + 1)
            q.write_desc(3 * i + 1, base + 4096, size, DESC_F_WRITE | DESC_F_NEXT, 3 * i + 2)
            q.write_desc(3 * i + 2, base + 32, 1, DESC_F_WRITE)
        sectors = DISK_BYTES // 512 - size // 512
        done = 0
        rounds = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for i in range(depth):
                sector = ((rounds * depth + i) * (size // 512)) % sectors
                off = i * (size + 4096)
                buf.view[off + 8:off + 16] = struct.pack("<Q", sector)
                q.publish(3 * i)
            drv.notify(0)
            drv.wait_used(q, depth, timeout=30)
            done += depth
            rounds += 1
        elapsed = time.perf_counter() - t0
        buf.close()
        return {"requests_per_s": done / elapsed, "mb_per_s": done * size / elapsed / 1e6}
    finally:
        dev.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per variant (default 3)")
    parser.add_argument("--depth", type=int, default=16, help="requests per doorbell")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        disk = Path(tmp) / "disk.img"
        with disk.open("wb") as f:
            f.truncate(DISK_BYTES)
        model = VirtioBlk(disk)
        sock = str(Path(tmp) / "blk.sock")
        server = Server()
        server.add(model, sock)
        server.start()
        results = {}
        try:
            for share in (True, False):
                for size in (4096, 65536):
                    name = f"{'fd' if share else 'messages'} {size // 1024} KiB reads"
                    results[name] = run_reads(sock, share_fds=share, size=size,
                                              depth=args.depth, seconds=args.seconds)
        finally:
            server.close()
            model.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"virtio-blk over vfio-user, queue depth {args.depth}, one CPU")
        for name, r in results.items():
            print(f"  {name:24} {r['requests_per_s']:10.0f} req/s {r['mb_per_s']:9.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
