"""UNIX socket paths as a root daemon and its clients must treat them.

A daemon that runs as root and listens on a path must not be made to remove
or replace something it did not create (:func:`prepare_listen_path`): it
refuses a symlink at the path, anything that is not a socket, a live socket,
and a directory in which other users could swap the path under it.  A client
says which path failed and what would fix it (:func:`connect_error`) instead
of a bare ``[Errno 13] Permission denied``.  A daemon in the foreground
stops on SIGINT or SIGTERM whichever of its threads the kernel hands the
signal to (:func:`stop_on_signals`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Iterator

from pyvfio.errors import UsageError

__all__ = ["SUN_PATH_MAX", "connect_error", "forget_wakeup_fd", "listen_error",
           "prepare_listen_path", "stop_on_signals"]

#: sun_path holds 108 bytes with the terminating NUL (unix(7)).
SUN_PATH_MAX = 107


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _owner(st: os.stat_result) -> str:
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        name = str(st.st_uid)
    return f"owner {name}, mode {stat.S_IMODE(st.st_mode):04o}"


def connect_error(path: str, exc: OSError, what: str) -> str:
    """One line for a failed ``connect()`` to ``what`` (``"vfio-user server"``,
    ``"pyvfio broker"``) at ``path``: the path, what went wrong, a hint."""
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        return (f"socket path {path!r} is {len(os.fsencode(path))} bytes; UNIX socket paths "
                f"hold at most {SUN_PATH_MAX}")
    if isinstance(exc, FileNotFoundError):
        if not os.path.isdir(parent):
            return f"no {what} at {path}: the directory {parent} does not exist"
        return f"no {what} at {path}: no such socket"
    if isinstance(exc, PermissionError):
        try:
            shown = f" ({_owner(os.stat(path))})"
        except OSError:
            shown = ""
        return (f"cannot connect to {path}{shown}: permission denied for {_user()}; the "
                f"socket's owner and mode (and search permission on {parent}) must allow it")
    if isinstance(exc, ConnectionRefusedError):
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            is_socket = True
        if not is_socket:
            return f"no {what} at {path}: it is not a socket"
        return f"no {what} listening at {path} (a stale socket: is the server running?)"
    if isinstance(exc, TimeoutError) or exc.errno == errno.EAGAIN:
        return f"connecting to {path} timed out: its listen queue is full (is {what} busy?)"
    if exc.errno == errno.ENOTDIR:
        return f"no {what} at {path}: a component of the path is not a directory"
    return f"cannot connect to {what} at {path}: {exc.strerror or exc}"


def listen_error(path: str, exc: OSError) -> UsageError:
    """Say which path failed and what to do, instead of a bare errno."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        return UsageError(f"socket path {path!r} is {len(os.fsencode(path))} bytes; UNIX "
                          f"socket paths hold at most {SUN_PATH_MAX}: use a shorter one")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        return UsageError(f"cannot create socket {path}: {parent} {what}")
    if isinstance(exc, PermissionError):
        return UsageError(f"cannot create socket {path}: permission denied in {parent} for "
                          f"{_user()}")
    return UsageError(f"cannot create socket {path}: {exc.strerror or exc} "
                      f"(is {parent} a writable directory?)")


def _check_directory(path: str) -> None:
    """The socket's directory must not let anyone but us (and root) replace
    entries in it: owned by root or by us, and not group- or world-writable
    unless sticky (as /tmp, where only an entry's owner may remove it)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise listen_error(path, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot create socket {path}: {parent} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise UsageError(f"refusing to listen at {path}: its directory {parent} belongs to "
                         f"another user ({_owner(st)}); use a directory owned by root or "
                         f"{_user()}, such as /run")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UsageError(f"refusing to listen at {path}: its directory {parent} is writable by "
                         f"others ({_owner(st)}), who could replace the socket; use a "
                         f"directory only its owner can write (chmod go-w {parent})")


def prepare_listen_path(path: str, what: str) -> None:
    """Make ``path`` free for ``bind()`` by a daemon serving ``what``, or
    raise :class:`UsageError` before anything is changed.

    Removes only a socket that is provably stale (``connect()`` is refused:
    nobody listens); refuses a symlink (even to a socket), anything that is
    not a socket, a live socket, and an unsafe directory."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise listen_error(path, OSError(errno.ENAMETOOLONG, "name too long"))
    _check_directory(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise listen_error(path, exc) from None
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"refusing to listen at {path}: it is a symlink (to "
                         f"{os.readlink(path)}); give the real path, or remove the link")
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket: refusing to remove it (remove "
                         "it yourself if it is not needed, or choose another path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody listens: a socket left by a server that died.  Remove it
        # only if it is still the very file we probed.
        try:
            again = os.lstat(path)
        except FileNotFoundError:
            return
        if (again.st_ino, again.st_dev) == (st.st_ino, st.st_dev):
            os.unlink(path)
        return
    except OSError as exc:
        raise UsageError(f"{path} exists and cannot be probed ({exc.strerror or exc}): "
                         "refusing to remove it") from None
    finally:
        probe.close()
    raise UsageError(f"another {what} is already listening on {path}")


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None], wakeup_fd: int,
                    signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)
                    ) -> Iterator[list[int]]:
    """While the block runs, each of ``signals`` calls ``stop()`` and is
    appended to the list it yields; the previous handlers (and wake-up fd)
    come back after it.  Must run in the main thread.

    The kernel may deliver a process-directed signal to any thread that does
    not block it, and Python runs the handler only in the main thread, at
    its next bytecode.  A main thread waiting in ``select`` on the daemon's
    sockets would then not run ``stop()`` until a client happened to connect
    (a service manager's SIGTERM ignored until its timeout, then SIGKILL).
    So ``wakeup_fd``, the non-blocking write end of a pipe whose read end the
    daemon's wait includes, is given to :func:`signal.set_wakeup_fd`: the
    C-level handler writes to it in whichever thread took the signal, and
    the wait returns.

    Raises ``RuntimeError`` outside the main thread; ``ValueError`` if
    ``wakeup_fd`` is blocking (:func:`signal.set_wakeup_fd`)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_on_signals() must run in the main thread")
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop()

    old_fd = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    old = {}
    try:
        for s in signals:
            old[s] = signal.signal(s, on_signal)
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(old_fd)


def forget_wakeup_fd(fd: int) -> None:
    """Call before closing ``fd``: if it is the signal wake-up fd (see
    :func:`stop_on_signals`), unset it, so that a signal arriving after the
    close cannot write into whatever file reuses the number.  Only the main
    thread has a wake-up fd to forget; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.set_wakeup_fd(-1)
    if current != fd:
        signal.set_wakeup_fd(current)
