"""deploy/: the DaemonSet and ConfigMap, checked against the Kubernetes API's
models (the ``kubernetes`` client's, through its ApiClient deserialization:
a key the models do not know is dropped there, so a round trip that changes
the document means a misspelt or misplaced field) and for what the plugin
needs from the host."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (installed with the kubernetes client) "
                           "is not installed")
kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

from pyvfio.k8s.config import PluginConfig  # noqa: E402
from pyvfio.k8s.plugin import DEVICE_PLUGIN_PATH  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load(name: str, kind: str, model: str) -> tuple[dict[str, Any], Any]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    assert len(docs) == 1 and docs[0]["kind"] == kind
    client = kubernetes.client.ApiClient()
    obj = client.deserialize(json.dumps(docs[0]), model, "application/json")
    # Every key survived the models: nothing misspelt, nothing misplaced.
    assert client.sanitize_for_serialization(obj) == docs[0]
    return docs[0], obj


def test_daemonset_is_a_valid_apps_v1_daemonset_with_what_the_plugin_needs():
    doc, ds = _load("daemonset.yaml", "DaemonSet", "V1DaemonSet")
    assert doc["apiVersion"] == "apps/v1"
    spec = ds.spec.template.spec
    labels = ds.spec.template.metadata.labels
    assert all(labels.get(k) == v for k, v in ds.spec.selector.match_labels.items())
    assert spec.host_pid  # /proc shows which host process holds a device
    (container,) = spec.containers
    assert container.security_context.privileged
    volumes = {v.name: v for v in spec.volumes}
    mounts = {m.name: m for m in container.volume_mounts}
    assert set(mounts) == set(volumes)
    host_paths = {v.host_path.path: mounts[n].mount_path
                  for n, v in volumes.items() if v.host_path is not None}
    # kubelet's socket directory, /dev/vfio, /dev/iommu (under /dev), /sys: at the same
    # paths inside, because DeviceSpec host paths and sysfs links are host paths.
    for path in (DEVICE_PLUGIN_PATH, "/dev", "/dev/vfio", "/sys", "/lib/modules",
                 "/run/pyvfio"):
        assert host_paths.get(path) == path, path
    assert any("/dev/iommu".startswith(p + "/") for p in host_paths)
    config_volume = next(v for v in spec.volumes if v.config_map is not None)
    config_dir = mounts[config_volume.name].mount_path
    args = container.args
    config_file = args[args.index("--config") + 1]
    assert os.path.dirname(config_file) == config_dir
    return_value = (config_volume.config_map.name, os.path.basename(config_file))
    assert return_value == ("pyvfio-device-plugin", "k8s.toml")


def test_configmap_is_valid_and_holds_a_valid_plugin_config():
    _doc, cm = _load("configmap.yaml", "ConfigMap", "V1ConfigMap")
    assert cm.metadata.name == "pyvfio-device-plugin"
    ds = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    assert cm.metadata.namespace == ds["metadata"]["namespace"]
    config = PluginConfig.from_toml(cm.data["k8s.toml"], source="configmap k8s.toml")
    assert [r.name for r in config.resources] == ["pyvfio.io/edu"]


def test_the_round_trip_check_catches_a_misspelt_field():
    doc = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {"privileged": True}
    client = kubernetes.client.ApiClient()
    obj = client.deserialize(json.dumps(doc), "V1DaemonSet", "application/json")
    assert client.sanitize_for_serialization(obj) != doc
