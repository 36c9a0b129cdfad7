"""Device migration, backend-neutral: VFIO migration v2 for kernel devices and
vfio-user devices alike, and the one driver that moves a device's state.

The states and the state machine are the kernel's (``enum vfio_device_mig_state``
in ``include/uapi/linux/vfio.h``); vfio-user's DEVICE_FEATURE reuses the same
numbers, so one vocabulary serves both:

- ``RUNNING``: the device works normally.  ``STOP``: quiesced, no DMA, no
  interrupts, state frozen.
- ``STOP_COPY``: stopped, and its state is read out through the migration
  data stream until the stream ends.
- ``RESUMING``: stopped, and a state is written in through the data stream;
  leaving for ``STOP`` loads it (or fails, and the device goes to ``ERROR``).
- ``PRE_COPY`` (optional, ``MigFlag.PRE_COPY``): still running, while an
  initial part of its state is read out ahead of the stop, to shorten the
  downtime.  ``RUNNING_P2P`` / ``PRE_COPY_P2P`` (optional, ``MigFlag.P2P``):
  like RUNNING / PRE_COPY but initiating no peer-to-peer DMA.
- ``ERROR``: a transition failed; only a reset leaves it.

A backend implements :class:`Migration`: get/set the state (any state its
flags allow; combination transitions walk the kernel's arcs, see
:func:`next_state` which a server can use to do the same), and read/write the
data stream.  :func:`migrate` is the one driver::

    report = migrate(src_device, dst_device)    # RUNNING on src -> RUNNING on dst

Devices expose their migration through a ``migration()`` method returning a
:class:`Migration` (:func:`migration_of` accepts either).
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvfio.errors import PyvfioError, UsageError

__all__ = [
    "DATA_STATES",
    "MigFlag",
    "MigState",
    "Migration",
    "MigrationError",
    "MigrationReport",
    "PrecopyInfo",
    "arc_path",
    "load",
    "migrate",
    "migration_of",
    "next_state",
    "save",
    "state_supported",
]


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state``."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigFlag(enum.IntFlag):
    """``VFIO_MIGRATION_*``: what ``VFIO_DEVICE_FEATURE_MIGRATION`` reports."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


#: States in which the migration data stream is open (saving or resuming).
DATA_STATES = frozenset({MigState.PRE_COPY, MigState.PRE_COPY_P2P, MigState.STOP_COPY,
                         MigState.RESUMING})
SAVING_STATES = frozenset({MigState.PRE_COPY, MigState.PRE_COPY_P2P, MigState.STOP_COPY})


class MigrationError(PyvfioError):
    """Raised when a migration cannot go on: a device cannot migrate, a state
    is not supported, the data stream broke, or the destination refused the
    state.  ``stage`` says where ("precopy", "stop-copy", "load", ...)."""

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class PrecopyInfo:
    """``struct vfio_precopy_info``: bytes still to read in PRE_COPY.
    ``initial_bytes`` must all be read before leaving PRE_COPY pays off;
    ``dirty_bytes`` is state that changed since and will change again."""

    initial_bytes: int
    dirty_bytes: int


# --- the kernel's state machine (drivers/vfio/vfio_main.c, vfio_mig_get_next_state) ----------

_S = MigState
# _FROM[cur][new]: the next state on the shortest path from cur towards new,
# with every optional state supported; unsupported ones are skipped below.
_FROM: dict[MigState, dict[MigState, MigState]] = {
    _S.STOP: {_S.STOP: _S.STOP, _S.RUNNING: _S.RUNNING_P2P, _S.PRE_COPY: _S.RUNNING_P2P,
              _S.PRE_COPY_P2P: _S.RUNNING_P2P, _S.STOP_COPY: _S.STOP_COPY,
              _S.RESUMING: _S.RESUMING, _S.RUNNING_P2P: _S.RUNNING_P2P, _S.ERROR: _S.ERROR},
    _S.RUNNING: {_S.STOP: _S.RUNNING_P2P, _S.RUNNING: _S.RUNNING, _S.PRE_COPY: _S.PRE_COPY,
                 _S.PRE_COPY_P2P: _S.RUNNING_P2P, _S.STOP_COPY: _S.RUNNING_P2P,
                 _S.RESUMING: _S.RUNNING_P2P, _S.RUNNING_P2P: _S.RUNNING_P2P,
                 _S.ERROR: _S.ERROR},
    _S.PRE_COPY: {_S.STOP: _S.RUNNING, _S.RUNNING: _S.RUNNING, _S.PRE_COPY: _S.PRE_COPY,
                  _S.PRE_COPY_P2P: _S.PRE_COPY_P2P, _S.STOP_COPY: _S.PRE_COPY_P2P,
                  _S.RESUMING: _S.RUNNING, _S.RUNNING_P2P: _S.RUNNING, _S.ERROR: _S.ERROR},
    _S.PRE_COPY_P2P: {_S.STOP: _S.RUNNING_P2P, _S.RUNNING: _S.RUNNING_P2P,
                      _S.PRE_COPY: _S.PRE_COPY, _S.PRE_COPY_P2P: _S.PRE_COPY_P2P,
                      _S.STOP_COPY: _S.STOP_COPY, _S.RESUMING: _S.RUNNING_P2P,
                      _S.RUNNING_P2P: _S.RUNNING_P2P, _S.ERROR: _S.ERROR},
    _S.STOP_COPY: {_S.STOP: _S.STOP, _S.RUNNING: _S.STOP, _S.PRE_COPY: _S.ERROR,
                   _S.PRE_COPY_P2P: _S.ERROR, _S.STOP_COPY: _S.STOP_COPY,
                   _S.RESUMING: _S.STOP, _S.RUNNING_P2P: _S.STOP, _S.ERROR: _S.ERROR},
    _S.RESUMING: {_S.STOP: _S.STOP, _S.RUNNING: _S.STOP, _S.PRE_COPY: _S.STOP,
                  _S.PRE_COPY_P2P: _S.STOP, _S.STOP_COPY: _S.STOP, _S.RESUMING: _S.RESUMING,
                  _S.RUNNING_P2P: _S.STOP, _S.ERROR: _S.ERROR},
    _S.RUNNING_P2P: {_S.STOP: _S.STOP, _S.RUNNING: _S.RUNNING, _S.PRE_COPY: _S.RUNNING,
                     _S.PRE_COPY_P2P: _S.PRE_COPY_P2P, _S.STOP_COPY: _S.STOP,
                     _S.RESUMING: _S.STOP, _S.RUNNING_P2P: _S.RUNNING_P2P,
                     _S.ERROR: _S.ERROR},
    _S.ERROR: {s: _S.ERROR for s in MigState},
}

# The flags a device must report for a state to exist (ERROR: never settable).
_NEEDS: dict[MigState, int] = {
    _S.STOP: MigFlag.STOP_COPY,
    _S.RUNNING: MigFlag.STOP_COPY,
    _S.PRE_COPY: MigFlag.STOP_COPY | MigFlag.PRE_COPY,
    _S.PRE_COPY_P2P: MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY,
    _S.STOP_COPY: MigFlag.STOP_COPY,
    _S.RESUMING: MigFlag.STOP_COPY,
    _S.RUNNING_P2P: MigFlag.STOP_COPY | MigFlag.P2P,
    _S.ERROR: 0xFFFFFFFF,
}


def state_supported(state: MigState | int, flags: MigFlag | int) -> bool:
    """Whether a device with migration ``flags`` has ``state``."""
    try:
        need = _NEEDS[MigState(state)]
    except ValueError:
        return False
    return (need & int(flags)) == need


def next_state(cur: MigState | int, new: MigState | int, flags: MigFlag | int) -> MigState:
    """The next arc a device with ``flags`` takes from ``cur`` towards ``new``
    (``vfio_mig_get_next_state``).  Raises :class:`MigrationError` when ``new``
    cannot be reached (an unsupported state, or STOP_COPY -> PRE_COPY)."""
    cur_s, new_s = _state(cur), _state(new)
    if not state_supported(cur_s, flags):
        raise MigrationError(f"current state {cur_s.name} is not one this device has "
                             f"(flags {MigFlag(int(flags))!r})")
    if not state_supported(new_s, flags):
        raise MigrationError(f"the device does not support {new_s.name} "
                             f"(flags {MigFlag(int(flags))!r})")
    step = _FROM[cur_s][new_s]
    # ERROR is a dead end of the table (STOP_COPY -> PRE_COPY*): stop there.
    # (The kernel's loop has no such check, so such a request is refused here
    # before it reaches a kernel.)
    while step != MigState.ERROR and not state_supported(step, flags):
        step = _FROM[step][new_s]
    if step == MigState.ERROR:
        raise MigrationError(f"no transition from {cur_s.name} to {new_s.name}")
    return step


def arc_path(cur: MigState | int, new: MigState | int, flags: MigFlag | int) -> list[MigState]:
    """Every state a combination transition passes through, ``new`` included
    (``[]`` when already there).  A vfio-user server walks this list arc by arc."""
    path: list[MigState] = []
    state = _state(cur)
    target = _state(new)
    while state != target:
        state = next_state(state, target, flags)
        path.append(state)
        if len(path) > len(MigState):  # the table has no cycles; be sure anyway
            raise MigrationError(f"state machine loops from {cur} to {new}")
    return path


def _state(value: MigState | int) -> MigState:
    try:
        return MigState(value)
    except ValueError:
        raise MigrationError(f"unknown migration state {value}") from None


# --- the backend interface -------------------------------------------------------------------


class Migration(abc.ABC):
    """The migration side of one device.

    A backend implements the abstract methods; everything else is built on
    them.  ``set_state`` accepts any state the device's flags allow and makes
    the whole combination transition (the kernel does it itself; a vfio-user
    server walks :func:`arc_path`).  The data stream is the backend's: an fd
    from the kernel, MIG_DATA_READ/WRITE messages for vfio-user.
    """

    name: str = "?"

    @property
    @abc.abstractmethod
    def flags(self) -> MigFlag:
        """The ``VFIO_MIGRATION_*`` flags; 0 when the device cannot migrate."""

    @abc.abstractmethod
    def get_state(self) -> MigState: ...

    @abc.abstractmethod
    def set_state(self, state: MigState) -> None:
        """Move to ``state``, opening the data stream when entering a saving
        state from a non-saving one or RESUMING, and closing it when leaving
        them."""

    @abc.abstractmethod
    def read_data(self, size: int) -> bytes:
        """Up to ``size`` bytes of the saved state (PRE_COPY*/STOP_COPY).
        ``b""`` means: no more for now (PRE_COPY) or the end (STOP_COPY)."""

    @abc.abstractmethod
    def write_data(self, data: bytes) -> int:
        """Write part of a state into a RESUMING device; returns bytes taken."""

    def precopy_info(self) -> PrecopyInfo:
        """``VFIO_MIG_GET_PRECOPY_INFO`` (PRE_COPY states only)."""
        raise MigrationError(f"{self.name} cannot report pre-copy sizes", "precopy")

    def data_size(self) -> int | None:
        """Estimated bytes STOP_COPY will produce (``MIG_DATA_SIZE``), or None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook; not every backend has a stream to close
        """Close the data stream if one is open."""

    # ---- built on the above ----

    def require(self, *states: MigState) -> None:
        """Raise :class:`MigrationError` unless every state is supported."""
        flags = self.flags
        if not flags & MigFlag.STOP_COPY:
            raise MigrationError(f"{self.name} does not support migration "
                                 f"(migration flags {int(flags):#x})")
        missing = [s.name for s in states if not state_supported(s, flags)]
        if missing:
            raise MigrationError(f"{self.name} does not support {', '.join(missing)} "
                                 f"(flags {flags!r})")

    def read_all(self, chunk: int = 1 << 20, sink: Callable[[bytes], Any] | None = None,
                 limit: int = 1 << 34) -> bytes:
        """Read until the stream says there is nothing more (now).  With
        ``sink`` the chunks go there and ``b""`` is returned; ``limit`` bounds
        what a device may make us buffer."""
        parts: list[bytes] = []
        total = 0
        while True:
            data = self.read_data(chunk)
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > limit:
                raise MigrationError(f"{self.name} produced more than {limit} bytes of state",
                                     "read")
            if sink is None:
                parts.append(data)
            else:
                sink(data)

    def write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self.write_data(bytes(view[:1 << 20]))
            if n <= 0:
                raise MigrationError(f"{self.name} accepted no more state "
                                     f"({len(view)} bytes left)", "load")
            view = view[n:]

    def __enter__(self) -> Migration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def migration_of(obj: Any) -> Migration:
    """The :class:`Migration` of a device (its ``migration()``), or ``obj`` itself."""
    if isinstance(obj, Migration):
        return obj
    getter = getattr(obj, "migration", None)
    if callable(getter):
        mig = getter()
        if isinstance(mig, Migration):
            return mig
    raise UsageError(f"{obj!r} has no migration interface (no migration() method)")


def save(device: Any) -> bytes:
    """Stop ``device`` and read its whole state (-> STOP_COPY -> STOP)."""
    mig = migration_of(device)
    mig.require(MigState.STOP_COPY)
    mig.set_state(MigState.STOP_COPY)
    try:
        data = mig.read_all()
    finally:
        mig.set_state(MigState.STOP)
    return data


def load(device: Any, data: bytes) -> None:
    """Write a saved state into ``device`` (-> RESUMING -> STOP); the device
    stays stopped, move it to RUNNING when ready."""
    mig = migration_of(device)
    mig.require(MigState.RESUMING)
    mig.set_state(MigState.RESUMING)
    mig.write_all(data)
    try:
        mig.set_state(MigState.STOP)
    except Exception as exc:
        raise MigrationError(f"{mig.name} refused the state ({len(data)} bytes): {exc}",
                             "load") from exc


@dataclass
class MigrationReport:
    """What :func:`migrate` did: bytes moved in each phase, how long the source
    was stopped (``downtime_s``: from leaving PRE_COPY/RUNNING to the
    destination RUNNING), and the states each side went through."""

    precopy: bool
    precopy_bytes: int = 0
    precopy_rounds: int = 0
    stop_copy_bytes: int = 0
    downtime_s: float = 0.0
    total_s: float = 0.0
    src_states: list[str] = field(default_factory=list)
    dst_states: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.precopy_bytes + self.stop_copy_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"precopy": self.precopy, "precopy_bytes": self.precopy_bytes,
                "precopy_rounds": self.precopy_rounds, "stop_copy_bytes": self.stop_copy_bytes,
                "total_bytes": self.total_bytes, "downtime_s": round(self.downtime_s, 6),
                "total_s": round(self.total_s, 6), "src_states": self.src_states,
                "dst_states": self.dst_states}


def migrate(src: Any, dst: Any, *, precopy: bool | None = None, max_precopy_rounds: int = 8,
            dirty_threshold: int = 0, resume: bool = True,
            log: Callable[[str], None] | None = None) -> MigrationReport:
    """Move the state of ``src`` (RUNNING) into ``dst`` and run it there.

    1. ``dst`` -> RESUMING (a fresh device: RUNNING -> STOP -> RESUMING).
    2. If both sides can (``precopy=None``: when ``src`` offers PRE_COPY):
       ``src`` -> PRE_COPY, and stream what it has while it keeps running,
       until ``initial_bytes`` is drained and ``dirty_bytes`` is at most
       ``dirty_threshold``, or ``max_precopy_rounds`` passed.
    3. ``src`` -> STOP_COPY (the downtime starts), stream the rest.
    4. ``dst`` -> STOP (loads the state), ``src`` -> STOP, and ``dst`` ->
       RUNNING if ``resume``.

    Works for any mix of backends (kernel <-> kernel, vfio-user <-> vfio-user)
    since the stream is just bytes.  On failure the source is put back to
    RUNNING when it can be and :class:`MigrationError` says at which stage.
    """
    s, d = migration_of(src), migration_of(dst)
    # Migration objects made here (from devices) are closed here; ones passed
    # in stay the caller's.
    made = [m for m, given in ((s, src), (d, dst)) if m is not given]
    say = log or (lambda _msg: None)
    s.require(MigState.STOP_COPY)
    d.require(MigState.RESUMING)
    use_precopy = bool(s.flags & MigFlag.PRE_COPY) if precopy is None else precopy
    if use_precopy:
        s.require(MigState.PRE_COPY)
    report = MigrationReport(precopy=use_precopy)
    start = time.monotonic()
    stage = "prepare"

    def move(mig: Migration, state: MigState, trail: list[str]) -> None:
        mig.set_state(state)
        trail.append(state.name)
        say(f"{mig.name}: -> {state.name}")

    def forward(data: bytes) -> None:
        d.write_all(data)

    try:
        move(d, MigState.RESUMING, report.dst_states)
        if use_precopy:
            stage = "precopy"
            move(s, MigState.PRE_COPY, report.src_states)
            for _round in range(max_precopy_rounds):
                before = report.precopy_bytes
                counted = _Counter(forward)
                s.read_all(sink=counted)
                report.precopy_bytes += counted.total
                report.precopy_rounds += 1
                try:
                    info = s.precopy_info()
                except MigrationError:
                    break
                say(f"{s.name}: pre-copy round {report.precopy_rounds}: "
                    f"{report.precopy_bytes - before} bytes, {info.initial_bytes} initial + "
                    f"{info.dirty_bytes} dirty left")
                if info.initial_bytes == 0 and info.dirty_bytes <= dirty_threshold:
                    break
        stage = "stop-copy"
        stopped = time.monotonic()
        move(s, MigState.STOP_COPY, report.src_states)
        counted = _Counter(forward)
        s.read_all(sink=counted)
        report.stop_copy_bytes = counted.total
        say(f"{s.name}: stop-copy {counted.total} bytes")
        stage = "load"
        try:
            move(d, MigState.STOP, report.dst_states)
        except Exception as exc:
            raise MigrationError(f"{d.name} refused the state "
                                 f"({report.total_bytes} bytes): {exc}", stage) from exc
        move(s, MigState.STOP, report.src_states)
        if resume:
            stage = "resume"
            move(d, MigState.RUNNING, report.dst_states)
        report.downtime_s = time.monotonic() - stopped
    except BaseException as exc:
        _abort(s, say)
        if isinstance(exc, MigrationError):
            if not exc.stage:
                exc.stage = stage
            raise
        if isinstance(exc, Exception):
            raise MigrationError(f"migration from {s.name} to {d.name} failed at {stage}: "
                                 f"{exc}", stage) from exc
        raise
    finally:
        report.total_s = time.monotonic() - start
        for mig in made:
            mig.close()
    return report


class _Counter:
    def __init__(self, sink: Callable[[bytes], Any]) -> None:
        self.sink = sink
        self.total = 0

    def __call__(self, data: bytes) -> None:
        self.total += len(data)
        self.sink(data)


def _abort(src: Migration, say: Callable[[str], None]) -> None:
    """Best effort: let the source run again after a failed migration."""
    try:
        if src.get_state() != MigState.RUNNING:
            src.set_state(MigState.RUNNING)
            say(f"{src.name}: migration aborted, back to RUNNING")
    except Exception as exc:  # the original error matters more
        say(f"{src.name}: could not return to RUNNING: {exc}")
