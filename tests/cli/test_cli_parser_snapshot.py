"""Every command's interface as its parser holds it, against a snapshot.

The words of ``--help`` (summaries, descriptions, examples, each option's
flags, metavar, choices, default and help), whether a subcommand is required,
and the function each command runs are part of the interface a user reads
and scripts against; a change to them must be deliberate.  The snapshot is taken from the
parser objects, not from rendered ``--help`` text, so it does not depend on
the Python version's argparse layout (Debian 12's 3.11 and Debian 13's 3.13
format options differently) or on the terminal width.

After a deliberate change, rewrite the snapshot and review its diff:

    PYVFIO_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest tests/cli/test_cli_parser_snapshot.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pyvfio.cli import build_parser

SNAPSHOT = Path(__file__).with_name("cli_parser_snapshot.json")


def _action(action: argparse.Action) -> dict[str, Any]:
    default = action.default
    if not isinstance(default, (str, int, float, bool, type(None), list)):
        default = repr(default)
    return {
        "flags": list(action.option_strings) or [action.dest],
        "dest": action.dest,
        "metavar": list(action.metavar) if isinstance(action.metavar, tuple) else action.metavar,
        "nargs": action.nargs,
        "choices": sorted(map(str, action.choices)) if action.choices is not None
        and not isinstance(action.choices, dict) else None,
        "default": default if default is not argparse.SUPPRESS else "==SUPPRESS==",
        "help": action.help,
    }


def _parser(parser: argparse.ArgumentParser) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": parser.description,
        "epilog": parser.epilog,
        # what the command runs (set_defaults(func=cmd_...)), by name
        "defaults": {key: getattr(value, "__qualname__", repr(value))
                     for key, value in sorted(parser._defaults.items())},
        "arguments": [],
        "commands": {},
    }
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out["subcommand"] = {"dest": action.dest, "metavar": action.metavar,
                                 "required": action.required}
            summaries = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                entry = _parser(sub)
                entry["summary"] = summaries.get(name)
                out["commands"][name] = entry
            continue
        out["arguments"].append(_action(action))
    if not out["commands"]:
        del out["commands"]
    return out


def test_the_command_line_matches_its_snapshot(monkeypatch) -> None:
    monkeypatch.delenv("PYVFIO_ROOT", raising=False)  # --root's default comes from it
    current = _parser(build_parser())
    text = json.dumps(current, indent=1, sort_keys=True) + "\n"
    if os.environ.get("PYVFIO_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(text)
    recorded = json.loads(SNAPSHOT.read_text())
    changed = sorted(name for name in set(recorded["commands"]) | set(current["commands"])
                     if recorded["commands"].get(name) != current["commands"].get(name))
    assert current == recorded, (
        f"the interface of {', '.join(changed) or 'the top-level parser'} differs from "
        f"{SNAPSHOT.name}; if deliberate, rewrite it: "
        "PYVFIO_UPDATE_SNAPSHOT=1 pytest tests/cli/test_cli_parser_snapshot.py")
