"""The vfio-user server: serves device models over UNIX sockets.

One :class:`Server` serves any number of devices, each on its own socket
path (:meth:`Server.add`).  Each device takes one client at a time; a
further client waits (connected, unanswered) until the current one leaves,
as with libvfio-user, and beyond :data:`MAX_WAITING_CLIENTS` is turned away.  Every
client connection runs in its own thread with its own :class:`Connection`:
its own DMA table (:mod:`pyvfio.user.dma`) and interrupt state
(:mod:`pyvfio.user.irq`), so clients of different devices are isolated from
each other.  When a client goes, its DMA windows are unmapped and its
eventfds closed; the device keeps its state and the next client can connect.

The request path is kept lean for REGION_READ/WRITE: precompiled structs, a
dispatch table, one ``recvmsg`` that usually holds whole messages, one
``send`` per reply, and no logging unless something fails.

Server-to-client commands (DMA_READ/DMA_WRITE for windows mapped without an
fd) go over the twin socket when the client negotiated one, else over the
main socket with replies demultiplexed by message id.

Migration follows the v2 state machine of the spec (``DEVICE_FEATURE``
MIG_DEVICE_STATE, MIG_DATA_READ/WRITE); the model provides
``save_state``/``load_state`` and the framework adds config space.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import selectors
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pyvfio.device import DeviceFlag, RegionFlag, RegionIndex
from pyvfio.devices.model import IoEventFd, PciDeviceModel, RegionSpec
from pyvfio.errors import ConnectionClosed, ProtocolError, UsageError
from pyvfio.migration import MigFlag, MigrationError, MigState, arc_path
from pyvfio.user import protocol as P
from pyvfio.user.dma import DmaFault, DmaTable
from pyvfio.user.irq import IrqState, irq_flags

__all__ = ["Connection", "DeviceServer", "MigrationFsm", "Server"]

log = logging.getLogger("pyvfio.user.server")

_HEADER = P.HEADER
_REGION_ACCESS = P.REGION_ACCESS
_REPLY = int(P.MsgFlag.REPLY)
_REPLY_ERROR = int(P.MsgFlag.REPLY | P.MsgFlag.ERROR)
_NO_REPLY = int(P.MsgFlag.NO_REPLY)
_CMD_REGION_READ = int(P.Command.REGION_READ)
_CMD_REGION_WRITE = int(P.Command.REGION_WRITE)

SERVER_MAX_MSG_FDS = 16
SERVER_MAX_DATA_XFER_SIZE = P.DEFAULT_MAX_DATA_XFER_SIZE
SERVER_MAX_DMA_MAPS = 4096
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
LISTEN_BACKLOG = 64
MAX_WAITING_CLIENTS = 4  # clients queued behind the connected one
CLIENT_REPLY_TIMEOUT = 10.0  # seconds a model waits for a DMA_READ/WRITE reply
_FD_COMMANDS = frozenset({P.Command.DMA_MAP, P.Command.DEVICE_SET_IRQS})


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


# --- a client connection ---------------------------------------------------------------------


class Connection:
    """One client of one device.  Runs in its own thread (:meth:`run`)."""

    def __init__(self, owner: DeviceServer, sock: socket.socket) -> None:
        self.owner = owner
        self.device = owner.device
        self.sock = sock
        self.reader = P.MessageReader(sock, max_msg_size=owner.max_data_xfer_size + 4096,
                                      max_fds=owner.max_msg_fds)
        self.dma = DmaTable(max_maps=owner.max_dma_maps, port=(self._dma_read_msg,
                                                               self._dma_write_msg))
        self.irqs = IrqState(self.device.irq_counts, lambda: self.device.intx_level)
        self.client_caps = P.Capabilities()
        self.negotiated = False
        self.thread: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._cond = threading.Condition(self.device.lock)
        self._replies: dict[int, P.Message | None] = {}
        self._backlog: collections.deque[P.Message] = collections.deque()
        self._next_id = 0x8000
        self._twin: socket.socket | None = None
        self._twin_reader: P.MessageReader | None = None
        self._twin_lock = threading.Lock()
        self._closed = False
        self._close_after_reply: list[int] = []  # our copies of fds sent in a reply
        regions = self.device.regions
        self._regions: list[RegionSpec | None] = [regions.get(i) for i in
                                                  range(self.device.num_regions)]
        self._access_table = self._build_access_table()
        self._max_xfer = owner.max_data_xfer_size
        self._handlers: dict[int, Callable[[P.Message], tuple[bytes, list[int]]]] = {
            P.Command.VERSION: self._version,
            P.Command.DMA_MAP: self._dma_map,
            P.Command.DMA_UNMAP: self._dma_unmap,
            P.Command.DEVICE_GET_INFO: self._get_info,
            P.Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            P.Command.DEVICE_GET_REGION_IO_FDS: self._get_region_io_fds,
            P.Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            P.Command.DEVICE_SET_IRQS: self._set_irqs,
            P.Command.REGION_READ: self._region_read,
            P.Command.REGION_WRITE: self._region_write,
            P.Command.DEVICE_RESET: self._reset,
            P.Command.REGION_WRITE_MULTI: self._write_multi,
            P.Command.DEVICE_FEATURE: self._feature,
            P.Command.MIG_DATA_READ: self._mig_read,
            P.Command.MIG_DATA_WRITE: self._mig_write,
        }

    # ---- the loop ----

    def run(self) -> None:
        self.thread = threading.current_thread()
        try:
            self._loop()
        except (ConnectionClosed, ConnectionError, BrokenPipeError):
            pass
        except ProtocolError as exc:  # a framing error: the stream is lost
            log.warning("%s: dropping client: %s", self.owner.path, exc)
        except OSError as exc:
            if not self._closed:
                log.warning("%s: dropping client: %s", self.owner.path, exc)
        except Exception:  # a bug must not take the server down
            log.exception("%s: connection failed", self.owner.path)
        finally:
            self._teardown()

    def _loop(self) -> None:
        reader = self.reader
        handlers = self._handlers
        lock = self.device.lock
        sock = self.sock
        backlog = self._backlog
        while True:
            if backlog:
                msgs = list(backlog)
                backlog.clear()
            else:
                msgs = reader.read_some()
                if not msgs:
                    if reader.eof:
                        return
                    continue
            try:
                for m in msgs:
                    flags = m.flags
                    if flags & 0xF:
                        self._route_reply(m)
                        continue
                    cmd = m.command
                    # The hot path: a clean REGION_READ/WRITE.
                    if cmd in (_CMD_REGION_READ, _CMD_REGION_WRITE) and not m.fds \
                            and m.problem is None and self.negotiated:
                        try:
                            with lock:
                                reply = self._access(m.payload, cmd == _CMD_REGION_WRITE)
                            if not flags & _NO_REPLY:
                                with self._send_lock:
                                    sock.sendall(_HEADER.pack(m.msg_id, cmd, 16 + len(reply),
                                                              _REPLY, 0) + reply)
                            continue
                        except ProtocolError as exc:
                            err = exc.errno
                        except OSError as exc:
                            err = exc.errno or errno.EIO
                        except Exception:
                            log.exception("%s: region access callback failed", self.owner.path)
                            err = errno.EIO
                        if not flags & _NO_REPLY:
                            self._send_error(m, err)
                        continue
                    payload: bytes = b""
                    out_fds: list[int] = []
                    err = 0
                    try:
                        if m.problem is not None:
                            raise m.problem
                        handler = handlers.get(cmd)
                        if handler is None:
                            raise ProtocolError(f"unknown command {cmd}", errno.EINVAL)
                        if not self.negotiated and cmd != P.Command.VERSION:
                            raise ProtocolError("the first command must be VERSION", errno.EINVAL)
                        if m.fds and cmd not in _FD_COMMANDS:
                            raise ProtocolError(f"command {cmd} takes no fds", errno.EINVAL)
                        with lock:
                            payload, out_fds = handler(m)
                    except ProtocolError as exc:
                        err = exc.errno
                    except OSError as exc:
                        err = exc.errno or errno.EIO
                    except Exception:
                        log.exception("%s: command %d failed", self.owner.path, cmd)
                        err = errno.EIO
                    finally:
                        m.close_fds()
                    try:
                        if not flags & _NO_REPLY:
                            if err:
                                self._send_error(m, err)
                            else:
                                self._send(P.pack_message(m.msg_id, cmd, payload, _REPLY), out_fds)
                    finally:
                        if self._close_after_reply:
                            P.close_fds(self._close_after_reply)
                            self._close_after_reply = []
                    if not self.negotiated:
                        # VERSION failed (or something came first): the spec has
                        # the server close the connection.
                        return
            finally:
                # Messages left unprocessed (the client vanished while we
                # answered an earlier one) must not leak their fds.
                for m in msgs:
                    if m.fds:
                        m.close_fds()

    def _send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        with self._send_lock:
            P.send_message(self.sock, data, fds)

    def _send_error(self, m: P.Message, err: int) -> None:
        with self._send_lock:
            self.sock.sendall(_HEADER.pack(m.msg_id, m.command, 16, _REPLY_ERROR, err))

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

    # ---- teardown ----

    def close(self) -> None:
        """Ask the connection to end (from another thread)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _teardown(self) -> None:
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        with self.device.lock:
            try:
                self.device.quiesce()
            except Exception:
                log.exception("%s: quiesce on disconnect failed", self.owner.path)
            self.device._detach()
            self.dma.remove_all()
            self.irqs.close()
            try:
                self.device.on_disconnect()
            except Exception:
                log.exception("%s: on_disconnect failed", self.owner.path)
        for m in self._backlog:
            m.close_fds()
        self._backlog.clear()
        self.reader.close()
        if self._twin is not None:
            self._twin.close()
        self.sock.close()
        self.owner._connection_ended(self)

    # ---- VERSION ----

    def _version(self, m: P.Message) -> tuple[bytes, list[int]]:
        if self.negotiated:
            raise ProtocolError("VERSION was already negotiated", errno.EINVAL)
        v = P.Version.unpack(m.payload)
        if v.major != P.VERSION_MAJOR:
            raise ProtocolError(f"unsupported major version {v.major}", errno.ENOTSUP)
        caps = v.caps
        self.client_caps = caps
        proposed = v.capabilities.to_json() if v.capabilities else {}
        mine: dict[str, Any] = {
            "max_msg_fds": self.owner.max_msg_fds,
            "max_data_xfer_size": self.owner.max_data_xfer_size,
            "max_dma_maps": self.owner.max_dma_maps,
            "pgsizes": P.DEFAULT_PGSIZES,
        }
        if "write_multiple" in proposed:
            mine["write_multiple"] = True
        if caps.migration is not None and self.device.supports_migration():
            mine["migration"] = {"pgsize": caps.migration["pgsize"],
                                 "max_bitmap_size": min(caps.migration["max_bitmap_size"],
                                                        self.owner.max_data_xfer_size)}
        out_fds: list[int] = []
        if caps.twin_socket and caps.twin_socket.get("supported") and caps.max_msg_fds >= 1:
            mine_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._twin = mine_end
            self._twin_reader = P.MessageReader(mine_end, max_fds=0)
            out_fds.append(client_end.detach())
            self._close_after_reply = list(out_fds)
            mine["twin_socket"] = {"supported": True, "fd_index": 0}
        reply = P.Version(P.VERSION_MAJOR, min(v.minor, P.VERSION_MINOR),
                          P.Capabilities.from_json(mine))
        self.negotiated = True
        self.device._attach(self)
        try:
            self.device.on_connect()
        except Exception:
            log.exception("%s: on_connect failed", self.owner.path)
        return reply.pack(), out_fds

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

    # ---- device info ----

    def _get_info(self, m: P.Message) -> tuple[bytes, list[int]]:
        P.DeviceInfoMsg.unpack(m.payload)
        flags = DeviceFlag.PCI | DeviceFlag.RESET
        return P.DeviceInfoMsg(P.DeviceInfoMsg.SIZE, flags, self.device.num_regions,
                               len(self.device.irq_counts)).pack(), []

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

    def _get_irq_info(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.IrqInfoMsg.unpack(m.payload)
        if req.index >= len(self.device.irq_counts):
            raise ProtocolError(f"no IRQ index {req.index}", errno.EINVAL)
        count = self.device.irq_counts[req.index]
        return P.IrqInfoMsg(req.index, P.IrqInfoMsg.SIZE, irq_flags(req.index) if count else 0,
                            count).pack(), []

    def _set_irqs(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.IrqSet.unpack(m.payload)
        fds = m.fds
        self.irqs.set_irqs(req.index, req.flags, req.start, req.count, req.bools, fds)
        m.fds = []  # taken over by the IRQ state
        return b"", []

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
        """REGION_READ/WRITE body -> reply payload (called with the device lock)."""
        n = len(payload)
        if n < 16:
            raise ProtocolError("region access shorter than its header", errno.EINVAL)
        offset, index, count = _REGION_ACCESS.unpack_from(payload)
        if is_write:
            if n != 16 + count:
                raise ProtocolError("REGION_WRITE count does not match the data", errno.EINVAL)
        elif n != 16:
            raise ProtocolError("REGION_READ carries data", errno.EINVAL)
        if count > self._max_xfer:
            raise ProtocolError(f"count {count} over max_data_xfer_size", errno.E2BIG)
        table = self._access_table
        entry = table[index] if index < len(table) else None
        if entry is None or offset + count > entry[0]:
            raise ProtocolError(f"access {offset:#x}+{count} outside region {index}",
                                errno.EINVAL)
        _size, readable, writable, callback, view = entry
        if is_write:
            if not writable:
                raise ProtocolError(f"region {index} is read-only", errno.EINVAL)
            if count:
                if callback is not None:
                    callback(offset, payload[16:], True)
                else:
                    view[offset:offset + count] = payload[16:]
            return payload[:16]
        if not readable:
            raise ProtocolError(f"region {index} is write-only", errno.EINVAL)
        if not count:
            return payload
        if callback is not None:
            data = callback(offset, count, False)
            if data.__class__ is not bytes:
                if not isinstance(data, (bytes, bytearray)):
                    raise OSError(errno.EIO, f"region {index} read callback returned "
                                  f"{type(data).__name__}")
                data = bytes(data)
            if len(data) != count:
                raise OSError(errno.EIO, f"region {index} read callback returned "
                              f"{len(data)} bytes for a {count}-byte read")
            return payload + data
        return payload + bytes(view[offset:offset + count])

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

    # ---- reset ----

    def _reset(self, m: P.Message) -> tuple[bytes, list[int]]:
        if m.payload:
            raise ProtocolError("DEVICE_RESET has no payload", errno.EINVAL)
        self.device.quiesce()
        self.device.reset()
        self.irqs.reset()
        self.owner.migration.reset()
        return b"", []

    # ---- features and migration ----

    def _feature(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.DeviceFeature.unpack(m.payload)
        index = req.feature
        mig = self.owner.migration
        migratable = self.device.supports_migration()
        supported = {
            P.FeatureIndex.MIGRATION: (migratable, False),
            P.FeatureIndex.MIG_DEVICE_STATE: (migratable, migratable),
            P.FeatureIndex.DMA_LOGGING_START: (False, True),
            P.FeatureIndex.DMA_LOGGING_STOP: (False, True),
            P.FeatureIndex.DMA_LOGGING_REPORT: (True, False),
        }
        if index not in supported:
            raise ProtocolError(f"unknown device feature {index}", errno.ENOTSUP)
        can_get, can_set = supported[P.FeatureIndex(index)]
        if req.probe:
            if (req.get and not can_get) or (req.set and not can_set) or \
                    not (can_get or can_set):
                raise ProtocolError(f"feature {index} does not support that", errno.ENOTSUP)
            return P.DeviceFeature(req.flags, b"", P.DeviceFeature.SIZE).pack(), []
        if req.get == req.set:
            raise ProtocolError("DEVICE_FEATURE needs exactly one of GET and SET", errno.EINVAL)
        if (req.get and not can_get) or (req.set and not can_set):
            raise ProtocolError(f"feature {index} cannot be {'read' if req.get else 'set'}",
                                errno.ENOTSUP)
        out = b""
        if index == P.FeatureIndex.MIGRATION:
            flags = P.MigrationFlag.STOP_COPY | (P.MigrationFlag.PRE_COPY if mig.pre_copy else 0)
            out = P.MigrationFeature(flags).pack()
        elif index == P.FeatureIndex.MIG_DEVICE_STATE:
            if req.set:
                st = P.MigStateMsg.unpack(req.data)
                name = _STATE_NAMES.get(st.device_state)  # type: ignore[call-overload]
                if name is None or name == "ERROR":
                    raise ProtocolError(f"bad migration state {st.device_state}", errno.EINVAL)
                mig.transition(name)
            out = P.MigStateMsg(_STATE_VALUES[mig.state]).pack()
        elif index == P.FeatureIndex.DMA_LOGGING_START:
            ctl = P.DmaLoggingControl.unpack(req.data)
            ps = ctl.page_size
            if ps == 0 or ps & (ps - 1):
                raise ProtocolError(f"DMA logging page size {ps}", errno.EINVAL)
            if self.dma.log_page_size:
                raise OSError(errno.EBUSY, "DMA logging is already on")
            self.dma.start_logging(ps)
            out = ctl.pack()
        elif index == P.FeatureIndex.DMA_LOGGING_STOP:
            if not self.dma.log_page_size:
                raise OSError(errno.EINVAL, "DMA logging is not on")
            self.dma.stop_logging()
            out = req.data
        else:  # DMA_LOGGING_REPORT
            rep = P.DmaLoggingReport.unpack(req.data)
            if not self.dma.log_page_size:
                raise OSError(errno.EINVAL, "DMA logging is not on")
            need = P.DeviceFeature.SIZE + P.DmaLoggingReport.SIZE + rep.bitmap_size
            if (req.argsz or 0) < need or need > self.owner.max_data_xfer_size:
                raise ProtocolError(f"DMA_LOGGING_REPORT needs argsz {need}", errno.EINVAL)
            out = P.DmaLoggingReport(rep.iova, rep.length, rep.page_size,
                                     self.dma.dirty_bitmap(rep.iova, rep.length,
                                                           rep.page_size)).pack()
        if req.get and (req.argsz or 0) < P.DeviceFeature.SIZE + len(out):
            raise ProtocolError(f"DEVICE_FEATURE: argsz {req.argsz} too small", errno.EINVAL)
        return P.DeviceFeature(req.flags, out).pack(), []

    def _mig_read(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.MigData.unpack(m.payload, with_data=False,
                               max_size=self.owner.max_data_xfer_size)
        data = self.owner.migration.read(req.size)
        return P.MigData(len(data), data).pack(), []

    def _mig_write(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.MigData.unpack(m.payload, with_data=True,
                               max_size=self.owner.max_data_xfer_size)
        self.owner.migration.write(req.data)
        return b"", []


# --- one device on one socket ----------------------------------------------------------------


class DeviceServer:
    """A device model served on one socket path, one client at a time."""

    def __init__(self, device: PciDeviceModel, path: str, *,
                 max_msg_fds: int = SERVER_MAX_MSG_FDS,
                 max_data_xfer_size: int = SERVER_MAX_DATA_XFER_SIZE,
                 max_dma_maps: int = SERVER_MAX_DMA_MAPS) -> None:
        self.device = device
        self.path = path
        self.max_msg_fds = max_msg_fds
        self.max_data_xfer_size = max_data_xfer_size
        self.max_dma_maps = max_dma_maps
        self.migration = MigrationFsm(device)
        self.connection: Connection | None = None
        self.listener: socket.socket | None = None
        self.clients_served = 0
        # Called as on_client("connected"|"disconnected", self, connection) from
        # the server's threads with its lock held: it must not block (the
        # control socket only queues an event).
        self.on_client: Callable[[str, DeviceServer, Connection], None] | None = None
        self._lock = threading.Lock()
        self._waiting: collections.deque[socket.socket] = collections.deque()
        self._closing = False
        device.finalize()
        # ioeventfds are the device's, not a client's: they outlive clients.
        self.io_fds: dict[int, list[tuple[IoEventFd, int]]] = {}
        for index, spec in device.regions.items():
            for sub in spec.ioeventfds:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.io_fds.setdefault(index, []).append((sub, fd))
        self._io_thread: threading.Thread | None = None
        self._io_wake: tuple[int, int] | None = None
        if self.io_fds:
            self._io_wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._io_thread = threading.Thread(target=self._poll_io_fds, daemon=True,
                                               name=f"vfio-user ioeventfds {path}")
            self._io_thread.start()

    def _poll_io_fds(self) -> None:
        """Turn ioeventfd signals into writes through the region callbacks."""
        assert self._io_wake is not None
        poller = select.poll()
        poller.register(self._io_wake[0], select.POLLIN)
        by_fd: dict[int, tuple[int, IoEventFd]] = {}
        for index, subs in self.io_fds.items():
            for sub, fd in subs:
                by_fd[fd] = (index, sub)
                poller.register(fd, select.POLLIN)
        while not self._closing:
            for fd, _ev in poller.poll():
                if fd == self._io_wake[0]:
                    return
                try:
                    hits = os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                index, sub = by_fd[fd]
                data = (sub.datamatch or 0).to_bytes(sub.size, "little")
                access = self.device.regions[index].access
                assert access is not None
                with self.device.lock:
                    for _ in range(min(hits, 1024)):
                        try:
                            access(sub.offset, data, True)
                        except Exception:
                            log.exception("%s: ioeventfd write failed", self.path)

    def listen(self) -> None:
        _prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            # Room for clients that connect before the accept loop runs (or
            # while it is busy): a full backlog fails their connect() at once.
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise _listen_error(self.path, exc) from exc
        self.listener = sock

    def accept(self) -> None:
        listener = self.listener
        if listener is None:  # removed while the accept loop was looking at it
            return
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # closed under us, or EMFILE: this device's problem only
            log.warning("%s: accept failed: %s", self.path, exc)
            return
        sock.setblocking(True)
        with self._lock:
            if self.connection is not None:
                # One client at a time.  Like libvfio-user (which accepts only
                # when detached), later clients wait their turn; past a few,
                # they are turned away.
                if len(self._waiting) >= MAX_WAITING_CLIENTS:
                    sock.close()
                else:
                    self._waiting.append(sock)
                return
            self._start(sock)

    def _start(self, sock: socket.socket) -> None:
        """Run a connection for ``sock`` (with ``_lock`` held)."""
        conn = Connection(self, sock)
        self.connection = conn
        self.clients_served += 1
        self._notify("connected", conn)
        thread = threading.Thread(target=conn.run, name=f"vfio-user {self.path}", daemon=True)
        conn.thread = thread
        thread.start()

    @property
    def busy(self) -> bool:
        """A client is connected (negotiated or not)."""
        return self.connection is not None

    def _connection_ended(self, conn: Connection) -> None:
        with self._lock:
            if self.connection is conn:
                self.connection = None
                self._notify("disconnected", conn)
                if self._waiting and not self._closing:
                    self._start(self._waiting.popleft())

    def _notify(self, what: str, conn: Connection) -> None:
        if self.on_client is not None:
            try:
                self.on_client(what, self, conn)
            except Exception:
                log.exception("%s: on_client(%s) failed", self.path, what)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            while self._waiting:
                self._waiting.popleft().close()
        if self._io_wake is not None:
            os.write(self._io_wake[1], b"x")
            if self._io_thread is not None:
                self._io_thread.join(5)
            for fd in self._io_wake:
                os.close(fd)
            self._io_wake = None
            for subs in self.io_fds.values():
                for _sub, fd in subs:
                    os.close(fd)
            self.io_fds = {}
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        conn = self.connection
        if conn is not None:
            conn.close()
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(5)


# sun_path holds 108 bytes with the terminating NUL (unix(7)).
_SUN_PATH_MAX = 107


def _listen_error(path: str, exc: OSError) -> UsageError:
    """Say which path failed and what to do, instead of a bare errno."""
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        return UsageError(f"socket path {path!r} is {len(os.fsencode(path))} bytes; UNIX "
                          f"socket paths hold at most {_SUN_PATH_MAX}: use a shorter one")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        return UsageError(f"cannot create socket {path}: {parent} {what}")
    if isinstance(exc, PermissionError):
        return UsageError(f"cannot create socket {path}: permission denied in {parent}")
    return UsageError(f"cannot create socket {path}: {exc.strerror or exc} "
                      f"(is {parent} a writable directory?)")


def _prepare_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead server; refuse a live one or a
    non-socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:  # a path component is not a directory, no permission...
        raise _listen_error(path, exc) from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise UsageError(f"{path}: another server is listening there")


# --- the server ------------------------------------------------------------------------------


class Server:
    """Serves several devices from one process.

    >>> server = Server()
    >>> server.add(EduDevice(), "/tmp/edu.sock")     # doctest: +SKIP
    >>> server.serve_forever()                        # doctest: +SKIP

    ``start()`` runs the accept loop in a background thread instead;
    ``close()`` stops it, disconnects clients and removes the socket files.
    """

    def __init__(self) -> None:
        self.devices: list[DeviceServer] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, device: PciDeviceModel, path: str, **limits: int) -> DeviceServer:
        ds = DeviceServer(device, path, **limits)
        ds.listen()
        assert ds.listener is not None
        self._selector.register(ds.listener, selectors.EVENT_READ, ds)
        self.devices.append(ds)
        return ds

    def remove(self, ds: DeviceServer) -> None:
        """Stop serving ``ds``: end its client (if any), close its socket and
        remove the socket file.  The model is left to the caller."""
        if ds.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(ds.listener)
        with contextlib.suppress(ValueError):
            self.devices.remove(ds)
        ds.close()

    def serve_forever(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select():
                if key.data is None:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 64)
                    continue
                key.data.accept()

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="vfio-user accept",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for ds in self.devices:
            with contextlib.suppress(KeyError, ValueError):
                if ds.listener is not None:
                    self._selector.unregister(ds.listener)
            ds.close()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connections(self) -> Iterator[Connection]:
        for ds in self.devices:
            if ds.connection is not None:
                yield ds.connection
