#!/usr/bin/env python3
"""Device plugin costs on generated hosts (pyvfio.testing.fakesysfs
``populate``: NICs, GPUs with audio functions, NVMe, USB, root ports, edu).

Two figures per host size, both what an operator's node pays:

- **scan**: one health pass (select + diagnose every selected group), the
  work the plugin does every ``health_interval`` seconds: CPU time of the
  least of the runs and wall time (median);
- **allocate**: one ``Allocate`` round trip from the kubelet stand-in over the
  plugin's UNIX socket (gRPC), which re-diagnoses before answering: median
  and 95th percentile wall time.

    python3 benchmarks/k8s_plugin_bench.py [--sizes 100,1000,5000] [--runs 5] [--calls 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyvfio.k8s.config import PluginConfig
from pyvfio.k8s.inventory import Inventory
from pyvfio.k8s.plugin import DevicePluginDaemon
from pyvfio.testing.fakesysfs import FakeSysfs
from pyvfio.testing.kubelet import Kubelet

CONFIG = """
[plugin]
health_interval = 3600
[resources."pyvfio.io/edu"]
ids = ["1234:11e8"]
[resources."pyvfio.io/nic"]
classes = ["0200"]
[resources."pyvfio.io/gpu"]
ids = ["10de:1b80"]
"""


def bench(size: int, runs: int, calls: int) -> None:
    d = tempfile.mkdtemp(prefix="k8sb-", dir="/tmp")
    try:
        fake = FakeSysfs(os.path.join(d, "root"))
        fake.add_standard_drivers()
        fake.populate(size)
        # Half the edus on vfio-pci, so some groups are healthy.
        edus = [a for a, dev in fake.devices.items() if dev.vendor == 0x1234]
        with fake:
            for a in edus[::2]:
                fake.write(fake.p(f"sys/bus/pci/devices/{a}/driver_override"), "vfio-pci")
                fake.write(fake.p("sys/bus/pci/drivers_probe"), a)
        config = PluginConfig.from_toml(CONFIG)
        inv = Inventory(config, fake.root)
        cpu, wall = [], []
        for _ in range(runs):
            c0, w0 = time.process_time(), time.perf_counter()
            scan = inv.scan()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        advertised = sum(len(v) for v in scan.devices.values())
        healthy = [i for i, g in scan.devices["pyvfio.io/edu"].items() if g.healthy]
        plugin_dir = os.path.join(d, "dp")
        os.makedirs(plugin_dir)
        with Kubelet(plugin_dir) as kubelet:
            daemon = DevicePluginDaemon(config, root=fake.root, plugin_dir=plugin_dir)
            t = threading.Thread(target=daemon.run, daemon=True)
            t.start()
            kubelet.wait_for(lambda k: k.healthy("pyvfio.io/edu"), timeout=300)
            lat = []
            for i in range(calls):
                w0 = time.perf_counter()
                kubelet.allocate("pyvfio.io/edu", [healthy[i % len(healthy)]])
                lat.append(time.perf_counter() - w0)
            daemon.stop()
            t.join(30)
        lat.sort()
        p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
        print(f"{size:6d} devices, {advertised:5d} advertised: scan cpu {min(cpu) * 1e3:8.1f} ms "
              f"(wall median {statistics.median(wall) * 1e3:8.1f} ms, "
              f"{min(cpu) / size * 1e6:6.1f} us/device); allocate median "
              f"{statistics.median(lat) * 1e3:7.1f} ms, p95 {p95 * 1e3:7.1f} ms")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    for size in (int(s) for s in args.sizes.split(",")):
        bench(size, args.runs, args.calls)


if __name__ == "__main__":
    main()
