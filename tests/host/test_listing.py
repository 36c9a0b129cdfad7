"""``pyvfio ls`` against lspci on the same tree: names, -s and -d filters,
and the -v detail view."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from pyvfio.cli import main
from pyvfio.errors import UsageError
from pyvfio.host.listing import id_filter, slot_filter
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import SYSTEM_PCI_IDS

LSPCI = shutil.which("lspci")
needs_lspci = pytest.mark.skipif(LSPCI is None, reason="lspci (pciutils) is not installed")
needs_ids = pytest.mark.skipif(SYSTEM_PCI_IDS is None, reason="the system has no pci.ids")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tree(tmp_path) -> Iterator[FakeSysfs]:
    f = FakeSysfs(tmp_path / "root", noiommu=False,
                  pci_ids=SYSTEM_PCI_IDS.path if SYSTEM_PCI_IDS else None)
    f.add_standard_drivers()
    f.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=3, revision=0x10)
    f.add_device("0000:00:04.0", 0x8086, 0xABCD, 0x020000, group=4)  # vendor known, device not
    f.add_device("0000:00:05.0", 0xABCE, 0x1234, 0x020000, group=5)  # neither
    f.add_device("0000:00:06.0", 0x8086, 0x100E, 0x020000, group=6, driver="e1000", revision=3)
    f.add_device("0000:02:00.0", 0x144D, 0xA808, 0x010802, group=7, driver="nvme")
    f.add_device("0000:02:00.1", 0x1234, 0x11E8, 0x00FF00, group=7)
    f.add_device("0001:05:1f.7", 0xABCE, 0x0001, 0x123456, group=8)  # class pci.ids lacks
    with f:
        yield f


def _lspci(tree: FakeSysfs, *args: str) -> list[str]:
    assert LSPCI is not None
    out = subprocess.run([LSPCI, "-A", "linux-sysfs", "-O", f"sysfs.path={tree.p('sys/bus/pci')}",
                          "-D", *args], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@needs_lspci
@needs_ids
def test_names_as_lspci_prints_them(tree: FakeSysfs, capsys) -> None:
    theirs = {}
    for line in _lspci(tree):
        address, _, rest = line.partition(" ")
        label, _, name = rest.partition(": ")
        theirs[address] = (label, name.split(" (rev ")[0])
    code, out, _ = run(capsys, "--root", tree.root, "ls")
    assert code == 0
    ours = {}
    for line in out.splitlines()[1:]:
        address = line.split()[0]
        row = line[line.index(address) + len(address):]
        # the class and name columns: CLASS ... NAME, split on the fixed table gaps
        cells = [c for c in row.split("  ") if c.strip()]
        ours[address] = (cells[1].strip(), cells[-1].strip())
    assert ours == theirs
    assert ours["0000:00:05.0"][1] == "Device abce:1234"
    assert ours["0000:00:04.0"][1] == "Intel Corporation Device abcd"


@needs_lspci
@pytest.mark.parametrize("spec", ["02:00.1", "00:", "0:06", ".1", "*:*.0", "1:5:", "0001:05:1f.7",
                                  "3", "00:04", "02:", "06.0"])
def test_slot_filter_matches_lspci(tree: FakeSysfs, capsys, spec: str) -> None:
    theirs = [line.split()[0] for line in _lspci(tree, "-s", spec)]
    code, out, _ = run(capsys, "--root", tree.root, "ls", "--json", "-s", spec)
    assert code == 0 and [d["device"] for d in json.loads(out)] == theirs


@needs_lspci
@pytest.mark.parametrize("spec", ["8086:", ":1234", "1234:11e8", "::0200", "8086::0200", "::00ff",
                                  "abce:", "::0108:02", "::0108:01"])
def test_id_filter_matches_lspci(tree: FakeSysfs, capsys, spec: str) -> None:
    theirs = [line.split()[0] for line in _lspci(tree, "-d", spec)]
    code, out, _ = run(capsys, "--root", tree.root, "ls", "--json", "-d", spec)
    assert code == 0 and [d["device"] for d in json.loads(out)] == theirs


def test_driver_and_class_filters(tree: FakeSysfs, capsys) -> None:
    for argv, expected in (
        (["--driver", "nvme"], ["0000:02:00.0"]),
        (["--driver", "none", "--class", "02"], ["0000:00:04.0", "0000:00:05.0"]),
        (["--class", "0108", "-s", "02:"], ["0000:02:00.0"]),
    ):
        code, out, _ = run(capsys, "--root", tree.root, "ls", "--json", *argv)
        assert code == 0 and [d["device"] for d in json.loads(out)] == expected


@pytest.mark.parametrize("bad", ["1:2:3:4", "zz:00.0", "00:40.0", "00:00.8"])
def test_bad_slot_filters(bad: str) -> None:
    with pytest.raises(UsageError, match="filter"):
        slot_filter(bad)


def test_bad_filters_are_one_line(tree: FakeSysfs, capsys) -> None:
    assert slot_filter("02:00.1") == (None, 2, 0, 1)
    assert id_filter("8086::0200") == (0x8086, None, 0x200, None)
    code, _, err = run(capsys, "--root", tree.root, "ls", "-d", "8086")
    assert code == 2 and "bad ID filter '8086'" in err
    code, _, err = run(capsys, "--root", tree.root, "ls", "--class", "2")
    assert code == 2 and "bad class filter" in err


def test_detail_view(tree: FakeSysfs, capsys) -> None:
    nvme = "0000:02:00.0"
    d = tree.p(tree.devices[nvme].sysfs_dir)
    # BAR0: 16 KiB 64-bit memory; BAR4: I/O; the rest unused.
    lines = ["0x00000000fe600000 0x00000000fe603fff 0x0000000000140204",
             *["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 3,
             "0x000000000000c000 0x000000000000c03f 0x0000000000040101",
             *["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 8]
    with open(f"{d}/resource", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(f"{d}/config", "rb") as f:
        cfg = bytearray(f.read())
    cfg[6] |= 0x10
    cfg[0x34] = 0x40
    cfg[0x40:0x42] = bytes([0x01, 0x50])  # PM -> 0x50
    cfg[0x50:0x52] = bytes([0x11, 0x70])  # MSI-X -> 0x70
    cfg[0x70:0x72] = bytes([0x10, 0x00])  # Express, end
    with open(f"{d}/config", "wb") as f:
        f.write(bytes(cfg))
    with open(tree.p(f"lib/modules/{tree.release}/modules.alias"), "a") as f:
        f.write("alias pci:v*d*sv*sd*bc01sc08i02* nvme\n")
    tree.add_block(nvme, "nvme0n1", 0, subdir="nvme/nvme0")
    tree.add_mount("259:0", "/srv", "/dev/nvme0n1")
    code, out, _ = run(capsys, "--root", tree.root, "ls", "-v", "-s", "02:00.0")
    assert code == 0
    assert "\tRegion 0: Memory at fe600000 (64-bit, non-prefetchable) [size=16K]" in out
    assert "\tRegion 4: I/O ports at c000 [size=64]" in out
    assert "\tCapabilities: [40] Power Management, [50] MSI-X, [70] Express" in out
    assert "\tKernel driver in use: nvme\n\tKernel modules: nvme" in out
    assert "\tBlock devices: nvme0n1" in out and "\tIOMMU group: 7" in out
    assert "\tIn use by the host (mounted): block device nvme0n1 of 0000:02:00.0" in out
    code, out, _ = run(capsys, "--root", tree.root, "ls", "-v", "--json", "02:00.0")
    (info,) = json.loads(out)
    assert info["regions"][0] == {"index": 0, "kind": "memory", "start": "0xfe600000", "size": 16384,
                                  "bits": 64, "prefetchable": False}
    assert [u["kind"] for u in info["host_uses"]] == ["mounted"] and info["vfio_driver"] == "vfio-pci"
