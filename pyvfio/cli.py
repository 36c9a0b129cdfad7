"""The ``pyvfio`` command.

Each area of the package registers its own subcommands (``register(sub)`` in
the modules listed in ``_COMMAND_MODULES``), so this file stays a dispatcher.
Exit codes: 0 success, 1 a check that ran but said no (``pyvfio check``),
2 bad usage or an error (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pyvfio.errors import PyvfioError

_COMMAND_MODULES = (
    "pyvfio.host.commands",  # ls, groups, check, bind, restore, apply, persist
    "pyvfio.kernel.commands",  # info
    "pyvfio.user.commands",  # serve
    "pyvfio.broker.commands",  # broker
    "pyvfio.testing.commands",  # guest, demo
)

# Commands whose module is known up front: running one of them imports only
# that module (importing every area costs ~80 ms of CPU at start-up, more than
# `pyvfio ls` spends on 1,000 devices).  Anything else, or no command, imports all.
_COMMAND_OWNERS = {name: "pyvfio.host.commands"
                   for name in ("ls", "groups", "check", "bind", "restore", "apply", "persist")}


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv``: the first word that is neither an option nor
    the value of ``--root`` (or an abbreviation of it, which argparse accepts)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = len(word) > 2 and "=" not in word and "--root".startswith(word)
        else:
            return word
    return None


class CommandFailed(Exception):
    """Raised by a subcommand to exit with ``code`` after printing ``message``."""

    def __init__(self, message: str = "", code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the ``argv`` about to be parsed, only the part
    that command needs when its module is known (``_COMMAND_OWNERS``)."""
    parser = argparse.ArgumentParser(
        prog="pyvfio",
        description="VFIO device assignment from Python: inspect and bind host devices, "
        "open them through kernel VFIO (legacy or iommufd), broker their fds, "
        "and serve or drive vfio-user devices.",
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("PYVFIO_ROOT", "/"),
        metavar="DIR",
        help="read sysfs, /dev and /proc under DIR instead of / (default: $PYVFIO_ROOT or /)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    owner = _COMMAND_OWNERS.get(_command_of(argv) or "") if argv is not None else None
    for name in (owner,) if owner else _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except CommandFailed as exc:
        if str(exc):
            print(f"pyvfio {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except PyvfioError as exc:
        print(f"pyvfio {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pyvfio {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
