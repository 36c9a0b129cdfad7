"""Region calls of a vfio-user client: DEVICE_GET_REGION_INFO (with its
capability chain and the region fd), REGION_READ / REGION_WRITE, mmap of the
region fd, DEVICE_GET_REGION_IO_FDS and REGION_WRITE_MULTI.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable

from pyvfio.device import RegionFlag, RegionInfo, SparseArea, outside_region_error
from pyvfio.errors import UsageError
from pyvfio.user import protocol as P
from pyvfio.user.client._base import ClientBase
from pyvfio.user.client.connection import MAX_REGION_INFO_SIZE, _pack_access
from pyvfio.user.protocol import Command, close_fds


class RegionCalls(ClientBase):
    """Region info and access over messages (or the mmapped region fd)."""

    def _get_region_info(self, index: int) -> RegionInfo:
        argsz = P.RegionInfoMsg.SIZE + 256  # room for a sparse map of a few areas
        for _attempt in range(2):
            reply = self._request(Command.DEVICE_GET_REGION_INFO,
                                  P.RegionInfoMsg(index, argsz=argsz).pack(), keep_fds=True)
            fds = reply.fds
            try:
                msg = self._unpack(P.RegionInfoMsg.unpack, reply.payload, reply=True)
                if msg.index != index:
                    raise self._malformed(f"REGION_INFO for region {index} answered for "
                                          f"region {msg.index}")
                if msg.argsz > argsz and len(reply.payload) < msg.argsz:
                    # The capabilities did not fit: ask again with the size it needs.
                    if msg.argsz > MAX_REGION_INFO_SIZE:
                        raise self._malformed(f"REGION_INFO argsz {msg.argsz} is over "
                                              f"{MAX_REGION_INFO_SIZE}")
                    argsz = msg.argsz
                    close_fds(fds)
                    continue
                if len(reply.payload) > max(argsz, P.RegionInfoMsg.SIZE):
                    raise self._malformed(f"REGION_INFO reply of {len(reply.payload)} bytes, "
                                          f"over the {argsz} asked for")
                info = self._region_info_from(msg, fds)
                fds = []
                return info
            finally:
                close_fds(fds)
        raise self._malformed(f"REGION_INFO for region {index}: argsz kept growing")

    def _region_info_from(self, msg: P.RegionInfoMsg, fds: list[int]) -> RegionInfo:
        """Check the reply against itself and keep the region fd when the
        region may be mmapped.  Consumes ``fds``."""
        flags = RegionFlag(msg.flags & (RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP
                                        | RegionFlag.CAPS))
        size = msg.size
        if size >= 1 << 63:
            raise self._malformed(f"region {msg.index} size {size:#x} is absurd")
        areas: tuple[SparseArea, ...] = ()
        if msg.sparse_areas is not None:
            for off, length in msg.sparse_areas:
                if length == 0 or off + length > size:
                    raise self._malformed(f"region {msg.index}: sparse area {off:#x}+{length:#x} "
                                          f"is outside the region of {size:#x} bytes")
            areas = tuple(SparseArea(o, s) for o, s in msg.sparse_areas)
        elif size:
            areas = (SparseArea(0, size),)
        fd = None
        if len(fds) > 1:
            raise self._malformed(f"region {msg.index} info came with {len(fds)} fds")
        if fds:
            fd = fds.pop()
        if flags & RegionFlag.MMAP and fd is None:
            # MMAP without an fd is nothing we can map: access through messages.
            flags &= ~RegionFlag.MMAP
        if fd is not None and not flags & RegionFlag.MMAP:
            os.close(fd)  # an fd where none belongs
            fd = None
        if fd is not None:
            old = self._region_fds.pop(msg.index, None)
            if old is not None:
                os.close(old)
            self._region_fds[msg.index] = fd
        else:
            areas = ()
        # The codec decodes the sparse-mmap and type capabilities; those are the
        # ids we can report (an MSI-X-mappable capability is not decoded).
        caps = tuple(cap for cap, present in ((P.RegionCapId.SPARSE_MMAP,
                                               msg.sparse_areas is not None),
                                              (P.RegionCapId.TYPE, msg.type is not None))
                     if present)
        return RegionInfo(msg.index, flags, size, msg.offset, areas, msg.type,
                          tuple(int(c) for c in caps))

    def _region_read(self, index: int, offset: int, size: int) -> bytes:
        if size <= self.max_xfer:
            return self._read_chunk(index, offset, size)
        parts = []
        for start in range(0, size, self.max_xfer):
            parts.append(self._read_chunk(index, offset + start,
                                          min(self.max_xfer, size - start)))
        return b"".join(parts)

    def _read_chunk(self, index: int, offset: int, size: int) -> bytes:
        head = _pack_access(offset, index, size)
        payload = self._conn.call(Command.REGION_READ, head)
        if len(payload) != 16 + size or payload[:16] != head:
            raise self._malformed(f"REGION_READ of region {index} {offset:#x}+{size}: reply "
                                  f"does not match (payload {len(payload)} bytes)")
        return payload[16:]

    # A batch is pipelined in slices of this many requests, so that neither
    # socket buffer fills while the other side waits for us to read.
    _PIPELINE = 64

    def _region_read_block(self, index: int, offset: int, count: int, width: int) -> bytes:
        """``count`` REGION_READs of ``width`` bytes, pipelined: one round trip
        per :attr:`_PIPELINE` registers, each read one access of its width."""
        heads = [_pack_access(offset + i * width, index, width) for i in range(count)]
        out: list[bytes] = []
        for start in range(0, count, self._PIPELINE):
            batch = heads[start:start + self._PIPELINE]
            for head, payload in zip(batch, self._conn.call_many(Command.REGION_READ, batch),
                                     strict=True):
                if len(payload) != 16 + width or payload[:16] != head:
                    raise self._malformed(f"REGION_READ of region {index}: a reply does not "
                                          f"match its request (payload {len(payload)} bytes)")
                out.append(payload[16:])
        return b"".join(out)

    def _region_write_block(self, index: int, offset: int, data: bytes, width: int) -> None:
        """Pipelined REGION_WRITEs of ``width`` bytes (see :meth:`_region_read_block`)."""
        requests = [_pack_access(offset + start, index, width) + data[start:start + width]
                    for start in range(0, len(data), width)]
        for start in range(0, len(requests), self._PIPELINE):
            batch = requests[start:start + self._PIPELINE]
            for request, reply in zip(batch, self._conn.call_many(Command.REGION_WRITE, batch),
                                      strict=True):
                if reply != request[:16]:
                    raise self._malformed(f"REGION_WRITE of region {index}: a reply does not "
                                          "match its request")

    def _region_write(self, index: int, offset: int, data: bytes) -> None:
        size = len(data)
        step = self.max_xfer
        for start in range(0, size, step):
            chunk = data[start:start + step] if size > step else data
            head = _pack_access(offset + start, index, len(chunk))
            if self._conn.call(Command.REGION_WRITE, head + chunk) != head:
                raise self._malformed(f"REGION_WRITE of region {index} {offset + start:#x}+"
                                      f"{len(chunk)}: reply does not match")

    def _region_int_accessors(self, info: RegionInfo
                              ) -> dict[int, tuple[Callable[[int], int],
                                                   Callable[[int, int], None]]]:
        """Register accessors of one region, one Python frame per access (the
        request path costs about as much Python as the socket round trip
        itself): reads are :meth:`_Connection.register_reader` closures, writes
        build the message and check the reply around :meth:`_Connection.call`.
        The reply must echo our 16-byte access head exactly."""
        index, size = info.index, info.size
        call = self._conn.call
        malformed = self._malformed

        name = self.name

        def bad(offset: int, width: int) -> UsageError:
            return outside_region_error(name, index, size, offset, width)

        def make(width: int) -> tuple[Callable[[int], int], Callable[[int, int], None]]:
            limit = size - width
            mask = (1 << (8 * width)) - 1
            read_n = self._conn.register_reader(index, width, limit, bad, malformed)

            def write_n(offset: int, value: int) -> None:
                if offset > limit or offset < 0:
                    raise bad(offset, width)
                head = _pack_access(offset, index, width)
                if call(10, head + (value & mask).to_bytes(width, "little")) != head:
                    raise malformed(f"REGION_WRITE of region {index} {offset:#x}+{width}: "
                                    "reply does not match")

            return read_n, write_n

        return {width: make(width) for width in (1, 2, 4, 8)}

    def _region_mmap(self, info: RegionInfo, offset: int, size: int) -> mmap.mmap:
        fd = self._region_fds.get(info.index)
        if fd is None:
            raise UsageError(f"region {info.index} of {self.path} came without an fd to mmap")
        where = info.offset + offset
        if where % mmap.ALLOCATIONGRANULARITY:
            raise UsageError(f"region {info.index}: mmap offset {where:#x} is not page aligned")
        prot = (mmap.PROT_READ if info.flags & RegionFlag.READ else 0) | \
            (mmap.PROT_WRITE if info.flags & RegionFlag.WRITE else 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=where)

    def region_io_fds(self, index: int) -> tuple[list[P.SubRegionIoFd], list[int]]:
        """``VFIO_USER_DEVICE_GET_REGION_IO_FDS``: the sub-regions of region
        ``index`` and the fds they index (the caller owns and closes them)."""
        argsz = P.RegionIoFds.SIZE + 16 * P.RegionIoFds.ENTRY_SIZE
        for _attempt in range(2):
            reply = self._request(Command.DEVICE_GET_REGION_IO_FDS,
                                  P.RegionIoFds(index, argsz=argsz).pack(), keep_fds=True)
            fds = reply.fds
            try:
                msg = self._unpack(P.RegionIoFds.unpack, reply.payload, reply=True)
                if msg.index != index:
                    raise self._malformed(f"REGION_IO_FDS for {index} answered for {msg.index}")
                if msg.count and not msg.sub_regions:
                    if msg.argsz <= argsz or msg.argsz > MAX_REGION_INFO_SIZE:
                        raise self._malformed(f"REGION_IO_FDS: {msg.count} sub-regions without "
                                              f"entries (argsz {msg.argsz})")
                    argsz = msg.argsz
                    close_fds(fds)
                    fds = []
                    continue
                region_size = self.region(index).size
                for sub in msg.sub_regions:
                    if sub.fd_index >= len(fds) or sub.offset + sub.size > region_size:
                        raise self._malformed(f"REGION_IO_FDS: sub-region {sub} is outside the "
                                              f"region or names fd {sub.fd_index} of {len(fds)}")
                out, fds = fds, []
                return list(msg.sub_regions), out
            finally:
                close_fds(fds)
        raise self._malformed("REGION_IO_FDS: argsz kept growing")

    def write_multiple(self, writes: Iterable[tuple[int, int, bytes]]) -> None:
        """Several small register writes ``(region, offset, data)`` (each 1-8
        bytes) in as few ``REGION_WRITE_MULTI`` messages as allowed, in order;
        one REGION_WRITE each when the server did not offer ``write_multiple``."""
        items = [(int(r), int(o), bytes(d)) for r, o, d in writes]
        for r, o, d in items:
            if not 1 <= len(d) <= 8:
                raise UsageError(f"write_multiple: writes are 1-8 bytes, not {len(d)}")
            self.region(r)._check(o, len(d))
        if not self.capabilities.write_multiple:
            for r, o, d in items:
                self._region_write(r, o, d)
            return
        per_msg = max(1, min(P.MAX_WRITE_MULTI, (self.max_xfer - 8) // 24))
        for i in range(0, len(items), per_msg):
            batch = tuple(P.WriteOne(r, o, d) for r, o, d in items[i:i + per_msg])
            reply = self._request(Command.REGION_WRITE_MULTI, P.RegionWriteMulti(batch).pack())
            done = self._unpack(P.RegionWriteMulti.unpack, reply.payload, reply=True).wr_cnt
            if done != len(batch):
                raise self._malformed(f"REGION_WRITE_MULTI: {done} of {len(batch)} writes "
                                      "reported done")
