"""The broker's decision log: one line per decision, in a stable format.

Every line is ``TIMESTAMP pyvfio-broker key=value ...`` (logfmt): the
timestamp is UTC ISO 8601 with milliseconds, keys are fixed words, values
that contain spaces, quotes, ``=`` or are empty are double-quoted with
backslash escapes.  Keys, in this order when present::

    event     start | connect | open | close | release | refused-connection |
              bad-request | disconnect | stop
    decision  granted | refused | error | info
    pid uid user gid          the peer, from SO_PEERCRED
    device backend rule       what was asked and which policy rule decided
    reason                    why (always present for refused and error)
    problems                  the host diagnosis, as compact JSON, when it decided

Example::

    2025-01-31T10:00:00.000Z pyvfio-broker event=open decision=refused pid=812 uid=65534
      user=nobody gid=65534 device=0000:00:04.0 backend=auto reason="no rule of ..."

Lines are written whole and flushed, so ``grep``/``tail -f`` see complete
records, and several threads may log at once.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import stat
import sys
import threading
from typing import Any, TextIO

from pyvfio.broker.wire import PeerCredentials
from pyvfio.errors import UsageError

__all__ = ["AuditLog", "format_record", "parse_record"]

_ORDER = ("event", "decision", "pid", "uid", "user", "gid", "device", "backend", "rule",
          "reason", "problems")
_PLAIN = re.compile(r"^[A-Za-z0-9_.:/@+,\-\[\]]+$")


def _quote(value: Any) -> str:
    if not isinstance(value, str):
        value = json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) \
            else str(value)
    if value and _PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def format_record(fields: dict[str, Any], when: _dt.datetime | None = None) -> str:
    when = when or _dt.datetime.now(_dt.UTC)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    keys = [k for k in _ORDER if k in fields] + sorted(k for k in fields if k not in _ORDER)
    parts = [f"{k}={_quote(fields[k])}" for k in keys if fields[k] is not None]
    return f"{stamp} pyvfio-broker " + " ".join(parts)


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_record(line: str) -> dict[str, str]:
    """Parse a line written by :func:`format_record` back into its fields
    (values as strings; ``problems`` stays JSON text).  For tests and tools."""
    out: dict[str, str] = {}
    for key, raw in _FIELD.findall(line):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), raw[1:-1])
        out[key] = raw
    return out



def _open_log(path: str) -> TextIO:
    """Open the decision log for appending, as a root daemon must: never
    through a symlink (one planted in a writable directory would make root
    append to any file), only a regular file, created 0640.  Errors name
    the path (:class:`~pyvfio.errors.UsageError`)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:  # a FIFO or device would block or fail the open itself: say what it is first
        st = os.lstat(path)
    except OSError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            raise UsageError(f"refusing the log {path}: it is not a regular file")
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"refusing the log {path}: it is a symlink; give the real path"
                             ) from None
        raise UsageError(f"cannot open the log {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UsageError(f"refusing the log {path}: it is not a regular file")
    os.set_blocking(fd, True)
    return open(fd, "a", encoding="utf-8")

class AuditLog:
    """Writes decision records to a stream (stderr by default) and/or a file."""

    def __init__(self, path: str | None = None, stream: TextIO | None = sys.stderr) -> None:
        self._lock = threading.Lock()
        self._stream = stream
        self._file: TextIO | None = _open_log(path) if path else None

    def record(self, event: str, decision: str, peer: PeerCredentials | None = None,
               **fields: Any) -> str:
        record: dict[str, Any] = {"event": event, "decision": decision}
        if peer is not None:
            record.update(pid=peer.pid, uid=peer.uid, user=peer.user_name, gid=peer.gid)
        record.update({k: v for k, v in fields.items() if v is not None})
        line = format_record(record)
        with self._lock:
            for out in (self._stream, self._file):
                if out is not None:
                    try:
                        out.write(line + "\n")
                        out.flush()
                    except (OSError, ValueError):  # a closed stderr must not stop the broker
                        pass
        return line

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
