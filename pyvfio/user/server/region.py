"""Region command group of a connection: DEVICE_GET_REGION_INFO,
DEVICE_GET_REGION_IO_FDS and the REGION_READ / REGION_WRITE /
REGION_WRITE_MULTI request path (kept lean: a precompiled per-region table).
"""

from __future__ import annotations

import errno
from typing import Any

from pyvfio.device import RegionFlag, RegionIndex
from pyvfio.devices.model import RegionSpec
from pyvfio.errors import ProtocolError
from pyvfio.user import protocol as P
from pyvfio.user.server._base import (
    _REGION_ACCESS,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    ConnectionBase,
    log,
)


class RegionHandlers(ConnectionBase):
    """Region info, ioeventfds and region access."""

    def _region_spec(self, index: int) -> RegionSpec | None:
        if index >= len(self._regions):
            raise ProtocolError(f"no region {index}", errno.EINVAL)
        return self._regions[index]

    def _get_region_info(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.RegionInfoMsg.unpack(m.payload)
        if req.argsz > self.owner.max_data_xfer_size:
            raise ProtocolError(f"REGION_INFO: argsz {req.argsz} too large", errno.EINVAL)
        index = req.index
        spec = self._region_spec(index)
        if index == RegionIndex.CONFIG:
            info = P.RegionInfoMsg(index, flags=RegionFlag.READ | RegionFlag.WRITE,
                                   size=self.device.config.size)
            return info.pack(max_size=req.argsz), []
        if spec is None:
            return P.RegionInfoMsg(index).pack(), []
        fds: list[int] = []
        info = P.RegionInfoMsg(index, flags=spec.flags, size=spec.size, offset=0,
                               sparse_areas=spec.mmap_areas, type=spec.type)
        if spec.memory is not None and self.client_caps.max_msg_fds < 1:
            # The client takes no fds: offer the region through messages only.
            info = P.RegionInfoMsg(index, flags=spec.flags & ~RegionFlag.MMAP, size=spec.size,
                                   type=spec.type)
        elif spec.memory is not None:
            info = P.RegionInfoMsg(index, flags=spec.flags, size=spec.size,
                                   offset=spec.memory.fd_offset, sparse_areas=spec.mmap_areas,
                                   type=spec.type)
            if req.argsz >= info.full_size():
                fds = [spec.memory.fd]
        return info.pack(max_size=req.argsz), fds

    def _get_region_io_fds(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.RegionIoFds.unpack(m.payload)
        spec = self._region_spec(req.index)
        if req.index != RegionIndex.CONFIG and (spec is None or not spec.flags
                                                & (RegionFlag.READ | RegionFlag.WRITE)):
            raise ProtocolError(f"region {req.index} is empty", errno.EINVAL)
        if req.argsz > self.owner.max_data_xfer_size:
            raise ProtocolError("REGION_IO_FDS: argsz too large", errno.EINVAL)
        subs = self.owner.io_fds.get(req.index, [])
        fds: list[int] = []
        entries: list[P.SubRegionIoFd] = []
        for sub, fd in subs:
            if fd not in fds:
                fds.append(fd)
            entries.append(P.SubRegionIoFd(
                sub.offset, sub.size, fds.index(fd), P.IoFdType.IOEVENTFD,
                KVM_IOEVENTFD_FLAG_DATAMATCH if sub.datamatch is not None else 0,
                sub.datamatch or 0))
        reply = P.RegionIoFds(req.index, P.RegionIoFds.SIZE, 0, len(entries), tuple(entries))
        if not entries or req.argsz < P.RegionIoFds.SIZE + P.RegionIoFds.ENTRY_SIZE * len(entries):
            return reply.pack(max_size=req.argsz), []  # the count and argsz needed only
        if len(fds) > self.client_caps.max_msg_fds:
            raise OSError(errno.E2BIG, f"{len(fds)} ioeventfds, the client takes "
                          f"{self.client_caps.max_msg_fds} fds")
        return reply.pack(), fds

    # ---- region access ----

    def _build_access_table(self) -> list[tuple[int, bool, bool, Any, memoryview | None] | None]:
        """Per region: (size, readable, writable, callback, memory view), plain
        values so the request path does no enum arithmetic."""
        table: list[tuple[int, bool, bool, Any, memoryview | None] | None] = []
        for index, spec in enumerate(self._regions):
            if index == RegionIndex.CONFIG:
                table.append((self.device.config.size, True, True, self.device.config_access,
                              None))
            elif spec is None or spec.size == 0:
                table.append(None)
            else:
                view = spec.memory.view if spec.memory is not None else None
                table.append((spec.size, bool(spec.flags & RegionFlag.READ),
                              bool(spec.flags & RegionFlag.WRITE), spec.access, view))
        return table

    def _access(self, payload: bytes, is_write: bool) -> bytes:
        """REGION_READ/WRITE body -> reply payload (called with the device lock).

        Raises :class:`ProtocolError` for a malformed body (spec "REGION_READ",
        "REGION_WRITE": the 16-byte ``offset``/``region``/``count`` header, then
        ``count`` bytes of data in a write request and in a read reply)."""
        n = len(payload)
        if n < 16:
            raise ProtocolError("region access shorter than its header", errno.EINVAL)
        offset, index, count = _REGION_ACCESS.unpack_from(payload)
        if is_write:
            if n != 16 + count:
                raise ProtocolError("REGION_WRITE count does not match the data", errno.EINVAL)
            self._write_region(offset, index, count, payload[16:])
            return payload[:16]
        if n != 16:
            raise ProtocolError("REGION_READ carries data", errno.EINVAL)
        return payload + self._read_region(offset, index, count)

    def _read_region(self, offset: int, index: int, count: int) -> bytes:
        """The ``count`` bytes a REGION_READ of region ``index`` at ``offset``
        answers with, from the region's callback or memory (called with the
        device lock).  Raises :class:`ProtocolError` (E2BIG, EINVAL) for a
        refused access and ``OSError(EIO)`` for a callback that broke its
        contract; a callback's own exception propagates."""
        # A read's reply carries `count` bytes: the client's own
        # max_data_xfer_size (VERSION) bounds it as well as ours (_max_read is
        # the smaller of the two).
        if count > self._max_read:
            raise ProtocolError(f"count {count} over max_data_xfer_size", errno.E2BIG)
        table = self._access_table
        entry = table[index] if index < len(table) else None
        if entry is None or offset + count > entry[0]:
            raise ProtocolError(f"access {offset:#x}+{count} outside region {index}",
                                errno.EINVAL)
        _size, readable, _writable, callback, view = entry
        if not readable:
            raise ProtocolError(f"region {index} is write-only", errno.EINVAL)
        if not count:
            return b""
        if callback is not None:
            data = callback(offset, count, False)
            if data.__class__ is not bytes:
                if not isinstance(data, (bytes, bytearray)):
                    raise self._model_bug(index, offset, count, f"returned {type(data).__name__}")
                data = bytes(data)
            if len(data) != count:
                raise self._model_bug(index, offset, count, f"returned {len(data)} bytes")
            return data
        return bytes(view[offset:offset + count])  # type: ignore[index]

    def _write_region(self, offset: int, index: int, count: int, data: bytes) -> None:
        """A REGION_WRITE of ``data`` (``count`` bytes) to region ``index`` at
        ``offset``, through the region's callback or into its memory (called
        with the device lock).  Raises :class:`ProtocolError` (E2BIG, EINVAL)
        for a refused access; a callback's own exception propagates."""
        # The same checks as _read_region, written out rather than shared: a
        # helper would add a Python call to every access on the hot path.
        if count > self._max_xfer:
            raise ProtocolError(f"count {count} over max_data_xfer_size", errno.E2BIG)
        table = self._access_table
        entry = table[index] if index < len(table) else None
        if entry is None or offset + count > entry[0]:
            raise ProtocolError(f"access {offset:#x}+{count} outside region {index}",
                                errno.EINVAL)
        _size, _readable, writable, callback, view = entry
        if not writable:
            raise ProtocolError(f"region {index} is read-only", errno.EINVAL)
        if count:
            if callback is not None:
                callback(offset, data, True)
            else:
                view[offset:offset + count] = data  # type: ignore[index]

    def _model_bug(self, index: int, offset: int, count: int, what: str) -> OSError:
        """A read callback that broke its contract: logged here, with where,
        for the model's author (the client only sees EIO)."""
        message = (f"{self.owner.path}: region {index} read callback at offset {offset:#x} "
                   f"{what} for a {count}-byte read; the client gets EIO")
        log.error("%s", message)
        return OSError(errno.EIO, message)

    def _region_read(self, m: P.Message) -> tuple[bytes, list[int]]:
        return self._access(m.payload, False), []

    def _region_write(self, m: P.Message) -> tuple[bytes, list[int]]:
        self._access(m.payload, True)
        return m.payload[:16], []

    def _write_multi(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.RegionWriteMulti.unpack(m.payload)
        for w in req.writes:
            self._access(_REGION_ACCESS.pack(w.offset, w.region, len(w.data)) + w.data, True)
        return P.RegionWriteMulti((), len(req.writes)).pack(), []
