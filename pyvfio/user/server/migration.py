"""The migration v2 state machine of one served device and its data stream.

Spec: QEMU ``docs/interop/vfio-user.rst``, "Migration"; the state arcs are
the kernel's (``linux/vfio.h``, :mod:`pyvfio.migration`).
"""

from __future__ import annotations

import errno
import struct

from pyvfio.devices.model import PciDeviceModel
from pyvfio.errors import UsageError
from pyvfio.migration import MigFlag, MigrationError, MigState, arc_path
from pyvfio.user import protocol as P

# --- migration -------------------------------------------------------------------------------

_SAVING = frozenset({"PRE_COPY", "STOP_COPY"})
_STATE_NAMES = {P.MigState.ERROR: "ERROR", P.MigState.STOP: "STOP",
                P.MigState.RUNNING: "RUNNING", P.MigState.STOP_COPY: "STOP_COPY",
                P.MigState.RESUMING: "RESUMING", P.MigState.PRE_COPY: "PRE_COPY"}
_STATE_VALUES = {v: k for k, v in _STATE_NAMES.items()}
_MIG_RECORD = struct.Struct("=4sIII")  # magic, version, config length, state length
_MIG_MAGIC = b"PVUM"


class MigrationFsm:
    """The migration v2 state machine of one device (spec "Direct State
    Transitions"); combination transitions walk the kernel's arcs, from
    :mod:`pyvfio.migration` (state names are its ``MigState`` names).  The data stream is one or more records, each a full
    snapshot (config space + model state); the destination loads the last."""

    def __init__(self, device: PciDeviceModel) -> None:
        self.device = device
        self.state = "RUNNING"
        self.pre_copy = bool(device.migration_pre_copy)
        self._out = b""
        self._out_pos = 0
        self._in = bytearray()

    def path(self, target: str) -> list[str]:
        """The arcs from the current state to ``target`` (excluding the start),
        as the kernel would walk them (:func:`pyvfio.migration.arc_path`)."""
        if self.state == "ERROR":
            raise OSError(errno.EINVAL, "migration state is ERROR; reset the device")
        flags = MigFlag.STOP_COPY | (MigFlag.PRE_COPY if self.pre_copy else MigFlag(0))
        try:
            return [s.name for s in arc_path(MigState[self.state], MigState[target], flags)]
        except MigrationError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None

    def transition(self, target: str) -> None:
        for step in self.path(target):
            old = self.state
            try:
                self._arc(old, step)
            except (OSError, ValueError, UsageError) as exc:
                self.state = "ERROR"
                err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
                raise OSError(err, f"migration {old} -> {step} failed: {exc}") from None
            self.state = step
            self.device.migration_state_changed(old, step)

    def _snapshot(self) -> bytes:
        cfg = self.device.config.snapshot()
        state = self.device.save_state()
        return _MIG_RECORD.pack(_MIG_MAGIC, 1, len(cfg), len(state)) + cfg + state

    def _arc(self, old: str, new: str) -> None:
        if new in _SAVING:
            self._out = self._snapshot()
            self._out_pos = 0
        elif old in _SAVING:
            self._out, self._out_pos = b"", 0
        if new == "RESUMING":
            self._in = bytearray()
        elif old == "RESUMING":
            self._load(bytes(self._in))
            self._in = bytearray()

    def _load(self, data: bytes) -> None:
        last: tuple[bytes, bytes] | None = None
        pos = 0
        while pos < len(data):
            if len(data) - pos < _MIG_RECORD.size:
                raise ValueError("truncated migration record header")
            magic, version, cfg_len, st_len = _MIG_RECORD.unpack_from(data, pos)
            if magic != _MIG_MAGIC or version != 1:
                raise ValueError("not a pyvfio migration stream")
            pos += _MIG_RECORD.size
            if pos + cfg_len + st_len > len(data):
                raise ValueError("truncated migration record")
            last = (data[pos:pos + cfg_len], data[pos + cfg_len:pos + cfg_len + st_len])
            pos += cfg_len + st_len
        if last is None:
            raise ValueError("no migration data was written")
        cfg, state = last
        if len(cfg) != self.device.config.size:
            raise ValueError(f"config space of {len(cfg)} bytes, device has "
                             f"{self.device.config.size}")
        self.device.load_state(state)
        self.device.config.restore(cfg)

    def read(self, size: int) -> bytes:
        if self.state not in _SAVING:
            raise OSError(errno.EINVAL, f"MIG_DATA_READ in state {self.state}")
        chunk = self._out[self._out_pos:self._out_pos + size]
        self._out_pos += len(chunk)
        return chunk

    def write(self, data: bytes) -> None:
        if self.state != "RESUMING":
            raise OSError(errno.EINVAL, f"MIG_DATA_WRITE in state {self.state}")
        if len(self._in) + len(data) > 256 << 20:
            raise OSError(errno.EFBIG, "migration stream over 256 MiB")
        self._in += data

    def reset(self) -> None:
        self.state = "RUNNING"
        self._out, self._out_pos, self._in = b"", 0, bytearray()

    def client_gone(self) -> None:
        """The client left: the next one starts in RUNNING, as a kernel vfio
        driver starts each open (a half-written stream is dropped; device
        registers are kept).  A model that was stopped is told it runs."""
        old = self.state
        self.reset()
        if old != "RUNNING":
            self.device.migration_state_changed(old, "RUNNING")
