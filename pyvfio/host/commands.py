"""``pyvfio ls``, ``groups``, ``check``, ``bind``, ``restore``.

Exit codes: 0 success (``check``: every named device ready); 1 the command ran
and the answer is no (a device not ready, a bind refused or rolled back, a
restore that failed); 2 bad usage, a missing device, no IOMMU (one line on
stderr, from :func:`pyvfio.cli.main`).

``ls --json`` and ``groups --json`` print a JSON array with one object per
line: the C-accelerated encoder only runs without ``indent``, and on a host
with thousands of devices the indenting encoder would cost more than reading
sysfs does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pyvfio.cli import CommandFailed, add_json_flag, error_kind, print_json
from pyvfio.errors import DeviceNotFound, HostStateError
from pyvfio.host.model import VIABLE_KINDS, Host, IommuGroup, normalize_bdf

if TYPE_CHECKING:
    from pyvfio.host.binding import BindResult
    from pyvfio.host.diagnosis import Diagnosis

# binding and diagnosis are imported by the commands that use them: `ls` and
# `groups` start faster without them.


_ERRORS = ("2 bad usage, a bad --root, a missing device (one line on\nstderr; with --json "
           "also {\"error\": {...}} on stdout), 130 interrupted")

LS_EPILOG = f"""\
examples:
  pyvfio ls                              every PCI device
  pyvfio ls 01:00.0 01:00.1              only these (the domain may be left out)
  pyvfio ls --json | jq '.[] | select(.driver == "vfio-pci")'
  pyvfio ls --root /srv/host-snapshot    another host's sysfs/dev/proc tree
  pyvfio ls -s 02:00.1                   lspci's slot filter ([[[[dom]:]bus]:][dev][.[fn]])
  pyvfio ls -d 8086: --driver none       lspci's ID filter (vendor:device[:class]), driverless
  pyvfio ls -d ::0200 -v                 Ethernet controllers, detail view

exit status: 0 listed, {_ERRORS}
"""

GROUPS_EPILOG = f"""\
examples:
  pyvfio groups                          groups, members, viability, /dev/vfio node
  pyvfio groups --json

exit status: 0 listed, {_ERRORS}
"""

CHECK_EPILOG = f"""\
examples:
  pyvfio check 01:00.0                   ready for VFIO? each problem with its fix
  pyvfio check 01:00.0 01:00.1 --json
  pyvfio check 01:00.0 && qemu-system-x86_64 ...
  pyvfio check --all --json              every device of the host, one object per line

exit status: 0 every named device is ready, 1 one is not,
{_ERRORS}
"""

BIND_EPILOG = f"""\
examples:
  pyvfio bind 01:00.0 --dry-run          the sysfs writes it would make, nothing changed
  pyvfio bind 01:00.0                    to the best vfio driver, recorded for restore
  pyvfio bind --group 01:00.0            every endpoint of its IOMMU group
  pyvfio bind 04:00.0 --driver mlx5_vfio_pci
  pyvfio bind --group 02:00.1 --force    take it even though the host uses a member (a NIC
                                         with routes, a mounted disk): refused without --force
  pyvfio bind --persist 01:00.0          also recorded in ROOT/etc/pyvfio/bindings.json

exit status: 0 bound and ready, 1 refused, rolled back or not ready afterwards,
{_ERRORS}
"""

RESTORE_EPILOG = f"""\
examples:
  pyvfio restore 01:00.0                 back to the driver it had before bind
  pyvfio restore --all --dry-run         what restoring every record would write

exit status: 0 restored (or nothing to do), 1 a restore failed,
{_ERRORS}
"""


APPLY_EPILOG = f"""\
examples:
  pyvfio apply --dry-run                 what the boot unit would bind
  pyvfio apply                           bind every persisted binding, with bind's checks
  pyvfio apply --print-unit > /etc/systemd/system/pyvfio-apply.service
                                         install the boot unit (then systemctl enable it)

exit status: 0 every binding is in place, 1 one or more were refused or failed,
{_ERRORS}
"""

PERSIST_EPILOG = f"""\
examples:
  pyvfio persist list                    the bindings apply makes at boot
  pyvfio persist forget 01:00.0          drop one (it stays bound until pyvfio restore)
  pyvfio persist forget --all

exit status: 0 done, {_ERRORS}
"""


def _parser(sub: Any, name: str, epilog: str, **kw: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    return parser


def register(sub: Any) -> None:
    p = _parser(sub, "ls", LS_EPILOG,
                help="list PCI devices (IDs, names, driver, IOMMU group), with lspci's filters",
                description="List PCI devices.  The filters combine (a device must pass all\n"
                "of them) and take lspci's syntax.")
    p.add_argument("devices", nargs="*", metavar="BDF", help="only these devices")
    p.add_argument("-s", dest="slot", metavar="[[[[DOMAIN]:]BUS]:][DEV][.[FUNC]]",
                   help="only devices in these slots (fields empty or * match any), as lspci -s")
    p.add_argument("-d", dest="ids", metavar="[VENDOR]:[DEVICE][:CLASS[:PROGIF]]",
                   help="only devices with these IDs (hex; CLASS is base+sub, 0200), as lspci -d")
    p.add_argument("--driver", metavar="NAME", help="only devices bound to NAME (none: no driver)")
    p.add_argument("--class", dest="klass", metavar="HEX",
                   help="only devices whose class code starts with HEX (02, 0200, 020000)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="detail view: BARs, capabilities, driver and modules, NUMA node, group, "
                   "reset methods, netdevs, block devices, what the host uses")
    add_json_flag(p)
    p.set_defaults(func=cmd_ls)

    p = _parser(sub, "groups", GROUPS_EPILOG, help="list IOMMU groups, their members and viability")
    add_json_flag(p)
    p.set_defaults(func=cmd_groups)

    p = _parser(
        sub, "check", CHECK_EPILOG,
        help="diagnose devices: viable, in use, driver kind, best driver, ready (exit 0 only if all ready)",
    )
    p.add_argument("devices", nargs="*", metavar="BDF")
    p.add_argument("--all", action="store_true",
                   help="diagnose every PCI device of the host (bridges left out)")
    add_json_flag(p)
    p.set_defaults(func=cmd_check)

    p = _parser(sub, "bind", BIND_EPILOG, help="bind devices to a vfio driver, recording how to restore them")
    p.add_argument("devices", nargs="+", metavar="BDF")
    p.add_argument("--driver", metavar="NAME", help="driver to bind to (default: the best vfio driver)")
    p.add_argument("--group", action="store_true", help="bind every endpoint of the devices' IOMMU groups")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sysfs writes (or the refusal), change nothing")
    p.add_argument("--force", action="store_true",
                   help="take devices the host uses (netdevs with routes or addresses, mounted "
                   "filesystems, swap, dm/md holders, the console) or whose group has a firmware "
                   "direct mapping; never overrides a group in use or one left not viable")
    p.add_argument("--persist", action="store_true",
                   help="also record the binding in the configuration (ROOT/etc/pyvfio/bindings.json) "
                   "so that `pyvfio apply` makes it again at boot")
    _state_dir_flag(p)
    _config_dir_flag(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_bind)

    p = _parser(sub, "apply", APPLY_EPILOG,
                help="bind every persisted binding (what the boot unit runs), with bind's checks",
                description="Bind every device recorded with `pyvfio bind --persist`, with the\n"
                "same checks as `pyvfio bind`: a device the host uses is refused unless --force.")
    p.add_argument("--dry-run", action="store_true", help="print what would be bound, change nothing")
    p.add_argument("--force", action="store_true", help="as bind --force, for every binding")
    p.add_argument("--print-unit", action="store_true",
                   help="print the systemd unit that runs `pyvfio apply` at boot, and exit")
    _state_dir_flag(p)
    _config_dir_flag(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_apply)

    p = _parser(sub, "persist", PERSIST_EPILOG,
                help="list or forget persisted bindings (see bind --persist)")
    persist_sub = p.add_subparsers(dest="persist_command", metavar="ACTION")
    persist_sub.required = True
    q = _parser(persist_sub, "list", PERSIST_EPILOG, help="list the persisted bindings")
    _config_dir_flag(q)
    add_json_flag(q)
    q.set_defaults(func=cmd_persist_list)
    q = _parser(persist_sub, "forget", PERSIST_EPILOG,
                help="remove persisted bindings (the devices stay bound until `pyvfio restore`)")
    q.add_argument("devices", nargs="*", metavar="BDF")
    q.add_argument("--all", action="store_true", help="forget every persisted binding")
    _config_dir_flag(q)
    add_json_flag(q)
    q.set_defaults(func=cmd_persist_forget)

    p = _parser(sub, "restore", RESTORE_EPILOG, help="return bound devices to their original driver")
    p.add_argument("devices", nargs="*", metavar="BDF")
    p.add_argument("--all", action="store_true", help="restore every recorded device")
    p.add_argument("--dry-run", action="store_true", help="print the sysfs writes, change nothing")
    _state_dir_flag(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_restore)


def _state_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir", metavar="DIR",
        help="where bind records live (default: $PYVFIO_STATE_DIR or ROOT/run/pyvfio/bind)",
    )


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Suspend the cyclic garbage collector while an inventory is built.

    A 10,000-device host makes some 200,000 small objects (devices, groups,
    diagnoses, their dicts and lists) and none of them form reference cycles,
    so reference counting frees them all; but every few hundred allocations
    the collector walks the young ones again, and now and then all of them:
    measured, a fifth of ``check --all``'s CPU time at 10,000 devices."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _config_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config-dir", metavar="DIR",
        help="where persisted bindings live (default: $PYVFIO_CONFIG_DIR or ROOT/etc/pyvfio)",
    )


def _print_json_lines(items: list[dict[str, Any]]) -> None:
    out = sys.stdout
    if not items:
        out.write("[]\n")
        return
    out.write("[\n" + ",\n".join(json.dumps(item) for item in items) + "\n]\n")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


# ---- ls ----

def cmd_ls(args: argparse.Namespace) -> int:
    with _without_cyclic_gc():
        return _ls(args)


def _ls(args: argparse.Namespace) -> int:
    host = Host(args.root)
    if args.devices:
        # A device named twice (in any spelling) is listed once, in first-named order.
        devices = [host.device(a) for a in dict.fromkeys(normalize_bdf(a) for a in args.devices)]
    else:
        devices = host.devices()
    if args.slot or args.ids or args.driver or args.klass:
        from pyvfio.host.listing import select

        devices = select(devices, slot=args.slot, ids=args.ids, driver=args.driver, klass=args.klass)
    ids = host.ids
    if args.verbose:
        from pyvfio.host.listing import ModuleMatcher, detail, format_detail

        matcher = ModuleMatcher(host)
        infos = [detail(host, d, matcher) for d in devices]
        if args.json:
            _print_json_lines(infos)
        else:
            print("\n\n".join(format_detail(i) for i in infos))
        return 0
    if args.json:
        _print_json_lines([d.as_dict(ids) for d in devices])
        return 0
    from pyvfio.host.listing import class_label, device_name

    rows = []
    for dev in devices:
        info = dev.as_dict(ids)
        name = device_name(ids, dev.vendor_id, dev.device_id)
        rows.append([
            dev.address,
            f"{info['vendor_id']}:{info['device_id']}",
            class_label(ids, dev.class_code),
            dev.driver or "-",
            "-" if dev.iommu_group is None else str(dev.iommu_group),
            dev.vfio_cdev or "-",
            name,
        ])
    print(_table(rows, ["DEVICE", "IDS", "CLASS", "DRIVER", "GROUP", "CDEV", "NAME"]))
    return 0


# ---- groups ----

def group_dict(host: Host, group: IommuGroup) -> dict[str, Any]:
    """The ``pyvfio groups --json`` object for one group."""
    members = []
    viable = True
    for address in group.devices:
        try:
            dev = host.device(address)
        except DeviceNotFound:  # unplugged while we read
            continue
        kind = host.driver_kind(dev)
        viable = viable and kind in VIABLE_KINDS
        members.append({
            "device": address, "driver": dev.driver, "driver_kind": kind, "is_bridge": dev.is_bridge,
        })
    return {
        "group": group.number,
        "devices": list(group.devices),
        "viable": viable,
        "type": group.type,
        "noiommu": group.noiommu,
        "node": host.group_node(group.number),
        "reserved_regions": [r.as_dict() for r in group.reserved_regions],
        "members": members,
    }


def cmd_groups(args: argparse.Namespace) -> int:
    with _without_cyclic_gc():
        return _groups(args)


def _groups(args: argparse.Namespace) -> int:
    host = Host(args.root)
    host.devices()  # one pass over the devices, so members come from the cache
    groups = [group_dict(host, g) for g in host.groups()]
    if args.json:
        _print_json_lines(groups)
        return 0
    rows = []
    for g in groups:
        members = ", ".join(
            f"{m['device']} ({m['driver'] or 'no driver'}, {m['driver_kind']})" for m in g["members"]
        )
        rows.append([str(g["group"]), _yes(g["viable"]), g["type"] or "-", g["node"] or "-", members])
    print(_table(rows, ["GROUP", "VIABLE", "TYPE", "NODE", "DEVICES"]))
    if not host.iommu_present():
        mode = "on" if host.noiommu_enabled() else "off"
        print(f"note: no IOMMU present; vfio no-IOMMU mode is {mode}", file=sys.stderr)
    return 0


# ---- check ----

def _print_diagnoses(diags: list[Diagnosis]) -> None:
    rows = []
    for d in diags:
        users = ", ".join(f"{h['pid']} ({h['comm']})" for h in d.in_use) or "-"
        rows.append([
            d.device, "-" if d.group is None else str(d.group), d.driver or "-", d.driver_kind,
            d.best_driver, _yes(d.viable), users, _yes(d.ready),
        ])
    print(_table(rows, ["DEVICE", "GROUP", "DRIVER", "KIND", "BEST", "VIABLE", "IN-USE", "READY"]))
    for d in diags:
        for p in d.problems:
            print(f"{d.device}: {p.reason}\n    fix: {p.fix}")
        if d.noiommu:
            print(f"WARNING: {d.device} is in vfio's UNSAFE no-IOMMU mode: no IOMMU isolates "
                  "its DMA, so the device (and whoever drives it) can reach all of memory",
                  file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    with _without_cyclic_gc():
        return _check(args)


def _check(args: argparse.Namespace) -> int:
    from pyvfio.host.diagnosis import diagnose_many

    host = Host(args.root, lean=args.all)
    if args.all:
        addresses = [d.address for d in host.devices() if not d.is_bridge]
        host.groups()  # group membership from the devices just read
    elif args.devices:
        addresses = [normalize_bdf(a) for a in args.devices]
    else:
        raise CommandFailed("name the devices to check, or use --all", 2)
    diags = diagnose_many(host, addresses)
    if args.json and args.all:  # thousands of objects: one per line, the fast encoder
        _print_json_lines([d.as_dict() for d in diags])
    elif args.json:
        print_json([d.as_dict() for d in diags])
    else:
        _print_diagnoses(diags)
    return 0 if all(d.ready for d in diags) else 1


# ---- bind / restore ----

def _refused(exc: HostStateError, *, dry_run: bool = False, json_out: bool = False) -> CommandFailed:
    """A refused bind/restore: exit 1, the problems in the error object; a
    dry run in text also lists every reason, not only the first."""
    if dry_run and not json_out and len(exc.problems) > 1:
        for p in exc.problems:
            print(f"{p['device']}: {p.get('kind')}: {p['reason']}\n    fix: {p['fix']}")
    return CommandFailed(str(exc), 1, kind=error_kind(exc), problems=exc.problems)


def _print_results(results: list[BindResult], dry_run: bool) -> None:
    for r in results:
        if not r.changed:
            print(f"{r.device}: already on {r.driver or 'no driver'}")
            continue
        verb = "would go" if dry_run else "now on"
        print(f"{r.device}: {r.original_driver or 'no driver'} -> {verb} {r.driver or 'no driver'}"
              if not dry_run else
              f"{r.device}: {r.original_driver or 'no driver'} {verb} to {r.driver or 'no driver'}")
        if dry_run:
            for step in r.steps:
                print(f"    {step}")
    if dry_run and results:
        print("dry run: nothing was changed")


def cmd_bind(args: argparse.Namespace) -> int:
    from pyvfio.host.binding import bind
    from pyvfio.host.diagnosis import diagnose_many

    host = Host(args.root)
    config = None
    if args.persist:
        from pyvfio.host.persist import PersistedBindings, config_dir_for

        config = PersistedBindings(config_dir_for(host.root, args.config_dir))
        config.load()  # a broken file is refused before anything changes
    try:
        if config is not None and not args.dry_run:
            config.check_writable()
        results = bind(
            args.devices, driver=args.driver, group=args.group, dry_run=args.dry_run,
            state_dir=args.state_dir, host=host, force=args.force,
        )
    except HostStateError as exc:
        raise _refused(exc, dry_run=args.dry_run, json_out=args.json) from exc
    persisted: list[dict[str, Any]] = []
    if config is not None and not args.dry_run:
        named = [host.device(normalize_bdf(a)) for a in args.devices]
        persisted = config.record(named, driver=args.driver, group=args.group)
    diags = [] if args.dry_run else diagnose_many(host, [normalize_bdf(a) for a in args.devices])
    if args.json:
        print_json({
            "dry_run": args.dry_run,
            "devices": [r.as_dict() for r in results],
            "check": [d.as_dict() for d in diags],
            "persisted": persisted,
        })
    else:
        _print_results(results, args.dry_run)
        if config is not None:
            verb = "would record" if args.dry_run else "recorded"
            print(f"{verb} in {config.path}: " + ", ".join(normalize_bdf(a) for a in args.devices))
        for r in results:
            for overridden in r.forced:
                print(f"{r.device}: forced past {overridden['kind']}: {overridden['reason']}")
        for d in diags:
            if not d.ready:
                for p in d.problems:
                    print(f"{d.device}: not ready: {p.reason}\n    fix: {p.fix}")
    return 0 if all(d.ready for d in diags) else 1


def cmd_restore(args: argparse.Namespace) -> int:
    from pyvfio.host.binding import restore

    host = Host(args.root)
    if not args.all and not args.devices:
        raise CommandFailed("name the devices to restore, or use --all", 2)
    try:
        results = restore(
            args.devices, all_devices=args.all, dry_run=args.dry_run, state_dir=args.state_dir,
            host=host,
        )
    except HostStateError as exc:
        raise _refused(exc) from exc
    if args.json:
        print_json({"dry_run": args.dry_run, "devices": [r.as_dict() for r in results]})
    else:
        for r in results:
            verb = "would be restored to" if args.dry_run else "restored to"
            print(f"{r.device}: {verb} {r.driver or 'no driver'}"
                  + (" (unchanged)" if not r.changed else ""))
            if args.dry_run:
                for step in r.steps:
                    print(f"    {step}")
        if not results:
            print("nothing to restore")
        elif args.dry_run:
            print("dry run: nothing was changed")
    return 0


# ---- persisted bindings ----

def cmd_apply(args: argparse.Namespace) -> int:
    from pyvfio.host.persist import apply, unit_text

    if args.print_unit:
        sys.stdout.write(unit_text())
        return 0
    results = apply(root=args.root, config_dir=args.config_dir, state_dir=args.state_dir,
                    dry_run=args.dry_run, force=args.force)
    if args.json:
        print_json({"dry_run": args.dry_run, "bindings": [r.as_dict() for r in results]})
    else:
        for r in results:
            print(f"{r.device}: {r.status}: {r.message}")
            for p in r.problems[1:]:
                print(f"    also: {p.get('kind')}: {p['reason']}")
        if not results:
            print("no persisted bindings")
    return 0 if all(r.ok for r in results) else 1


def cmd_persist_list(args: argparse.Namespace) -> int:
    from pyvfio.host.persist import PersistedBindings, config_dir_for

    config = PersistedBindings(config_dir_for(args.root, args.config_dir))
    entries = config.load()
    if args.json:
        print_json(entries)
        return 0
    rows = [[e["device"], f"{e.get('vendor_id')}:{e.get('device_id')}", e.get("driver") or "(best)",
             _yes(bool(e.get("group")))] for e in entries]
    print(_table(rows, ["DEVICE", "IDS", "DRIVER", "GROUP"]))
    print(f"({len(entries)} in {config.path})")
    return 0


def cmd_persist_forget(args: argparse.Namespace) -> int:
    from pyvfio.host.persist import PersistedBindings, config_dir_for

    if not args.all and not args.devices:
        raise CommandFailed("name the devices to forget, or use --all", 2)
    config = PersistedBindings(config_dir_for(args.root, args.config_dir))
    config.check_writable()
    removed = config.forget(None if args.all else args.devices)
    if args.json:
        print_json({"forgotten": removed})
    else:
        for a in removed:
            print(f"{a}: forgotten (still bound now; pyvfio restore {a} puts it back)")
        if not removed:
            print("nothing to forget")
    return 0
