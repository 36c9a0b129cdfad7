"""VERSION: the version negotiation and its capabilities JSON, with the
spec's defaults and our limits.

Spec: QEMU ``docs/interop/vfio-user.rst``, "VFIO_USER_VERSION".
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyvfio.user.protocol._codec import _fail, _need, _pack

VERSION_MAJOR = 0
"""Protocol major version spoken (libvfio-user and QEMU use 0)."""
VERSION_MINOR = 2
"""Highest minor version spoken; the reply carries min(client's, ours)."""

DEFAULT_MAX_MSG_FDS = 1
"""What a peer that does not state ``max_msg_fds`` can receive (spec)."""
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
"""Spec default for ``max_data_xfer_size``: 1 MiB."""
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096

MAX_MSG_FDS_LIMIT = 1024
"""We refuse to negotiate more fds per message than this (libvfio-user's
``VFIO_USER_CLIENT_MAX_MSG_FDS_LIMIT`` is 1024 too)."""
MAX_DATA_XFER_LIMIT = 64 << 20
"""We refuse transfers bigger than this whatever the peer says (QEMU's
``VFIO_USER_MAX_MAX_XFER``)."""
MAX_JSON_SIZE = 64 << 10
"""Version JSON larger than this is refused."""


# --- VERSION ---------------------------------------------------------------------------------


def _cap_int(caps: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = caps.get(name, default)
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise _fail(f"VERSION: capability {name!r} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise _fail(f"VERSION: capability {name!r} = {value} is outside [{lo}, {hi}]")
    return value


@dataclass(frozen=True)
class Capabilities:
    """The ``capabilities`` object of the VERSION JSON, with spec defaults.

    ``migration`` is libvfio-user's object (``pgsize``, ``max_bitmap_size``)
    that bounds the dirty bitmap of ``DMA_UNMAP`` with ``GET_DIRTY_BITMAP``;
    ``None`` when absent.  ``twin_socket`` is ``{"supported": bool,
    "fd_index": int}`` or ``None``.  ``extra`` keeps unknown keys so that a
    newer peer's capabilities survive a round trip.
    """

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    write_multiple: bool = False
    migration: dict[str, int] | None = None
    twin_socket: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN: ClassVar[frozenset[str]] = frozenset(
        {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple",
         "migration", "twin_socket"})

    @classmethod
    def from_json(cls, caps: Any) -> Capabilities:
        """Validate a decoded ``capabilities`` object (absent keys take the
        spec defaults)."""
        if not isinstance(caps, dict):
            raise _fail(f"VERSION: 'capabilities' must be an object, not {type(caps).__name__}")
        write_multiple = caps.get("write_multiple", False)
        if not isinstance(write_multiple, bool):
            raise _fail("VERSION: capability 'write_multiple' must be a boolean")
        migration = caps.get("migration")
        if migration is not None:
            if not isinstance(migration, dict):
                raise _fail("VERSION: capability 'migration' must be an object")
            migration = {
                "pgsize": _cap_int(migration, "pgsize", 4096, 1, 1 << 40),
                "max_bitmap_size": _cap_int(migration, "max_bitmap_size", 256 << 20, 0, 1 << 40),
            }
        twin = caps.get("twin_socket")
        if twin is not None:
            if not isinstance(twin, dict):
                raise _fail("VERSION: capability 'twin_socket' must be an object")
            supported = twin.get("supported", False)
            if not isinstance(supported, bool):
                raise _fail("VERSION: 'twin_socket.supported' must be a boolean")
            twin_out: dict[str, Any] = {"supported": supported}
            if "fd_index" in twin:
                twin_out["fd_index"] = _cap_int(twin, "fd_index", 0, 0, MAX_MSG_FDS_LIMIT)
            twin = twin_out
        pgsizes = _cap_int(caps, "pgsizes", DEFAULT_PGSIZES, 1, (1 << 64) - 1)
        return cls(
            max_msg_fds=_cap_int(caps, "max_msg_fds", DEFAULT_MAX_MSG_FDS, 0, MAX_MSG_FDS_LIMIT),
            max_data_xfer_size=_cap_int(caps, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE,
                                        1, (1 << 64) - 1),
            max_dma_maps=_cap_int(caps, "max_dma_maps", DEFAULT_MAX_DMA_MAPS, 0, (1 << 32) - 1),
            pgsizes=pgsizes,
            write_multiple=write_multiple,
            migration=migration,
            twin_socket=twin,
            extra={k: v for k, v in caps.items() if k not in cls._KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(max_msg_fds=self.max_msg_fds, max_data_xfer_size=self.max_data_xfer_size,
                   max_dma_maps=self.max_dma_maps, pgsizes=self.pgsizes)
        if self.write_multiple:
            out["write_multiple"] = True
        if self.migration is not None:
            out["migration"] = dict(self.migration)
        if self.twin_socket is not None:
            out["twin_socket"] = dict(self.twin_socket)
        return out


_VERSION = struct.Struct("=HH")


@dataclass(frozen=True)
class Version:
    """``struct vfio_user_version``: major u16, minor u16, then optional
    NUL-terminated UTF-8 JSON ``{"capabilities": {...}}``.

    ``capabilities`` is ``None`` when the message carried no JSON at all
    (every capability then takes its default)."""

    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    capabilities: Capabilities | None = None

    @property
    def caps(self) -> Capabilities:
        return self.capabilities if self.capabilities is not None else Capabilities()

    def pack(self) -> bytes:
        head = _pack(_VERSION, "VERSION", self.major, self.minor)
        if self.capabilities is None:
            return head
        text = json.dumps({"capabilities": self.capabilities.to_json()}, separators=(",", ":"))
        return head + text.encode() + b"\0"

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Version:
        _need(payload, _VERSION.size, "VERSION")
        major, minor = _VERSION.unpack_from(payload)
        raw = bytes(payload[_VERSION.size:])
        if not raw:
            return cls(major, minor, None)
        if len(raw) > MAX_JSON_SIZE:
            raise _fail(f"VERSION: JSON of {len(raw)} bytes is over {MAX_JSON_SIZE}", errno.E2BIG)
        if raw[-1] != 0:
            raise _fail("VERSION: version data is not NUL-terminated")
        text = raw[:-1]
        if 0 in text:
            raise _fail("VERSION: version data has a NUL inside the JSON")
        try:
            doc = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _fail(f"VERSION: version data is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _fail("VERSION: version data must be a JSON object")
        caps = doc.get("capabilities", {})
        return cls(major, minor, Capabilities.from_json(caps))
