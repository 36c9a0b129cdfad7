"""Host management against a real kernel: inventory, diagnosis, binding.

Runs inside the guest (standard topology, see pyvfio.testing.topology) as
root with the root "/": the real sysfs, /dev/vfio and /proc.  Every test that
changes a binding restores it in a finalizer, through pyvfio's own records.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvfio.cli import main
from pyvfio.errors import BindError, DeviceInUse, HostUsesDevice, NotBoundToVfio, NotViable
from pyvfio.host import Host, bind, require_ready, restore
from pyvfio.testing import kconfig, topology

SYSFS_PCI = Path("/sys/bus/pci/devices")


def driver_of(bdf: str) -> str | None:
    link = SYSFS_PCI / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def override_of(bdf: str) -> str:
    return (SYSFS_PCI / bdf / "driver_override").read_text().strip()


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[str]:
    """A bind-record directory; whatever is recorded there is restored at the end."""
    directory = str(tmp_path / "bind-state")
    yield directory
    if os.path.isdir(directory) and os.listdir(directory):
        restore(all_devices=True, state_dir=directory)
    for bdf, driver in topology.BOOT_DRIVERS.items():
        assert driver_of(bdf) == driver, f"{bdf} left on {driver_of(bdf)}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inventory_matches_lspci(guest_kernel: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ls", "--json")
    assert code == 0
    ours = {
        d["device"]: (d["vendor_id"], d["device_id"], d["class"][:4], d["revision"])
        for d in json.loads(out)
    }
    lspci = subprocess.run(["lspci", "-Dn"], capture_output=True, text=True, check=True).stdout
    theirs = {}
    for line in lspci.splitlines():
        # "0000:00:03.0 00ff: 1234:11e8 (rev 10)"
        parts = line.split()
        vendor, device = parts[2].split(":")
        rev = parts[4].rstrip(")") if len(parts) > 4 and parts[3] == "(rev" else "00"
        theirs[parts[0]] = (vendor, device, parts[1].rstrip(":"), rev)
    assert ours == theirs
    assert ours[topology.EDU][:2] == ("1234", "11e8")


def test_groups_and_drivers_at_boot(guest_kernel: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "groups", "--json")
    assert code == 0
    groups = json.loads(out)
    bridged = next(g for g in groups if topology.EDU_BRIDGED in g["devices"])
    assert sorted(bridged["devices"]) == sorted(topology.BRIDGED_GROUP_MEMBERS)
    assert bridged["viable"] is False  # e1000 sits on its host driver
    kinds = {m["device"]: m["driver_kind"] for m in bridged["members"]}
    assert kinds[topology.E1000_BRIDGED] == "host" and kinds[topology.EDU_BRIDGED] == "none"
    edu_group = next(g for g in groups if g["devices"] == [topology.EDU])
    assert edu_group["viable"] is True and edu_group["node"] is None
    assert edu_group["type"] in ("DMA", "DMA-FQ", "identity", "blocked")
    root_port = Host().device(topology.ROOT_PORT)
    assert root_port.is_bridge and Host().driver_kind(root_port) == "bridge"


def test_bridged_edu_is_not_viable_naming_e1000(
    guest_kernel: str, state_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = Host().diagnose(topology.EDU_BRIDGED)
    assert not d.viable and not d.ready
    offenders = [(p.device, p.driver) for p in d.problems if p.kind == "host-driver"]
    assert offenders == [(topology.E1000_BRIDGED, "e1000")]
    with pytest.raises(NotViable) as exc:
        bind(topology.EDU_BRIDGED, state_dir=state_dir)
    assert f"{topology.E1000_BRIDGED} (e1000)" in str(exc.value)
    assert driver_of(topology.EDU_BRIDGED) is None  # refused before touching anything
    code, out, _ = run(capsys, "check", topology.EDU_BRIDGED, "--json")
    assert code == 1
    (check,) = json.loads(out)
    assert check["viable"] is False
    assert {"device": topology.E1000_BRIDGED, "driver": "e1000"}.items() <= check["problems"][1].items()
    assert f"bind {topology.E1000_BRIDGED} (e1000) to vfio-pci, or use --group" in check["problems"][1]["fix"]


def test_bind_check_restore_edu(
    guest_kernel: str, state_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(NotBoundToVfio, match=r"0000:00:03\.0"):
        require_ready(topology.EDU)
    code, _, err = run(capsys, "bind", topology.EDU, "--state-dir", state_dir)
    assert code == 0, err
    assert driver_of(topology.EDU) == "vfio-pci" and override_of(topology.EDU) == "vfio-pci"
    code, out, _ = run(capsys, "check", topology.EDU, "--json")
    assert code == 0
    (check,) = json.loads(out)
    assert check["ready"] and check["driver_kind"] == "vfio" and check["problems"] == []
    node = check["group_node"]
    assert node == f"/dev/vfio/{check['group']}" and stat.S_ISCHR(os.stat(node).st_mode)
    if guest_kernel != "debian":  # device cdevs arrived in 6.6
        assert check["vfio_cdev_path"] == f"/dev/vfio/devices/{check['vfio_cdev']}"
        assert stat.S_ISCHR(os.stat(check["vfio_cdev_path"]).st_mode)
    code, _, err = run(capsys, "restore", topology.EDU, "--state-dir", state_dir)
    assert code == 0, err
    assert driver_of(topology.EDU) is None and override_of(topology.EDU) == "(null)"
    assert not os.path.exists(node)
    assert os.listdir(state_dir) == []


def test_bind_group_on_the_bridged_group(guest_kernel: str, state_dir: str) -> None:
    results = bind(topology.EDU_BRIDGED, group=True, state_dir=state_dir)
    assert {r.device for r in results} == {topology.EDU_BRIDGED, topology.E1000_BRIDGED}
    assert driver_of(topology.EDU_BRIDGED) == "vfio-pci"
    assert driver_of(topology.E1000_BRIDGED) == "vfio-pci"
    assert driver_of(topology.PCI_BRIDGE) is None  # bridges stay as they are
    for bdf in (topology.EDU_BRIDGED, topology.E1000_BRIDGED):
        assert require_ready(bdf).ready
    restore(all_devices=True, state_dir=state_dir)
    assert driver_of(topology.E1000_BRIDGED) == "e1000"
    assert driver_of(topology.EDU_BRIDGED) is None
    assert override_of(topology.E1000_BRIDGED) == "(null)"


def test_probe_that_does_not_attach_is_rolled_back(guest_kernel: str, state_dir: str) -> None:
    """pcieport's probe refuses anything but a PCIe port (-ENODEV), which the
    kernel does not report to drivers_probe: only reading the link back shows it."""
    with pytest.raises(BindError, match="its driver is none") as exc:
        bind(topology.EDU, driver="pcieport", state_dir=state_dir)
    assert "rolled back" in str(exc.value)
    assert driver_of(topology.EDU) is None and override_of(topology.EDU) == "(null)"
    assert not os.path.exists(state_dir) or os.listdir(state_dir) == []


def _hold_open(path: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); print('open', flush=True); sys.stdin.read()",
         path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
    return holder


def test_in_use_by_a_process_holding_the_group(guest_kernel: str, state_dir: str) -> None:
    bind(topology.EDU, state_dir=state_dir)
    d = Host().diagnose(topology.EDU)
    assert d.ready and d.group_node is not None
    paths = [d.group_node]
    if guest_kernel != "debian" and d.vfio_cdev:
        paths.append(f"/dev/vfio/devices/{d.vfio_cdev}")
    for path in paths:
        holder = _hold_open(path)
        try:
            comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
            d = Host().diagnose(topology.EDU)
            assert {"pid": holder.pid, "comm": comm, "path": path} in d.in_use
            assert not d.ready
            with pytest.raises(DeviceInUse, match=f"pid {holder.pid}"):
                require_ready(topology.EDU)
            with pytest.raises(DeviceInUse):
                bind(topology.EDU, driver="pci-stub", state_dir=state_dir)
            assert driver_of(topology.EDU) == "vfio-pci"
        finally:
            holder.communicate("")
    assert Host().diagnose(topology.EDU).ready


@pytest.mark.guest_config("noiommu")
def test_noiommu_mode_diagnosis(guest_kernel: str, state_dir: str) -> None:
    kconfig.require("CONFIG_VFIO_NOIOMMU", feature="vfio's no-IOMMU mode")
    host = Host()
    assert not host.iommu_present() and host.noiommu_enabled()
    d = host.diagnose(topology.EDU)
    assert d.group is None and d.noiommu and d.problems[0].kind == "no-iommu-group"
    bind(topology.EDU, state_dir=state_dir)
    d = Host().diagnose(topology.EDU)
    assert d.ready and d.noiommu and d.group_node == f"/dev/vfio/noiommu-{d.group}"


# ---- issue 10: never take what the host uses ------------------------------------------------

BUSYBOX = "/bin/busybox"


def _netdev_of(bdf: str) -> str:
    names = os.listdir(SYSFS_PCI / bdf / "net")
    assert len(names) == 1, names
    return names[0]


@pytest.fixture
def configured_e1000(guest_kernel: str) -> Iterator[str]:
    """The bridged e1000's interface, up with 10.0.2.15/24 and a route to
    10.9.0.0/16 (busybox ip); flushed and down again afterwards."""
    if guest_kernel != "debian":
        pytest.skip("the pyvfio-6.12 guest kernel is built without IPv4 (no CONFIG_INET)")
    iface = _netdev_of(topology.E1000_BRIDGED)
    for args in (["link", "set", iface, "up"], ["addr", "add", "10.0.2.15/24", "dev", iface],
                 ["route", "add", "10.9.0.0/16", "via", "10.0.2.2", "dev", iface]):
        subprocess.run([BUSYBOX, "ip", *args], check=True, capture_output=True)
    try:
        yield iface
    finally:
        if driver_of(topology.E1000_BRIDGED) == "e1000":
            iface = _netdev_of(topology.E1000_BRIDGED)
            subprocess.run([BUSYBOX, "ip", "addr", "flush", "dev", iface], check=False)
            subprocess.run([BUSYBOX, "ip", "link", "set", iface, "down"], check=False)


def test_e1000_with_an_address_and_a_route_is_refused(
    guest_kernel: str, configured_e1000: str, state_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    iface = configured_e1000
    d = Host().diagnose(topology.EDU_BRIDGED)
    (use,) = [p for p in d.problems if p.kind == "active-netdev"]
    assert use.device == topology.E1000_BRIDGED and iface in use.reason
    assert "10.9.0.0/16 via 10.0.2.2" in use.reason and "10.0.2.0/24" in use.reason
    with pytest.raises(HostUsesDevice, match=iface):
        bind(topology.EDU_BRIDGED, group=True, state_dir=state_dir)
    assert driver_of(topology.E1000_BRIDGED) == "e1000" and driver_of(topology.EDU_BRIDGED) is None
    assert not os.path.exists(state_dir)  # refused before the first write, records included
    code, out, err = run(capsys, "bind", "--group", "--dry-run", topology.EDU_BRIDGED,
                         "--state-dir", state_dir)
    assert code == 1 and iface in err and driver_of(topology.E1000_BRIDGED) == "e1000"
    # --force takes it, and says what it overrode
    code, out, err = run(capsys, "bind", "--group", "--force", "--json", topology.EDU_BRIDGED,
                         "--state-dir", state_dir)
    assert code == 0, err
    forced = {r["device"]: [p["kind"] for p in r["forced"]] for r in json.loads(out)["devices"]}
    assert forced[topology.E1000_BRIDGED] == ["active-netdev"]
    assert driver_of(topology.E1000_BRIDGED) == "vfio-pci" and require_ready(topology.EDU_BRIDGED).ready


@pytest.mark.guest_config("storage")
def test_nvme_with_a_mounted_filesystem_is_refused(
    guest_kernel: str, state_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if guest_kernel != "debian":
        pytest.skip("the pyvfio-6.12 guest kernel is built without NVMe and block filesystems")
    assert driver_of(topology.NVME) == "nvme"
    namespace = next(n for n in sorted(os.listdir("/sys/class/block"))
                     if f"/{topology.NVME}/" in os.readlink(f"/sys/class/block/{n}"))
    subprocess.run(["mke2fs", "-q", "-F", f"/dev/{namespace}"], check=True, capture_output=True)
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "ext2", f"/dev/{namespace}", str(mount_point)], check=True)
    try:
        d = Host().diagnose(topology.NVME)
        (use,) = [p for p in d.problems if p.kind == "mounted"]
        assert namespace in use.reason and str(mount_point) in use.reason
        with pytest.raises(HostUsesDevice, match=f"{namespace} of {topology.NVME} holds a mounted"):
            bind(topology.NVME, state_dir=state_dir)
        assert driver_of(topology.NVME) == "nvme" and not os.path.exists(state_dir)
        code, out, _ = run(capsys, "ls", "-v", "-s", "00:06.0")
        assert code == 0 and f"\tBlock devices: {namespace}" in out
        assert "In use by the host (mounted)" in out and "Kernel driver in use: nvme" in out
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    # Unmounted, it is free to take; and it goes back.
    bind(topology.NVME, state_dir=state_dir)
    assert driver_of(topology.NVME) == "vfio-pci"
    restore(topology.NVME, state_dir=state_dir)
    assert driver_of(topology.NVME) == "nvme"
