"""Managed binding: put devices on a vfio driver and put them back.

The sequence is the kernel's documented one (and libvirt's
``virPCIDeviceBindToStub``): write the driver name into ``driver_override``,
write the address into the current driver's ``unbind``, write it into
``/sys/bus/pci/drivers_probe``, then read the ``driver`` link back, because a
probe that fails is not an error for ``drivers_probe`` (the kernel ignores
-ENODEV/-ENXIO from ``probe()`` so that the next driver may try).

Before anything is touched, the original driver and ``driver_override`` are
written to a state directory, one JSON file per device, atomically (write a
temporary file, fsync, rename, fsync the directory).  A record in phase
``binding`` is what a crash in the middle of a bind leaves behind;
:func:`restore` finishes it off the same way as a completed bind.  Any failure
during a bind rolls back every device that call touched.

State directory: ``--state-dir``, else ``$PYVFIO_STATE_DIR``, else
``<root>/run/pyvfio/bind``.  ``/run`` is a tmpfs: the records vanish on
reboot exactly when the bindings they describe do.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from pyvfio.errors import (
    BindError,
    DeviceInUse,
    HostUsesDevice,
    NoIommu,
    NotPermitted,
    NotViable,
    UsageError,
)
from pyvfio.host._paths import records_directory, unwritable_directory
from pyvfio.host.diagnosis import (
    P_NO_GROUP,
    P_RESERVED_DIRECT,
    VIABLE_KINDS,
    diagnose_many,
)
from pyvfio.host.model import Host, PciDevice, normalize_bdf
from pyvfio.host.sysfs import read_link_name, read_str
from pyvfio.host.usage import USAGE_KINDS

DEFAULT_STATE_DIR = "run/pyvfio/bind"
# Problems that refuse a bind unless forced: the host uses the device, or vfio
# cannot own its group (binding would only take the device from the host).
FORCEABLE_KINDS = (*USAGE_KINDS, P_RESERVED_DIRECT)


def state_dir_for(root: str, override: str | None = None) -> str:
    return records_directory(root, override, "PYVFIO_STATE_DIR", DEFAULT_STATE_DIR)


class BindState:
    """One JSON record per device:
    ``{"device", "original_driver", "original_override", "target_driver",
    "phase": "binding"|"bound", "pid", "time", "boot_id"}``.

    ``boot_id`` (``/proc/sys/kernel/random/boot_id``) marks records from an
    earlier boot as stale: bindings do not survive a reboot, so such a record
    (a state directory that is not on a tmpfs) describes nothing real."""

    def __init__(self, directory: str, boot_id: str | None = None) -> None:
        self.directory = directory
        self.boot_id = boot_id

    def is_stale(self, record: dict[str, Any]) -> bool:
        recorded = record.get("boot_id")
        return bool(recorded and self.boot_id and recorded != self.boot_id)

    def path(self, address: str) -> str:
        return os.path.join(self.directory, f"{address}.json")

    def load(self, address: str) -> dict[str, Any] | None:
        try:
            with open(self.path(address)) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BindError(f"unreadable bind record {self.path(address)}: {exc}") from exc
        if not isinstance(record, dict) or record.get("device") != address:
            raise BindError(f"bind record {self.path(address)} is not for {address}")
        return record

    def save(self, record: dict[str, Any]) -> None:
        if self.boot_id:
            record["boot_id"] = self.boot_id
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        final = self.path(record["device"])
        tmp = f"{final}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(record, indent=1, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self._sync_dir()

    def remove(self, address: str) -> None:
        try:
            os.unlink(self.path(address))
        except FileNotFoundError:
            return
        self._sync_dir()

    def addresses(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json"))

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class BindResult:
    device: str
    original_driver: str | None
    driver: str | None
    changed: bool
    steps: list[str] = field(default_factory=list)
    forced: list[dict[str, Any]] = field(default_factory=list)  # problems --force overrode

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "original_driver": self.original_driver,
            "driver": self.driver,
            "changed": self.changed,
            "steps": list(self.steps),
            "forced": [dict(p) for p in self.forced],
        }


class _Ops:
    """Sysfs writes of one operation, recorded as steps; not performed in a
    dry run."""

    def __init__(self, host: Host, dry_run: bool) -> None:
        self.host = host
        self.dry_run = dry_run
        self.written: list[str] = []  # each path written (or, in a dry run, to be written)

    def write(self, steps: list[str], relative: str, value: str) -> None:
        shown = value.strip() or "(empty: clear)"
        # The path written, under the host's root (a dry run under --root
        # shows the files it would touch there).
        steps.append(f"write {shown!r} to {self.host.path(relative)}")
        self.written.append(relative)
        if not self.dry_run:
            self.host.writer.write(self.host.path(relative), value)

    def driver_now(self, address: str) -> str | None:
        return read_link_name(self.host.path(f"sys/bus/pci/devices/{address}/driver"))


def _state_for(host: Host, state_dir: str | None) -> BindState:
    return BindState(
        state_dir_for(host.root, state_dir),
        read_str(host.path("proc/sys/kernel/random/boot_id")),
    )


def _dev_attr(address: str, attr: str) -> str:
    return f"sys/bus/pci/devices/{address}/{attr}"


def _targets(host: Host, devices: list[PciDevice], group: bool) -> list[PciDevice]:
    chosen: dict[str, PciDevice] = {}
    for dev in devices:
        if group and dev.iommu_group is not None:
            for address in host.group(dev.iommu_group).devices:
                member = host.device(address)
                if not member.is_bridge:
                    chosen[member.address] = member
            if dev.is_bridge:
                continue
        if dev.is_bridge:
            raise BindError(
                f"{dev.address} is a PCI bridge; vfio-pci does not take bridges "
                "(bind the endpoints behind it, or use --group on one of them)"
            )
        chosen[dev.address] = dev
    return [chosen[a] for a in sorted(chosen)]


def _check_groups(host: Host, targets: list[PciDevice], force: bool = False) -> list[dict[str, Any]]:
    """Refuse, before the first write, everything the diagnosis already shows
    (issue 10): a group the bind would leave not viable, a group in use, a
    device without an IOMMU group on an IOMMU host (vfio-pci's probe fails),
    and, unless ``force``, a device the host uses or a group vfio cannot own.
    Returns the problems ``force`` overrode."""
    names = {d.address for d in targets}
    for dev in targets:
        if dev.iommu_group is None and not host.noiommu_enabled() and not host.iommu_present():
            raise NoIommu(
                f"no IOMMU: {dev.address} has no IOMMU group; boot with intel_iommu=on "
                "(or amd_iommu=on), or enable vfio's unsafe no-IOMMU mode"
            )
    problems: list[dict[str, Any]] = []
    groups_seen: set[int] = set()
    for dev in targets:
        if dev.iommu_group is None or dev.iommu_group in groups_seen:
            continue
        groups_seen.add(dev.iommu_group)
        for address in host.group(dev.iommu_group).devices:
            if address in names:
                continue
            member = host.device(address)
            kind = host.driver_kind(member)
            if kind not in VIABLE_KINDS:
                problems.append({
                    "device": member.address,
                    "driver": member.driver,
                    "reason": f"{member.address} in IOMMU group {dev.iommu_group} stays on the host "
                    f"driver {member.driver}, so the group would not be viable",
                    "fix": f"bind {member.address} ({member.driver}) to vfio-pci, or use --group",
                    "kind": "host-driver",
                    "evidence": [],
                })
    if problems:
        first = problems[0]
        raise NotViable(
            f"refusing to bind {', '.join(sorted(names))}: {first['reason']}; fix: {first['fix']}",
            problems,
        )
    diags = diagnose_many(host, [t.address for t in targets])
    in_use = [h for d in diags for h in d.in_use]
    if in_use:
        h = in_use[0]
        raise DeviceInUse(
            f"refusing to bind: {h['path']} is held open by pid {h['pid']} ({h['comm']})",
            [{"device": t.address, "driver": t.driver, "kind": "in-use",
              "reason": f"{h['path']} is held open by pid {h['pid']} ({h['comm']})",
              "fix": f"stop pid {h['pid']} ({h['comm']}) first", "evidence": []} for t in targets],
        )
    cannot = [p for d in diags for p in d.problems
              if p.kind == P_NO_GROUP and p.device == d.device and not d.noiommu]
    if cannot:
        blocked = cannot[0]
        raise BindError(f"refusing to bind {blocked.device}: {blocked.reason}; fix: {blocked.fix}",
                        [p.as_dict() for p in cannot])
    # What the host uses, for every device this call would take (each target
    # is diagnosed, so members taken by --group are covered), and groups the
    # kernel will not hand to vfio.  One entry per (device, kind, object).
    seen: set[tuple[str, str, str]] = set()
    overridable: list[dict[str, Any]] = []
    for d in diags:
        for p in d.problems:
            # A target's own diagnosis names its own uses; a peer's repeats them.
            own = p.device == d.device or p.kind == P_RESERVED_DIRECT
            if p.kind in FORCEABLE_KINDS and own and (p.device, p.kind, p.reason) not in seen:
                seen.add((p.device, p.kind, p.reason))
                overridable.append(p.as_dict())
    if overridable and not force:
        use = overridable[0]
        more = len(overridable) - 1
        tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
        raise HostUsesDevice(
            f"refusing to bind {use['device']}: {use['reason']}; fix: {use['fix']}{tail}",
            overridable,
        )
    return overridable


def _check_rights(host: Host, plan: list[tuple[PciDevice, str]], state: BindState) -> None:
    """Refuse, before the first write, a caller who may not make the writes:
    every sysfs attribute the bind writes, and the state directory (or the
    nearest existing directory above it)."""
    wanted = ["sys/bus/pci/drivers_probe"]
    for dev, _target in plan:
        wanted.append(_dev_attr(dev.address, "driver_override"))
        if dev.driver:
            wanted.append(f"sys/bus/pci/drivers/{dev.driver}/unbind")
    _refuse_unwritable(host, wanted, state, "binding")


def _refuse_unwritable(host: Host, relatives: list[str], state: BindState | None,
                       doing: str) -> None:
    """:class:`NotPermitted` naming the first of ``relatives`` (sysfs paths
    under the host's root) that exists and that the caller may not write,
    then the state directory if ``state``.  ``os.access`` with the effective
    ids answers as the writes would, and sees read-only mounts (EROFS)."""
    for relative in relatives:
        path = host.path(relative)
        if os.path.exists(path) and not os.access(path, os.W_OK, effective_ids=True):
            raise NotPermitted(f"cannot write {path}: {doing} needs root (or write access to "
                               "sysfs); nothing was changed")
    if state is None:
        return
    directory = unwritable_directory(state.directory)
    if directory is not None:
        raise NotPermitted(f"cannot write the bind records in {state.directory} ({directory} is not "
                           "writable; use --state-dir or $PYVFIO_STATE_DIR); nothing was changed")


def bind(
    addresses: list[str] | str,
    *,
    root: str = "/",
    driver: str | None = None,
    group: bool = False,
    dry_run: bool = False,
    state_dir: str | None = None,
    host: Host | None = None,
    force: bool = False,
) -> list[BindResult]:
    """Bind devices (with ``group``: every endpoint of their groups) to
    ``driver`` or each device's best vfio driver.  All or nothing: on any
    failure the devices this call changed are restored and :class:`BindError`
    is raised.

    Refuses before the first write (in a dry run too): :class:`NotViable`
    (a member would stay on a host driver), :class:`DeviceInUse` (a process
    holds the group), :class:`BindError` (no IOMMU group on an IOMMU host,
    a driver not loaded), :class:`HostUsesDevice` (the host uses a device
    that would be taken: routes/addresses, mounts, swap, holders, console;
    or a ``direct`` reserved region) unless ``force``, and
    :class:`NotPermitted` (the caller cannot write sysfs or the state
    directory).  Each result's ``forced`` lists the problems ``force``
    overrode."""
    if isinstance(addresses, str):
        addresses = [addresses]
    if not addresses:
        raise UsageError("name at least one device to bind")
    host = host or Host(root)
    devices = [host.device(normalize_bdf(a)) for a in addresses]
    targets = _targets(host, devices, group)
    forced = _check_groups(host, targets, force)
    plan = [(dev, driver or host.best_driver(dev)) for dev in targets]
    for _dev, target in plan:
        if not host.driver_loaded(target):
            module = target.replace("-", "_")
            raise BindError(f"driver {target} is not loaded (modprobe {module})")
    state = _state_for(host, state_dir)
    changes = [(d, t) for d, t in plan if d.driver != t]
    if changes and not dry_run:  # a device already on its driver needs no write
        _check_rights(host, changes, state)
    ops = _Ops(host, dry_run)
    done: list[tuple[BindResult, dict[str, Any]]] = []
    results: list[BindResult] = []
    try:
        for dev, target in plan:
            result, record = _bind_one(ops, state, dev, target)
            result.forced = [p for p in forced if p["device"] == dev.address]
            results.append(result)
            if record is not None and result.changed:
                done.append((result, record))
    except (OSError, BindError) as exc:
        notes = []
        failed_record = getattr(exc, "record", None)
        pending = [r for _res, r in done]
        if failed_record is not None:
            pending.append(failed_record)
        for record in reversed(pending):
            try:
                _restore_one(ops, state, record)
                notes.append(f"{record['device']} back on {record['original_driver'] or 'no driver'}")
            except (OSError, BindError) as rexc:
                notes.append(f"{record['device']} NOT restored ({rexc}); run pyvfio restore {record['device']}")
        rolled = "; rolled back: " + ", ".join(notes) if notes else ""
        raise BindError(f"{exc}{rolled}") from exc
    finally:
        host.refresh()
    return results


class _BindFailed(BindError):
    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def _bind_one(
    ops: _Ops, state: BindState, dev: PciDevice, target: str
) -> tuple[BindResult, dict[str, Any] | None]:
    address = dev.address
    current = dev.driver if ops.dry_run else ops.driver_now(address)
    result = BindResult(address, current, current, changed=False)
    record = state.load(address)
    if record is not None and state.is_stale(record):
        record = None  # from an earlier boot: the driver we see now is the original
    if current == target:
        if record is not None and record.get("phase") != "bound" and not ops.dry_run:
            record["phase"] = "bound"
            state.save(record)
        return result, record
    if record is None:
        record = {
            "device": address,
            "original_driver": current,
            "original_override": dev.driver_override,
        }
    else:
        result.original_driver = record.get("original_driver")
    record.update(target_driver=target, phase="binding", pid=os.getpid(), time=time.time())
    if not ops.dry_run:
        state.save(record)
    result.steps.append(f"record {address} (driver {current or 'none'}) in {state.path(address)}")
    try:
        ops.write(result.steps, _dev_attr(address, "driver_override"), target)
        if current:
            ops.write(result.steps, f"sys/bus/pci/drivers/{current}/unbind", address)
        ops.write(result.steps, "sys/bus/pci/drivers_probe", address)
    except OSError as exc:
        raise _BindFailed(f"binding {address} to {target} failed: {exc}", record) from exc
    result.changed = True
    if ops.dry_run:
        result.driver = target
        return result, record
    now = ops.driver_now(address)
    result.driver = now
    if now != target:
        raise _BindFailed(
            f"binding {address} to {target} failed: after drivers_probe its driver is "
            f"{now or 'none'} (the probe did not attach; see dmesg)",
            record,
        )
    record["phase"] = "bound"
    state.save(record)
    return result, record


def _restore_one(ops: _Ops, state: BindState, record: dict[str, Any]) -> BindResult:
    address = record["device"]
    original = record.get("original_driver")
    override = record.get("original_override")
    current = ops.driver_now(address)
    result = BindResult(address, current, current, changed=False)
    final_override = override or "\n"  # a newline clears it: the kernel stores NULL
    written = None
    if current != original:
        result.changed = True
        # While rebinding, driver_override names the original driver: the
        # only way back to a driver that matched through an override itself
        # (pci-stub, a vfio driver bound by hand) and harmless for the rest.
        written = original or final_override
        ops.write(result.steps, _dev_attr(address, "driver_override"), written)
        if current:
            ops.write(result.steps, f"sys/bus/pci/drivers/{current}/unbind", address)
        if original:
            try:
                ops.write(result.steps, f"sys/bus/pci/drivers/{original}/bind", address)
            except OSError:
                pass  # e.g. the driver is not loaded now: let the bus pick
            if ops.dry_run or ops.driver_now(address) != original:
                ops.write(result.steps, "sys/bus/pci/drivers_probe", address)
    if written != final_override:
        ops.write(result.steps, _dev_attr(address, "driver_override"), final_override)
    if ops.dry_run:
        result.driver = original
        return result
    result.driver = ops.driver_now(address)
    if result.driver != original:
        raise BindError(
            f"could not put {address} back on {original or 'no driver'} (it is on "
            f"{result.driver or 'no driver'}); record kept in {state.path(address)}"
        )
    state.remove(address)
    return result


def _check_restore_rights(host: Host, state: BindState,
                          records: dict[str, dict[str, Any] | None]) -> None:
    """Refuse a restore the caller may not make, before its first write: the
    sysfs paths come from a dry run of each restore (so they are exactly the
    ones it would write); the state directory is needed as soon as one
    record would be removed (each restored or stale record is)."""
    probe = _Ops(host, dry_run=True)
    for record in records.values():
        if record is not None and not state.is_stale(record):
            _restore_one(probe, state, record)
    removes = any(record is not None for record in records.values())
    _refuse_unwritable(host, probe.written, state if removes else None, "restoring")


def restore(
    addresses: list[str] | str | None = None,
    *,
    all_devices: bool = False,
    root: str = "/",
    dry_run: bool = False,
    state_dir: str | None = None,
    host: Host | None = None,
) -> list[BindResult]:
    """Return recorded devices to their original driver and driver_override,
    whether the bind completed or crashed half way.  Named devices without a
    record raise :class:`BindError`; with ``all_devices`` every record is
    restored.  Every device is attempted; the first failure is raised at the
    end.

    Refuses before the first write (not in a dry run) with
    :class:`NotPermitted` when the caller may not write a sysfs attribute the
    restore would write (the same steps a dry run lists) or, when a record
    is to be removed, the state directory."""
    host = host or Host(root)
    state = _state_for(host, state_dir)
    if isinstance(addresses, str):
        addresses = [addresses]
    if all_devices:
        names = state.addresses()
    elif addresses:
        names = [normalize_bdf(a) for a in addresses]
    else:
        raise UsageError("name the devices to restore, or use --all")
    records = {address: state.load(address) for address in names}
    if not dry_run:
        _check_restore_rights(host, state, records)
    ops = _Ops(host, dry_run)
    results: list[BindResult] = []
    errors: list[str] = []
    for address, record in records.items():
        if record is None:
            errors.append(f"no binding of {address} is recorded in {state.directory}")
            continue
        if state.is_stale(record):
            if not dry_run:
                state.remove(address)
            errors.append(f"the record of {address} is from an earlier boot (bindings do not "
                          "survive a reboot); removed it, nothing to restore")
            continue
        try:
            results.append(_restore_one(ops, state, record))
        except (OSError, BindError) as exc:
            errors.append(f"{address}: {exc}")
    host.refresh()
    if errors:
        raise BindError("; ".join(errors))
    return results
