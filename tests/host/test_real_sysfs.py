"""pyvfio's inventory of the machine the tests run on, against lspci.

Whatever kernel this host runs, its real sysfs is a second real-kernel check
of the reader (uevent format, links, attributes) besides the guest suites.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from pyvfio.cli import main


def _has_pci() -> bool:
    return os.path.isdir("/sys/bus/pci/devices") and bool(os.listdir("/sys/bus/pci/devices"))


def _lspci() -> dict[str, dict[str, str | None]]:
    out = subprocess.run(["lspci", "-Dnk"], capture_output=True, text=True, check=True).stdout
    devices: dict[str, dict[str, str | None]] = {}
    current: dict[str, str | None] = {}
    for line in out.splitlines():
        if not line.startswith("\t"):
            # "0000:00:01.0 ffff: 1af4:1045 (rev 01)"
            parts = line.split()
            vendor, device = parts[2].split(":")
            rev = parts[4].rstrip(")") if len(parts) > 4 and parts[3] == "(rev" else "00"
            current = {"ids": f"{vendor}:{device}", "class": parts[1].rstrip(":"), "rev": rev,
                       "subsystem": None, "driver": None}
            devices[parts[0]] = current
        elif line.strip().startswith("Subsystem:"):
            current["subsystem"] = line.split(":", 1)[1].strip()
        elif line.strip().startswith("Kernel driver in use:"):
            current["driver"] = line.split(":", 1)[1].strip()
    return devices


@pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils is not installed")
@pytest.mark.skipif(not _has_pci(), reason="this machine exposes no PCI devices in /sys")
def test_ls_matches_lspci_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", "/", "ls", "--json"]) == 0
    ours = {}
    for d in json.loads(capsys.readouterr().out):
        subsystem = (f"{d['subsystem_vendor_id']}:{d['subsystem_device_id']}"
                     if d["subsystem_vendor_id"] not in (None, "0000") else None)
        ours[d["device"]] = {"ids": f"{d['vendor_id']}:{d['device_id']}", "class": d["class"][:4],
                             "rev": d["revision"], "subsystem": subsystem, "driver": d["driver"]}
    theirs = _lspci()
    assert ours.keys() == theirs.keys()
    for address, info in theirs.items():
        mine = ours[address]
        if info["subsystem"] is None:
            mine["subsystem"] = None  # lspci omits subsystems bridges do not have
        assert mine == info, address
