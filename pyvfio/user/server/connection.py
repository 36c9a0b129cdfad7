"""One client connection of a served device: its thread, the message loop and
the dispatch table, VERSION negotiation, DEVICE_GET_INFO, DEVICE_RESET and
teardown.  The handlers of each command group are mixins: :mod:`.dma`,
:mod:`.region`, :mod:`.irq`, :mod:`.feature`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import socket
import threading
from collections.abc import Callable
from typing import Any

from pyvfio.device import DeviceFlag
from pyvfio.devices.model import RegionSpec
from pyvfio.errors import ConnectionClosed, ProtocolError
from pyvfio.user import protocol as P
from pyvfio.user.dma import DmaTable
from pyvfio.user.irq import IrqState
from pyvfio.user.server._base import (
    _ACCESS_MESSAGE,
    _CMD_REGION_READ,
    _CMD_REGION_WRITE,
    _FD_COMMANDS,
    _HEADER,
    _NO_REPLY,
    _REPLY,
    ServedDevice,
    log,
)
from pyvfio.user.server.dma import DmaHandlers
from pyvfio.user.server.feature import FeatureHandlers
from pyvfio.user.server.irq import IrqHandlers
from pyvfio.user.server.region import RegionHandlers

_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


class Connection(DmaHandlers, RegionHandlers, IrqHandlers, FeatureHandlers):
    """One client of one device.  Runs in its own thread (:meth:`run`)."""

    def __init__(self, owner: ServedDevice, sock: socket.socket) -> None:
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
        self._twin_thread: threading.Thread | None = None
        self._twin_eof = False
        self._reply_timeout = owner.reply_timeout
        self._closed = False
        self._close_after_reply: list[int] = []  # our copies of fds sent in a reply
        regions = self.device.regions
        self._regions: list[RegionSpec | None] = [regions.get(i) for i in
                                                  range(self.device.num_regions)]
        self._access_table = self._build_access_table()
        self._max_xfer = owner.max_data_xfer_size
        self._max_read = owner.max_data_xfer_size
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
            # A client holds the device from connect() on, and later clients
            # wait: one that never sends VERSION must not hold it for good.
            self.sock.settimeout(self._reply_timeout)
            self._loop()
        except TimeoutError:
            log.warning("%s: dropping a client that sent no VERSION within %gs",
                        self.owner.path, self._reply_timeout)
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

    def _access_errno(self, exc: Exception) -> int:
        """The errno a failed region access is answered with; called from the
        ``except`` block, so an unexpected exception is logged with its traceback."""
        if isinstance(exc, ProtocolError):
            return exc.errno
        if isinstance(exc, OSError):
            return exc.errno or errno.EIO
        log.exception("%s: region access callback failed", self.owner.path)
        return errno.EIO

    def _loop(self) -> None:
        reader = self.reader
        handlers = self._handlers
        lock = self.device.lock
        sock = self.sock
        backlog = self._backlog
        recvmsg, bufsize, cmsg_space = sock.recvmsg, reader.bufsize, reader.cmsg_space
        sendall, send_lock, access = sock.sendall, self._send_lock, self._access
        read_region, write_region = self._read_region, self._write_region
        unpack_access, pack_access = _ACCESS_MESSAGE.unpack_from, _ACCESS_MESSAGE.pack
        # Prebound acquire/release: a `with` statement looks up and calls
        # __enter__/__exit__ on every message of the hot path.
        lock_acquire, lock_release = lock.acquire, lock.release
        send_acquire, send_release = send_lock.acquire, send_lock.release
        data: bytes | None
        while True:
            if backlog:
                msgs = list(backlog)
                backlog.clear()
            elif reader.idle:
                # The hot path, in this frame: reads that each hold exactly one
                # REGION_READ or REGION_WRITE wanting a reply, and no fds,
                # answered one after the other with no Message object and no
                # reader state.  The first read that holds anything else goes
                # to the reader and the general loop below.  A model that did
                # DMA from this thread (DmaHandlers._call) used the reader,
                # which may then hold more: back to the top.
                reads = reader.reads
                while True:
                    try:
                        data, anc, msg_flags, _addr = recvmsg(bufsize, cmsg_space,
                                                              _MSG_CMSG_CLOEXEC)
                    except (ConnectionResetError, BrokenPipeError) as exc:
                        reader.close()
                        raise ConnectionClosed("vfio-user peer broke the connection: "
                                               f"{exc}") from None
                    if anc or len(data) < 32 or not self.negotiated:
                        break
                    msg_id, cmd, msg_size, flags, _err, offset, index, count = \
                        unpack_access(data)
                    if flags or msg_size != len(data):
                        break
                    try:
                        if cmd == _CMD_REGION_READ and msg_size == 32:
                            lock_acquire()
                            try:
                                out = read_region(offset, index, count)
                            finally:
                                lock_release()
                            reply = pack_access(msg_id, cmd, 32 + len(out), _REPLY, 0, offset,
                                                index, count) + out
                        elif cmd == _CMD_REGION_WRITE and msg_size == 32 + count:
                            lock_acquire()
                            try:
                                write_region(offset, index, count, data[32:])
                            finally:
                                lock_release()
                            reply = pack_access(msg_id, cmd, 32, _REPLY, 0, offset, index, count)
                        else:
                            break
                        send_acquire()
                        try:
                            sendall(reply)
                        finally:
                            send_release()
                    except Exception as exc:
                        self._send_error(P.Message(msg_id, cmd, flags, 0, b"", []),
                                         self._access_errno(exc))
                    if reader.reads != reads:
                        data = None
                        break
                if data is None:
                    continue
                msgs = reader.take(data, anc, msg_flags)
                if not msgs:
                    if reader.eof:
                        return
                    continue
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
                                reply = access(m.payload, cmd == _CMD_REGION_WRITE)
                            if not flags & _NO_REPLY:
                                with self._send_lock:
                                    sock.sendall(_HEADER.pack(m.msg_id, cmd, 16 + len(reply),
                                                              _REPLY, 0) + reply)
                            continue
                        except Exception as exc:
                            err = self._access_errno(exc)
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
                self.owner.migration.client_gone()
            except Exception:
                log.exception("%s: leaving the migration state failed", self.owner.path)
            try:
                self.device.on_disconnect()
            except Exception:
                log.exception("%s: on_disconnect failed", self.owner.path)
        for m in self._backlog:
            m.close_fds()
        self._backlog.clear()
        self.reader.close()
        if self._twin is not None:
            with contextlib.suppress(OSError):
                self._twin.shutdown(socket.SHUT_RDWR)
            if self._twin_thread is not None:
                self._twin_thread.join(5)
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
        self._max_read = self._client_max_xfer
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
            self._twin_thread = threading.Thread(target=self._twin_loop, daemon=True,
                                                 name=f"vfio-user twin {self.owner.path}")
            self._twin_thread.start()
            out_fds.append(client_end.detach())
            self._close_after_reply = list(out_fds)
            mine["twin_socket"] = {"supported": True, "fd_index": 0}
        reply = P.Version(P.VERSION_MAJOR, min(v.minor, P.VERSION_MINOR),
                          P.Capabilities.from_json(mine))
        self.negotiated = True
        self.sock.settimeout(None)
        self.device._attach(self)
        try:
            self.device.on_connect()
        except Exception:
            log.exception("%s: on_connect failed", self.owner.path)
        return reply.pack(), out_fds

    # ---- device info ----

    def _get_info(self, m: P.Message) -> tuple[bytes, list[int]]:
        P.DeviceInfoMsg.unpack(m.payload)
        flags = DeviceFlag.PCI | DeviceFlag.RESET
        return P.DeviceInfoMsg(P.DeviceInfoMsg.SIZE, flags, self.device.num_regions,
                               len(self.device.irq_counts)).pack(), []

    # ---- reset ----

    def _reset(self, m: P.Message) -> tuple[bytes, list[int]]:
        if m.payload:
            raise ProtocolError("DEVICE_RESET has no payload", errno.EINVAL)
        self.device.quiesce()
        self.device.reset()
        self.irqs.reset()
        self.owner.migration.reset()
        return b"", []
