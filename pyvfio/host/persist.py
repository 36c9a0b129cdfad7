"""Bindings that survive a reboot (what driverctl's overrides are for).

``pyvfio bind --persist`` records the wanted binding in
``<root>/etc/pyvfio/bindings.json`` (``--config-dir``, else
``$PYVFIO_CONFIG_DIR``, else ``<root>/etc/pyvfio``); ``pyvfio apply`` binds
every recorded device with the same checks as ``pyvfio bind`` (a device the
host uses is refused unless ``apply --force``); the systemd unit
``pyvfio-apply.service`` (package data beside this module, printed by
``pyvfio apply --print-unit``) runs ``pyvfio apply`` early at boot, before
libvirtd and kubelet.

File format (written atomically: temporary file, fsync, rename)::

    {"version": 1,
     "bindings": [{"device": "0000:01:00.0", "vendor_id": "10de", "device_id": "1b80",
                   "driver": null, "group": true}]}

``driver`` null means the device's best vfio driver at apply time.  The IDs
guard against a different card in the slot after a hardware change: such a
binding is not applied (``changed`` in the results) until it is forgotten and
recorded again.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pyvfio.errors import (
    DeviceNotFound,
    HostStateError,
    NoIommu,
    NotPermitted,
    UsageError,
)
from pyvfio.host._paths import records_directory, unwritable_directory
from pyvfio.host.model import Host, PciDevice, normalize_bdf

CONFIG_DIR = "etc/pyvfio"
CONFIG_FILE = "bindings.json"

FORMAT_VERSION = 1
UNIT_NAME = "pyvfio-apply.service"


def config_dir_for(root: str, override: str | None = None) -> str:
    return records_directory(root, override, "PYVFIO_CONFIG_DIR", CONFIG_DIR)


class PersistedBindings:
    """The configuration file of persisted bindings in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, CONFIG_FILE)

    def load(self) -> list[dict[str, Any]]:
        """The recorded bindings, ``[]`` if the file does not exist; a file
        that is not ours raises :class:`UsageError` naming it."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise UsageError(f"unreadable binding configuration {self.path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("bindings"), list):
            raise UsageError(f"{self.path} is not a pyvfio binding configuration "
                             '(expected {"version": 1, "bindings": [...]})')
        if data.get("version") != FORMAT_VERSION:
            raise UsageError(f"{self.path} has version {data.get('version')!r}; this pyvfio reads "
                             f"version {FORMAT_VERSION}")
        entries = []
        for entry in data["bindings"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("device"), str):
                raise UsageError(f"{self.path}: a binding without a device: {entry!r}")
            entry["device"] = normalize_bdf(entry["device"])
            entries.append(entry)
        return entries

    def check_writable(self) -> None:
        """Raise :class:`NotPermitted` unless the file could be written (the
        nearest existing directory is writable)."""
        directory = unwritable_directory(self.directory)
        if directory is not None:
            raise NotPermitted(f"cannot write the binding configuration in {self.directory} "
                               f"({directory} is not writable; use --config-dir or "
                               "$PYVFIO_CONFIG_DIR); nothing was changed")

    def save(self, entries: list[dict[str, Any]]) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        data = {"version": FORMAT_VERSION, "bindings": sorted(entries, key=lambda e: e["device"])}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def record(self, devices: list[PciDevice], *, driver: str | None, group: bool) -> list[dict[str, Any]]:
        """Add (or replace) one binding per device; returns the new entries."""
        entries = {e["device"]: e for e in self.load()}
        added = []
        for dev in devices:
            entry = {"device": dev.address, "vendor_id": f"{dev.vendor_id:04x}",
                     "device_id": f"{dev.device_id:04x}", "driver": driver, "group": group}
            entries[dev.address] = entry
            added.append(entry)
        self.save(list(entries.values()))
        return added

    def forget(self, addresses: list[str] | None) -> list[str]:
        """Remove the bindings of ``addresses`` (``None``: all); returns the
        removed addresses.  Naming a device that has none is a :class:`UsageError`."""
        entries = {e["device"]: e for e in self.load()}
        if addresses is None:
            removed = sorted(entries)
            entries = {}
        else:
            wanted = [normalize_bdf(a) for a in addresses]
            missing = [a for a in wanted if a not in entries]
            if missing:
                raise UsageError(f"no persisted binding of {', '.join(missing)} in {self.path}")
            removed = wanted
            for a in wanted:
                del entries[a]
        if removed:
            self.save(list(entries.values()))
        return removed


@dataclass
class ApplyResult:
    """What ``pyvfio apply`` did with one persisted binding: ``status`` is
    ``bound`` (changed now), ``already`` (nothing to do), ``refused`` (a
    check said no; ``problems`` says why), ``changed`` (another device is in
    the slot now), ``absent`` (no device at the address) or ``failed``."""

    device: str
    status: str
    message: str
    devices: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("bound", "already")

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "status": self.status, "message": self.message,
                "devices": self.devices, "problems": self.problems}


def apply(
    *,
    root: str = "/",
    config_dir: str | None = None,
    state_dir: str | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> list[ApplyResult]:
    """Bind every persisted binding, each with :func:`pyvfio.host.binding.bind`'s
    checks; one failure does not stop the others."""
    from pyvfio.host.binding import bind

    config = PersistedBindings(config_dir_for(root, config_dir))
    results = []
    for entry in config.load():
        address = entry["device"]
        host = Host(root)
        try:
            dev = host.device(address)
        except DeviceNotFound as exc:
            results.append(ApplyResult(address, "absent", str(exc)))
            continue
        ids = f"{dev.vendor_id:04x}:{dev.device_id:04x}"
        recorded = f"{entry.get('vendor_id')}:{entry.get('device_id')}"
        if entry.get("vendor_id") and ids != recorded:
            results.append(ApplyResult(
                address, "changed",
                f"{address} is now {ids}, but the binding was recorded for {recorded}: not applied "
                f"(pyvfio persist forget {address}, then bind --persist again if it is wanted)"))
            continue
        try:
            done = bind(address, root=root, driver=entry.get("driver"), group=bool(entry.get("group")),
                        dry_run=dry_run, state_dir=state_dir, host=host, force=force)
        except (HostStateError, NoIommu) as exc:
            status = "refused" if not isinstance(exc, NotPermitted) else "failed"
            problems = exc.problems if isinstance(exc, HostStateError) else []
            results.append(ApplyResult(address, status, str(exc), problems=problems))
            continue
        changed = any(r.changed for r in done)
        results.append(ApplyResult(
            address, "bound" if changed else "already",
            ", ".join(f"{r.device} {'->' if r.changed else 'on'} {r.driver or 'no driver'}" for r in done),
            [r.as_dict() for r in done]))
    return results


def unit_text(command: str | None = None) -> str:
    """The systemd unit shipped with the package, with ``ExecStart`` running
    ``command`` (default: this interpreter with ``-m pyvfio``)."""
    template = resources.files("pyvfio.host").joinpath(UNIT_NAME).read_text()
    return template.replace("@PYVFIO@", command or f"{sys.executable} -m pyvfio")
