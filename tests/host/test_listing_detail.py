"""``ls -v`` piece by piece: BAR sizes, the resource file, both capability
lists (bounded walks, unknown IDs, unreadable config), the module matcher and
the whole detail text of a rich and of a bare device."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest

from pyvfio.errors import UsageError
from pyvfio.host.listing import (
    ModuleMatcher,
    _size,
    capabilities,
    class_filter,
    class_label,
    detail,
    device_name,
    format_detail,
    id_filter,
    regions,
    select,
    slot_filter,
)
from pyvfio.host.model import Host
from pyvfio.testing.fakesysfs import FakeSysfs

PCI_IDS = b"""1234  Example Vendor
\t11e8  Edu Device
\t\t1af4 1100  QEMU Virtual Machine
8086  Intel Corporation
\t100e  82540EM Gigabit Ethernet Controller
C 00  Unclassified device
\tff  Unclassified device
C 02  Network controller
\t00  Ethernet controller
"""

RICH = "0000:00:03.0"
BARE = "0000:00:05.0"
UNUSED = "0x0000000000000000 0x0000000000000000 0x0000000000000000"


@pytest.fixture
def tree(tmp_path) -> Iterator[FakeSysfs]:
    ids = tmp_path / "pci.ids"
    ids.write_bytes(PCI_IDS)
    f = FakeSysfs(tmp_path / "root", noiommu=False, cdev=True, pci_ids=str(ids))
    f.add_standard_drivers()
    f.add_device(RICH, 0x8086, 0x100E, 0x020000, group=3, driver="e1000", subsystem=(0x1234, 0x0001),
                 revision=0x03, numa_node=1, reset_methods=("flr", "bus"))
    f.add_device(BARE, 0xABCD, 0x0001, 0x00FF00, reset_methods=())
    with f:
        yield f


def _write(tree: FakeSysfs, address: str, name: str, data: bytes) -> None:
    with open(tree.p(f"{tree.devices[address].sysfs_dir}/{name}"), "wb") as f:
        f.write(data)


def _config(*, status: int = 0x10, pointer: int = 0, chain: dict[int, tuple[int, int]] | None = None,
            ext: dict[int, int] | None = None, size: int = 4096) -> bytes:
    """A config space: ``chain`` maps offset -> (cap ID, next pointer byte),
    ``ext`` maps offset -> the 32-bit extended capability header."""
    cfg = bytearray(size)
    cfg[6] = status
    cfg[0x34] = pointer
    for pos, (cap, nxt) in (chain or {}).items():
        cfg[pos], cfg[pos + 1] = cap, nxt
    for pos, header in (ext or {}).items():
        cfg[pos:pos + 4] = header.to_bytes(4, "little")
    return bytes(cfg)


def _ext(cap: int, nxt: int, version: int = 1) -> int:
    return cap | (version << 16) | (nxt << 20)


def _caps(tree: FakeSysfs, cfg: bytes) -> list[str] | None:
    _write(tree, BARE, "config", cfg)
    return capabilities(Host(tree.root), BARE)


# ---- names and the class filter ----

def test_device_names_as_lspci_prints_them(tree: FakeSysfs) -> None:
    ids = Host(tree.root).ids
    assert ids is not None
    assert device_name(ids, 0x8086, 0x100E) == "Intel Corporation 82540EM Gigabit Ethernet Controller"
    assert device_name(ids, 0x8086, 0xABCD) == "Intel Corporation Device abcd"
    assert device_name(ids, 0xABCE, 0x1234) == "Device abce:1234"
    assert device_name(None, 0x8086, 0x100E) == "Device 8086:100e"
    assert class_label(None, 0x020000) == "Class [0200]"
    assert class_label(ids, 0x020000) == "Ethernet controller"
    assert class_label(ids, 0x028000) == "Network controller [0280]"
    assert class_label(ids, 0x123456) == "Class [1234]"


@pytest.mark.parametrize(("spec", "prefix"), [
    ("02", "02"), ("0x02", "02"), ("0X0200", "0200"), ("0C0330", "0c0330"), ("0x0c03", "0c03"),
])
def test_class_filter_takes_hex_in_any_case(spec: str, prefix: str) -> None:
    assert class_filter(spec) == prefix


@pytest.mark.parametrize("spec", ["2", "020", "0200000", "0x", "zz", "020x"])
def test_class_filter_refuses_other_lengths(spec: str) -> None:
    with pytest.raises(UsageError, match="bad class filter"):
        class_filter(spec)


@pytest.mark.parametrize(("spec", "fields"), [
    ("ffff:ffff:ffff:ff", (0xFFFF, 0xFFFF, 0xFFFF, 0xFF)),
    (":", (None, None, None, None)),
    ("*:*:*:*", (None, None, None, None)),
    ("::0c03:30", (None, None, 0x0C03, 0x30)),
])
def test_id_filter_fields(spec: str, fields: tuple[int | None, ...]) -> None:
    assert id_filter(spec) == fields


@pytest.mark.parametrize(("spec", "message"), [
    ("10000:", "bad vendor '10000' in the filter (at most ffff)"),
    (":10000", "bad device '10000' in the filter (at most ffff)"),
    ("::10000", "bad class '10000' in the filter (at most ffff)"),
    ("::0200:100", "bad prog-if '100' in the filter (at most ff)"),
    ("g:", "bad vendor 'g' in the filter (hex expected)"),
    (":g", "bad device 'g' in the filter (hex expected)"),
    ("::g", "bad class 'g' in the filter (hex expected)"),
    ("::0200:g", "bad prog-if 'g' in the filter (hex expected)"),
    ("1:2:3:4:5", "bad ID filter '1:2:3:4:5' (expected [vendor]:[device][:class[:prog-if]])"),
])
def test_id_filter_names_the_bad_field(spec: str, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        id_filter(spec)
    assert str(exc.value) == message


@pytest.mark.parametrize(("spec", "message"), [
    ("100000000::", "bad domain '100000000' in the filter (at most ffffffff)"),
    ("100:", "bad bus '100' in the filter (at most ff)"),
    ("20", "bad device '20' in the filter (at most 1f)"),
    (".8", "bad function '8' in the filter (at most 7)"),
    ("x::", "bad domain 'x' in the filter (hex expected)"),
    ("x:", "bad bus 'x' in the filter (hex expected)"),
    ("x", "bad device 'x' in the filter (hex expected)"),
    (".x", "bad function 'x' in the filter (hex expected)"),
])
def test_slot_filter_names_the_bad_field(spec: str, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        slot_filter(spec)
    assert str(exc.value) == message


@pytest.mark.parametrize(("spec", "fields"), [
    ("ffffffff:ff:1f.7", (0xFFFFFFFF, 0xFF, 0x1F, 7)),
    ("", (None, None, None, None)),
    ("*:*:*.*", (None, None, None, None)),
    ("3.", (None, None, 3, None)),
    ("1::", (1, None, None, None)),
])
def test_slot_filter_fields(spec: str, fields: tuple[int | None, ...]) -> None:
    assert slot_filter(spec) == fields


# ---- sizes and regions ----

@pytest.mark.parametrize(("n", "text"), [
    (0, "0"), (1, "1"), (1023, "1023"), (1024, "1K"), (1536, "1536"), (4096, "4K"),
    (1024**2, "1M"), (3 * 1024**2, "3M"), (1024**3, "1G"), (1024**4, "1T"), (1024**5, "1P"),
    (2 * 1024**5, "2P"), (1024**4 + 1024**3, "1025G"),
])
def test_sizes_as_lspci_prints_them(n: int, text: str) -> None:
    assert _size(n) == text


def test_regions_from_the_resource_file(tree: FakeSysfs) -> None:
    lines = [
        "0x00000000fe000000 0x00000000fe01ffff 0x0000000000040200",  # BAR0: 128K, 32-bit memory
        "garbage that is not a resource line",                         # BAR1: skipped, not the end
        "0x000000000000c000 0x000000000000c03f 0x0000000000040101",  # BAR2: I/O
        UNUSED,                                                        # BAR3: unused
        "0x0000000000000000 0x0000000000000000 0x0000000000040200",  # BAR4: flags, no range
        "0x0000000000001000 0x0000000000001fff 0x0000000000000000",  # BAR5: range, no flags
        "0x00000000fd000000 0x00000000fd00ffff 0x0000000000046200",  # ROM
        "0x00000000fc000000 0x00000000fc00ffff 0x0000000000040200",  # bridge window: not a BAR
    ]
    _write(tree, RICH, "resource", ("\n".join(lines) + "\n").encode())
    found = regions(Host(tree.root), RICH)
    assert found == [
        {"index": 0, "kind": "memory", "start": "0xfe000000", "size": 128 * 1024, "bits": 32,
         "prefetchable": False},
        {"index": 2, "kind": "io", "start": "0xc000", "size": 64, "bits": 32, "prefetchable": False},
        {"index": 4, "kind": "memory", "start": "0x0", "size": 0, "bits": 32, "prefetchable": False},
        {"index": 5, "kind": "memory", "start": "0x1000", "size": 4096, "bits": 32,
         "prefetchable": False},
        {"index": 6, "kind": "rom", "start": "0xfd000000", "size": 64 * 1024, "bits": 32,
         "prefetchable": True},
    ]


def test_regions_of_a_device_without_a_resource_file(tree: FakeSysfs) -> None:
    os.unlink(tree.p(f"{tree.devices[BARE].sysfs_dir}/resource"))
    assert regions(Host(tree.root), BARE) == []


# ---- capabilities ----

def test_standard_capabilities_follow_the_pointers_without_their_low_bits(tree: FakeSysfs) -> None:
    cfg = _config(pointer=0x41, chain={0x40: (0x01, 0x53), 0x50: (0x11, 0x61), 0x60: (0x3F, 0x00)},
                  size=256)
    assert _caps(tree, cfg) == ["[40] Power Management", "[50] MSI-X", "[60] capability 0x3f"]


def test_without_the_capability_list_bit_there_is_no_list(tree: FakeSysfs) -> None:
    cfg = _config(status=0x01 | 0x08, pointer=0x40, chain={0x40: (0x01, 0x00)}, size=256)
    assert _caps(tree, cfg) == []


def test_a_looping_chain_ends_after_48_and_128_entries(tree: FakeSysfs) -> None:
    cfg = _config(pointer=0x40, chain={0x40: (0x05, 0x40)}, ext={0x100: _ext(0x01, 0x100)})
    found = _caps(tree, cfg)
    assert found is not None
    assert found.count("[40] MSI") == 48
    assert found.count("[100] Advanced Error Reporting") == 128 and len(found) == 176


def test_extended_capabilities(tree: FakeSysfs) -> None:
    cfg = _config(status=0, ext={0x100: _ext(0x01, 0x141), 0x140: _ext(0x10, 0x200),
                                 0x200: _ext(0x7F, 0x000)})
    assert _caps(tree, cfg) == ["[100] Advanced Error Reporting", "[140] Single Root I/O Virtualization",
                                "[200] extended capability 0x007f"]


@pytest.mark.parametrize("header", [0, 0xFFFFFFFF])
def test_an_empty_or_all_ones_extended_header_ends_the_list(tree: FakeSysfs, header: int) -> None:
    assert _caps(tree, _config(status=0, ext={0x100: header})) == []
    cfg = bytearray(_config(status=0, ext={0x100: header}))
    cfg[0x104] = 0xAB  # the next dword is not part of the header
    assert _caps(tree, bytes(cfg)) == []
    cfg = _config(status=0, ext={0x100: _ext(0x03, 0x180), 0x180: header})
    assert _caps(tree, cfg) == ["[100] Device Serial Number"]


def test_a_config_space_only_root_may_read_is_unknown(tree: FakeSysfs) -> None:
    cfg = _config(pointer=0x40, chain={0x40: (0x01, 0x00)}, size=256)
    assert _caps(tree, cfg) == ["[40] Power Management"]  # 256 bytes: no extended space
    assert _caps(tree, cfg[:64]) is None  # what a user may read
    assert _caps(tree, cfg[:255]) is None
    os.unlink(tree.p(f"{tree.devices[BARE].sysfs_dir}/config"))
    assert capabilities(Host(tree.root), BARE) is None


# ---- kernel modules ----

def test_module_matcher(tree: FakeSysfs) -> None:
    aliases = tree.p(f"lib/modules/{tree.release}/modules.alias")
    with open(aliases, "a") as f:
        f.write("alias pci:v00008086d0000100Esv*sd*bc*sc*i* e1000\n"
                "alias pci:v00008086d*sv*sd*bc02sc00i* e1000\n"  # the same module again
                "alias pci:v00001234d*sv*sd*bc*sc*i* other\n"
                "alias pci:v*d*sv*sd*bc02sc*i* netgeneric\n")
    host = Host(tree.root)
    matcher = ModuleMatcher(host)
    assert matcher.modules(host.device(RICH)) == ["e1000", "netgeneric"]
    assert matcher.modules(host.device(BARE)) == []


def test_module_matcher_without_modules_alias(tree: FakeSysfs) -> None:
    os.unlink(tree.p(f"lib/modules/{tree.release}/modules.alias"))
    host = Host(tree.root)
    assert ModuleMatcher(host).modules(host.device(RICH)) == []


def test_a_device_without_a_pci_modalias_has_no_modules(tree: FakeSysfs) -> None:
    with open(tree.p(f"lib/modules/{tree.release}/modules.alias"), "a") as f:
        f.write("alias pci:* anything\nalias * everything\n")
    host = Host(tree.root)
    matcher = ModuleMatcher(host)
    bare = host.device(BARE)
    for modalias in (None, "", "acpi:PNP0A08:"):
        assert matcher.modules(dataclasses.replace(bare, modalias=modalias)) == []
    assert matcher.modules(bare) == ["anything"]


# ---- the whole detail view ----

def test_detail_of_a_rich_device(tree: FakeSysfs) -> None:
    lines = [
        "0x00000000fe000000 0x00000000fe01ffff 0x0000000000040200",
        "0x00000000e0000000 0x00000000efffffff 0x000000000014220c",  # 256M 64-bit prefetchable
        "0x000000000000c000 0x000000000000c03f 0x0000000000040101",
        UNUSED, UNUSED, UNUSED,
        "0x00000000fd000000 0x00000000fd03ffff 0x0000000000046200",
    ]
    _write(tree, RICH, "resource", ("\n".join(lines) + "\n").encode())
    _write(tree, RICH, "config", _config(pointer=0x40, chain={0x40: (0x01, 0x00)}, ext={
        0x100: _ext(0x01, 0x000)}))
    with open(tree.p(f"lib/modules/{tree.release}/modules.alias"), "a") as f:
        f.write("alias pci:v00008086d0000100Esv*sd*bc*sc*i* e1000\n"
                "alias pci:v*d*sv*sd*bc02sc00i* netgeneric\n")
    tree.add_netdev(RICH, "eth1")
    tree.add_netdev(RICH, "eth0")
    tree.add_ipv4_route("eth0", "10.0.0.0", 8)
    tree.write(tree.p(f"sys/bus/pci/devices/{RICH}/driver_override"), "vfio-pci")
    tree.write(tree.p("sys/bus/pci/drivers/e1000/unbind"), RICH)
    tree.write(tree.p("sys/bus/pci/drivers_probe"), RICH)
    host = Host(tree.root)
    dev = host.device(RICH)
    info = detail(host, dev, ModuleMatcher(host))
    assert info["name"] == "Intel Corporation 82540EM Gigabit Ethernet Controller"
    assert info["class_label"] == "Ethernet controller"
    assert info["subsystem_name"] is None and info["vendor_name"] == "Intel Corporation"
    assert info["netdevs"] == ["eth0", "eth1"]
    assert info["block_devices"] == []
    uses = host.usage.uses(RICH, dev.class_code)
    assert info["host_uses"] == [u.as_dict() for u in uses] and uses
    use = uses[0]
    assert info["host_uses"][0] == {"device": use.device, "kind": use.kind, "name": use.name,
                                    "reason": use.reason, "fix": use.fix,
                                    "evidence": list(use.evidence)}
    expected = [
        f"{RICH} Ethernet controller [0200]: Intel Corporation 82540EM Gigabit Ethernet Controller "
        "[8086:100e] (rev 03)",
        "\tSubsystem: [1234:0001]",  # pci.ids does not name this subsystem
        "\tNUMA node: 1",
        "\tIOMMU group: 3",
        "\tRegion 0: Memory at fe000000 (32-bit, non-prefetchable) [size=128K]",
        "\tRegion 1: Memory at e0000000 (64-bit, prefetchable) [size=256M]",
        "\tRegion 2: I/O ports at c000 [size=64]",
        "\tExpansion ROM at fd000000 [size=256K]",
        "\tCapabilities: [40] Power Management, [100] Advanced Error Reporting",
        "\tReset methods: flr bus",
        "\tKernel driver in use: vfio-pci",
        "\tKernel modules: e1000, netgeneric",
        "\tVFIO driver for bind: vfio-pci",
        f"\tVFIO device: /dev/vfio/devices/{info['vfio_cdev']}",
        "\tNetwork interfaces: eth0, eth1",
        *[f"\tIn use by the host ({u.kind}): {u.reason}" for u in uses],
    ]
    assert info["vfio_cdev"]
    assert format_detail(info).split("\n") == expected


def test_detail_of_a_bare_device(tree: FakeSysfs) -> None:
    _write(tree, BARE, "config", _config(status=0, size=64))
    host = Host(tree.root)
    info = detail(host, host.device(BARE), ModuleMatcher(host))
    assert info["name"] == "Device abcd:0001" and info["class_label"] == "Unclassified device"
    assert info["netdevs"] == [] and info["block_devices"] == [] and info["host_uses"] == []
    assert format_detail(info).split("\n") == [
        f"{BARE} Unclassified device [00ff]: Device abcd:0001 [abcd:0001]",
        "\tNUMA node: -",
        "\tIOMMU group: none",
        "\tCapabilities: <access denied>",
        "\tReset methods: none",
        "\tKernel driver in use: none",
        f"\tVFIO driver for bind: {info['vfio_driver']}",
    ]
    _write(tree, BARE, "config", _config(status=0, size=4096))
    info = detail(host, host.device(BARE), ModuleMatcher(host))
    assert "\tCapabilities: none" in format_detail(info).split("\n")


def test_detail_names_a_known_subsystem_and_block_devices(tree: FakeSysfs) -> None:
    edu = "0000:00:06.0"
    tree.add_device(edu, 0x1234, 0x11E8, 0x00FF00, group=6, subsystem=(0x1AF4, 0x1100), revision=0x10)
    tree.add_block(edu, "vdb", 16)
    tree.add_block(edu, "vdc", 32)
    host = Host(tree.root)
    info = detail(host, host.device(edu), ModuleMatcher(host))
    text = format_detail(info).split("\n")
    assert text[0] == f"{edu} Unclassified device [00ff]: Example Vendor Edu Device [1234:11e8] (rev 10)"
    assert text[1] == "\tSubsystem: QEMU Virtual Machine [1af4:1100]"
    assert "\tBlock devices: vdb, vdc" in text and info["block_devices"] == ["vdb", "vdc"]


def test_detail_names_the_boot_vga_use(tree: FakeSysfs) -> None:
    gpu = "0000:00:07.0"
    tree.add_device(gpu, 0x1234, 0x1111, 0x030000, group=7)
    tree.set_boot_vga(gpu)
    tree.add_framebuffer(0, None)
    host = Host(tree.root)
    info = detail(host, host.device(gpu), ModuleMatcher(host))
    assert [(u["kind"], u["name"]) for u in info["host_uses"]] == [("boot-vga", "boot_vga")]


def test_module_matcher_without_a_kernel_release(tree: FakeSysfs) -> None:
    """No proc/sys/kernel/osrelease: no modules.alias to read, no modules."""
    os.unlink(tree.p("proc/sys/kernel/osrelease"))
    host = Host(tree.root)
    assert host.aliases.path is None
    assert ModuleMatcher(host).modules(host.device(RICH)) == []


def test_slot_filter_reads_the_address_fields_as_hex(tmp_path) -> None:
    fake = FakeSysfs(tmp_path / "r", noiommu=False)
    fake.add_standard_drivers()
    for address in ("0000:10:00.0", "0000:0a:00.0", "0010:10:1f.7", "000a:00:00.0"):
        fake.add_device(address, 0x1234, 0x11E8, 0x00FF00, group=len(fake.devices) + 1)
    devices = Host(fake.root).devices()

    def chosen(spec: str) -> list[str]:
        return [d.address for d in select(devices, slot=spec)]

    assert chosen("10:") == ["0000:10:00.0", "0010:10:1f.7"]
    assert chosen("0a:") == ["0000:0a:00.0"]
    assert chosen("10::") == ["0010:10:1f.7"]
    assert chosen("a::") == ["000a:00:00.0"]
    assert chosen("1f.7") == ["0010:10:1f.7"]
