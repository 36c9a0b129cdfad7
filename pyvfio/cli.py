"""The ``pyvfio`` command.

Each area of the package registers its own subcommands (``register(sub)`` in
the modules listed in ``_COMMAND_MODULES``), so this file stays a dispatcher,
and it is the one place where every command gets the behaviour of a well-made
Unix tool:

- exit statuses: 0 success, 1 a command that ran and said no (``pyvfio
  check``: a device not ready; ``bind``: refused), 2 bad usage or an error (one
  line on stderr, never a traceback), 130 interrupted (Ctrl-C: one line);
- a reader that goes away (``pyvfio ls | head -1``) ends the command quietly
  with exit 0, as lspci does;
- with ``--json``, an error is also one JSON object on stdout,
  ``{"error": {"message": ..., "kind": ..., ...}}`` (see docs/cli-json.md),
  with the same exit status;
- output the terminal's encoding cannot show is escaped, never a traceback;
- the global options (``--root``) are accepted before or after the subcommand;
- a ``--root`` (or ``$PYVFIO_ROOT``) that is not a host tree is an error.
"""

from __future__ import annotations

import argparse
import errno as _errno
import importlib
import json
import os
import re
import select
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pyvfio.errors import HostStateError, PyvfioError, UsageError

_COMMAND_MODULES = (
    "pyvfio.host.commands",  # ls, groups, check, bind, restore, apply, persist
    "pyvfio.kernel.commands",  # info
    "pyvfio.user.commands",  # serve
    "pyvfio.broker.commands",  # broker
    "pyvfio.testing.commands",  # guest, demo
    "pyvfio.k8s.commands",  # k8s-device-plugin
)

# Commands whose module is known up front: running one of them imports only
# that module (importing every area costs ~80 ms of CPU at start-up, more than
# `pyvfio ls` spends on 1,000 devices).  Anything else, or no command, imports all.
_COMMAND_OWNERS = {name: "pyvfio.host.commands"
                   for name in ("ls", "groups", "check", "bind", "restore", "apply", "persist")}

#: Commands that read the host tree under ``--root`` before anything else;
#: ``info`` and the edu driver check it only when they open a kernel device
#: (``--vfio-user`` needs no host tree), ``broker`` when it starts serving.
_HOST_TREE_COMMANDS = frozenset({"ls", "groups", "check", "bind", "restore"})

EXIT_OK = 0
EXIT_NO = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


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
    """Raised by a subcommand to exit with ``code`` after printing ``message``
    (one line on stderr; with ``--json`` also the error object on stdout, its
    ``kind`` and any ``details`` keys inside it)."""

    def __init__(self, message: str = "", code: int = EXIT_NO, *, kind: str | None = None,
                 **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind or ("usage" if code == EXIT_ERROR else "failed")
        self.details = details


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of text (errors too: see docs/cli-json.md)")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# --- errors as data --------------------------------------------------------------------------


def error_kind(exc: BaseException) -> str:
    """The ``kind`` of an error object: the exception class's name in
    kebab-case without ``Error`` (``UsageError`` -> ``usage``,
    ``DeviceNotFound`` -> ``device-not-found``, ``PermissionError`` ->
    ``permission``), so a script can branch on it without parsing messages."""
    if isinstance(exc, CommandFailed):
        return exc.kind
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    name = type(exc).__name__
    if name.endswith("Error") and name != "Error":
        name = name[: -len("Error")]
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def error_object(exc: BaseException, message: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "kind", ...}}`` for ``exc``: plus ``errno``
    (its symbolic name, e.g. ``"EACCES"``) for OS errors, ``problems`` for a
    refused host change, and a :class:`CommandFailed`'s details."""
    body: dict[str, Any] = {"message": str(exc) if message is None else message,
                            "kind": error_kind(exc)}
    err = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(err, int) and err in _errno.errorcode:
        body["errno"] = _errno.errorcode[err]
    if isinstance(exc, HostStateError):
        body["problems"] = exc.problems
    if isinstance(exc, CommandFailed):
        body.update(exc.details)
    return {"error": body}


# --- pipes, encodings, interrupts -------------------------------------------------------------


def make_output_safe() -> None:
    """Escape what the output encoding cannot show (``PYTHONIOENCODING=ascii``
    and a pci.ids name with an accent) instead of dying on it."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a detached or closed stream: leave it
                pass


def reader_gone() -> int:
    """stdout's reader went away (``| head -1``): stop quietly with exit 0, as
    lspci does.  stdout is pointed at /dev/null so the interpreter's final
    flush cannot raise again (the recipe in Python's ``signal`` docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests)
        pass
    return EXIT_OK


def stdout_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: a broken
    pipe from a broker or vfio-user socket is an error, not the end of output."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def say(prog: str, message: str) -> None:
    """One line on stderr; never fails (stderr may be a closed pipe too)."""
    try:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def run_command(prog: str, func: Callable[[], int | None], *, json_errors: bool) -> int:
    """Run one command body the way every pyvfio command ends: see the module
    docstring.  Used by :func:`main` and by the ``python -m`` entry points."""
    def fail(exc: BaseException, code: int, message: str | None = None) -> int:
        text = str(exc) if message is None else message
        if text:
            say(prog, text)
        if json_errors:
            try:
                print_json(error_object(exc, text))
                sys.stdout.flush()
            except BrokenPipeError:
                return reader_gone()
            except (OSError, ValueError):
                pass
        return code

    try:
        result = func()
        sys.stdout.flush()
    except BrokenPipeError as exc:
        if stdout_gone():
            return reader_gone()
        return fail(exc, EXIT_ERROR, describe_os_error(exc))  # a socket's peer, not our reader
    except KeyboardInterrupt as exc:
        return fail(exc, EXIT_INTERRUPTED, "interrupted")
    except CommandFailed as exc:
        return fail(exc, exc.code)
    except (PyvfioError, OSError) as exc:
        if interrupted(exc):
            return fail(KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted")
        return fail(exc, EXIT_ERROR, describe_os_error(exc) if not isinstance(exc, PyvfioError)
                    else None)
    return int(result or 0)


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` happened because of Ctrl-C: a KeyboardInterrupt that
    left a connection mid-reply makes the clean-up on the way out fail (a
    reply to the wrong request, a closed connection), and that error, not
    the interrupt, is what reaches the top."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def describe_os_error(exc: OSError) -> str:
    """An OS error as one line that names the path it concerns."""
    text = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


# --- the root ---------------------------------------------------------------------------------


def check_root(root: str) -> str:
    """``root`` if it is a host tree (it has ``sys/bus/pci``), else a
    :class:`UsageError` that says what is wrong with it."""
    if root == "":
        raise UsageError("the root is empty (--root '' or PYVFIO_ROOT set but empty): "
                         "unset PYVFIO_ROOT to read this host, or name a directory")
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise UsageError(f"root {root} {what}")
    if not os.path.isdir(os.path.join(root, "sys/bus/pci")):
        hint = ("is sysfs mounted?" if os.path.realpath(root) == "/" else
                "give the directory that holds sys/, dev/ and proc/")
        raise UsageError(f"{os.path.join(root, 'sys/bus/pci')} does not exist, so {root} is not "
                         f"a host tree: {hint}")
    return root


def _root_default() -> str:
    return os.environ.get("PYVFIO_ROOT", "/")


ROOT_HELP = "read sysfs, /dev and /proc under DIR instead of / (default: $PYVFIO_ROOT or /)"


def add_root_option(parser: argparse.ArgumentParser, *, default: Any = None) -> None:
    """``--root DIR``: on ``pyvfio`` itself, and (with ``argparse.SUPPRESS``
    as the default, so that it only overrides) after every subcommand."""
    parser.add_argument("--root", default=_root_default() if default is None else default,
                        metavar="DIR", help=ROOT_HELP)


# --- the parser -------------------------------------------------------------------------------


def _json_requested(argv: Sequence[str]) -> bool:
    words = list(argv)
    if "--" in words:
        words = words[: words.index("--")]
    return "--json" in words


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors also as a JSON error object when the
    command line asks for ``--json`` (argparse itself knows nothing of it)."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            try:
                print_json({"error": {"message": message, "kind": "usage"}})
            except OSError:
                pass
        super().error(message)


COMMON_EXIT_STATUS = ("exit status: 0 success, 2 bad usage or an error (one line on stderr; "
                      "with --json also {\"error\": {...}} on stdout), 130 interrupted")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the ``argv`` about to be parsed, only the part
    that command needs when its module is known (``_COMMAND_OWNERS``)."""
    parser = _Parser(
        prog="pyvfio",
        description="VFIO device assignment from Python: inspect and bind host devices, "
        "open them through kernel VFIO (legacy or iommufd), broker their fds, "
        "and serve or drive vfio-user devices.",
        epilog="Global options (--root) may also come after the command. Each command's "
        "--help gives examples and its exit statuses. " + COMMON_EXIT_STATUS + ".",
    )
    add_root_option(parser)
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
    for subparser in sub.choices.values():
        if not any("--root" in a.option_strings for a in subparser._actions):
            add_root_option(subparser, default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    make_output_safe()
    json_errors = _json_requested(argv)
    _Parser.json_errors = json_errors
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    except BrokenPipeError:  # --help into `head`
        return reader_gone()
    finally:
        _Parser.json_errors = False
    prog = f"pyvfio {args.command}"
    json_errors = bool(getattr(args, "json", False))

    def body() -> int | None:
        if args.command in _HOST_TREE_COMMANDS:
            check_root(args.root)
        return args.func(args)

    return run_command(prog, body, json_errors=json_errors)


if __name__ == "__main__":
    sys.exit(main())
