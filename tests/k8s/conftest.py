"""Fake hosts and a kubelet stand-in for the device plugin tests.

The fake host (pyvfio.testing.fakesysfs), by IOMMU group:

- group 12: ``GPU`` on vfio-pci (NUMA node 1) + ``AUDIO``, its HDMI audio, on vfio-pci
- group 7: ``PCI_BRIDGE`` (no driver) + ``EDU_A`` and ``EDU_B`` (edu, on vfio-pci)
- group 31: ``EDU`` (edu, on vfio-pci, NUMA node 0)
- group 40: ``EDU_HOST`` (edu, no driver: not ready)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("grpc", reason="the k8s extra (grpcio) is not installed")

from pyvfio.k8s.config import PluginConfig
from pyvfio.k8s.plugin import DevicePluginDaemon
from pyvfio.testing.fakesysfs import FakeSysfs
from pyvfio.testing.kubelet import Kubelet

GPU = "0000:01:00.0"
AUDIO = "0000:01:00.1"
PCI_BRIDGE = "0000:02:00.0"
EDU_A = "0000:03:01.0"
EDU_B = "0000:03:02.0"
EDU = "0000:06:00.0"
EDU_HOST = "0000:07:00.0"

CONFIG = """
[plugin]
health_interval = 0.1

[resources."pyvfio.io/edu"]
ids = ["1234:11e8"]

[resources."pyvfio.io/gpu"]
ids = ["10de:1b80"]
"""


def build(fake: FakeSysfs) -> FakeSysfs:
    fake.add_standard_drivers()
    fake.add_device(GPU, 0x10DE, 0x1B80, 0x030000, group=12, driver="vfio-pci", numa_node=1)
    fake.add_device(AUDIO, 0x10DE, 0x10F0, 0x040300, group=12, driver="vfio-pci")
    fake.add_device(PCI_BRIDGE, 0x1B36, 0x000E, 0x060400, group=7)
    fake.add_device(EDU_A, 0x1234, 0x11E8, 0x00FF00, group=7, driver="vfio-pci")
    fake.add_device(EDU_B, 0x1234, 0x11E8, 0x00FF00, group=7, driver="vfio-pci")
    fake.add_device(EDU, 0x1234, 0x11E8, 0x00FF00, group=31, driver="vfio-pci", numa_node=0)
    fake.add_device(EDU_HOST, 0x1234, 0x11E8, 0x00FF00, group=40)
    return fake


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: a UNIX socket path has at most 107 bytes."""
    d = tempfile.mkdtemp(prefix="k8s-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(short_dir: str) -> Iterator[FakeSysfs]:
    with FakeSysfs(os.path.join(short_dir, "root"), cdev=True) as f:
        build(f)
        yield f


@pytest.fixture
def plugin_dir(short_dir: str) -> str:
    d = os.path.join(short_dir, "dp")
    os.makedirs(d)
    return d


@pytest.fixture
def kubelet(plugin_dir: str) -> Iterator[Kubelet]:
    with Kubelet(plugin_dir) as k:
        yield k


@dataclass
class RunningPlugin:
    daemon: DevicePluginDaemon
    thread: threading.Thread

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the plugin did not stop"


@pytest.fixture
def start_plugin(fake: FakeSysfs, plugin_dir: str) -> Iterator[object]:
    """``start_plugin(config_text)``: run a DevicePluginDaemon in a thread."""
    running: list[RunningPlugin] = []

    def start(text: str = CONFIG) -> DevicePluginDaemon:
        daemon = DevicePluginDaemon(PluginConfig.from_toml(text), root=fake.root,
                                    plugin_dir=plugin_dir)
        thread = threading.Thread(target=daemon.run, daemon=True, name="plugin")
        thread.start()
        running.append(RunningPlugin(daemon, thread))
        return daemon

    yield start
    for r in running:
        r.stop()
