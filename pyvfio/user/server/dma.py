"""DMA command group of a connection: DMA_MAP / DMA_UNMAP from the client, and
the server-to-client DMA_READ / DMA_WRITE (over the twin socket when
negotiated, else over the main socket with replies matched by message id).
"""

from __future__ import annotations

import errno
import threading
import time

from pyvfio.errors import ProtocolError
from pyvfio.user import protocol as P
from pyvfio.user.dma import DmaFault
from pyvfio.user.server._base import MAX_BACKLOG, ConnectionBase, log


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
            if P.DmaUnmap.SIZE + need > self._client_max_xfer:
                raise OSError(errno.E2BIG, f"DMA_UNMAP: a {need}-byte bitmap exceeds the "
                              "client's max_data_xfer_size")
            bitmap = self.dma.dirty_bitmap(req.address, req.size, pgsize)
            self.dma.remove(req.address, req.size)
            return P.DmaUnmap(req.address, req.size, req.flags, req.argsz, pgsize, need,
                              bitmap).pack(), []
        if not self.dma.overlaps(req.address, req.size):
            # Never mapped: the kernel's type1 unmaps nothing and succeeds.
            # QEMU's vfio-user container (hw/vfio-user/container.c,
            # vfio_user_dma_unmap) returns the reply's errno to the shared
            # vfio listener, which is written for type1 and reports every
            # failure; it unmaps ranges it never mapped on each vIOMMU domain
            # switch, so iommufd's ENOENT would only flood its log.  A range
            # that cuts a window is still refused below (libvfio-user: exact
            # match).
            return P.DmaUnmap(req.address, req.size, req.flags, req.argsz).pack(), []
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
        """Send a command to the client and return its reply (any thread).

        Over the twin socket (and over the main socket from any thread but
        the connection's own), the wait is a condition wait on the device
        lock: the lock is released while the client takes its time, so the
        connection keeps answering REGION_READ and the rest meanwhile.  Every
        wait ends after the server's ``reply_timeout`` (``ETIMEDOUT``)."""
        if self._closed:
            raise DmaFault(errno.ENOTCONN, "client is gone")
        twin = self._twin
        with self._cond:
            self._next_id = (self._next_id + 1) & 0xFFFF
            msg_id = self._next_id
            self._replies[msg_id] = None
        try:
            data = P.pack_message(msg_id, command, payload)
            if twin is not None:
                with self._twin_lock:
                    P.send_message(twin, data)
                self._wait_reply(msg_id, twin=True)
            elif threading.current_thread() is self.thread:
                self._send(data)
                # We are the reader: pump the socket, keeping commands for later.
                while self._replies.get(msg_id) is None:
                    self.sock.settimeout(self._reply_timeout)
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
                    if len(self._backlog) > MAX_BACKLOG:
                        # Kept commands cost memory: stop reading, fail this
                        # DMA, answer them afterwards.
                        raise DmaFault(errno.ENOBUFS, f"client sent {len(self._backlog)} "
                                       "commands while a DMA request was pending")
            else:
                self._send(data)
                self._wait_reply(msg_id, twin=False)
            reply = self._replies.get(msg_id)
            if reply is None:
                raise DmaFault(errno.ENOTCONN, "client went away during DMA")
            return reply
        except (TimeoutError, OSError) as exc:
            if isinstance(exc, DmaFault):
                raise
            raise DmaFault(exc.errno or errno.ETIMEDOUT, f"DMA message to the client failed: "
                           f"{exc}") from None
        finally:
            with self._cond:
                self._replies.pop(msg_id, None)

    def _wait_reply(self, msg_id: int, *, twin: bool) -> None:
        deadline = time.monotonic() + self._reply_timeout
        with self._cond:
            while self._replies.get(msg_id) is None and not self._closed \
                    and not (twin and self._twin_eof):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DmaFault(errno.ETIMEDOUT, f"client did not answer a DMA request "
                                   f"within {self._reply_timeout:g}s")
                self._cond.wait(left)

    def _twin_loop(self) -> None:
        """Read the client's replies on the twin socket and hand them to the
        waiting callers (their own thread, never holding the device lock)."""
        reader = self._twin_reader
        assert reader is not None
        try:
            while True:
                m = reader.read()
                if m is None:
                    break
                if m.flags & 0xF:
                    self._route_reply(m)
                else:  # the client sends commands on the main socket only
                    m.close_fds()
                    log.warning("%s: command %d on the twin socket ignored", self.owner.path,
                                m.command)
        except (OSError, ProtocolError):
            pass
        finally:
            with self._cond:
                self._twin_eof = True
                self._cond.notify_all()

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
