"""ioctl request encoding, the one ioctl wrapper, and the ``argsz`` loop.

Everything that calls ``ioctl(2)`` on a VFIO or iommufd fd goes through
:func:`ioctl` so that a failure always becomes a
:class:`~pyvfio.errors.KernelError` that keeps ``errno`` and says which
ioctl failed on which object ("VFIO_GROUP_SET_CONTAINER on group 12: [Errno
16] Device or resource busy").

The request encoding is ``asm-generic/ioctl.h`` (x86, arm64, riscv: 8-bit
nr, 8-bit type, 14-bit size, 2-bit direction).  VFIO and iommufd use plain
``_IO(';', nr)`` for all of their ioctls: the size lives in ``argsz`` /
``size`` inside the struct instead of the request number.

``call_with_argsz`` is the "grow and retry" loop every VFIO ``*_GET_INFO``
with a capability chain needs, written once: the kernel fills the fixed
part, sets the CAPS flag and raises ``argsz`` to the size the full chain
needs; the caller retries with a buffer that large.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyvfio.errors import KernelError

__all__ = [
    "IOCTL_NAMES",
    "IOC_NONE",
    "IOC_READ",
    "IOC_WRITE",
    "MAX_INFO_SIZE",
    "_IO",
    "_IOC",
    "_IOR",
    "_IOW",
    "_IOWR",
    "CapHeader",
    "call_with_argsz",
    "ioctl",
    "iter_caps",
    "register_names",
]

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

# A capability chain is a few hundred bytes at most (sparse mmap of a BAR
# with an MSI-X hole: two areas).  A kernel asking for more than this is
# either buggy or hostile; refuse rather than allocate without bound.
MAX_INFO_SIZE = 1 << 20


def _IOC(direction: int, type_: int | str, nr: int, size: int) -> int:
    if isinstance(type_, str):
        type_ = ord(type_)
    if not 0 <= nr < (1 << IOC_NRBITS) or not 0 <= size < (1 << IOC_SIZEBITS):
        raise ValueError(f"ioctl nr {nr} or size {size} out of range")
    return ((direction << IOC_DIRSHIFT) | (type_ << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT)
            | (size << IOC_SIZESHIFT))


def _IO(type_: int | str, nr: int) -> int:
    return _IOC(IOC_NONE, type_, nr, 0)


def _IOR(type_: int | str, nr: int, size: int) -> int:
    return _IOC(IOC_READ, type_, nr, size)


def _IOW(type_: int | str, nr: int, size: int) -> int:
    return _IOC(IOC_WRITE, type_, nr, size)


def _IOWR(type_: int | str, nr: int, size: int) -> int:
    return _IOC(IOC_READ | IOC_WRITE, type_, nr, size)


IOCTL_NAMES: dict[int, str] = {}
"""Request number -> name, filled by the uapi modules, for error messages."""


def register_names(namespace: dict[str, Any], prefixes: tuple[str, ...]) -> None:
    """Record every ``int`` constant of ``namespace`` whose name starts with one
    of ``prefixes`` and whose value has the ioctl type byte ``';'``."""
    for name, value in namespace.items():
        if (isinstance(value, int) and not isinstance(value, bool) and name.startswith(prefixes)
                and (value >> IOC_TYPESHIFT) & 0xFF == ord(";")):
            IOCTL_NAMES.setdefault(value, name)


def ioctl(fd: int, request: int, arg: Any = 0, *, op: str | None = None,
          target: str = "") -> int:
    """Call ``ioctl(fd, request, arg)`` and return its (non-negative) result.

    ``arg`` is an ``int`` (passed by value, e.g. ``VFIO_CHECK_EXTENSION``), a
    ctypes structure or a ``bytearray`` (passed by pointer and updated in
    place with what the kernel wrote back).  Immutable ``bytes`` are refused:
    ``fcntl.ioctl`` would then return a copy instead of the ioctl's result,
    which loses the fd ``VFIO_GROUP_GET_DEVICE_FD`` returns.

    On failure raises :class:`KernelError` naming ``op`` (default: the
    request's name) and ``target`` (e.g. "group 12").
    """
    if isinstance(arg, bytes):
        raise TypeError("pass a bytearray or ctypes object, not bytes, to ioctl()")
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        name = op or IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        raise KernelError(exc.errno or _errno.EIO, name, target) from None


# --- capability chains -----------------------------------------------------------------------


class CapHeader(ctypes.Structure):
    """``struct vfio_info_cap_header`` (vfio.h)::

        struct vfio_info_cap_header {
            __u16 id;       /* Identifies capability */
            __u16 version;  /* Version specific to the capability ID */
            __u32 next;     /* Offset of next capability */
        };
    """

    _fields_ = [("id", ctypes.c_uint16), ("version", ctypes.c_uint16), ("next", ctypes.c_uint32)]


S = TypeVar("S", bound=ctypes.Structure)


def call_with_argsz(fd: int, request: int, struct_type: type[S],
                    fill: Callable[[S], None] | None = None, *, op: str | None = None,
                    target: str = "", caps_flag: int = 0) -> tuple[S, bytearray]:
    """Run a VFIO ``*_GET_INFO`` ioctl whose struct starts with ``argsz``, growing
    the buffer once if the kernel reports a larger ``argsz`` (a capability
    chain that did not fit), and return ``(struct, whole buffer)``.

    ``fill`` sets the input fields (e.g. ``index``); it runs on each attempt.
    ``caps_flag`` is the flags bit that says a chain is present: without it
    the first answer is final.  The returned struct is a view on the buffer,
    so ``cap_offset`` can be followed with :func:`iter_caps`.
    """
    base = ctypes.sizeof(struct_type)
    size = base
    for _attempt in range(3):
        buf = bytearray(size)
        info = struct_type.from_buffer(buf)
        info.argsz = size
        if fill is not None:
            fill(info)
        ioctl(fd, request, buf, op=op, target=target)
        wanted = int(info.argsz)
        if wanted <= size or (caps_flag and not int(info.flags) & caps_flag):
            return info, buf
        if wanted > MAX_INFO_SIZE:
            raise KernelError(_errno.EOVERFLOW, op or IOCTL_NAMES.get(request, hex(request)),
                              target, f"kernel asked for an argsz of {wanted} bytes")
        size = wanted
    raise KernelError(_errno.EAGAIN, op or IOCTL_NAMES.get(request, hex(request)), target,
                      "argsz kept growing")


def iter_caps(buf: bytes | bytearray | memoryview, first: int,
              min_offset: int = 0) -> Iterator[tuple[int, int, int]]:
    """Walk a capability chain in ``buf``: yield ``(id, version, offset)``.

    Offsets are relative to the start of the info buffer.  A chain ends at
    offset 0; offsets inside the fixed part (below ``min_offset``), past the
    buffer, or already visited end the walk instead of looping or reading
    out of bounds.
    """
    seen: set[int] = set()
    offset = first
    hdr = ctypes.sizeof(CapHeader)
    while offset and offset >= min_offset and offset + hdr <= len(buf) and offset not in seen:
        seen.add(offset)
        cap = CapHeader.from_buffer_copy(bytes(buf[offset:offset + hdr]))
        yield int(cap.id), int(cap.version), offset
        offset = int(cap.next)
