"""``pyvfio broker`` (the daemon) and ``pyvfio broker-open`` (a client that
gets fds for a VMM and prints or execs the QEMU command line that uses them)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import threading
from typing import Any

from pyvfio.cli import add_json_flag, check_root, print_json
from pyvfio.errors import UsageError

BROKER_EPILOG = """\
examples:
  pyvfio broker --socket /run/pyvfio-broker.sock --policy /etc/pyvfio/broker.toml
  pyvfio broker --policy /etc/pyvfio/broker.toml --socket /run/b.sock --check
  pyvfio broker ... --socket-mode 0660 --log /var/log/pyvfio-broker.log

The socket's directory must be writable only by root (or be sticky, like /tmp),
the policy owned by root and writable by nobody else, and --log not a symlink.
A stale socket left by a dead broker is replaced; anything else at the path (a
file, a symlink, a live broker) is refused and left as it is.

exit status: 0 stopped by SIGTERM or Ctrl-C (or --check: the policy is valid),
2 bad usage, an invalid or unsafe policy, an unsafe or busy socket path (one line
on stderr)
"""

BROKER_OPEN_EPILOG = """\
examples:
  pyvfio broker-open --socket /run/pyvfio-broker.sock --list
  pyvfio broker-open --socket /run/pyvfio-broker.sock --print-qemu-args 0000:00:03.0
  pyvfio broker-open --socket /run/pyvfio-broker.sock 0000:00:03.0 \\
      --exec qemu-system-x86_64 -M q35 -m 1G

A peer that is not a pyvfio broker (a vfio-user server, say) is reported within
5 s, naming what answered.

exit status: 0 success (--exec: the command's own), 2 bad usage, no broker at
the path, a refusal (one line on stderr says why), 130 interrupted
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "broker", epilog=BROKER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the fd broker: a root daemon that opens VFIO devices for allowed users",
        description=textwrap.fill("Listen on a UNIX socket; for each client (identified by SO_PEERCRED) "
                    "check the policy and the host's readiness, open the device "
                    "(group+container or iommufd+cdev) and pass the fds. "
                    "Decisions are logged one per line (see docs/broker.md).", 78))
    p.add_argument("--socket", required=True, metavar="PATH", help="UNIX socket to listen on")
    p.add_argument("--policy", required=True, metavar="FILE", help="policy file (TOML)")
    p.add_argument("--log", metavar="FILE",
                   help="append decision records to FILE (they always go to stderr too)")
    p.add_argument("--socket-mode", default="0666", metavar="MODE",
                   help="permissions of the socket (octal, default 0666: the policy decides)")
    p.add_argument("--check", action="store_true",
                   help="validate the policy file, print its rules, and exit")
    add_json_flag(p)
    p.set_defaults(func=run_broker)

    c = sub.add_parser(
        "broker-open", epilog=BROKER_OPEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="get devices from the broker and print (or exec) the QEMU arguments using the fds",
        description=textwrap.fill("Ask the broker for devices without set-up (iommufd + unbound cdev fds, "
                    "or container + group fds), then print the QEMU arguments that use them "
                    "(--print-qemu-args) or exec a command with the fds inherited and the "
                    "arguments appended (--exec CMD ...). Without either, print what came.", 78))
    c.add_argument("--socket", required=True, metavar="PATH", help="the broker's socket")
    c.add_argument("--backend", choices=("auto", "legacy", "iommufd"), default="auto")
    c.add_argument("--print-qemu-args", action="store_true",
                   help="print the QEMU arguments that use the passed fds")
    c.add_argument("--list", action="store_true",
                   help="list the devices the policy allows this user, and exit")
    c.add_argument("devices", nargs="*", metavar="BDF")
    add_json_flag(c)
    c.add_argument("--exec", nargs=argparse.REMAINDER, dest="exec_cmd", metavar="CMD",
                   help="exec CMD with the fds inherited and the QEMU arguments appended "
                        "(must come last)")
    c.set_defaults(func=run_broker_open)


def run_broker(args: argparse.Namespace) -> int:
    from pyvfio.broker.audit import AuditLog
    from pyvfio.broker.policy import Policy
    from pyvfio.broker.server import Broker
    from pyvfio.sockets import stop_on_signals

    policy = Policy.load(args.policy)
    if args.check and args.json:
        print_json(_policy_dict(policy))
        return 0
    if args.json:
        raise UsageError("--json goes with --check (the running broker logs one record per "
                         "line instead; see docs/broker.md)")
    if args.check:
        print(f"{policy.source}: {len(policy.rules)} rule(s), max_clients={policy.max_clients}, "
              f"max_devices_per_client={policy.max_devices_per_client}")
        for r in policy.rules:
            who = (["*"] if r.everyone else []) + [f"uid {u}" for u in sorted(r.uids)] + \
                [f"gid {g}" for g in sorted(r.gids)]
            what = sorted(r.addresses) + [f"{v:04x}:{d:04x}" for v, d in sorted(r.ids)] + \
                [f"group {g}" for g in sorted(r.iommu_groups)]
            print(f"  {r.label}: {', '.join(who)} -> {', '.join(what)} "
                  f"backends={','.join(r.backends)}{' managed' if r.managed else ''}")
        return 0
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        raise UsageError(f"--socket-mode must be octal, not {args.socket_mode!r}") from None
    check_root(args.root)  # the broker reads sysfs and /dev under it for every decision
    audit = AuditLog(args.log)
    broker = Broker(args.socket, policy, root=args.root, audit=audit, socket_mode=mode)
    broker.listen()

    def stop() -> None:
        threading.Thread(target=broker.stop, daemon=True).start()

    try:
        with stop_on_signals(stop, broker.wakeup_fd()):
            broker.serve_forever()
    finally:
        audit.close()
    return 0


def _policy_dict(policy: Any) -> dict[str, Any]:
    """``pyvfio broker --check --json``: the policy as the broker reads it."""
    return {
        "policy": policy.source, "max_clients": policy.max_clients,
        "max_devices_per_client": policy.max_devices_per_client,
        "rules": [{
            "rule": r.label, "name": r.name or None, "everyone": r.everyone,
            "uids": sorted(r.uids), "gids": sorted(r.gids), "devices": sorted(r.addresses),
            "ids": [f"{v:04x}:{d:04x}" for v, d in sorted(r.ids)],
            "iommu_groups": sorted(r.iommu_groups), "backends": list(r.backends),
            "managed": r.managed,
        } for r in policy.rules],
    }


def run_broker_open(args: argparse.Namespace) -> int:
    from pyvfio.broker.client import BrokerSession
    from pyvfio.cli import CommandFailed

    if args.json and args.exec_cmd:
        raise CommandFailed("--json and --exec exclude each other (--exec replaces this "
                            "process)", 2)
    with BrokerSession(args.socket) as session:
        if args.list and args.json:
            print_json(session.allowed())
            return 0
        if args.list:
            for d in session.allowed():
                print(f"{d['device']}  {d['id']}  group {d['iommu_group']}  "
                      f"backends={','.join(d['backends'])}  ({d['rule']})")
            return 0
        if not args.devices:
            raise CommandFailed("name at least one device (or use --list)", 2)
        for bdf in args.devices:
            session.open_fds(bdf, backend=args.backend)
        qemu = session.qemu_args()
        if args.exec_cmd:
            session.inheritable_fds()
            sys.stdout.flush()
            os.execvp(args.exec_cmd[0], [*args.exec_cmd, *qemu])
        if args.json:
            print_json({"backend": session.backend, "devices": session.passed_fds,
                        "qemu_args": qemu})
        elif args.print_qemu_args:
            print(" ".join(qemu))
        else:
            print(f"backend: {session.backend}")
            for address, fds in session.passed_fds.items():
                shown = ", ".join(f"{k}={v}" for k, v in fds.items())
                print(f"{address}: {shown}")
    return 0
