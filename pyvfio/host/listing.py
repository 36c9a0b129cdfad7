"""``pyvfio ls`` as an operator who knows lspci expects it: the same filters
(``-s`` slot, ``-d`` vendor:device[:class]), driver and class filters, names
printed the way lspci prints them when pci.ids lacks an ID, and a ``-v``
detail view per device.

lspci's rules (pciutils ``lib/names.c``), checked against ``lspci -A
linux-sysfs`` on the same tree by ``tests/host/test_listing.py``:

- vendor and device known: ``Intel Corporation 82540EM Gigabit Ethernet Controller``;
  vendor known, device not: ``Intel Corporation Device abcd``;
  vendor unknown: ``Device abce:1234``.
- class: the subclass name; else the base class name with the code,
  ``Unclassified device [00ff]``; else ``Class [1234]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from pyvfio.errors import UsageError
from pyvfio.host.model import Host, PciDevice
from pyvfio.host.sysfs import read_bytes, read_str
from pyvfio.pci.ids import PciIds

# ---- names ----


def device_name(ids: PciIds | None, vendor_id: int, device_id: int) -> str:
    vendor = ids.vendor(vendor_id) if ids else None
    if vendor is None:
        return f"Device {vendor_id:04x}:{device_id:04x}"
    device = ids.device(vendor_id, device_id) if ids else None
    return f"{vendor} {device}" if device else f"{vendor} Device {device_id:04x}"


def class_label(ids: PciIds | None, class_code: int) -> str:
    code = class_code >> 8
    if ids is not None:
        sub = ids.subclass_name(class_code)
        if sub:
            return sub
        base = ids.base_class_name(class_code)
        if base:
            return f"{base} [{code:04x}]"
    return f"Class [{code:04x}]"


# ---- filters ----


def _field(text: str, what: str, limit: int) -> int | None:
    if text in ("", "*"):
        return None
    try:
        value = int(text, 16)
    except ValueError:
        raise UsageError(f"bad {what} {text!r} in the filter (hex expected)") from None
    if value > limit:
        raise UsageError(f"bad {what} {text!r} in the filter (at most {limit:x})")
    return value


def slot_filter(spec: str) -> tuple[int | None, int | None, int | None, int | None]:
    """lspci's ``-s [[[[<domain>]:]<bus>]:][<device>][.[<func>]]``: any field
    empty or ``*`` matches everything.  Returns (domain, bus, device, function)."""
    left, dot, func_text = spec.partition(".")
    func = _field(func_text, "function", 7) if dot else None
    parts = left.split(":")
    if len(parts) > 3:
        raise UsageError(f"bad slot filter {spec!r} (expected [[[domain]:]bus]:][device][.[func]])")
    parts = [""] * (3 - len(parts)) + parts
    return (_field(parts[0], "domain", 0xFFFFFFFF), _field(parts[1], "bus", 0xFF),
            _field(parts[2], "device", 0x1F), func)


def id_filter(spec: str) -> tuple[int | None, int | None, int | None, int | None]:
    """lspci's ``-d [<vendor>]:[<device>][:<class>[:<prog-if>]]``; ``class``
    is the 4-digit base+sub code.  Returns (vendor, device, class, prog-if)."""
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 4:
        raise UsageError(f"bad ID filter {spec!r} (expected [vendor]:[device][:class[:prog-if]])")
    parts += [""] * (4 - len(parts))
    return (_field(parts[0], "vendor", 0xFFFF), _field(parts[1], "device", 0xFFFF),
            _field(parts[2], "class", 0xFFFF), _field(parts[3], "prog-if", 0xFF))


def class_filter(spec: str) -> str:
    """``--class 02`` / ``0200`` / ``020000``: a prefix of the 6-digit class code."""
    text = spec.lower().removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]{2}|[0-9a-f]{4}|[0-9a-f]{6}", text):
        raise UsageError(f"bad class filter {spec!r} (2, 4 or 6 hex digits: 02, 0200, 020000)")
    return text


def select(
    devices: Iterable[PciDevice],
    *,
    slot: str | None = None,
    ids: str | None = None,
    driver: str | None = None,
    klass: str | None = None,
) -> list[PciDevice]:
    """The devices that pass every given filter (``driver`` ``none`` matches
    devices without one)."""
    s = slot_filter(slot) if slot else None
    d = id_filter(ids) if ids else None
    c = class_filter(klass) if klass else None
    chosen = []
    for dev in devices:
        if s is not None:
            domain, rest = dev.address.split(":", 1)
            bus, rest = rest.split(":")
            slot_no, fn = rest.split(".")
            have = (int(domain, 16), int(bus, 16), int(slot_no, 16), int(fn))
            if any(want is not None and want != got for want, got in zip(s, have, strict=True)):
                continue
        if d is not None:
            have_ids = (dev.vendor_id, dev.device_id, dev.class_code >> 8, dev.class_code & 0xFF)
            if any(want is not None and want != got for want, got in zip(d, have_ids, strict=True)):
                continue
        if driver is not None and (dev.driver or "none") != driver:
            continue
        if c is not None and not f"{dev.class_code:06x}".startswith(c):
            continue
        chosen.append(dev)
    return chosen


# ---- the detail view ----

# PCI capability IDs (PCI Local Bus spec / pci_regs.h PCI_CAP_ID_*) and
# extended capability IDs (PCI_EXT_CAP_ID_*), named as lspci names them.
CAPABILITIES = {
    0x01: "Power Management", 0x02: "AGP", 0x03: "Vital Product Data", 0x04: "Slot ID",
    0x05: "MSI", 0x06: "CompactPCI hot-swap", 0x07: "PCI-X", 0x08: "HyperTransport",
    0x09: "Vendor Specific", 0x0A: "Debug port", 0x0B: "CompactPCI central resource control",
    0x0C: "PCI hot-plug", 0x0D: "Subsystem", 0x0E: "AGP 8x", 0x0F: "Secure device",
    0x10: "Express", 0x11: "MSI-X", 0x12: "SATA HBA", 0x13: "PCI Advanced Features",
    0x14: "Enhanced Allocation", 0x15: "Flattening Portal Bridge",
}
EXT_CAPABILITIES = {
    0x01: "Advanced Error Reporting", 0x02: "Virtual Channel", 0x03: "Device Serial Number",
    0x04: "Power Budgeting", 0x0B: "Vendor Specific", 0x0D: "Access Control Services",
    0x0E: "Alternative Routing-ID Interpretation", 0x0F: "Address Translation Service",
    0x10: "Single Root I/O Virtualization", 0x13: "Page Request Interface",
    0x15: "Resizable BAR", 0x17: "Transaction Processing Hints", 0x18: "Latency Tolerance Reporting",
    0x19: "Secondary PCI Express", 0x1B: "Process Address Space ID", 0x1E: "L1 PM Substates",
    0x1F: "Precision Time Measurement", 0x23: "Designated Vendor-Specific", 0x25: "Data Link Feature",
    0x26: "Physical Layer 16.0 GT/s", 0x27: "Lane Margining at the Receiver",
}

_IORESOURCE_IO = 0x100
_IORESOURCE_MEM = 0x200
_IORESOURCE_PREFETCH = 0x2000
_IORESOURCE_MEM_64 = 0x100000


def _size(n: int) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or n % 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}P"


def regions(host: Host, address: str) -> list[dict[str, Any]]:
    """BARs (0-5) and the expansion ROM (6) from sysfs ``resource``: one
    ``start end flags`` line each (``pci_resource_show()``)."""
    text = read_str(host.path(f"sys/bus/pci/devices/{address}/resource")) or ""
    found = []
    for index, line in enumerate(text.splitlines()[:7]):
        try:
            start, end, flags = (int(x, 16) for x in line.split()[:3])
        except ValueError:
            continue
        if not flags and not end:
            continue
        kind = "io" if flags & _IORESOURCE_IO else "memory"
        found.append({
            "index": index, "kind": "rom" if index == 6 else kind, "start": f"{start:#x}",
            "size": end - start + 1 if end else 0, "bits": 64 if flags & _IORESOURCE_MEM_64 else 32,
            "prefetchable": bool(flags & _IORESOURCE_PREFETCH),
        })
    return found


def capabilities(host: Host, address: str) -> list[str] | None:
    """Capability names from the config space (``[40] Power Management``),
    ``None`` if the config space cannot be read past its header (only root
    reads beyond 64 bytes).  Both lists are walked with a bound, so a looping
    chain ends."""
    cfg = read_bytes(host.path(f"sys/bus/pci/devices/{address}/config"), 4096)
    if cfg is None or len(cfg) < 256:
        return None
    found = []
    if cfg[6] & 0x10:  # PCI_STATUS_CAP_LIST
        pos, seen = cfg[0x34] & 0xFC, 0
        while pos >= 0x40 and seen < 48:
            cap = cfg[pos]
            found.append(f"[{pos:02x}] {CAPABILITIES.get(cap, f'capability {cap:#04x}')}")
            pos, seen = cfg[pos + 1] & 0xFC, seen + 1
    pos, seen = 0x100, 0
    while len(cfg) >= 4096 and pos >= 0x100 and seen < 128:
        header = int.from_bytes(cfg[pos:pos + 4], "little")
        if header in (0, 0xFFFFFFFF):
            break
        cap = header & 0xFFFF
        found.append(f"[{pos:03x}] {EXT_CAPABILITIES.get(cap, f'extended capability {cap:#06x}')}")
        pos, seen = (header >> 20) & 0xFFC, seen + 1
    return found


_MODULE_ALIAS = re.compile(rb"^alias pci:(\S+) (\S+)$", re.MULTILINE)


class ModuleMatcher:
    """Which kernel modules could drive a device: the ``alias pci:`` lines of
    ``modules.alias`` whose pattern matches its modalias (what ``lspci -k``
    prints as "Kernel modules", through libkmod), plus the vfio drivers."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._table: list[tuple[str, str]] | None = None

    def modules(self, dev: PciDevice) -> list[str]:
        if self._table is None:
            path = self.host.aliases.path
            data = b""
            if path:
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    data = b""
            self._table = [(m.group(1).decode(), m.group(2).decode()) for m in _MODULE_ALIAS.finditer(data)]
        if not dev.modalias or not dev.modalias.startswith("pci:"):
            return []
        subject = dev.modalias[4:]
        found: list[str] = []
        for pattern, module in self._table:
            if module not in found and fnmatchcase(subject, pattern):
                found.append(module)
        return found


def detail(host: Host, dev: PciDevice, matcher: ModuleMatcher) -> dict[str, Any]:
    """The ``ls -v`` object of one device: everything ``ls --json`` has, plus
    regions, capabilities, modules, netdevs, block devices and the host's uses."""
    info = dev.as_dict(host.ids)
    info["name"] = device_name(host.ids, dev.vendor_id, dev.device_id)
    info["class_label"] = class_label(host.ids, dev.class_code)
    info["regions"] = regions(host, dev.address)
    info["capabilities"] = capabilities(host, dev.address)
    info["kernel_modules"] = matcher.modules(dev)
    info["vfio_driver"] = host.best_driver(dev)  # what pyvfio bind would choose
    base = host.path(f"sys/bus/pci/devices/{dev.address}")
    info["netdevs"] = sorted(os.listdir(f"{base}/net")) if os.path.isdir(f"{base}/net") else []
    usage = host.usage
    info["block_devices"] = usage.block_devices(dev.address)
    info["host_uses"] = [u.as_dict() for u in usage.uses(dev.address, dev.class_code)]
    return info


def format_detail(info: dict[str, Any]) -> str:
    rev = f" (rev {info['revision']})" if info["revision"] not in (None, "00") else ""
    lines = [f"{info['device']} {info['class_label']} [{info['class'][:4]}]: {info['name']} "
             f"[{info['vendor_id']}:{info['device_id']}]{rev}"]
    if info["subsystem_vendor_id"] not in (None, "0000"):
        sub = info["subsystem_name"] or ""
        lines.append(f"\tSubsystem: {sub + ' ' if sub else ''}[{info['subsystem_vendor_id']}:"
                     f"{info['subsystem_device_id']}]")
    lines.append(f"\tNUMA node: {info['numa_node'] if info['numa_node'] is not None else '-'}")
    group = info["iommu_group"]
    lines.append(f"\tIOMMU group: {group if group is not None else 'none'}")
    for r in info["regions"]:
        if r["kind"] == "io":
            lines.append(f"\tRegion {r['index']}: I/O ports at {r['start'][2:]} [size={_size(r['size'])}]")
        elif r["kind"] == "rom":
            lines.append(f"\tExpansion ROM at {r['start'][2:]} [size={_size(r['size'])}]")
        else:
            pf = "prefetchable" if r["prefetchable"] else "non-prefetchable"
            lines.append(f"\tRegion {r['index']}: Memory at {r['start'][2:]} ({r['bits']}-bit, {pf}) "
                         f"[size={_size(r['size'])}]")
    caps = info["capabilities"]
    lines.append("\tCapabilities: " + ("<access denied>" if caps is None else ", ".join(caps) or "none"))
    lines.append(f"\tReset methods: {' '.join(info['reset_methods']) if info['reset_methods'] else 'none'}")
    lines.append(f"\tKernel driver in use: {info['driver'] or 'none'}")
    if info["kernel_modules"]:
        lines.append(f"\tKernel modules: {', '.join(info['kernel_modules'])}")
    lines.append(f"\tVFIO driver for bind: {info['vfio_driver']}")
    if info["vfio_cdev"]:
        lines.append(f"\tVFIO device: /dev/vfio/devices/{info['vfio_cdev']}")
    if info["netdevs"]:
        lines.append(f"\tNetwork interfaces: {', '.join(info['netdevs'])}")
    if info["block_devices"]:
        lines.append(f"\tBlock devices: {', '.join(info['block_devices'])}")
    for use in info["host_uses"]:
        lines.append(f"\tIn use by the host ({use['kind']}): {use['reason']}")
    return "\n".join(lines)
