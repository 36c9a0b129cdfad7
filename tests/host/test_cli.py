"""The CLI through pyvfio.cli.main: JSON shapes, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from pyvfio.cli import main
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import (
    AUDIO,
    BUSY_NIC,
    E1000_BRIDGED,
    EDU,
    EDU_BRIDGED,
    GPU,
    PCI_BRIDGE,
    SYSTEM_PCI_IDS,
)

CHECK_KEYS = {"device", "group", "driver", "driver_kind", "best_driver", "viable", "in_use",
              "ready", "problems"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_json(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "ls", "--json")
    assert code == 0
    devices = json.loads(out)
    assert [d["device"] for d in devices] == sorted(fake.devices)
    gpu = next(d for d in devices if d["device"] == GPU)
    assert gpu["vendor_id"] == "10de" and gpu["device_id"] == "1b80" and gpu["class"] == "030000"
    assert gpu["driver"] == "nouveau" and gpu["iommu_group"] == 12 and gpu["is_bridge"] is False
    assert gpu["reset_methods"] == ["flr", "bus"] and gpu["revision"] == "a1"
    if SYSTEM_PCI_IDS is not None:
        assert gpu["vendor_name"] == "NVIDIA Corporation"
        assert gpu["class_name"] == "VGA compatible controller"


def test_ls_without_pci_ids_has_null_names(bare: FakeSysfs, capsys) -> None:
    bare.add_device("0000:00:03.0", 0x8086, 0x100E, 0x020000, group=3)
    code, out, _ = run(capsys, "--root", bare.root, "ls", "--json", "00:03.0")
    assert code == 0
    (dev,) = json.loads(out)
    assert dev["vendor_name"] is None and dev["vendor_id"] == "8086"


def test_ls_table(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["DEVICE", "IDS", "CLASS", "DRIVER", "GROUP"]
    assert any(line.startswith(f"{AUDIO}  10de:10f0") and "snd_hda_intel" in line for line in lines)


def test_groups_json(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "groups", "--json")
    assert code == 0
    groups = {g["group"]: g for g in json.loads(out)}
    assert groups[7]["devices"] == [PCI_BRIDGE, EDU_BRIDGED, E1000_BRIDGED]
    assert groups[7]["viable"] is False and groups[31]["viable"] is True and groups[1]["viable"] is True
    assert groups[30]["node"] == "/dev/vfio/30" and groups[7]["node"] is None
    assert groups[12]["reserved_regions"] == [
        {"start": "0x00000000fee00000", "end": "0x00000000feefffff", "type": "msi"}]
    assert {"group", "devices", "viable"} <= set(groups[12])


def test_check_json_not_ready(fake: FakeSysfs, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PYVFIO_ROOT", fake.root)  # the root from the environment
    code, out, _ = run(capsys, "check", GPU, BUSY_NIC, "--json")
    assert code == 1
    gpu, nic = json.loads(out)
    assert set(gpu) >= CHECK_KEYS
    assert gpu["viable"] is False and gpu["ready"] is False
    assert {"device": AUDIO, "driver": "snd_hda_intel"}.items() <= gpu["problems"][1].items()
    assert set(gpu["problems"][1]) >= {"device", "driver", "reason", "fix"}
    assert nic["in_use"] == [{"pid": 4242, "comm": "qemu-system-x86", "path": "/dev/vfio/30"}]


def test_check_ready_exits_zero(fake: FakeSysfs, capsys) -> None:
    assert run(capsys, "--root", fake.root, "bind", EDU)[0] == 0
    code, out, _ = run(capsys, "--root", fake.root, "check", EDU)
    assert code == 0
    assert out.splitlines()[1].split() == [EDU, "31", "vfio-pci", "vfio", "vfio-pci", "yes", "-", "yes"]


def test_check_table_names_problems_and_fixes(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "check", "01:00.0")
    assert code == 1
    assert f"fix: bind {AUDIO} (snd_hda_intel) to vfio-pci, or use --group" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["check", "zz:00.0"], "not a PCI address"),
    (["check", "0000:09:00.0"], "no PCI device 0000:09:00.0"),
    (["bind", "nonsense"], "not a PCI address"),
    (["ls", "09:00.0"], "no PCI device"),
])
def test_bad_input_is_one_line_exit_2(fake: FakeSysfs, capsys, argv: list[str], message: str) -> None:
    code, out, err = run(capsys, "--root", fake.root, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_no_iommu_is_exit_2(tmp_path, capsys) -> None:
    fake = FakeSysfs(tmp_path / "r", iommu=False, noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
    code, _, err = run(capsys, "--root", fake.root, "check", "00:04.0")
    assert code == 2 and err.startswith("pyvfio check: no IOMMU") and err.count("\n") == 1


def test_check_without_devices_is_usage_error(fake: FakeSysfs, capsys) -> None:
    code, _, err = run(capsys, "--root", fake.root, "check")
    assert code == 2 and "name the devices to check, or use --all" in err


def test_bind_group_and_restore_json(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "bind", "--group", GPU, "--json")
    assert code == 0
    data = json.loads(out)
    assert [(d["device"], d["original_driver"], d["driver"]) for d in data["devices"]] == [
        (GPU, "nouveau", "vfio-pci"), (AUDIO, "snd_hda_intel", "vfio-pci")]
    assert data["check"][0]["ready"] is True
    code, out, _ = run(capsys, "--root", fake.root, "restore", "--all", "--json")
    assert code == 0
    assert [(d["device"], d["driver"]) for d in json.loads(out)["devices"]] == [
        (GPU, "nouveau"), (AUDIO, "snd_hda_intel")]


def test_bind_refused_exits_1_with_the_problem(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "bind", GPU, "--json")
    assert code == 1
    assert json.loads(out)["error"]["problems"][0]["device"] == AUDIO
    assert err.startswith("pyvfio bind: refusing to bind 0000:01:00.0") and err.count("\n") == 1
    code, _, err = run(capsys, "--root", fake.root, "bind", BUSY_NIC, "--driver", "pci-stub")
    assert code == 1 and "pid 4242 (qemu-system-x86)" in err


def test_bind_dry_run_prints_the_writes(fake: FakeSysfs, capsys) -> None:
    code, out, _ = run(capsys, "--root", fake.root, "bind", "--dry-run", E1000_BRIDGED)
    assert code == 0 and fake.writes == []
    # The paths under --root: what it would really write.
    assert f"write '{E1000_BRIDGED}' to {fake.root}/sys/bus/pci/drivers/e1000/unbind" in out
    assert out.endswith("dry run: nothing was changed\n")


def test_restore_usage(fake: FakeSysfs, capsys) -> None:
    code, _, err = run(capsys, "--root", fake.root, "restore")
    assert code == 2 and "--all" in err
    code, _, err = run(capsys, "--root", fake.root, "restore", EDU)
    assert code == 1 and "no binding of 0000:06:00.0 is recorded" in err


@pytest.mark.parametrize(("argv", "command"), [
    (["ls"], "ls"),
    (["--root", "/x", "check", "01:00.0"], "check"),
    (["--root=/x", "groups"], "groups"),
    (["--ro", "ls", "info", "01:00.0"], "info"),  # argparse takes --ro for --root
    (["--root", "ls", "bind", "x"], "bind"),
    (["--help"], None),
])
def test_command_detection(argv: list[str], command: str | None) -> None:
    from pyvfio.cli import _command_of

    assert _command_of(argv) == command


def test_host_commands_import_only_the_host_area(fake: FakeSysfs) -> None:
    """Start-up cost: `pyvfio ls` must not import every other area's commands."""
    import subprocess
    import sys

    code = ("import sys; from pyvfio.cli import main; rc = main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.endswith('.commands')), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "--root", fake.root, "ls", "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stderr.strip() == "['pyvfio.host.commands']"
    assert len(json.loads(proc.stdout)) == len(fake.devices)
