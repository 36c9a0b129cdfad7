"""Whole texts and fields where other tests check a fragment: which path a
caller without write rights is refused on (each in turn, as nobody), the
bind record's owner and time, a dry run's record step for a driverless
device, a probe that does not attach, and each kind of group member on a
host driver.  A fragment check passes when a later check gives the same
words for another reason; these do not."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvfio.errors import (
    BindError,
    DeviceInUse,
    HostUsesDevice,
    NoIommu,
    NotPermitted,
    NotViable,
    UsageError,
)
from pyvfio.host import Host, bind, restore
from pyvfio.host.binding import BindState
from pyvfio.host.diagnosis import P_NO_GROUP, Problem
from pyvfio.host.nodes import NODE_STALE, group_node_check
from pyvfio.host.usage import Use
from pyvfio.testing.fakesysfs import VFIO_GROUP_MAJOR, FakeSysfs, make_char_node

from .conftest import (
    AUDIO,
    BUSY_NIC,
    E1000_BRIDGED,
    EDU,
    EDU_BRIDGED,
    GPU,
    PCI_BRIDGE,
    as_nobody,
)

NVME = "0000:05:00.0"
NVME_PEER = "0000:05:00.1"

SYSFS_HINT = "binding needs root (or write access to sysfs); nothing was changed"


def _refusal_as_nobody(fake: FakeSysfs, address: str,
                       action: Callable[..., object] = bind) -> str:
    """The NotPermitted text of ``action`` (bind or restore) run as nobody."""
    with as_nobody(), pytest.raises(NotPermitted) as exc:
        action(address, root=fake.root)
    return str(exc.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (seteuid)")
def test_each_path_a_bind_writes_is_checked_in_turn(nobody_tree: FakeSysfs) -> None:
    """Made writable one by one, each path the bind would write is the next
    refusal, named in full: drivers_probe, the device's driver_override, the
    old driver's unbind, then the directory of the bind records.  The rights
    are those of the effective user (nobody), not the real one (root)."""
    fake = nobody_tree
    plain, on_e1000 = "0000:00:03.0", "0000:00:04.0"
    assert fake.devices[on_e1000].driver == "e1000"
    probe = fake.p("sys/bus/pci/drivers_probe")
    assert _refusal_as_nobody(fake, plain) == f"cannot write {probe}: {SYSFS_HINT}"
    os.chmod(probe, 0o666)
    override = fake.p(f"sys/bus/pci/devices/{plain}/driver_override")
    assert _refusal_as_nobody(fake, plain) == f"cannot write {override}: {SYSFS_HINT}"
    os.chmod(fake.p(f"sys/bus/pci/devices/{on_e1000}/driver_override"), 0o666)
    unbind = fake.p("sys/bus/pci/drivers/e1000/unbind")
    assert _refusal_as_nobody(fake, on_e1000) == f"cannot write {unbind}: {SYSFS_HINT}"
    os.chmod(override, 0o666)
    records = os.path.join(fake.root, "run/pyvfio/bind")
    message = _refusal_as_nobody(fake, plain)
    nearest = records
    while not os.path.isdir(nearest):
        nearest = os.path.dirname(nearest)
    assert message == (f"cannot write the bind records in {records} ({nearest} is not writable; "
                       "use --state-dir or $PYVFIO_STATE_DIR); nothing was changed")
    assert fake.devices[plain].driver is None and fake.devices[on_e1000].driver == "e1000"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (seteuid)")
def test_a_device_already_on_its_driver_needs_no_rights(nobody_tree: FakeSysfs) -> None:
    """Nothing to write, nothing to refuse: nobody may ask for a device that
    is already where it would go."""
    with as_nobody():
        (result,) = bind("0000:00:05.0", root=nobody_tree.root)
    assert (result.device, result.driver, result.changed) == ("0000:00:05.0", "vfio-pci", False)
    assert nobody_tree.writes == []


RESTORE_HINT = "restoring needs root (or write access to sysfs); nothing was changed"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (seteuid)")
def test_each_path_a_restore_writes_is_checked_in_turn(nobody_tree: FakeSysfs) -> None:
    """A restore is refused before its first write too: made writable one by
    one, each path it would write (the steps its dry run lists) is the next
    refusal, then the directory whose record it would remove.  Until the
    last, the device stays on vfio-pci and its record stays."""
    fake = nobody_tree
    nic = "0000:00:04.0"
    bind(nic, root=fake.root)  # as root: e1000 -> vfio-pci, recorded
    assert fake.devices[nic].driver == "vfio-pci"
    record = os.path.join(fake.root, "run/pyvfio/bind", nic + ".json")
    os.chmod(os.path.dirname(record), 0o755)  # readable by nobody (the records are
    os.chmod(record, 0o644)                   # root's own, 0700 and 0600, by default)
    writes = len(fake.writes)
    with as_nobody():
        (dry,) = restore(nic, root=fake.root, dry_run=True)  # a dry run needs no rights
    order = [fake.p(f"sys/bus/pci/devices/{nic}/driver_override"),
             fake.p("sys/bus/pci/drivers/vfio-pci/unbind"),
             fake.p("sys/bus/pci/drivers/e1000/bind"),
             fake.p("sys/bus/pci/drivers_probe")]
    assert [step.rsplit(" to ", 1)[1] for step in dry.steps] == [*order, order[0]]
    for path in order:
        assert _refusal_as_nobody(fake, nic, restore) == f"cannot write {path}: {RESTORE_HINT}"
        os.chmod(path, 0o666)
    records = os.path.dirname(record)
    assert _refusal_as_nobody(fake, nic, restore) == (
        f"cannot write the bind records in {records} ({records} is not writable; "
        "use --state-dir or $PYVFIO_STATE_DIR); nothing was changed")
    assert fake.writes[writes:] == [] and fake.devices[nic].driver == "vfio-pci"
    assert os.path.exists(record)
    (result,) = restore(nic, root=fake.root)  # root (the fake kernel acts as its caller)
    assert (result.driver, result.changed) == ("e1000", True)
    assert fake.devices[nic].driver == "e1000" and not os.path.exists(record)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (seteuid)")
def test_a_restore_with_nothing_to_write_or_remove_needs_no_rights(
        nobody_tree: FakeSysfs) -> None:
    """A device without a record is the same error for nobody as for root:
    nothing would be written, so nothing is refused for rights."""
    with as_nobody(), pytest.raises(BindError) as exc:
        restore("0000:00:05.0", root=nobody_tree.root)
    assert str(exc.value) == ("no binding of 0000:00:05.0 is recorded in "
                              f"{os.path.join(nobody_tree.root, 'run/pyvfio/bind')}")
    assert nobody_tree.writes == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (seteuid)")
def test_a_stale_record_is_not_removed_by_a_caller_who_may_not(nobody_tree: FakeSysfs) -> None:
    """A record from an earlier boot needs no sysfs write, but removing it
    needs the records directory: refused up front, the record kept."""
    fake = nobody_tree
    nic = "0000:00:04.0"
    bind(nic, root=fake.root)
    records = os.path.join(fake.root, "run/pyvfio/bind")
    fake.reboot()  # a new boot_id: the record is from an earlier boot now
    os.chmod(records, 0o755)
    os.chmod(os.path.join(records, nic + ".json"), 0o644)
    writes = len(fake.writes)
    with as_nobody(), pytest.raises(NotPermitted) as exc:
        restore(nic, root=fake.root)
    assert str(exc.value) == (f"cannot write the bind records in {records} ({records} is not "
                              "writable; use --state-dir or $PYVFIO_STATE_DIR); nothing was "
                              "changed")
    assert os.listdir(records) == [nic + ".json"] and fake.writes[writes:] == []
    with pytest.raises(BindError, match="from an earlier boot"):  # root may: removed
        restore(nic, root=fake.root)
    assert os.listdir(records) == []


def test_the_bind_record_names_the_process_and_the_time(fake: FakeSysfs, tmp_path) -> None:
    state = str(tmp_path / "state")
    before = time.time()
    bind(EDU, root=fake.root, state_dir=state)
    record = BindState(state).load(EDU)
    assert record is not None
    assert record["pid"] == os.getpid()
    assert before <= record["time"] <= time.time()
    assert (record["original_driver"], record["target_driver"], record["phase"]) == (None, "vfio-pci",
                                                                                      "bound")


def test_a_dry_run_lists_the_record_step_of_a_driverless_device(fake: FakeSysfs, tmp_path) -> None:
    state = str(tmp_path / "state")
    (result,) = bind(EDU, root=fake.root, state_dir=state, dry_run=True)
    assert result.steps[0] == f"record {EDU} (driver none) in {os.path.join(state, EDU + '.json')}"


def test_a_probe_that_does_not_attach_names_no_driver(fake: FakeSysfs, tmp_path) -> None:
    fake.fail_probe_devices.add(("vfio-pci", EDU))
    with pytest.raises(BindError) as exc:
        bind(EDU, root=fake.root, state_dir=str(tmp_path / "state"))
    assert str(exc.value).startswith(
        f"binding {EDU} to vfio-pci failed: after drivers_probe its driver is none "
        "(the probe did not attach; see dmesg)")


def test_each_kind_of_member_on_a_host_driver_has_its_whole_problem(fake: FakeSysfs) -> None:
    d = Host(fake.root).diagnose(GPU)
    assert d.problems[:2] == [
        Problem(GPU, "nouveau",
                f"{GPU} is bound to the host driver nouveau, not to a vfio driver",
                f"bind {GPU} (nouveau) to vfio-pci: pyvfio bind {GPU}", "host-driver"),
        Problem(AUDIO, "snd_hda_intel",
                f"{AUDIO} in the same IOMMU group 12 is bound to the host driver snd_hda_intel, "
                "so the group is not viable",
                f"bind {AUDIO} (snd_hda_intel) to vfio-pci, or use --group", "host-driver"),
    ]


def test_a_bridge_on_a_foreign_driver_has_its_whole_problem(bare: FakeSysfs) -> None:
    bare.add_driver("weird_bridge", classes=[0x0604])
    bare.add_device("0000:00:1e.0", 0x8086, 0x244E, 0x060400, group=4, driver="weird_bridge")
    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4)
    d = Host(bare.root).diagnose("0000:01:00.0")
    bridge = [p for p in d.problems if p.device == "0000:00:1e.0"]
    assert bridge == [Problem(
        "0000:00:1e.0", "weird_bridge",
        "bridge 0000:00:1e.0 in IOMMU group 4 is bound to weird_bridge, which is not a bridge "
        "driver (pcieport, shpchp), so the group is not viable",
        "unbind 0000:00:1e.0 (weird_bridge): a bridge may stay driverless or on pcieport",
        "host-driver")]


# ---- bind's refusals, whole ------------------------------------------------------------------

def test_no_device_named_is_a_usage_error(fake: FakeSysfs) -> None:
    with pytest.raises(UsageError) as exc:
        bind([], root=fake.root)
    assert str(exc.value) == "name at least one device to bind"


def test_no_iommu_names_both_ways_out(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "no-iommu", iommu=False, noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x8086, 0x100E, 0x020000, driver="e1000")  # no group
    with fake, pytest.raises(NoIommu) as exc:
        bind("0000:00:04.0", root=fake.root)
    assert str(exc.value) == ("no IOMMU: 0000:00:04.0 has no IOMMU group; boot with intel_iommu=on "
                              "(or amd_iommu=on), or enable vfio's unsafe no-IOMMU mode")


def test_two_targets_of_a_group_with_a_third_member_on_a_host_driver(bare: FakeSysfs) -> None:
    """One problem for the member left behind (its group is looked at once,
    not once per target), and the refusal names every target."""
    first, second, left = "0000:07:00.0", "0000:07:00.1", "0000:07:00.2"
    bare.add_device(first, 0x1234, 0x11E8, 0x00FF00, group=9)
    bare.add_device(second, 0x1234, 0x11E8, 0x00FF00, group=9)
    bare.add_device(left, 0x8086, 0x100E, 0x020000, group=9, driver="e1000")
    with pytest.raises(NotViable) as exc:
        bind([second, first], root=bare.root)
    reason = f"{left} in IOMMU group 9 stays on the host driver e1000, so the group would not be viable"
    fix = f"bind {left} (e1000) to vfio-pci, or use --group"
    assert str(exc.value) == f"refusing to bind {first}, {second}: {reason}; fix: {fix}"
    assert exc.value.problems == [{"device": left, "driver": "e1000", "reason": reason, "fix": fix,
                                   "kind": "host-driver", "evidence": []}]


def test_every_target_group_is_checked_after_one_seen_twice(fake: FakeSysfs) -> None:
    """GPU and audio share group 12; the third target's group 7 still has
    e1000 on its host driver."""
    with pytest.raises(NotViable) as exc:
        bind([GPU, AUDIO, EDU_BRIDGED], root=fake.root)
    assert [p["device"] for p in exc.value.problems] == [E1000_BRIDGED]
    assert fake.writes == []


def test_a_group_held_open_refuses_with_one_problem_per_target(fake: FakeSysfs) -> None:
    with pytest.raises(DeviceInUse) as exc:
        bind(BUSY_NIC, root=fake.root)
    held = "/dev/vfio/30 is held open by pid 4242 (qemu-system-x86)"
    assert str(exc.value) == f"refusing to bind: {held}"
    assert exc.value.problems == [{"device": BUSY_NIC, "driver": "vfio-pci", "kind": "in-use",
                                   "reason": held, "fix": "stop pid 4242 (qemu-system-x86) first",
                                   "evidence": []}]


def test_no_group_on_an_iommu_host_carries_its_problem(fake: FakeSysfs) -> None:
    fake.add_device("0000:09:00.0", 0x8086, 0x100E, 0x020000, driver="e1000")  # no group
    d = Host(fake.root).diagnose("0000:09:00.0")
    (own,) = [p for p in d.problems if p.kind == P_NO_GROUP]
    with pytest.raises(BindError) as exc:
        bind("0000:09:00.0", root=fake.root)
    assert str(exc.value) == f"refusing to bind 0000:09:00.0: {own.reason}; fix: {own.fix}"
    assert exc.value.problems == [own.as_dict()]


@pytest.fixture
def storage(tmp_path) -> Iterator[FakeSysfs]:
    f = FakeSysfs(tmp_path / "storage", noiommu=False, cdev=True)
    f.add_standard_drivers()
    f.add_device(NVME, 0x144D, 0xA808, 0x010802, group=40, driver="nvme")
    f.add_device(NVME_PEER, 0x1234, 0x11E8, 0x00FF00, group=40)
    f.add_block(NVME, "nvme0n1", 0, subdir="nvme/nvme0")
    for minor in (1, 2, 3):
        f.add_block(NVME, f"nvme0n1p{minor}", minor, parent="nvme0n1")
    with f:
        yield f


def test_the_refusal_counts_the_other_uses(storage: FakeSysfs) -> None:
    swap = f"block device nvme0n1p2 of {NVME} is active swap"
    storage.add_swap("/dev/nvme0n1p2")
    with pytest.raises(HostUsesDevice) as exc:
        bind(NVME, root=storage.root)
    assert str(exc.value).startswith(f"refusing to bind {NVME}: {swap}; fix: swapoff")
    assert str(exc.value).endswith("or --force to take it anyway")  # one use: no count
    storage.add_dm("dm-0", "vg0-home", 0, on=["nvme0n1p1"])
    storage.add_mount("253:0", "/home", "/dev/mapper/vg0-home")
    with pytest.raises(HostUsesDevice) as exc:
        bind(NVME, root=storage.root)
    assert str(exc.value).endswith(" first, or --force to take it anyway (+1 more problem)")
    storage.add_mount("259:3", "/srv", "/dev/nvme0n1p3")
    with pytest.raises(HostUsesDevice) as exc:
        bind(NVME, root=storage.root)
    assert str(exc.value).endswith(" (+2 more problems)")
    assert len(exc.value.problems) == 3


def test_a_peers_use_says_that_group_would_take_it(storage: FakeSysfs) -> None:
    storage.add_swap("/dev/nvme0n1p2")
    d = Host(storage.root).diagnose(NVME_PEER)
    (swap,) = [p for p in d.problems if p.kind == "swap"]
    assert swap.reason == (f"block device nvme0n1p2 of {NVME} is active swap (binding with --group "
                           f"would take it from the host along with {NVME_PEER})")


def test_a_direct_region_shared_by_two_targets_is_one_problem_each(storage: FakeSysfs) -> None:
    storage.add_device("0000:00:14.0", 0x8086, 0x100E, 0x020000, group=5, driver="e1000")
    storage.add_device("0000:00:14.1", 0x8086, 0x100E, 0x020000, group=5, driver="e1000")
    storage.set_reserved_regions(5, "0x00000000bddde000 0x00000000bdddefff direct\n")
    with pytest.raises(HostUsesDevice) as exc:
        bind(["00:14.0", "00:14.1"], root=storage.root)
    assert [(p["kind"], p["device"]) for p in exc.value.problems] == [
        ("reserved-direct", "0000:00:14.0"), ("reserved-direct", "0000:00:14.1")]
    assert str(exc.value).endswith(" (+1 more problem)")


def test_the_boot_vga_use_names_every_framebuffer(storage: FakeSysfs) -> None:
    gpu = "0000:01:00.0"
    storage.add_device(gpu, 0x10DE, 0x1B80, 0x030000, group=12, driver="nouveau")
    storage.set_boot_vga(gpu)
    storage.add_framebuffer(0, None)
    storage.add_framebuffer(1, None)
    assert Host(storage.root).usage.uses(gpu, 0x030000) == [Use(
        gpu, "boot-vga", "boot_vga",
        f"{gpu} is the boot VGA device and the host has a framebuffer (fb0, fb1): the firmware "
        "console runs on it",
        "move the console off it (video=efifb:off, or boot with another primary GPU); "
        "--force to take it anyway",
        [f"/sys/bus/pci/devices/{gpu}/boot_vga = 1", "/sys/class/graphics"])]


def test_a_driver_not_loaded_names_its_module(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "nodrivers", noiommu=False)
    fake.add_device(EDU, 0x1234, 0x11E8, 0x00FF00, group=31)
    with fake, pytest.raises(BindError) as exc:
        bind(EDU, root=fake.root, driver="vfio-pci")
    assert str(exc.value) == "driver vfio-pci is not loaded (modprobe vfio_pci)"


# ---- rollback --------------------------------------------------------------------------------

def test_a_device_this_call_did_not_change_is_not_rolled_back(bare: FakeSysfs, tmp_path) -> None:
    """The first device was bound by an earlier call (its record says so); a
    later call that fails on a device after it must leave it where it is."""
    state = str(tmp_path / "state")
    earlier, failing = "0000:02:00.0", "0000:03:00.0"
    bare.add_device(earlier, 0x1234, 0x11E8, 0x00FF00, group=2)
    bare.add_device(failing, 0x8086, 0x100E, 0x020000, group=3, driver="e1000")
    bind(earlier, root=bare.root, state_dir=state)
    bare.fail_probe_devices.add(("vfio-pci", failing))
    with pytest.raises(BindError) as exc:
        bind([earlier, failing], root=bare.root, state_dir=state)
    assert str(exc.value) == (
        f"binding {failing} to vfio-pci failed: after drivers_probe its driver is none (the probe "
        f"did not attach; see dmesg); rolled back: {failing} back on e1000")
    assert bare.devices[earlier].driver == "vfio-pci" and bare.devices[failing].driver == "e1000"


def test_the_rollback_names_each_device_put_back(bare: FakeSysfs, tmp_path) -> None:
    plain, on_e1000 = "0000:02:00.0", "0000:03:00.0"
    bare.add_device(plain, 0x1234, 0x11E8, 0x00FF00, group=2)
    bare.add_device(on_e1000, 0x8086, 0x100E, 0x020000, group=3, driver="e1000")
    bare.fail_probe_devices.add(("vfio-pci", on_e1000))
    with pytest.raises(BindError) as exc:
        bind([on_e1000, plain], root=bare.root, state_dir=str(tmp_path / "state"))
    assert str(exc.value) == (
        f"binding {on_e1000} to vfio-pci failed: after drivers_probe its driver is none (the probe "
        f"did not attach; see dmesg); rolled back: {on_e1000} back on e1000, {plain} back on no "
        "driver")
    assert bare.devices[plain].driver is None and bare.devices[on_e1000].driver == "e1000"


def test_a_record_that_cannot_be_written_is_a_bind_error(fake: FakeSysfs, tmp_path,
                                                           monkeypatch) -> None:
    def full(self: BindState, record: dict) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(BindState, "save", full)
    with pytest.raises(BindError) as exc:
        bind(EDU, root=fake.root, state_dir=str(tmp_path / "state"))
    assert str(exc.value) == f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
    assert fake.devices[EDU].driver is None and fake.writes == []


def test_group_on_a_bridge_goes_on_to_the_next_device(fake: FakeSysfs, tmp_path) -> None:
    results = bind([PCI_BRIDGE, EDU], root=fake.root, group=True, dry_run=True,
                   state_dir=str(tmp_path / "state"))
    assert [r.device for r in results] == [EDU_BRIDGED, E1000_BRIDGED, EDU]


# ---- nodes -----------------------------------------------------------------------------------

def test_a_stale_node_keeps_the_kernels_number(fake: FakeSysfs) -> None:
    bind(EDU, root=fake.root)
    kernel = Path(fake.p("sys/class/vfio/31/dev")).read_text().strip()
    prefix = fake.root.rstrip("/") + "/"
    os.unlink(fake.p("dev/vfio/31"))
    make_char_node(fake.p("dev/vfio/31"), VFIO_GROUP_MAJOR, 99)
    check = group_node_check(prefix, 31, False)
    assert (check.state, check.kernel_devnum) == (NODE_STALE, kernel)
    os.unlink(fake.p("dev/vfio/31"))
    Path(fake.p("dev/vfio/31")).touch()
    check = group_node_check(prefix, 31, False)
    assert (check.state, check.detail, check.kernel_devnum) == (
        NODE_STALE, "/dev/vfio/31 is not a character device", kernel)


# ---- diagnoses, whole ------------------------------------------------------------------------

def test_no_iommu_at_all_is_said_by_the_diagnosis(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "no-iommu", iommu=False, noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x8086, 0x100E, 0x020000, driver="e1000")
    with fake, pytest.raises(NoIommu) as exc:
        Host(fake.root).diagnose("0000:00:04.0")
    assert str(exc.value) == (
        f"no IOMMU: 0000:00:04.0 has no IOMMU group and {fake.root}/sys/kernel/iommu_groups is "
        "empty; boot with intel_iommu=on (or amd_iommu=on) and enable VT-d/AMD-Vi in firmware")


def test_a_bridge_says_so_before_its_groups_problems(bare: FakeSysfs) -> None:
    bridge, nic = "0000:00:1c.0", "0000:01:00.0"
    bare.add_device(bridge, 0x8086, 0xA110, 0x060400, group=6, driver="pcieport")
    bare.add_device(nic, 0x8086, 0x100E, 0x020000, group=6, driver="e1000")
    d = Host(bare.root).diagnose(bridge)
    assert d.problems[0] == Problem(bridge, "pcieport",
                                    f"{bridge} is a PCI bridge; vfio-pci does not take bridges",
                                    "assign the endpoints behind the bridge instead", "bridge")
    assert [(p.device, p.kind) for p in d.problems[1:]] == [(nic, "host-driver")]


def test_a_device_on_pci_stub_is_not_on_vfio(bare: FakeSysfs) -> None:
    dev = "0000:02:00.0"
    bare.add_driver("pci-stub")
    bare.add_device(dev, 0x1234, 0x11E8, 0x00FF00, group=2, driver="pci-stub")
    d = Host(bare.root).diagnose(dev)
    assert d.problems == [Problem(dev, "pci-stub", f"{dev} is not bound to a vfio driver (pci-stub)",
                                  f"bind it to vfio-pci: pyvfio bind {dev}", "not-vfio")]


def test_a_direct_region_is_a_whole_problem(bare: FakeSysfs) -> None:
    dev = "0000:00:14.0"
    bare.add_device(dev, 0x8086, 0x100E, 0x020000, group=5, driver="e1000")
    bare.set_reserved_regions(5, "0x00000000bddde000 0x00000000bdddefff direct\n")
    (direct,) = [p for p in Host(bare.root).diagnose(dev).problems if p.kind == "reserved-direct"]
    assert direct == Problem(
        dev, "e1000",
        "IOMMU group 5 has a firmware direct mapping 0x00000000bddde000-0x00000000bdddefff (type "
        "direct: an RMRR that is not relaxable); the kernel refuses DMA ownership of such a group "
        "(EINVAL, \"iommu: Prevent RESV_DIRECT devices from blocking domains\"), so neither the "
        "legacy VFIO API nor iommufd can use it",
        "the firmware reserves this memory for the device (ACPI DMAR RMRR): a firmware setting or "
        "update that drops the RMRR (legacy USB, a shared iGPU buffer, a BMC) is the only fix; the "
        "kernel allows no override",
        "reserved-direct", ["/sys/kernel/iommu_groups/5/reserved_regions"])


def test_the_devices_own_uses_come_before_its_peers(bare: FakeSysfs) -> None:
    first, second = "0000:03:00.0", "0000:03:00.1"
    for address, name in ((first, "eth0"), (second, "eth1")):
        bare.add_device(address, 0x8086, 0x100E, 0x020000, group=8, driver="e1000")
        bare.add_netdev(address, name)
        bare.add_ipv4_route(name, "10.0.0.0", 8)
    d = Host(bare.root).diagnose(second)
    assert [(p.device, p.kind) for p in d.problems if p.kind == "active-netdev"] == [
        (second, "active-netdev"), (first, "active-netdev")]
