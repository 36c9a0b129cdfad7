"""The backend-neutral migration state machine and driver (:mod:`pyvfio.migration`).

The state machine is checked against the kernel's own documentation of
``vfio_mig_get_next_state`` (drivers/vfio/vfio_main.c: the arcs a driver must
implement and the combination paths it lists).  The driver :func:`migrate` is
run between two in-memory devices that accept *only* those single arcs, so a
driver that skipped or invented a transition fails here; the real thing
(mtty on the 6.12 kernel) is ``tests/guest/test_migration.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvfio.errors import UsageError
from pyvfio.migration import (
    MigFlag,
    Migration,
    MigrationError,
    MigState,
    PrecopyInfo,
    arc_path,
    load,
    migrate,
    migration_of,
    next_state,
    save,
    state_supported,
)

S = MigState
ALL = MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY
FLAG_SETS = [MigFlag.STOP_COPY, MigFlag.STOP_COPY | MigFlag.P2P,
             MigFlag.STOP_COPY | MigFlag.PRE_COPY, ALL]

# "The coding in this table requires the driver to implement the following FSM arcs"
# (vfio_main.c), per feature set.
ARCS_BASE = {(S.RESUMING, S.STOP), (S.STOP, S.RESUMING), (S.STOP, S.STOP_COPY),
             (S.STOP_COPY, S.STOP)}
ARCS_P2P = {(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING), (S.RUNNING_P2P, S.STOP),
            (S.STOP, S.RUNNING_P2P)}
ARCS_PRECOPY = {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.STOP_COPY)}
ARCS_PRECOPY_P2P = {(S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.PRE_COPY_P2P),
                    (S.PRE_COPY_P2P, S.PRE_COPY), (S.PRE_COPY_P2P, S.RUNNING_P2P),
                    (S.PRE_COPY_P2P, S.STOP_COPY), (S.RUNNING, S.PRE_COPY),
                    (S.RUNNING_P2P, S.PRE_COPY_P2P)}
ARCS_NO_P2P = {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}


def allowed_arcs(flags: MigFlag) -> set[tuple[MigState, MigState]]:
    arcs = set(ARCS_BASE)
    if flags & MigFlag.P2P:
        arcs |= ARCS_P2P
    else:
        arcs |= ARCS_NO_P2P
    if flags & MigFlag.PRE_COPY:
        arcs |= ARCS_PRECOPY_P2P if flags & MigFlag.P2P else ARCS_PRECOPY
    return arcs


# --- the state machine -----------------------------------------------------------------------


@pytest.mark.parametrize(("cur", "new", "path"), [
    # Combination transitions listed in vfio_main.c, all optional features on.
    (S.PRE_COPY, S.STOP_COPY, [S.PRE_COPY_P2P, S.STOP_COPY]),
    (S.PRE_COPY, S.RESUMING, [S.RUNNING, S.RUNNING_P2P, S.STOP, S.RESUMING]),
    (S.PRE_COPY_P2P, S.RUNNING, [S.RUNNING_P2P, S.RUNNING]),
    (S.RESUMING, S.PRE_COPY, [S.STOP, S.RUNNING_P2P, S.RUNNING, S.PRE_COPY]),
    (S.RESUMING, S.STOP_COPY, [S.STOP, S.STOP_COPY]),
    (S.RUNNING, S.STOP_COPY, [S.RUNNING_P2P, S.STOP, S.STOP_COPY]),
    (S.RUNNING, S.PRE_COPY_P2P, [S.RUNNING_P2P, S.PRE_COPY_P2P]),
    (S.STOP_COPY, S.RUNNING, [S.STOP, S.RUNNING_P2P, S.RUNNING]),
    (S.STOP, S.PRE_COPY, [S.RUNNING_P2P, S.RUNNING, S.PRE_COPY]),
    (S.RUNNING, S.RUNNING, []),
])
def test_paths_documented_by_the_kernel(cur: MigState, new: MigState,
                                        path: list[MigState]) -> None:
    assert arc_path(cur, new, ALL) == path


def test_without_optional_states_the_arcs_are_direct() -> None:
    assert arc_path(S.RUNNING, S.STOP_COPY, MigFlag.STOP_COPY) == [S.STOP, S.STOP_COPY]
    assert arc_path(S.RUNNING, S.RESUMING, MigFlag.STOP_COPY) == [S.STOP, S.RESUMING]
    assert arc_path(S.PRE_COPY, S.STOP_COPY, MigFlag.STOP_COPY | MigFlag.PRE_COPY) == [
        S.STOP_COPY]


def test_blocked_and_unsupported_transitions() -> None:
    with pytest.raises(MigrationError, match="no transition from STOP_COPY to PRE_COPY"):
        next_state(S.STOP_COPY, S.PRE_COPY, ALL)
    with pytest.raises(MigrationError, match="does not support PRE_COPY"):
        next_state(S.RUNNING, S.PRE_COPY, MigFlag.STOP_COPY)
    with pytest.raises(MigrationError, match="does not support RUNNING_P2P"):
        arc_path(S.RUNNING, S.RUNNING_P2P, MigFlag.STOP_COPY | MigFlag.PRE_COPY)
    with pytest.raises(MigrationError, match="unknown migration state 9"):
        next_state(S.RUNNING, 9, ALL)
    assert not state_supported(S.ERROR, ALL)
    assert not state_supported(42, ALL)


supported_pairs = st.sampled_from(FLAG_SETS).flatmap(
    lambda flags: st.tuples(
        st.just(flags),
        st.sampled_from([s for s in S if state_supported(s, flags)]),
        st.sampled_from([s for s in S if state_supported(s, flags)])))


@given(supported_pairs)
def test_every_path_uses_only_required_arcs(case: tuple[MigFlag, MigState, MigState]) -> None:
    flags, cur, new = case
    if cur == S.STOP_COPY and new in (S.PRE_COPY, S.PRE_COPY_P2P):
        with pytest.raises(MigrationError):
            arc_path(cur, new, flags)
        return
    path = arc_path(cur, new, flags)
    assert (path[-1] if path else cur) == new
    arcs = allowed_arcs(flags)
    for a, b in zip([cur, *path], path, strict=False):
        assert (a, b) in arcs, f"{a.name}->{b.name} with {flags!r}"
    # "The path cannot have saving group states as interior arcs": a session
    # is not opened and closed on the way (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY
    # stays in one session, which the kernel lists as a valid path).
    saving = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}
    if cur not in saving:
        assert not saving & set(path[:-1])


# --- a device that only accepts real arcs ----------------------------------------------------


class ArcDevice(Migration):
    """An in-memory device: ``state`` bytes of state, split into an initial
    part (available in PRE_COPY) and the rest (STOP_COPY).  Refuses any
    single arc the kernel does not require drivers to implement."""

    def __init__(self, name: str, flags: MigFlag, state: bytes = b"",
                 reject_load: bool = False) -> None:
        self.name = name
        self._mig_flags = flags
        self.state = S.RUNNING
        self.device_state = state
        self.reject_load = reject_load
        self.arcs: list[tuple[MigState, MigState]] = []
        self._out = b""
        self._in = bytearray()
        self.closed = False

    @property
    def flags(self) -> MigFlag:
        return self._mig_flags

    def get_state(self) -> MigState:
        return self.state

    def set_state(self, state: MigState) -> None:
        for step in arc_path(self.state, state, self.flags):
            assert (self.state, step) in allowed_arcs(self.flags), (self.state, step)
            self._arc(self.state, step)
            self.arcs.append((self.state, step))
            self.state = step

    def _arc(self, cur: MigState, new: MigState) -> None:
        half = len(self.device_state) // 2
        if new == S.PRE_COPY and cur == S.RUNNING:
            self._out = self.device_state[:half]
        elif new == S.STOP_COPY:
            self._out += self.device_state[half:] if cur == S.PRE_COPY_P2P or (
                cur == S.PRE_COPY) else self.device_state
        elif new == S.RESUMING:
            self._in = bytearray()
        elif cur == S.RESUMING and new == S.STOP:
            if self.reject_load:
                self.state = S.ERROR
                raise MigrationError(f"{self.name}: bad state")
            self.device_state = bytes(self._in)

    def read_data(self, size: int) -> bytes:
        assert self.state in (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY), self.state
        data, self._out = self._out[:size], self._out[size:]
        return data

    def write_data(self, data: bytes) -> int:
        assert self.state == S.RESUMING
        take = data[:7]  # short writes: the driver must loop
        self._in += take
        return len(take)

    def precopy_info(self) -> PrecopyInfo:
        assert self.state in (S.PRE_COPY, S.PRE_COPY_P2P)
        return PrecopyInfo(len(self._out), 0)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_migrate_moves_the_state(flags: MigFlag) -> None:
    blob = bytes(range(256)) * 3
    src = ArcDevice("src", flags, blob)
    dst = ArcDevice("dst", flags)
    report = migrate(src, dst)
    assert dst.device_state == blob
    assert dst.state == S.RUNNING and src.state == S.STOP
    assert report.total_bytes == len(blob)
    assert report.precopy == bool(flags & MigFlag.PRE_COPY)
    if report.precopy:
        assert report.precopy_bytes == len(blob) // 2 and report.precopy_rounds == 1
        assert src.arcs[0] == (S.RUNNING, S.PRE_COPY)
    assert report.src_states[-1] == "STOP" and report.dst_states == ["RESUMING", "STOP",
                                                                      "RUNNING"]


def test_migrate_without_precopy_when_asked() -> None:
    src, dst = ArcDevice("src", ALL, b"x" * 100), ArcDevice("dst", ALL)
    report = migrate(src, dst, precopy=False)
    assert not report.precopy and report.stop_copy_bytes == 100
    assert (S.RUNNING, S.PRE_COPY) not in src.arcs


def test_failed_load_puts_the_source_back_to_running() -> None:
    src, dst = ArcDevice("src", ALL, b"state"), ArcDevice("dst", ALL, reject_load=True)
    with pytest.raises(MigrationError, match="dst refused the state") as exc:
        migrate(src, dst)
    assert exc.value.stage == "load"
    assert src.state == S.RUNNING
    assert dst.state == S.ERROR


def test_migrate_refuses_devices_that_cannot_migrate() -> None:
    with pytest.raises(MigrationError, match="does not support migration"):
        migrate(ArcDevice("src", MigFlag(0)), ArcDevice("dst", ALL))
    with pytest.raises(MigrationError, match="does not support PRE_COPY"):
        migrate(ArcDevice("src", MigFlag.STOP_COPY), ArcDevice("dst", ALL), precopy=True)


def test_save_and_load_helpers() -> None:
    src = ArcDevice("src", MigFlag.STOP_COPY, b"abc" * 50)
    blob = save(src)
    assert blob == b"abc" * 50 and src.state == S.STOP
    dst = ArcDevice("dst", MigFlag.STOP_COPY)
    load(dst, blob)
    assert dst.device_state == blob and dst.state == S.STOP


def test_migration_of_devices_and_objects() -> None:
    mig = ArcDevice("x", ALL)

    class Dev:
        def migration(self) -> Migration:
            return mig

    assert migration_of(mig) is mig
    assert migration_of(Dev()) is mig
    with pytest.raises(UsageError, match="no migration interface"):
        migration_of(object())


def test_migrate_closes_what_it_opened() -> None:
    src, dst = ArcDevice("src", ALL, b"1234"), ArcDevice("dst", ALL)

    class Dev:
        def __init__(self, m: ArcDevice) -> None:
            self.m = m

        def migration(self) -> Migration:
            return self.m

    migrate(Dev(src), dst)
    assert src.closed and not dst.closed
