"""The exception tree of pyvfio.

Exceptions are grouped by meaning, not by where they come from: a caller that
wants to know "is this group unusable" catches :class:`NotViable` whether the
legacy backend, the iommufd backend or the broker found out.  Errors that come
from a failed system call keep their ``errno`` (they derive from
:class:`OSError`) and say which operation on which object failed, e.g.
``VFIO_GROUP_SET_CONTAINER on group 12: [Errno 16] Device or resource busy``.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any


class PyvfioError(Exception):
    """Base class of every error pyvfio raises on purpose."""


# --- usage and host --------------------------------------------------------------------------


class UsageError(PyvfioError, ValueError):
    """Raised when the caller passed something malformed (a bad PCI address, an
    unknown backend name, an access width the region cannot do)."""


class DeviceNotFound(PyvfioError, LookupError):
    """Raised when a named device does not exist under the host root."""


class NoIommu(PyvfioError):
    """Raised when the host has no IOMMU (no ``/sys/kernel/iommu_groups``) and
    vfio's no-IOMMU mode is not enabled either."""


class HostStateError(PyvfioError):
    """Raised when the host is in a state that prevents an operation; carries the
    diagnosis (a list of problem dicts as ``pyvfio check --json`` prints them)."""

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[dict[str, Any]] = list(problems or [])


class NotViable(HostStateError):
    """Raised when an IOMMU group cannot be used because a member of the group is
    bound to a host driver (seed 004, case 2).  ``problems`` names each member."""


class DeviceInUse(HostStateError):
    """Raised when the group or device node is already held open by a process
    (seed 004, case 1)."""


class NotBoundToVfio(HostStateError):
    """Raised when the device itself is not bound to a vfio driver."""


class HostUsesDevice(HostStateError):
    """Raised when the host itself uses a device that an operation would take:
    a network interface with routes or addresses, a mounted filesystem, swap,
    a device-mapper/md holder, the console (``problems`` has one entry per
    use, with its own kind), or a group that vfio cannot own (a firmware
    ``direct`` reserved region).  ``--force`` (``force=True``) overrides."""


class NotPermitted(HostStateError, PermissionError):
    """Raised before the first write when the caller may not make the writes an
    operation needs (sysfs attributes, the state or configuration directory)."""


class BindError(HostStateError):
    """Raised when binding or restoring a driver failed.  By the time it is
    raised, the original driver has been put back (or the message says it could
    not be)."""


# --- kernel ----------------------------------------------------------------------------------


class KernelError(PyvfioError, OSError):
    """A system call on a VFIO/iommufd object failed.

    ``op`` is the operation (usually the ioctl name), ``target`` the object
    ("group 12", "device 0000:01:00.0", "IOAS 3").  ``errno`` is kept.
    """

    def __init__(self, err: int, op: str, target: str = "", detail: str = "") -> None:
        text = os.strerror(err) if err else "failed"
        where = f"{op} on {target}" if target else op
        msg = f"{where}: [Errno {err}] {text}"
        if detail:
            msg += f" ({detail})"
        OSError.__init__(self, err, msg)
        self.op = op
        self.target = target
        self.detail = detail

    def __str__(self) -> str:
        return str(self.strerror)

    @classmethod
    def from_oserror(cls, exc: OSError, op: str, target: str = "", detail: str = "") -> KernelError:
        return cls(exc.errno or _errno.EIO, op, target, detail)


class DmaError(PyvfioError):
    """Base of DMA-mapping errors."""


class IovaRangeError(DmaError, ValueError):
    """Raised when an IOVA range lies outside the ranges the IOMMU can translate,
    or no free range of the requested size is left."""


class MemlockLimitError(DmaError, KernelError):
    """Raised when pinning memory for DMA hit RLIMIT_MEMLOCK (or the type1
    ``dma_entry_limit``).  The message says which limit and how to raise it."""


class ClosedError(PyvfioError):
    """Raised when an object is used after *we* closed it."""


# --- vfio-user -------------------------------------------------------------------------------


class ProtocolError(PyvfioError):
    """Raised when a vfio-user message is malformed (too short, wrong size, bad
    flags, an fd where none belongs).  A server answers it with an error reply;
    a client drops the connection."""

    def __init__(self, message: str, errno: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno


class FdsTruncated(ProtocolError):
    """A vfio-user message came with more fds than the receiver takes: the
    kernel closed the rest unseen and flagged the read (``MSG_CTRUNC``).  It
    breaks only a message whose fds are needed (a region's mmap fds); on one
    that takes no fds (a register access's reply, a server->client command)
    a client closes what came and goes on, as it does with any fd where none
    belongs."""


class PeerError(PyvfioError, OSError):
    """The vfio-user peer answered a command with an error reply; ``errno`` is
    the peer's."""

    def __init__(self, err: int, command: str) -> None:
        OSError.__init__(self, err, f"{command}: peer replied [Errno {err}] {os.strerror(err)}")
        self.command = command

    def __str__(self) -> str:
        return str(self.strerror)


class ConnectionClosed(PyvfioError, ConnectionError):
    """Raised when the peer closed (or broke) the connection."""


# --- broker ----------------------------------------------------------------------------------


class BrokerRefused(PyvfioError, PermissionError):
    """The broker refused a request; ``reason`` is the broker's explanation and
    ``problems`` the host diagnosis when that was the cause."""

    def __init__(self, reason: str, problems: list[dict[str, Any]] | None = None) -> None:
        PermissionError.__init__(self, reason)
        self.reason = reason
        self.problems: list[dict[str, Any]] = list(problems or [])

    def __str__(self) -> str:
        return self.reason
