"""The plugin as a process (SIGTERM), and managed mode."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from pyvfio.k8s.plugin import socket_name
from pyvfio.testing.fakesysfs import FakeSysfs
from pyvfio.testing.kubelet import Kubelet

from .conftest import AUDIO, EDU, EDU_HOST, GPU, build

EDU_RES = "pyvfio.io/edu"


def test_sigterm_stops_cleanly_and_removes_only_its_own_socket(short_dir, plugin_dir, kubelet):
    fake = build(FakeSysfs(os.path.join(short_dir, "root")))
    config = os.path.join(short_dir, "k8s.toml")
    with open(config, "w") as f:
        f.write('[plugin]\nhealth_interval = 0.2\n[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\n')
    # Someone else's socket and file in the directory: never touched.
    other = socket.socket(socket.AF_UNIX)
    other.bind(os.path.join(plugin_dir, "other-vendor.sock"))
    other.listen()
    with open(os.path.join(plugin_dir, "kubelet_internal_checkpoint"), "w") as f:
        f.write("{}")
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "--root", fake.root,
                             "k8s-device-plugin", "--config", config, "--plugin-dir", plugin_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kubelet.wait_for(lambda k: k.devices(EDU_RES).get(EDU) == "Healthy", timeout=60)
        own = os.path.join(plugin_dir, socket_name(EDU_RES))
        assert os.path.exists(own)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        other.close()
    assert proc.returncode == 0, err
    assert not os.path.exists(own)
    assert sorted(os.listdir(plugin_dir)) == ["kubelet.sock", "kubelet_internal_checkpoint",
                                              "other-vendor.sock"]
    assert "registered with kubelet" in err and "stopped" in err
    assert "Traceback" not in err
    # The stream kubelet followed ended with the plugin.
    kubelet.wait_for(lambda k: k.plugins[EDU_RES].stream_error is not None, timeout=10)


def test_managed_mode_binds_at_start_and_restores_at_exit(fake: FakeSysfs, plugin_dir, kubelet,
                                                          start_plugin, caplog):
    caplog.set_level("INFO", logger="pyvfio.k8s")
    # The GPU's audio function is on its host driver and not selected: managed mode must
    # refuse to bind the GPU alone (the group would not be viable) and leave it alone.
    fake.write(fake.p("sys/bus/pci/drivers/vfio-pci/unbind"), AUDIO)
    fake.write(fake.p("sys/bus/pci/drivers/snd_hda_intel/bind"), AUDIO)
    fake.write(fake.p("sys/bus/pci/drivers/vfio-pci/unbind"), GPU)
    fake.write(fake.p("sys/bus/pci/drivers/nouveau/bind"), GPU)
    writes_before = len(fake.writes)
    daemon = start_plugin('[plugin]\nmanaged = true\nhealth_interval = 0.1\n'
                          '[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\n'
                          '[resources."pyvfio.io/gpu"]\nids = ["10de:1b80"]\n')
    kubelet.wait_for(lambda k: k.devices(EDU_RES).get(EDU_HOST) == "Healthy"
                     and k.devices("pyvfio.io/gpu"), timeout=20)
    assert fake.devices[EDU_HOST].driver == "vfio-pci"
    assert fake.devices[GPU].driver == "nouveau"  # refused before any write to it
    assert not any(GPU in path or GPU in data for path, data in fake.writes[writes_before:])
    assert kubelet.devices("pyvfio.io/gpu")[GPU] == "Unhealthy"
    messages = [r.getMessage() for r in caplog.records]
    assert any("could not bind" in m and AUDIO in m for m in messages), messages
    assert daemon.bound == [EDU_HOST]  # the others were on vfio-pci already
    daemon.stop()
    deadline = time.monotonic() + 20
    while fake.devices[EDU_HOST].driver is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.devices[EDU_HOST].driver is None  # back to no driver
    assert fake.devices[EDU].driver == "vfio-pci"  # not ours to restore


def test_a_kubelet_refusal_is_logged_and_retried(plugin_dir, start_plugin, caplog):
    caplog.set_level("INFO", logger="pyvfio.k8s")

    class Refusing(Kubelet):
        refuse = True

        def Register(self, request, context):
            if self.refuse:
                self._refuse(context, "resource name already taken")
            return super().Register(request, context)

    with Refusing(plugin_dir) as k:
        start_plugin('[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\n')
        deadline = time.monotonic() + 20
        while not any("registration with kubelet" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert any("already taken" in r.getMessage() for r in caplog.records)
        Refusing.refuse = False
        k.wait_for(lambda k: k.devices(EDU_RES).get(EDU) == "Healthy", timeout=30)
