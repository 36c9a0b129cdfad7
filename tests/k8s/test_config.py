"""The device plugin's config: validation up front, clear errors, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyvfio.cli import main
from pyvfio.k8s.config import ConfigError, PluginConfig, check_resource_name, env_name


def test_toml_and_json_give_the_same_config():
    toml = PluginConfig.from_toml("""
[plugin]
backend = "legacy"
managed = true
health_interval = 2

[resources."pyvfio.io/edu"]
ids = ["1234:11E8"]
classes = ["0x00ff"]
drivers = ["vfio-pci", "none"]
addresses = ["00:03.0"]
backend = "iommufd"
""")
    js = PluginConfig.from_json(json.dumps({
        "plugin": {"backend": "legacy", "managed": True, "health_interval": 2},
        "resources": {"pyvfio.io/edu": {"ids": ["1234:11E8"], "classes": ["0x00ff"],
                                        "drivers": ["vfio-pci", "none"],
                                        "addresses": ["00:03.0"], "backend": "iommufd"}}}))
    assert toml.resources == js.resources
    r = toml.resources[0]
    assert r.ids == {(0x1234, 0x11E8)} and r.classes == ("00ff",)
    assert r.addresses == {"0000:00:03.0"} and r.backend == "iommufd" and r.managed
    assert toml.health_interval == 2.0


def test_selectors_combine_kinds_with_and_values_with_or():
    r = PluginConfig.from_toml('[resources."a.io/x"]\nids = ["1234:11e8", "8086:100e"]\n'
                               'drivers = ["vfio-pci"]\n').resources[0]
    common = {"address": "0000:00:03.0", "class_code": 0x00FF00}
    assert r.matches(vendor_id=0x1234, device_id=0x11E8, driver="vfio-pci", **common)
    assert r.matches(vendor_id=0x8086, device_id=0x100E, driver="vfio-pci", **common)
    assert not r.matches(vendor_id=0x1234, device_id=0x11E8, driver="e1000", **common)
    assert not r.matches(vendor_id=0x1234, device_id=0x11E9, driver="vfio-pci", **common)
    c = PluginConfig.from_toml('[resources."a.io/x"]\nclasses = ["02"]\n'
                               'drivers = ["none"]\n').resources[0]
    assert c.matches(address="0000:00:05.0", vendor_id=1, device_id=2, class_code=0x020000,
                     driver=None)
    assert not c.matches(address="0000:00:05.0", vendor_id=1, device_id=2,
                         class_code=0x030000, driver=None)


@pytest.mark.parametrize("name", [
    "pyvfio.io/edu", "example.com/gpu-a100", "nvidia.com/GA100_A100_PCIE_40GB",
    "a.b/c.d_e-f", "x/y",
])
def test_good_resource_names(name):
    assert check_resource_name(name) is None


@pytest.mark.parametrize(("name", "why"), [
    ("edu", "DOMAIN/NAME"),
    ("kubernetes.io/edu", "reserved"),
    ("k8s.kubernetes.io/edu", "reserved"),
    ("requests.pyvfio.io/edu", "quota"),
    ("Pyvfio.io/edu", "lower-case"),
    ("pyvfio_io/edu", "lower-case"),
    ("pyvfio.io/", "1-63"),
    ("pyvfio.io/-edu", "1-63"),
    ("pyvfio.io/edu-", "1-63"),
    ("pyvfio.io/" + "e" * 64, "1-63"),
    ("pyvfio.io/a/b", "one '/'"),
    ("pyvfio.io/ed u", "1-63"),
    ("a" * 245 + "/x", "lower-case DNS"),
])
def test_bad_resource_names(name, why):
    assert why in (check_resource_name(name) or "")


def test_env_name_follows_kubevirt():
    assert env_name("pyvfio.io/edu") == "PCI_RESOURCE_PYVFIO_IO_EDU"
    assert env_name("nvidia.com/GA100_A100") == "PCI_RESOURCE_NVIDIA_COM_GA100_A100"


@pytest.mark.parametrize(("text", "message"), [
    ("", "name at least one resource"),
    ("[resources]\n", "name at least one resource"),
    ('[resource."pyvfio.io/edu"]\nids = ["1234:11e8"]\n', "unknown key(s) ['resource']"),
    ('[plugin]\nbackend = "vfio"\n[resources."a.io/b"]\nids = ["1234:11e8"]\n',
     "[plugin] backend must be one of auto, legacy, iommufd"),
    ('[plugin]\nhealth_interval = 0\n[resources."a.io/b"]\nids = ["1234:11e8"]\n',
     "health_interval"),
    ('[plugin]\nhealth_interval = "5"\n[resources."a.io/b"]\nids = ["1234:11e8"]\n',
     "health_interval"),
    ('[plugin]\nmanaged = "yes"\n[resources."a.io/b"]\nids = ["1234:11e8"]\n',
     "managed must be true or false"),
    ('[plugin]\ncolour = 1\n[resources."a.io/b"]\nids = ["1234:11e8"]\n', "['colour']"),
    ('[resources."pyvfio.io/edu"]\nid = ["1234:11e8"]\n', "unknown key(s) ['id']"),
    ('[resources."pyvfio.io/edu"]\nids = ["1234:11e"]\n', "'1234:11e' is not a vendor:device"),
    ('[resources."pyvfio.io/edu"]\nids = ["12345:11e8"]\n', "is not a vendor:device"),
    ('[resources."pyvfio.io/edu"]\nids = ["xyzw:11e8"]\n', "is not a vendor:device"),
    ('[resources."pyvfio.io/edu"]\nids = "1234:11e8"\n', "ids must be a list of strings"),
    ('[resources."pyvfio.io/edu"]\nids = [4660]\n', "ids must be a list of strings"),
    ('[resources."pyvfio.io/edu"]\nclasses = ["020"]\n', "is not a PCI class"),
    ('[resources."pyvfio.io/edu"]\naddresses = ["0000:00:20.0"]\n', "is not a PCI address"),
    ('[resources."pyvfio.io/edu"]\naddresses = ["00:03"]\n', "is not a PCI address"),
    ('[resources."pyvfio.io/edu"]\ndrivers = ["vfio pci"]\n', "is not a driver name"),
    ('[resources."pyvfio.io/edu"]\nids = []\n', "name at least one selector"),
    ('[resources."pyvfio.io/edu"]\nbackend = "legacy"\n', "name at least one selector"),
    ('[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\nbackend = "vfio"\n', "backend must be"),
    ('[resources.edu]\nids = ["1234:11e8"]\n', "not a valid extended resource name"),
    ('[resources."kubernetes.io/edu"]\nids = ["1234:11e8"]\n', "reserved"),
    ('[resources."a.io/x.y"]\nids = ["1234:11e8"]\n[resources."a.io/x_y"]\nids = ["1234:11e8"]\n',
     "same environment variable PCI_RESOURCE_A_IO_X_Y"),
    ("resources = 3\n", "name at least one resource"),
    ('[resources]\n"a.io/b" = 3\n', "must be a table of selectors"),
    ("[resources\n", "not valid TOML"),
])
def test_bad_config_is_a_clear_error(text, message):
    with pytest.raises(ConfigError) as err:
        PluginConfig.from_toml(text, source="k8s.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("k8s.toml")


def test_bad_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"resources": [1]}')
    with pytest.raises(ConfigError, match="name at least one resource"):
        PluginConfig.load(path)
    path.write_text('{"resources": ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        PluginConfig.load(path)
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="top level must be an object"):
        PluginConfig.from_json("[1]")


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "k8s.toml"
    path.write_text('[resources."pyvfio.io/edu"]\nids = ["1234:11e"]\n')
    assert main(["k8s-device-plugin", "--config", str(path),
                 "--plugin-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("pyvfio k8s-device-plugin: ")
    assert str(path) in err and "ids: '1234:11e'" in err
    assert main(["k8s-device-plugin", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert main(["k8s-device-plugin", "--config", str(path), "--json"]) == 2
    assert "--json applies to --check" in capsys.readouterr().err


def test_bad_config_exits_2_before_touching_the_plugin_dir(tmp_path):
    """As a process: exit 2, nothing created in the device-plugins directory."""
    path = tmp_path / "k8s.toml"
    path.write_text('[resources."kubernetes.io/edu"]\nids = ["1234:11e8"]\n')
    dp = tmp_path / "dp"
    dp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pyvfio", "k8s-device-plugin", "--config",
                           str(path), "--plugin-dir", str(dp)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "kubernetes.io domain is reserved" in proc.stderr
    assert os.listdir(dp) == []


def test_check_shows_what_each_resource_selects(tmp_path, capsys):
    from pyvfio.testing.fakesysfs import FakeSysfs

    fake = FakeSysfs(tmp_path / "root")
    fake.add_standard_drivers()
    fake.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=3, driver="vfio-pci")
    fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00, group=4)
    path = tmp_path / "k8s.toml"
    path.write_text('[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\n'
                    '[resources."pyvfio.io/nic"]\nclasses = ["0200"]\n')
    assert main(["--root", fake.root, "k8s-device-plugin", "--config", str(path),
                 "--check", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    edu, nic = data["resources"]
    assert edu["env"] == "PCI_RESOURCE_PYVFIO_IO_EDU"
    assert [(d["id"], d["health"]) for d in edu["devices"]] == [
        ("0000:00:03.0", "Healthy"), ("0000:00:04.0", "Unhealthy")]
    assert "vfio" in edu["devices"][1]["reason"]
    assert nic["devices"] == []
    assert main(["--root", fake.root, "k8s-device-plugin", "--config", str(path),
                 "--check"]) == 0
    out = capsys.readouterr().out
    assert "0000:00:03.0  group 3  0000:00:03.0  Healthy" in out
    assert "(selects no device now)" in out


def test_without_grpcio_the_command_names_the_extra(tmp_path):
    path = tmp_path / "k8s.toml"
    path.write_text('[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\n')
    code = ("import sys; sys.modules['grpc'] = None; from pyvfio.cli import main; "
            f"sys.exit(main(['k8s-device-plugin', '--config', {str(path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "pip install 'pyvfio[k8s]'" in proc.stderr and "grpc" in proc.stderr
    # and the rest of pyvfio is unaffected
    code = "import sys; sys.modules['grpc'] = None; import pyvfio.k8s.commands, pyvfio.cli"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
