"""Diagnosis: viable, in use, driver kinds, variants, best driver, ready."""

from __future__ import annotations

import os

import pytest

from pyvfio.errors import DeviceInUse, HostStateError, NoIommu, NotBoundToVfio, NotViable
from pyvfio.host import Host, require_ready
from pyvfio.testing.fakesysfs import FakeSysfs

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


def _to_vfio(fake: FakeSysfs, bdf: str, driver: str = "vfio-pci") -> None:
    """Bind by hand, as an operator would with echo."""
    current = fake.devices[bdf].driver
    fake.write(fake.p(f"sys/bus/pci/devices/{bdf}/driver_override"), driver)
    if current:
        fake.write(fake.p(f"sys/bus/pci/drivers/{current}/unbind"), bdf)
    fake.write(fake.p("sys/bus/pci/drivers_probe"), bdf)
    assert fake.devices[bdf].driver == driver


def test_gpu_with_audio_on_host_driver(fake: FakeSysfs) -> None:
    d = Host(fake.root).diagnose(GPU)
    assert (d.group, d.driver, d.driver_kind, d.best_driver) == (12, "nouveau", "host", "vfio-pci")
    assert not d.viable and not d.ready and d.in_use == []
    audio = next(p for p in d.problems if p.device == AUDIO)
    assert audio.driver == "snd_hda_intel"
    assert audio.fix == f"bind {AUDIO} (snd_hda_intel) to vfio-pci, or use --group"
    assert d.problems[0].device == GPU  # the device's own problem comes first


def test_gpu_on_vfio_but_audio_on_host_is_not_viable(fake: FakeSysfs) -> None:
    _to_vfio(fake, GPU)
    d = Host(fake.root).diagnose(GPU)
    assert d.driver_kind == "vfio" and d.group_node == "/dev/vfio/12"
    assert not d.viable and not d.ready
    assert [(p.device, p.driver, p.kind) for p in d.problems] == [(AUDIO, "snd_hda_intel", "host-driver")]
    with pytest.raises(NotViable) as exc:
        require_ready(GPU, root=fake.root)
    assert AUDIO in str(exc.value) and "snd_hda_intel" in str(exc.value)
    assert exc.value.problems[0]["device"] == AUDIO
    _to_vfio(fake, AUDIO)
    d = require_ready(GPU, root=fake.root)
    assert d.ready and d.viable and d.as_dict()["ready"] is True


def test_bridged_group(fake: FakeSysfs) -> None:
    """QEMU's pcie-pci-bridge topology: the bridge (no driver) is fine, e1000 is not."""
    host = Host(fake.root)
    d = host.diagnose(EDU_BRIDGED)
    assert d.driver_kind == "none" and not d.viable
    kinds = {m.device: m.driver_kind for m in d.members}
    assert kinds == {PCI_BRIDGE: "none", EDU_BRIDGED: "none", E1000_BRIDGED: "host"}
    offenders = [(p.device, p.driver) for p in d.problems if p.kind == "host-driver"]
    assert offenders == [(E1000_BRIDGED, "e1000")]
    assert d.problems[0].kind == "not-vfio" and "pyvfio bind 0000:03:01.0" in d.problems[0].fix
    with pytest.raises(NotBoundToVfio, match=r"0000:03:01\.0"):
        require_ready(EDU_BRIDGED, root=fake.root)


def test_root_port_on_pcieport_is_a_bridge(fake: FakeSysfs) -> None:
    host = Host(fake.root)
    assert host.driver_kind(host.device(ROOT_PORT)) == "bridge"
    d = host.diagnose(ROOT_PORT)
    assert d.viable and not d.ready and d.problems[0].kind == "bridge"


def test_bridge_on_a_foreign_driver_breaks_viability(bare: FakeSysfs) -> None:
    bare.add_driver("weird_bridge", classes=[0x0604])
    bare.add_device("0000:00:1e.0", 0x8086, 0x244E, 0x060400, group=4, driver="weird_bridge")
    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4)
    d = Host(bare.root).diagnose("0000:01:00.0")
    assert not d.viable
    assert any(p.device == "0000:00:1e.0" and p.driver == "weird_bridge" for p in d.problems)


def test_pci_stub_and_driverless_members_are_viable(bare: FakeSysfs) -> None:
    bare.add_device("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, group=4, driver="vfio-pci")
    bare.add_device("0000:01:00.1", 0x1234, 0x11E8, 0x00FF00, group=4, driver="pci-stub")
    bare.add_device("0000:01:00.2", 0x1234, 0x11E8, 0x00FF00, group=4)
    d = Host(bare.root).diagnose("0000:01:00.0")
    assert {m.driver_kind for m in d.members} == {"vfio", "stub", "none"}
    assert d.viable and d.ready and d.problems == []


def test_variant_driver(fake: FakeSysfs) -> None:
    host = Host(fake.root)
    assert host.best_driver(host.device(MLX_VF)) == "mlx5_vfio_pci"
    _to_vfio(fake, MLX_VF, "mlx5_vfio_pci")
    d = Host(fake.root).diagnose(MLX_VF)
    assert d.driver_kind == "vfio-variant" and d.ready and d.best_driver == "mlx5_vfio_pci"


def test_best_driver_takes_the_fewest_wildcards(bare: FakeSysfs) -> None:
    bare.add_driver("generic_vfio", vfio=True, vfio_aliases=["v000015B3d*sv*sd*bc*sc*i*"])
    bare.add_driver("exact_vfio", vfio=True, vfio_aliases=["v000015B3d0000101Esv*sd*bc02sc00i*"])
    bare.add_device("0000:01:00.0", 0x15B3, 0x101E, 0x020000, group=4)
    bare.add_device("0000:01:00.1", 0x15B3, 0x1017, 0x020000, group=5)
    bare.add_device("0000:01:00.2", 0x8086, 0x1017, 0x020000, group=6)
    host = Host(bare.root)
    assert host.best_driver(host.device("0000:01:00.0")) == "exact_vfio"
    assert host.best_driver(host.device("0000:01:00.1")) == "generic_vfio"
    assert host.best_driver(host.device("0000:01:00.2")) == "vfio-pci"


def test_builtin_variant_from_modules_builtin_modinfo(bare: FakeSysfs) -> None:
    """An all-built-in kernel: the aliases are in modules.builtin.modinfo."""
    bare.add_driver("nvgrace_gpu_vfio_pci", vfio=True)
    modinfo = bare.p(f"lib/modules/{bare.release}/modules.builtin.modinfo")
    with open(modinfo, "wb") as f:
        f.write(b"vfio.alias=devname:vfio/vfio\0"
                b"nvgrace_gpu_vfio_pci.alias=vfio_pci:v000010DEd00002342sv*sd*bc*sc*i*\0"
                b"nvgrace_gpu_vfio_pci.license=GPL\0")
    bare.add_device("0000:01:00.0", 0x10DE, 0x2342, 0x030200, group=4)
    host = Host(bare.root)
    assert host.best_driver(host.device("0000:01:00.0")) == "nvgrace_gpu_vfio_pci"
    bare.write(bare.p("sys/bus/pci/devices/0000:01:00.0/driver_override"), "nvgrace_gpu_vfio_pci")
    bare.write(bare.p("sys/bus/pci/drivers_probe"), "0000:01:00.0")
    assert Host(bare.root).diagnose("0000:01:00.0").driver_kind == "vfio-variant"


def test_variant_alias_without_group_node_is_reported(bare: FakeSysfs) -> None:
    """modules.alias says vfio, /dev/vfio/N says no: reported, not hidden."""
    bare.add_device("0000:01:00.0", 0x15B3, 0x101E, 0x020000, group=4, driver="mlx5_vfio_pci")
    os.unlink(bare.p("dev/vfio/4"))
    d = Host(bare.root).diagnose("0000:01:00.0")
    assert d.driver_kind == "vfio-variant" and not d.ready
    assert [p.kind for p in d.problems] == ["no-group-node"]
    assert "/dev/vfio/4 does not exist" in d.problems[0].reason
    with pytest.raises(HostStateError, match="/dev/vfio/4"):
        require_ready("0000:01:00.0", root=bare.root)


def test_group_node_without_known_vfio_driver_is_reported(bare: FakeSysfs) -> None:
    """A variant whose module lacks vfio_pci aliases, on a kernel without
    device cdevs, in a group with another driven member: /sys/class/vfio/4
    says a driver registered the group, nothing says which one."""
    bare.add_driver("oot_vfio", vfio=True)  # no aliases in modules.alias
    bare.add_device("0000:01:00.0", 0x1D0F, 0xEFA0, 0x020000, group=4, driver="oot_vfio")
    bare.add_device("0000:01:00.1", 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    d = Host(bare.root).diagnose("0000:01:00.0")
    assert d.driver_kind == "host"
    disagreements = [p for p in d.problems if p.kind == "variant-disagreement"]
    assert [p.driver for p in disagreements] == ["oot_vfio", "e1000"]
    assert "/dev/vfio/4 exists" in disagreements[0].reason
    # each names its driver's module, where modinfo would look
    assert disagreements[1].reason == (
        "/dev/vfio/4 exists, so a driver in group 4 registered with vfio, but nothing says "
        "which: modules.alias lists no vfio_pci alias for e1000 (module e1000) and the kernel "
        "has no device cdev for it")
    assert disagreements[1].fix == (
        "if e1000 is a vfio variant driver, its vfio_pci: aliases are missing (run depmod; "
        "check modinfo e1000); otherwise the node is stale")


def test_sole_member_of_a_registered_group_is_a_vfio_device(bare: FakeSysfs) -> None:
    """The same driver alone in its group (no cdev, no alias): the kernel's
    registration of the group names it, so it is a vfio device and ready."""
    bare.add_driver("oot_vfio", vfio=True)
    bare.add_device("0000:01:00.0", 0x1D0F, 0xEFA0, 0x020000, group=4, driver="oot_vfio")
    d = Host(bare.root).diagnose("0000:01:00.0")
    assert d.driver_kind == "vfio-variant" and d.best_driver == "oot_vfio" and d.ready
    assert any(e["source"] == "/sys/class/vfio/4" and "only member" in e["says"] for e in d.evidence)


def test_in_use_group(fake: FakeSysfs) -> None:
    d = Host(fake.root).diagnose(BUSY_NIC)
    assert d.driver_kind == "vfio" and d.viable and not d.ready
    assert d.in_use == [{"pid": 4242, "comm": "qemu-system-x86", "path": "/dev/vfio/30"}]
    with pytest.raises(DeviceInUse, match=r"pid 4242 \(qemu-system-x86\)") as exc:
        require_ready(BUSY_NIC, root=fake.root)
    assert exc.value.problems[-1]["kind"] == "in-use"


def test_in_use_through_a_cdev(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "r", cdev=True, noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:03.0", 0x1234, 0x11E8, 0x00FF00, group=3, driver="vfio-pci")
    fake.add_process(99, "cloud-hypervisor", ["/dev/iommu", "/dev/vfio/devices/vfio0"])
    d = Host(fake.root).diagnose("0000:00:03.0")
    assert d.in_use == [{"pid": 99, "comm": "cloud-hypervisor", "path": "/dev/vfio/devices/vfio0"}]
    assert d.as_dict()["vfio_cdev"] == "vfio0"
    assert d.as_dict()["vfio_cdev_path"] == "/dev/vfio/devices/vfio0"


def test_in_use_through_a_legacy_device_fd(fake: FakeSysfs) -> None:
    """The holder closed the group fd but kept the device fd: only its
    fdinfo (vfio-device-syspath, Linux 6.18+) names the device."""
    _to_vfio(fake, EDU)
    fake.add_process(77, "dpdk-testpmd", ["/dev/vfio/vfio"], device_fds=[EDU])
    d = Host(fake.root).diagnose(EDU)
    assert d.in_use == [{"pid": 77, "comm": "dpdk-testpmd", "path": f"anon_inode:[vfio-device] {EDU}"}]
    assert d.problems[-1].reason.startswith("the device is in use")
    assert Host(fake.root).diagnose(BUSY_NIC).in_use[0]["pid"] == 4242  # others unaffected


def test_ready_device(fake: FakeSysfs) -> None:
    _to_vfio(fake, EDU)
    d = require_ready(EDU, root=fake.root)
    evidence = d.as_dict().pop("evidence")
    assert {"source": "/sys/class/vfio/31/dev", "says": "0:1"} in evidence
    assert {"source": "/dev/vfio/31", "says": "character device 0:1"} in evidence
    assert {"source": "/sys/kernel/iommu_groups/31/reserved_regions",
            "says": "0xfee00000-0xfeefffff msi"} in evidence
    assert {k: v for k, v in d.as_dict().items() if k != "evidence"} == {
        "device": EDU, "group": 31, "driver": "vfio-pci", "driver_kind": "vfio",
        "best_driver": "vfio-pci", "viable": True, "in_use": [], "ready": True, "problems": [],
        "group_node": "/dev/vfio/31", "vfio_cdev": None, "vfio_cdev_path": None,
        "noiommu": False,
        "members": [{"device": EDU, "driver": "vfio-pci", "driver_kind": "vfio", "is_bridge": False}],
    }


def test_no_iommu(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "r", iommu=False, noiommu=False)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
    with pytest.raises(NoIommu, match="intel_iommu=on"):
        Host(fake.root).diagnose("0000:00:04.0")


def test_noiommu_mode(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "r", iommu=False, noiommu=True)
    fake.add_standard_drivers()
    fake.add_device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00)
    d = Host(fake.root).diagnose("0000:00:04.0")
    assert d.group is None and d.noiommu and d.problems[0].kind == "no-iommu-group"
    _to_vfio(fake, "0000:00:04.0")
    d = Host(fake.root).diagnose("0000:00:04.0")
    assert d.ready and d.noiommu and d.group_node == "/dev/vfio/noiommu-0"
