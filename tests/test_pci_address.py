"""One PCI address type (pyvfio.pci.address.PciAddress) for every layer.

The layers used to disagree: ``pyvfio ls`` listed an Intel VMD device
``10001:8a:00.0`` (a five-digit domain), but ``pyvfio.kernel.open_device`` and
a broker policy rule refused it as "not a PCI address".  Here the five-digit
domain goes through open_device (on a fake root, up to the point where the
fake kernel cannot answer an ioctl), the broker policy and daemon, and every
CLI command that takes an address.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvfio.broker.audit import AuditLog
from pyvfio.broker.client import BrokerSession
from pyvfio.broker.policy import DeviceIdentity, Policy, normalize_address
from pyvfio.broker.server import Broker
from pyvfio.broker.wire import PeerCredentials
from pyvfio.cli import main
from pyvfio.errors import BrokerRefused, KernelError, NotBoundToVfio, UsageError
from pyvfio.host import Host, normalize_bdf
from pyvfio.kernel import _sysfs, choose_backend, open_device
from pyvfio.kernel.iommufd import IommufdUnavailable, sysfs_device_dir
from pyvfio.pci.address import PciAddress
from pyvfio.testing.fakesysfs import FakeSysfs

VMD = "10001:8a:00.0"  # an NVMe drive behind Intel VMD: domain 0x10001
VMD_OTHER = "10001:8a:00.1"
EDU = "0000:00:03.0"


# --- the type --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("0000:00:03.0", "0000:00:03.0"),
    ("00:03.0", "0000:00:03.0"),
    ("1:0.1", "0000:01:00.1"),
    (" 0000:AF:1F.7\n", "0000:af:1f.7"),
    ("10001:8a:00.0", "10001:8a:00.0"),
    ("10001:8A:0.0", "10001:8a:00.0"),
    ("ffffffff:ff:1f.7", "ffffffff:ff:1f.7"),
    ("0:0:0.0", "0000:00:00.0"),
    ("00000001:00:00.0", "0001:00:00.0"),
])
def test_parse_and_print(text: str, want: str) -> None:
    addr = PciAddress.parse(text)
    assert str(addr) == want
    assert PciAddress.parse(str(addr)) == addr
    assert PciAddress.normalize(text) == want and PciAddress.is_address(text)


def test_fields_slot_order_and_hash() -> None:
    vmd = PciAddress.parse(VMD)
    assert (vmd.domain, vmd.bus, vmd.device, vmd.function) == (0x10001, 0x8A, 0, 0)
    assert vmd.slot == "10001:8a:00"
    addrs = [PciAddress.parse(a) for a in (VMD, "0000:01:00.0", "0000:00:1f.7", VMD_OTHER)]
    assert [str(a) for a in sorted(addrs)] == ["0000:00:1f.7", "0000:01:00.0", VMD, VMD_OTHER]
    assert len({PciAddress.parse("00:03.0"), PciAddress.parse("0000:00:03.0")}) == 1
    assert PciAddress.parse(vmd) is vmd


@pytest.mark.parametrize("text", [
    "", "edu", "00:03", "0000:00:03.8", "0000:00:20.0", "0000:100:00.0", "000:00:003.0",
    "100000000:00:00.0", "0000:00:03.0.1", "g0:00.0", "0000:00:03.-1", "0x00:03.0", "00:03.0 x",
])
def test_garbage_is_a_usage_error_naming_the_text(text: str) -> None:
    with pytest.raises(UsageError, match="not a PCI address") as exc:
        PciAddress.parse(text)
    assert repr(text) in str(exc.value)
    assert not PciAddress.is_address(text)


@pytest.mark.parametrize("value", [None, 3, b"00:03.0", ["00:03.0"]])
def test_non_strings_are_usage_errors(value: object) -> None:
    with pytest.raises(UsageError, match="not a PCI address"):
        PciAddress.parse(value)


@pytest.mark.parametrize(("fields", "what"), [
    ((0, 0, 0x20, 0), "device 32"), ((0, 0x100, 0, 0), "bus 256"), ((0, 0, 0, 8), "function 8"),
    ((-1, 0, 0, 0), "domain -1"), ((1 << 32, 0, 0, 0), "domain"), ((0, 0, 0, True), "function"),
])
def test_constructor_checks_ranges(fields: tuple[int, int, int, int], what: str) -> None:
    with pytest.raises(UsageError, match=f"not a PCI address \\({what}"):
        PciAddress(*fields)


@given(st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFF), st.integers(0, 0x1F),
       st.integers(0, 7))
def test_print_then_parse_is_identity(domain: int, bus: int, dev: int, fn: int) -> None:
    addr = PciAddress(domain, bus, dev, fn)
    text = str(addr)
    assert PciAddress.parse(text) == addr and PciAddress.parse(text.upper()) == addr
    assert text == f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"


@given(st.text(max_size=24))
def test_every_layer_agrees_on_any_text(text: str) -> None:
    """host, kernel backends and broker policy give the same answer for any input."""
    results = []
    for normalize in (PciAddress.normalize, normalize_bdf, _sysfs.normalize_bdf,
                      normalize_address):
        try:
            results.append(normalize(text))
        except UsageError:
            results.append(None)
    assert len(set(results)) == 1, results


def test_iommufd_sysfs_dir_takes_every_form(tmp_path) -> None:
    root = str(tmp_path)
    want = os.path.join(root, "sys/bus/pci/devices", VMD)
    assert sysfs_device_dir(VMD, root) == want
    assert sysfs_device_dir("10001:8A:0.0", root) == want
    assert sysfs_device_dir("00:03.0", root) == os.path.join(root, "sys/bus/pci/devices", EDU)
    with pytest.raises(UsageError, match=r"not a PCI address .* or mdev UUID"):
        sysfs_device_dir("0000:00:20.0", root)


# --- the five-digit domain through every layer -----------------------------------------------


@pytest.fixture
def fake(tmp_path) -> Iterator[FakeSysfs]:
    f = FakeSysfs(tmp_path / "root", noiommu=False)
    f.add_standard_drivers()
    f.add_device(VMD, 0x8086, 0x0A54, 0x010802, group=40, driver="nvme")
    f.add_device(VMD_OTHER, 0x8086, 0x0A54, 0x010802, group=41, driver="vfio-pci")
    f.add_device(EDU, 0x1234, 0x11E8, 0x00FF00, group=3)
    with f:
        yield f


def test_host_lists_and_finds_the_vmd_device(fake: FakeSysfs) -> None:
    host = Host(fake.root)
    assert host.device("10001:8A:00.0").address == VMD
    assert VMD in [d.address for d in host.devices()]


def test_open_device_takes_the_vmd_address_up_to_the_kernel(fake: FakeSysfs) -> None:
    # Bound to a host driver: refused for that reason, naming the address.
    with pytest.raises(NotBoundToVfio, match=f"pyvfio bind {VMD}"):
        open_device("10001:8A:00.0", "legacy", root=fake.root)
    # Bound to vfio-pci: the address is accepted and the backend reaches the
    # fake kernel, whose /dev/vfio/vfio is a plain file (ENOTTY on the ioctl).
    with pytest.raises(KernelError, match="VFIO_GET_API_VERSION"):
        open_device(VMD_OTHER, root=fake.root)
    assert choose_backend(VMD_OTHER, fake.root)[0] == "legacy"
    # The iommufd backend looks for the device's cdev under the VMD address.
    with open(os.path.join(fake.root, "dev/iommu"), "w"):
        pass
    with pytest.raises(IommufdUnavailable, match=VMD_OTHER):
        open_device(VMD_OTHER, "iommufd", root=fake.root)


def test_policy_rule_with_the_vmd_address(tmp_path) -> None:
    policy = Policy.from_toml(f'[[rule]]\nusers = [0]\ndevices = ["10001:8A:0.1", "{EDU}"]\n',
                              source="p.toml")
    assert policy.rules[0].addresses == frozenset({VMD_OTHER, EDU})
    allowed = DeviceIdentity(VMD_OTHER, 0x8086, 0x0A54, 41)
    refused = DeviceIdentity(VMD, 0x8086, 0x0A54, 40)
    creds = _root_credentials()
    assert policy.decide(creds, allowed).allowed
    assert not policy.decide(creds, refused).allowed


def _root_credentials() -> PeerCredentials:
    return PeerCredentials(pid=1, uid=0, gid=0)


class _RunningBroker:
    def __init__(self, root: str, policy: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="pyvfio-vmd-")
        self.path = os.path.join(self.dir, "broker.sock")
        self.broker = Broker(self.path, Policy.from_toml(policy, source="policy.toml"),
                             root=root, audit=AuditLog(None, io.StringIO()))
        self.broker.listen()
        self.thread = threading.Thread(target=self.broker.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def broker(fake: FakeSysfs) -> Iterator[_RunningBroker]:
    r = _RunningBroker(fake.root, f'[[rule]]\nusers = [{os.getuid()}]\n'
                                  f'devices = ["{VMD_OTHER}"]\n')
    yield r
    r.stop()


def test_broker_allows_and_opens_the_vmd_device(broker: _RunningBroker) -> None:
    with BrokerSession(broker.path) as s:
        assert [d["device"] for d in s.allowed()] == [VMD_OTHER]
    # Allowed by the policy, then the fake kernel cannot do the ioctls.
    from pyvfio.broker.client import open_device as broker_open

    with pytest.raises(BrokerRefused, match=f"opening {VMD_OTHER} failed: .*VFIO_GET_API"):
        broker_open(broker.path, "10001:8A:00.1", backend="legacy")
    with pytest.raises(BrokerRefused, match=f"allows .* the device {VMD} "):
        broker_open(broker.path, VMD)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_cli_command_takes_the_vmd_address(fake: FakeSysfs, broker: _RunningBroker,
                                                  capsys, tmp_path) -> None:
    root = ("--root", fake.root)
    code, out, _ = _run(capsys, *root, "ls", "--json", "10001:8A:0.0")
    assert code == 0 and [d["device"] for d in json.loads(out)] == [VMD]
    code, out, _ = _run(capsys, *root, "ls")
    assert code == 0 and any(line.startswith(f"{VMD}  8086:0a54") for line in out.splitlines())
    code, out, _ = _run(capsys, *root, "groups", "--json")
    assert code == 0 and {g["group"]: g["devices"] for g in json.loads(out)}[40] == [VMD]
    code, out, _ = _run(capsys, *root, "check", "--json", "10001:8a:00.0")
    (diag,) = json.loads(out)
    assert code == 1 and diag["device"] == VMD and diag["driver"] == "nvme"
    code, out, _ = _run(capsys, *root, "bind", "--dry-run", "10001:8A:00.0")
    # a dry run under --root names the paths under that root
    assert code == 0 and f"write '{VMD}' to {fake.root}/sys/bus/pci/drivers/nvme/unbind" in out
    code, out, _ = _run(capsys, *root, "bind", "--json", "10001:8A:00.0")
    assert code == 0 and json.loads(out)["devices"][0]["device"] == VMD
    assert fake.devices[VMD].driver == "vfio-pci"
    code, out, _ = _run(capsys, *root, "check", "--json", VMD)
    assert code == 0 and json.loads(out)[0]["ready"] is True
    # info opens the device: the address is taken, the fake kernel answers ENOTTY.
    code, out, err = _run(capsys, *root, "info", "10001:8a:0.0")
    assert code == 2 and "VFIO_GET_API_VERSION" in err and "not a PCI address" not in err
    code, out, _ = _run(capsys, *root, "restore", "--json", "10001:8A:00.0")
    assert code == 0 and json.loads(out)["devices"][0]["device"] == VMD
    assert fake.devices[VMD].driver == "nvme"
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nusers = [0]\ndevices = ["10001:8A:0.0"]\n')
    code, out, _ = _run(capsys, "broker", "--socket", str(tmp_path / "s"), "--policy",
                        str(policy), "--check")
    assert code == 0 and f"uid 0 -> {VMD}" in out
    code, out, _ = _run(capsys, "broker-open", "--socket", broker.path, "--list")
    assert code == 0 and out.startswith(f"{VMD_OTHER}  8086:0a54  group 41")
    code, out, err = _run(capsys, "broker-open", "--socket", broker.path, "--backend", "legacy",
                          "10001:8A:0.1")
    # Allowed by the policy; the broker's open then meets the fake kernel.
    assert code == 2 and out == ""
    assert f"opening {VMD_OTHER} failed: VFIO_GET_API_VERSION" in err
