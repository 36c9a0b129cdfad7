"""DMA command group of a connection: DMA_MAP / DMA_UNMAP from the client, and
the server-to-client DMA_READ / DMA_WRITE (over the twin socket when
negotiated, else over the main socket with replies matched by message id).
"""

from __future__ import annotations

import errno
import threading

from pyvfio.errors import ProtocolError
from pyvfio.user import protocol as P
from pyvfio.user.dma import DmaFault
from pyvfio.user.server._base import CLIENT_REPLY_TIMEOUT, ConnectionBase


class DmaHandlers(ConnectionBase):
    """DMA_MAP, DMA_UNMAP and the server's own DMA_READ / DMA_WRITE commands."""

    # ---- DMA ----

    def _dma_map(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.DmaMap.unpack(m.payload)
        if len(m.fds) > 1:
            raise ProtocolError("DMA_MAP takes at most one fd", errno.EINVAL)
        fd = m.fds[0] if m.fds else -1
        self.device.quiesce()
        self.dma.add(req.address, req.size, req.flags, fd, req.offset)
        return b"", []  # the fd is closed by the caller; the mapping keeps the memory

    def _dma_unmap(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.DmaUnmap.unpack(m.payload)
        if req.argsz > self.owner.max_data_xfer_size + 64:
            raise ProtocolError(f"DMA_UNMAP: argsz {req.argsz} too large", errno.EINVAL)
        self.device.quiesce()
        if req.flags & P.DmaUnmapFlag.ALL:
            if req.address or req.size:
                raise ProtocolError("DMA_UNMAP ALL with an address or size", errno.EINVAL)
            self.dma.remove_all()
            return P.DmaUnmap(0, 0, req.flags, req.argsz).pack(), []
        if req.wants_bitmap:
            pgsize = req.bitmap_pgsize
            if not self.dma.log_page_size:
                raise OSError(errno.EINVAL, "DMA_UNMAP: dirty page logging is not on")
            if pgsize == 0 or pgsize & (pgsize - 1):
                raise OSError(errno.EINVAL, f"DMA_UNMAP: bitmap pgsize {pgsize}")
            pages = -(-req.size // pgsize)
            need = -(-pages // 64) * 8
            if req.bitmap_size != need:
                raise OSError(errno.EINVAL, f"DMA_UNMAP: bitmap of {req.bitmap_size} bytes, "
                              f"need {need}")
            # Check the window exists before reading (and clearing) its bits.
            if not any(w.iova == req.address and w.size == req.size for w in self.dma.mappings):
                raise OSError(errno.ENOENT, "DMA_UNMAP: no such window")
            bitmap = self.dma.dirty_bitmap(req.address, req.size, pgsize)
            self.dma.remove(req.address, req.size)
            return P.DmaUnmap(req.address, req.size, req.flags, req.argsz, pgsize, need,
                              bitmap).pack(), []
        self.dma.remove(req.address, req.size)
        return P.DmaUnmap(req.address, req.size, req.flags, req.argsz).pack(), []

    # ---- replies to our own commands ----

    def _route_reply(self, m: P.Message) -> None:
        with self._cond:
            if m.msg_id in self._replies and self._replies[m.msg_id] is None:
                self._replies[m.msg_id] = m
                self._cond.notify_all()
                return
        m.close_fds()  # a reply nobody waits for

    def _call(self, command: int, payload: bytes) -> P.Message:
        """Send a command to the client and return its reply (any thread)."""
        if self._closed:
            raise DmaFault(errno.ENOTCONN, "client is gone")
        if self._twin is not None:
            return self._call_twin(command, payload)
        with self._cond:
            self._next_id = (self._next_id + 1) & 0xFFFF
            msg_id = self._next_id
            self._replies[msg_id] = None
        try:
            self._send(P.pack_message(msg_id, command, payload))
            if threading.current_thread() is self.thread:
                # We are the reader: pump the socket, keeping commands for later.
                while self._replies.get(msg_id) is None:
                    self.sock.settimeout(CLIENT_REPLY_TIMEOUT)
                    try:
                        batch = self.reader.read_some()
                    finally:
                        self.sock.settimeout(None)
                    if self.reader.eof:
                        raise DmaFault(errno.ENOTCONN, "client closed the connection")
                    for r in batch:
                        if r.flags & 0xF:
                            self._route_reply(r)
                        else:
                            self._backlog.append(r)
            else:
                with self._cond:
                    while self._replies.get(msg_id) is None and not self._closed:
                        if not self._cond.wait(CLIENT_REPLY_TIMEOUT):
                            raise DmaFault(errno.ETIMEDOUT, "client did not answer a DMA "
                                           "request in time")
            reply = self._replies.get(msg_id)
            if reply is None:
                raise DmaFault(errno.ENOTCONN, "client went away during DMA")
            return reply
        except (TimeoutError, OSError) as exc:
            if isinstance(exc, DmaFault):
                raise
            raise DmaFault(exc.errno or errno.EIO, f"DMA message to the client failed: {exc}"
                           ) from None
        finally:
            with self._cond:
                self._replies.pop(msg_id, None)

    def _call_twin(self, command: int, payload: bytes) -> P.Message:
        assert self._twin is not None and self._twin_reader is not None
        with self._twin_lock:
            self._next_id = (self._next_id + 1) & 0xFFFF
            msg_id = self._next_id
            try:
                P.send_message(self._twin, P.pack_message(msg_id, command, payload))
                while True:
                    reply = self._twin_reader.read()
                    if reply is None:
                        raise DmaFault(errno.ENOTCONN, "client closed the twin socket")
                    if reply.msg_id == msg_id and reply.flags & 0xF:
                        return reply
                    reply.close_fds()
            except OSError as exc:
                if isinstance(exc, DmaFault):
                    raise
                raise DmaFault(exc.errno or errno.EIO, f"DMA message failed: {exc}") from None

    def _dma_read_msg(self, iova: int, size: int) -> bytes:
        out = bytearray()
        step = max(1, self.client_caps.max_data_xfer_size)
        while len(out) < size:
            n = min(step, size - len(out))
            r = self._call(P.Command.DMA_READ, P.DmaAccess(iova + len(out), n).pack())
            r.close_fds()
            if r.is_error:
                raise DmaFault(r.error or errno.EIO, f"client failed DMA_READ of {iova:#x}")
            try:
                body = P.DmaAccess.unpack(r.payload, with_data=True, max_count=n)
            except ProtocolError as exc:
                raise DmaFault(errno.EIO, f"bad DMA_READ reply: {exc}") from None
            if body.count != n:
                raise DmaFault(errno.EIO, "DMA_READ reply with the wrong count")
            out += body.data
        return bytes(out)

    def _dma_write_msg(self, iova: int, data: bytes) -> None:
        step = max(1, self.client_caps.max_data_xfer_size)
        for pos in range(0, len(data), step):
            chunk = data[pos:pos + step]
            r = self._call(P.Command.DMA_WRITE, P.DmaAccess(iova + pos, len(chunk), chunk).pack())
            r.close_fds()
            if r.is_error:
                raise DmaFault(r.error or errno.EIO, f"client failed DMA_WRITE of {iova:#x}")
