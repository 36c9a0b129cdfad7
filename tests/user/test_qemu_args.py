"""``pyvfio qemu-args`` and ``pyvfio control``: the command-line faces of issue 16.

The options themselves are proven by tests/vmm, which boots QEMU with exactly
this output; here: their shape, every refusal, and the control client's exits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyvfio.errors import UsageError
from pyvfio.testing import vmm
from pyvfio.user.qemu_args import qemu_args, vfio_user_device_json


def pyvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvfio", *args], capture_output=True,
                          text=True, timeout=60)


def test_default_is_shared_memfd_ram_and_the_json_device() -> None:
    argv = qemu_args(["/run/edu.sock"])
    assert argv == ["-m", "1024",
                    "-object", "memory-backend-memfd,id=pyvfio-ram,size=1024M,share=on",
                    "-machine", "memory-backend=pyvfio-ram",
                    "-device", '{"driver":"vfio-user-pci","socket":{"path":"/run/edu.sock",'
                               '"type":"unix"}}']
    assert "share=off" not in " ".join(argv)


def test_iommu_comes_first_with_caching_mode_and_devices_keep_socket_order() -> None:
    argv = qemu_args(["/a.sock", "/b.sock"], memory_mib=None, iommu=True, ids=["a"],
                     addrs=["0x6", "0x7"], bus="pcie.0")
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "intel-iommu,intremap=on,caching-mode=on"
    parsed = [json.loads(d) for d in devices[1:]]
    assert [p["socket"]["path"] for p in parsed] == ["/a.sock", "/b.sock"]
    assert parsed[0]["id"] == "a" and "id" not in parsed[1]
    assert [p["addr"] for p in parsed] == ["0x6", "0x7"] and parsed[1]["bus"] == "pcie.0"
    assert "-object" not in argv and "-m" not in argv  # plain RAM: left alone


def test_quoting_survives_odd_paths() -> None:
    path = '/run/a "b"\\c.sock'
    assert json.loads(vfio_user_device_json(path))["socket"]["path"] == path


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sockets": []}, "no socket"),
    ({"sockets": ["edu.sock"]}, "absolute path"),
    ({"sockets": ["/a"], "ids": ["a", "b"]}, "at most one of each"),
    ({"sockets": ["/a"], "ids": ["1x"]}, "start with a letter"),
    ({"sockets": ["/a"], "memory_mib": 0}, "RAM size in MiB"),
])
def test_refusals(kwargs, message) -> None:
    with pytest.raises(UsageError, match=message):
        qemu_args(**kwargs)


def test_cli_prints_shell_words_and_json() -> None:
    out = pyvfio("qemu-args", "--socket", "/run/x y.sock", "--iommu", "--plain-ram")
    assert out.returncode == 0
    assert out.stdout.strip() == (
        "-device intel-iommu,intremap=on,caching-mode=on -device "
        "'{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"/run/x y.sock\",\"type\":\"unix\"}}'")
    js = pyvfio("qemu-args", "--socket", "/run/x.sock", "--memory", "512", "--json")
    assert json.loads(js.stdout)[:2] == ["-m", "512"]
    bad = pyvfio("qemu-args", "--socket", "x.sock")
    assert bad.returncode == 2 and "absolute path" in bad.stderr


def test_control_cli_round_trip_and_exits(tmp_path: Path) -> None:
    control = tmp_path / "c.sock"
    proc = vmm.start_server(control)
    try:
        sock = str(tmp_path / "e.sock")
        added = pyvfio("control", str(control), "device-add",
                       json.dumps({"model": "edu", "socket": sock}))
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["id"] == "edu0"
        listed = json.loads(pyvfio("control", str(control), "query-devices").stdout)
        assert [d["socket"] for d in listed] == [sock]
        missing = pyvfio("control", str(control), "device-remove", '{"id": "nope"}')
        assert missing.returncode == 1 and "DeviceNotFound: no device 'nope'" in missing.stderr
        not_json = pyvfio("control", str(control), "device-remove", "{id}")
        assert not_json.returncode == 2 and "not JSON" in not_json.stderr
        assert pyvfio("control", str(control)).returncode == 2
    finally:
        assert vmm.stop_server(proc) == 0
    gone = pyvfio("control", str(control), "query-devices")
    assert gone.returncode == 2 and "is pyvfio serve --control running?" in gone.stderr


def test_json_outputs_are_as_documented() -> None:
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli-json.md").read_text()

    def block(title: str):
        body = doc.split(f"## {title}\n", 1)[1]
        return json.loads(re.search(r"```json\n(.*?)```", body, re.S).group(1))

    documented = block("pyvfio qemu-args")
    printed = json.loads(pyvfio("qemu-args", "--socket", "/run/edu.sock", "--json").stdout)
    assert printed == documented
    provisioned = block("pyvfio guest-qemu")
    found = json.loads(pyvfio("guest-qemu", "--json").stdout)
    assert set(found) == set(provisioned)
    assert found["version"].count(".") == 2 and found["command"] == found["command"].strip()
