"""Whole texts and fields where other tests check a fragment: which path a
caller without write rights is refused on (each in turn, as nobody), the
bind record's owner and time, a dry run's record step for a driverless
device, a probe that does not attach, and each kind of group member on a
host driver.  A fragment check passes when a later check gives the same
words for another reason; these do not."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

from pyvfio.errors import BindError, NotPermitted
from pyvfio.host import Host, bind
from pyvfio.host.binding import BindState
from pyvfio.host.diagnosis import Problem
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import AUDIO, EDU, GPU

SYSFS_HINT = "binding needs root (or write access to sysfs); nothing was changed"


@pytest.fixture
def shared() -> Iterator[FakeSysfs]:
    """A small tree that the user nobody can read but not write (0755 and
    0644, owned by root), in a directory of its own outside tmp_path (whose
    parents nobody may not search)."""
    base = tempfile.mkdtemp(prefix="pyvfio-exact-")
    os.chmod(base, 0o755)
    fake = FakeSysfs(os.path.join(base, "root"), noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=3)
    fake.add_device("0000:00:04.0", 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    for dirpath, dirnames, _ in os.walk(base):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    try:
        with fake:
            yield fake
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _refusal_as_nobody(fake: FakeSysfs, address: str) -> str:
    nobody = pwd.getpwnam("nobody").pw_uid
    os.seteuid(nobody)
    try:
        with pytest.raises(NotPermitted) as exc:
            bind(address, root=fake.root)
    finally:
        os.seteuid(0)
    return str(exc.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (seteuid)")
def test_each_path_a_bind_writes_is_checked_in_turn(shared: FakeSysfs) -> None:
    """Made writable one by one, each path the bind would write is the next
    refusal, named in full: drivers_probe, the device's driver_override, the
    old driver's unbind, then the directory of the bind records.  The rights
    are those of the effective user (nobody), not the real one (root)."""
    fake = shared
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
