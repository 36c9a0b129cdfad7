"""``pyvfio k8s-device-plugin``: the kubelet device plugin daemon.

This module imports neither grpc nor the plugin: registering the subcommand
and ``--check`` work without the ``k8s`` extra; running the daemon without it
exits 2 naming the extra.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

_EPILOG = """\
examples:
  pyvfio k8s-device-plugin --config /etc/pyvfio/k8s.toml
  pyvfio k8s-device-plugin --config k8s.toml --check --json
  pyvfio --root /fake k8s-device-plugin --config k8s.toml --plugin-dir /tmp/dp

config (TOML or JSON; see docs/kubernetes.md):
  [resources."pyvfio.io/edu"]
  ids = ["1234:11e8"]

exit status: 0 stopped by SIGTERM or SIGINT (sockets removed, managed devices
restored), or --check: the config is valid; 2 bad config, bad usage, the k8s
extra (grpcio) missing, or a live socket in the way (one line on stderr)
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "k8s-device-plugin",
        help="serve VFIO devices to Kubernetes pods (kubelet device plugin API v1beta1)",
        description="Advertise host PCI devices to kubelet as extended resources, one device\n"
                    "per IOMMU group, Healthy only when pyvfio's host diagnosis says ready.\n"
                    "Allocate gives containers the VFIO device nodes (legacy: the group node\n"
                    "and /dev/vfio/vfio; iommufd: the cdevs and /dev/iommu) and\n"
                    "PCI_RESOURCE_<NAME> with the PCI addresses (docs/kubernetes.md).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE",
                   help="the resources and their selectors (TOML, or JSON)")
    p.add_argument("--plugin-dir", default=None, metavar="DIR",
                   help="kubelet's device-plugins directory, holding kubelet.sock "
                        "(default: /var/lib/kubelet/device-plugins)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, show what each resource selects now, and exit")
    p.add_argument("--json", action="store_true", help="with --check: print JSON")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="what goes to stderr (default: info)")
    p.set_defaults(func=run_device_plugin)


def run_device_plugin(args: argparse.Namespace) -> int:
    from pyvfio.cli import CommandFailed, print_json
    from pyvfio.k8s.config import PluginConfig

    if args.json and not args.check:
        raise CommandFailed("--json applies to --check (the daemon logs lines to stderr)", 2)
    config = PluginConfig.load(args.config)  # ConfigError (a UsageError): exit 2
    if args.check:
        from pyvfio.k8s.inventory import Inventory

        scan = Inventory(config, args.root).scan()
        if args.json:
            print_json({
                "config": config.source,
                "health_interval": config.health_interval,
                "resources": [
                    {**r.as_dict(),
                     "devices": [d.as_dict() for _i, d in sorted(scan.devices[r.name].items())]}
                    for r in config.resources],
                "conflicts": scan.conflicts,
            })
            return 0
        print(f"{config.source}: {len(config.resources)} resource(s), "
              f"health every {config.health_interval:g}s")
        for r in config.resources:
            print(f"  {r.name}: {r.describe()}; backend {r.backend}"
                  f"{'; managed' if r.managed else ''}")
            for _i, d in sorted(scan.devices[r.name].items()):
                why = f" ({d.reason})" if d.reason else ""
                print(f"    {d.id}  group {d.group}  {','.join(d.addresses)}  {d.health}{why}")
            if not scan.devices[r.name]:
                print("    (selects no device now)")
        for line in scan.conflicts:
            print(f"  conflict: {line}")
        return 0
    try:
        import google.protobuf  # noqa: F401
        import grpc  # noqa: F401
    except ImportError as exc:
        raise CommandFailed(f"needs the 'k8s' extra ({exc.name} is not installed): "
                            "pip install 'pyvfio[k8s]'", 2) from None
    from pyvfio.k8s.plugin import DEVICE_PLUGIN_PATH, DevicePluginDaemon

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s pyvfio k8s-device-plugin: %(message)s")
    daemon = DevicePluginDaemon(config, root=args.root,
                                plugin_dir=args.plugin_dir or DEVICE_PLUGIN_PATH)

    def stop(_signum: int, _frame: object) -> None:
        daemon.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    daemon.run()
    return 0
