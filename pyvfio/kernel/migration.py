"""VFIO migration v2 of a kernel device (``VFIO_DEVICE_FEATURE``).

The kernel side of :class:`pyvfio.migration.Migration`:

- ``VFIO_DEVICE_FEATURE_MIGRATION`` (GET): the ``VFIO_MIGRATION_*`` flags.
- ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` (GET/SET): the state; a SET that
  opens a data transfer session returns a new *data fd* in ``data_fd``.  The
  kernel walks combination transitions itself (``vfio_mig_get_next_state``).
- The data fd: ``read()`` it in PRE_COPY*/STOP_COPY, ``write()`` it in
  RESUMING.  In PRE_COPY a read at the temporary end of the stream returns 0
  or fails with ENOMSG; in STOP_COPY 0 is the real end.  An arc that stays in
  the same session (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY) returns no new fd:
  the PRE_COPY fd keeps going, so we keep it until the session ends.
- ``VFIO_MIG_GET_PRECOPY_INFO`` on the data fd: bytes left in PRE_COPY.
- ``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`` (GET): STOP_COPY's size estimate.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Protocol

from pyvfio.errors import ClosedError, KernelError
from pyvfio.migration import (
    DATA_STATES,
    MigFlag,
    MigrationError,
    MigState,
    PrecopyInfo,
    next_state,
)
from pyvfio.migration import Migration as _Migration
from pyvfio.uapi import vfio as V
from pyvfio.uapi.ioctl import ioctl

__all__ = ["KernelMigration", "MigratableDevice"]


class MigratableDevice(Protocol):
    """What :class:`KernelMigration` needs of a device: the
    ``VFIO_DEVICE_FEATURE`` calls of :class:`~pyvfio.kernel.device.KernelDevice`
    (see there).  A protocol, so this module does not import the device module
    that hands out migrations."""

    name: str

    def feature(self, feature: int, flags: int, payload: bytes | ctypes.Structure = b"",
                reply_size: int = 0) -> bytes: ...

    def has_feature(self, feature: int, flags: int = ...) -> bool: ...

    def migration_flags(self) -> int: ...

    def mig_state(self) -> int: ...

    def set_mig_state(self, state: int) -> int | None: ...


class KernelMigration(_Migration):
    """Migration of a :class:`KernelDevice` (vfio-pci variant drivers, mdevs
    such as ``mtty``).  The data fd is owned here and closed when the session
    ends or on :meth:`close`."""

    def __init__(self, device: MigratableDevice) -> None:
        self.device = device
        self.name = device.name
        self.data_fd = -1
        self._flags: MigFlag | None = None

    @property
    def flags(self) -> MigFlag:
        if self._flags is None:
            self._flags = MigFlag(self.device.migration_flags())
        return self._flags

    def get_state(self) -> MigState:
        return MigState(self.device.mig_state())

    def set_state(self, state: MigState) -> None:
        state = MigState(state)
        if state == MigState.ERROR:
            raise MigrationError("ERROR cannot be set; reset the device to leave it")
        self.require(state)
        # Check the transition exists before asking: the kernel's own walk of
        # its table does not stop at the ERROR entries (STOP_COPY -> PRE_COPY).
        next_state(self.get_state(), state, self.flags)
        try:
            fd = self.device.set_mig_state(int(state))
        except KernelError as exc:
            try:
                now = self.get_state().name
            except KernelError:
                now = "unknown"
            raise MigrationError(f"VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE -> {state.name} on "
                                 f"{self.name} failed ({exc}); the device is now in {now}"
                                 ) from exc
        if fd is not None:
            self._close_data()
            self.data_fd = fd
        elif state not in DATA_STATES:
            self._close_data()

    def _fd(self) -> int:
        if self.data_fd < 0:
            raise MigrationError(f"{self.name} has no migration data stream open "
                                 "(enter PRE_COPY, STOP_COPY or RESUMING first)")
        return self.data_fd

    def read_data(self, size: int) -> bytes:
        try:
            return os.read(self._fd(), size)
        except OSError as exc:
            if exc.errno == errno.ENOMSG:  # PRE_COPY: nothing more for now
                return b""
            raise KernelError.from_oserror(exc, "read", f"migration data of {self.name}"
                                           ) from None

    def write_data(self, data: bytes) -> int:
        try:
            return os.write(self._fd(), data)
        except OSError as exc:
            raise KernelError.from_oserror(exc, "write", f"migration data of {self.name}",
                                           f"{len(data)} bytes") from None

    def precopy_info(self) -> PrecopyInfo:
        info = V.vfio_precopy_info(argsz=ctypes.sizeof(V.vfio_precopy_info))
        try:
            ioctl(self._fd(), V.VFIO_MIG_GET_PRECOPY_INFO, info,
                  op="VFIO_MIG_GET_PRECOPY_INFO", target=f"migration data of {self.name}")
        except KernelError as exc:
            raise MigrationError(str(exc), "precopy") from exc
        return PrecopyInfo(int(info.initial_bytes), int(info.dirty_bytes))

    def data_size(self) -> int | None:
        if not self.device.has_feature(V.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE):
            return None
        reply = self.device.feature(V.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
                                    V.VFIO_DEVICE_FEATURE_GET,
                                    reply_size=ctypes.sizeof(V.vfio_device_feature_mig_data_size))
        return int(V.vfio_device_feature_mig_data_size.from_buffer_copy(reply).stop_copy_length)

    def _close_data(self) -> None:
        if self.data_fd >= 0:
            fd, self.data_fd = self.data_fd, -1
            os.close(fd)

    def close(self) -> None:
        self._close_data()

    def __repr__(self) -> str:
        try:
            state = self.get_state().name
        except (KernelError, ClosedError):
            state = "?"
        return f"<KernelMigration {self.name} {state} data_fd={self.data_fd}>"
