"""What the host commands say: Diagnosis.summary, require_ready's messages, the
text of ``groups``, ``check`` and ``restore``, and pyvfio.host's lazy names.

The expected lines are built from the diagnosis the library returns (its
reasons and fixes), so these tests pin the layout, not the wording of the
problems (tests/host/test_diagnosis.py covers those)."""

from __future__ import annotations

import importlib
import json
import os

import pytest

import pyvfio.host
from pyvfio.cli import main
from pyvfio.errors import DeviceInUse, HostStateError, NotBoundToVfio, NotViable
from pyvfio.host import Host, bind, require_ready
from pyvfio.testing.fakesysfs import VFIO_GROUP_MAJOR, FakeSysfs, make_char_node

from .conftest import (
    AUDIO,
    BUSY_NIC,
    E1000_BRIDGED,
    EDU,
    EDU_BRIDGED,
    GPU,
    MLX_VF,
    PCI_BRIDGE,
    ROOT_PORT,
)
from .test_diagnosis import _to_vfio


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- Diagnosis.summary and require_ready ----

def test_summary_of_a_ready_device(fake: FakeSysfs) -> None:
    _to_vfio(fake, EDU)
    assert Host(fake.root).diagnose(EDU).summary() == f"{EDU} is ready (group 31, vfio-pci)"


def test_summary_names_the_first_problem_and_counts_the_others(fake: FakeSysfs, bare: FakeSysfs) -> None:
    alone = Host(fake.root).diagnose(MLX_VF)  # one problem
    (only,) = alone.problems
    assert alone.summary() == f"{alone.device} is not ready: {only.reason}; fix: {only.fix}"

    gpu = Host(fake.root).diagnose(GPU)  # its own driver, then the audio function's
    first = gpu.problems[0]
    assert len(gpu.problems) == 2
    assert gpu.summary() == f"{GPU} is not ready: {first.reason}; fix: {first.fix} (+1 more problem)"

    for fn in range(3):
        bare.add_device(f"0000:01:00.{fn}", 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    d = Host(bare.root).diagnose("0000:01:00.0")
    first = d.problems[0]
    assert len(d.problems) == 3
    assert d.summary() == (f"0000:01:00.0 is not ready: {first.reason}; fix: {first.fix}"
                           " (+2 more problems)")


def test_require_ready_names_the_problem_of_its_kind(fake: FakeSysfs) -> None:
    d = Host(fake.root).diagnose(GPU)
    own = d.problems[0]
    with pytest.raises(NotBoundToVfio) as not_vfio:
        require_ready(GPU, root=fake.root)
    assert str(not_vfio.value) == f"cannot use {GPU}: {own.reason}; fix: {own.fix} (+1 more problem)"
    assert not_vfio.value.problems == [p.as_dict() for p in d.problems]

    _to_vfio(fake, GPU)
    (audio,) = Host(fake.root).diagnose(GPU).problems
    with pytest.raises(NotViable) as not_viable:
        require_ready(GPU, root=fake.root)
    assert str(not_viable.value) == f"cannot use {GPU}: {audio.reason}; fix: {audio.fix}"
    assert not_viable.value.problems == [audio.as_dict()]

    (busy,) = Host(fake.root).diagnose(BUSY_NIC).problems
    with pytest.raises(DeviceInUse) as in_use:
        require_ready(BUSY_NIC, root=fake.root)
    assert str(in_use.value) == f"cannot use {BUSY_NIC}: {busy.reason}; fix: {busy.fix}"


def test_require_ready_counts_every_other_problem(bare: FakeSysfs) -> None:
    bare.add_device("0000:01:00.0", 0x8086, 0x100E, 0x020000, group=4, driver="vfio-pci")
    for fn in (1, 2):
        bare.add_device(f"0000:01:00.{fn}", 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    problems = Host(bare.root).diagnose("0000:01:00.0").problems
    assert [p.kind for p in problems] == ["host-driver", "host-driver"]
    with pytest.raises(NotViable) as exc:
        require_ready("0000:01:00.0", root=bare.root)
    assert str(exc.value) == (f"cannot use 0000:01:00.0: {problems[0].reason}; fix: {problems[0].fix}"
                              " (+1 more problem)")
    bare.add_device("0000:01:00.3", 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    with pytest.raises(NotViable, match=r"\(\+2 more problems\)$"):
        require_ready("0000:01:00.0", root=bare.root)


def test_require_ready_with_a_missing_node_is_a_host_state_error(bare: FakeSysfs) -> None:
    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4, driver="vfio-pci")
    os.unlink(bare.p("dev/vfio/4"))
    d = Host(bare.root).diagnose("0000:01:00.0")
    (node,) = d.problems
    assert node.kind == "no-group-node"
    with pytest.raises(HostStateError) as exc:
        require_ready("0000:01:00.0", root=bare.root)
    assert type(exc.value) is HostStateError
    assert str(exc.value) == f"cannot use 0000:01:00.0: {node.reason}; fix: {node.fix}"
    assert exc.value.problems == [node.as_dict()]


def test_require_ready_without_a_problem_of_the_error_s_kinds_gives_the_summary(bare: FakeSysfs) -> None:
    """A stale /dev/vfio/N (not the kernel's node): on vfio, viable, not in
    use, no node-missing problem; the message is the diagnosis summary."""
    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4, driver="vfio-pci")
    make_char_node(bare.p("dev/vfio/4"), VFIO_GROUP_MAJOR, 99)
    d = Host(bare.root).diagnose("0000:01:00.0")
    assert [p.kind for p in d.problems] == ["stale-node"] and d.viable and not d.ready
    with pytest.raises(HostStateError) as exc:
        require_ready("0000:01:00.0", root=bare.root)
    assert type(exc.value) is HostStateError
    assert str(exc.value) == d.summary()
    assert exc.value.problems == [p.as_dict() for p in d.problems]


def test_require_ready_takes_a_host_and_normalizes(fake: FakeSysfs) -> None:
    _to_vfio(fake, EDU)
    host = Host(fake.root)
    d = require_ready("06:00.0", host=host)
    assert d.device == EDU and d.ready
    with pytest.raises(NotBoundToVfio):
        require_ready("01:00.0", root="/nonexistent", host=host)  # the host given wins


# ---- groups ----

def _table_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    return {line.split()[0]: line.split(None, 4) for line in lines[1:]}


def test_groups_table(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "groups")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["GROUP", "VIABLE", "TYPE", "NODE", "DEVICES"]
    rows = _table_rows(out)
    assert sorted(rows, key=int) == ["1", "7", "12", "20", "30", "31"]
    host = Host(fake.root)
    for number, row in rows.items():
        g = host.group(int(number))
        assert row[2] == (g.type or "-")
        assert row[3] == (host.group_node(g.number) or "-")
    assert rows["7"][1] == "no" and rows["31"][1] == "yes" and rows["30"][3] == "/dev/vfio/30"
    assert rows["7"][4] == (f"{PCI_BRIDGE} (no driver, none), {EDU_BRIDGED} (no driver, none), "
                            f"{E1000_BRIDGED} (e1000, host)")
    assert rows["1"][4] == f"{ROOT_PORT} (pcieport, bridge)"
    # The columns line up: each header starts where its cells start.
    starts = [lines[0].index(h) for h in ("VIABLE", "TYPE", "NODE", "DEVICES")]
    for line in lines[1:]:
        assert all(line[s - 2:s] == "  " and line[s] != " " for s in starts)


def test_groups_table_without_an_iommu_names_the_mode(tmp_path, capsys) -> None:
    for noiommu, mode in ((True, "on"), (False, "off")):
        fake = FakeSysfs(tmp_path / mode, iommu=False, noiommu=noiommu)
        fake.add_standard_drivers()
        fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
        with fake:
            code, out, err = run(capsys, "--root", fake.root, "groups")
            assert code == 0
            assert err == f"note: no IOMMU present; vfio no-IOMMU mode is {mode}\n"
            if noiommu:  # a no-IOMMU group has a name, no type
                _to_vfio(fake, "0000:00:04.0")
                code, out, err = run(capsys, "--root", fake.root, "groups")
                assert Host(fake.root).group(0).type is None
                assert out.splitlines()[1].split()[:4] == ["0", "yes", "-", "/dev/vfio/noiommu-0"]


def test_group_members_of_an_unplugged_device_are_left_out(fake: FakeSysfs) -> None:
    from pyvfio.host.commands import group_dict

    group = Host(fake.root).group(7)
    # Gone from the bus while the group listing still names it (unplugged while we read).
    os.unlink(fake.p(f"sys/bus/pci/devices/{EDU_BRIDGED}"))
    g = group_dict(Host(fake.root), group)
    assert g["devices"] == [PCI_BRIDGE, EDU_BRIDGED, E1000_BRIDGED]
    assert [m["device"] for m in g["members"]] == [PCI_BRIDGE, E1000_BRIDGED]
    assert g["viable"] is False  # e1000 still breaks it
    os.unlink(fake.p(f"sys/bus/pci/devices/{E1000_BRIDGED}"))
    g = group_dict(Host(fake.root), group)
    assert [m["device"] for m in g["members"]] == [PCI_BRIDGE] and g["viable"] is True


# ---- check ----

def test_check_table_lists_users_problems_and_fixes(fake: FakeSysfs, capsys) -> None:
    code, out, err = run(capsys, "--root", fake.root, "check", GPU, BUSY_NIC, EDU_BRIDGED)
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["DEVICE", "GROUP", "DRIVER", "KIND", "BEST", "VIABLE", "IN-USE", "READY"]
    assert lines[1].split() == [GPU, "12", "nouveau", "host", "vfio-pci", "no", "-", "no"]
    assert lines[2].split() == [BUSY_NIC, "30", "vfio-pci", "vfio", "vfio-pci", "yes", "4242",
                                "(qemu-system-x86)", "no"]
    assert lines[3].split() == [EDU_BRIDGED, "7", "-", "none", "vfio-pci", "no", "-", "no"]
    host = Host(fake.root)
    expected = []
    for bdf in (GPU, BUSY_NIC, EDU_BRIDGED):
        for p in host.diagnose(bdf).problems:
            expected += [f"{bdf}: {p.reason}", f"    fix: {p.fix}"]
    assert lines[4:] == expected


def test_check_table_of_a_device_without_a_group(bare: FakeSysfs, capsys) -> None:
    bare.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)  # no group
    code, out, _ = run(capsys, "--root", bare.root, "check", "00:04.0")
    assert code == 1
    assert out.splitlines()[1].split()[:3] == ["0000:00:04.0", "-", "-"]


def test_check_warns_of_noiommu_mode_on_stderr(tmp_path, capsys) -> None:
    fake = FakeSysfs(tmp_path / "r", iommu=False, noiommu=True)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
    _to_vfio(fake, "0000:00:04.0")  # the kernel makes a no-IOMMU group for it
    assert Host(fake.root).diagnose("0000:00:04.0").noiommu
    code, out, err = run(capsys, "--root", fake.root, "check", "00:04.0")
    assert code == 0
    assert err == ("WARNING: 0000:00:04.0 is in vfio's UNSAFE no-IOMMU mode: no IOMMU isolates its DMA, "
                   "so the device (and whoever drives it) can reach all of memory\n")
    assert "UNSAFE" not in out


def test_diagnose_many_is_diagnose_of_each(fake: FakeSysfs) -> None:
    host = Host(fake.root)
    many = host.diagnose_many([GPU, EDU, BUSY_NIC])
    assert [d.as_dict() for d in many] == [Host(fake.root).diagnose(a).as_dict()
                                            for a in (GPU, EDU, BUSY_NIC)]
    assert host.diagnose_many([]) == []


# ---- restore ----

def test_restore_text(fake: FakeSysfs, capsys) -> None:
    assert run(capsys, "--root", fake.root, "bind", "--group", GPU)[0] == 0
    code, out, _ = run(capsys, "--root", fake.root, "restore", "--all", "--dry-run")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{GPU}: would be restored to nouveau"
    assert lines[1].startswith("    ") and lines[1].strip()
    assert f"{AUDIO}: would be restored to snd_hda_intel" in lines
    assert lines[-1] == "dry run: nothing was changed"
    assert all(line.startswith(("    ", GPU, AUDIO, "dry run")) for line in lines)
    assert fake.devices[GPU].driver == "vfio-pci"

    code, out, _ = run(capsys, "--root", fake.root, "restore", GPU)
    assert code == 0 and out == f"{GPU}: restored to nouveau\n"
    code, out, _ = run(capsys, "--root", fake.root, "restore", "--all")
    assert code == 0 and out == f"{AUDIO}: restored to snd_hda_intel\n"
    code, out, _ = run(capsys, "--root", fake.root, "restore", "--all")
    assert code == 0 and out == "nothing to restore\n"


def test_restore_of_a_device_already_back_says_unchanged(fake: FakeSysfs, capsys) -> None:
    assert run(capsys, "--root", fake.root, "bind", EDU)[0] == 0
    # Put it back by hand: the record stays, the restore has nothing to write.
    fake.write(fake.p(f"sys/bus/pci/devices/{EDU}/driver_override"), "\n")
    fake.write(fake.p("sys/bus/pci/drivers/vfio-pci/unbind"), EDU)
    assert fake.devices[EDU].driver is None
    code, out, _ = run(capsys, "--root", fake.root, "restore", EDU)
    assert code == 0 and out == f"{EDU}: restored to no driver (unchanged)\n"


# ---- the lazy names of pyvfio.host ----

def test_every_public_name_is_its_home_modules_object(monkeypatch) -> None:
    host = pyvfio.host
    for name in host.__all__:
        monkeypatch.delitem(vars(host), name, raising=False)  # not cached yet
    for name in host.__all__:
        value = getattr(host, name)
        home = importlib.import_module(f"pyvfio.host.{host._HOME[name]}")
        assert value is getattr(home, name)
        assert vars(host)[name] is value  # cached: the next lookup is a plain attribute
    assert sorted(host._HOME) == sorted(host.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match=r"^module 'pyvfio.host' has no attribute 'nothing_here'$"):
        pyvfio.host.nothing_here  # noqa: B018
    assert not hasattr(pyvfio.host, "commands_x")


def test_check_table_lists_every_user_of_a_device(fake: FakeSysfs, capsys) -> None:
    fake.add_process(5151, "vfio-test", ["/dev/vfio/30"])
    users = Host(fake.root).diagnose(BUSY_NIC).in_use
    assert sorted(h["pid"] for h in users) == [4242, 5151]
    code, out, _ = run(capsys, "--root", fake.root, "check", BUSY_NIC)
    assert code == 1
    listed = ", ".join(f"{h['pid']} ({h['comm']})" for h in users)
    assert out.splitlines()[1].endswith(f"  {listed}  no")


def test_a_group_member_that_vanished_is_left_out_of_the_diagnosis(fake: FakeSysfs) -> None:
    os.unlink(fake.p(f"sys/bus/pci/devices/{E1000_BRIDGED}"))  # listed in the group, gone from the bus
    d = Host(fake.root).diagnose(EDU_BRIDGED)
    assert [m.device for m in d.members] == [PCI_BRIDGE, EDU_BRIDGED]
    assert d.viable and [p.kind for p in d.problems] == ["not-vfio"]


# ---- bind ----

def test_bind_text_names_what_force_overrode(fake: FakeSysfs, capsys) -> None:
    fake.add_netdev(E1000_BRIDGED, "ens2")
    fake.add_ipv4_route("ens2", "10.1.0.0", 16)
    (use,) = Host(fake.root).usage.uses(E1000_BRIDGED)
    code, out, _ = run(capsys, "--root", fake.root, "bind", "--group", "--force", EDU_BRIDGED)
    assert code == 0
    assert f"{E1000_BRIDGED}: forced past active-netdev: {use.reason}" in out.splitlines()


def test_bind_persist_dry_run_says_it_would_record(fake: FakeSysfs, capsys) -> None:
    path = fake.p("etc/pyvfio/bindings.json")
    code, out, _ = run(capsys, "--root", fake.root, "bind", "--persist", "--dry-run", EDU, "06:00.0")
    assert code == 0 and not os.path.exists(path)
    assert f"would record in {path}: {EDU}, {EDU}" in out.splitlines()


def test_restore_usage_and_json(fake: FakeSysfs, capsys) -> None:
    code, _, err = run(capsys, "--root", fake.root, "restore")
    assert code == 2 and err == "pyvfio restore: name the devices to restore, or use --all\n"
    assert run(capsys, "--root", fake.root, "bind", EDU)[0] == 0
    code, out, _ = run(capsys, "--root", fake.root, "restore", "--all", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0 and data["dry_run"] is True and [d["device"] for d in data["devices"]] == [EDU]
    code, out, _ = run(capsys, "--root", fake.root, "restore", EDU, "--json")
    assert code == 0 and json.loads(out)["dry_run"] is False


def test_a_table_line_ends_with_its_last_cell(fake: FakeSysfs, capsys) -> None:
    """A group whose every member vanished has an empty DEVICES cell: the line
    ends after the NODE column, with no padding."""
    os.unlink(fake.p(f"sys/bus/pci/devices/{EDU}"))
    code, out, _ = run(capsys, "--root", fake.root, "groups")
    assert code == 0
    lines = out.splitlines()
    assert all(line == line.rstrip() for line in lines)
    (row,) = [line for line in lines if line.startswith("31 ")]
    assert row.split() == ["31", "yes", "DMA", "-"]


def test_a_refused_dry_run_lists_every_reason(bare: FakeSysfs, capsys) -> None:
    for fn in range(3):
        bare.add_device(f"0000:01:00.{fn}", 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    code, out, err = run(capsys, "--root", bare.root, "bind", "--dry-run", "01:00.0")
    assert code == 1
    with pytest.raises(HostStateError) as exc:
        bind("01:00.0", root=bare.root, dry_run=True)
    problems = exc.value.problems  # the other two members
    assert [p["device"] for p in problems] == ["0000:01:00.1", "0000:01:00.2"]
    assert out == "".join(f"{p['device']}: {p['kind']}: {p['reason']}\n    fix: {p['fix']}\n"
                          for p in problems)
    assert err.count("\n") == 1
    code, out, _ = run(capsys, "--root", bare.root, "bind", "--dry-run", "--json", "01:00.0")
    assert code == 1 and set(json.loads(out)) == {"error"}  # JSON: the problems are in the object
    code, out, _ = run(capsys, "--root", bare.root, "bind", "01:00.0")
    assert code == 1 and out == ""  # not a dry run: the one-line error only
    bare.add_device("0000:02:00.0", 0x8086, 0x100E, 0x020000, group=5, driver="vfio-pci")
    bare.add_device("0000:02:00.1", 0x8086, 0x100E, 0x020000, group=5, driver="e1000")
    code, out, _ = run(capsys, "--root", bare.root, "bind", "--dry-run", "02:00.0")
    assert code == 1 and out == ""  # one reason: the error line says it all
