"""A minimal raw vfio-user client for the server tests: sends exact bytes,
returns exact replies, so tests do not depend on :mod:`pyvfio.user.client`."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

from pyvfio.user import protocol as P


class RawClient:
    def __init__(self, path: str, *, negotiate: bool = True, caps: dict | None = None,
                 timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = P.MessageReader(self.sock, max_fds=16)
        self.next_id = 1
        self.server_caps: P.Capabilities | None = None
        self.twin: socket.socket | None = None
        self.dma_handler = None  # (command, payload) -> reply payload for server commands
        if negotiate:
            self.negotiate(caps)

    def negotiate(self, caps: dict | None = None, minor: int = 2) -> P.Version:
        c = P.Capabilities.from_json(caps or {"max_msg_fds": 8})
        m = self.call(P.Command.VERSION, P.Version(0, minor, c).pack())
        v = P.Version.unpack(m.payload)
        self.server_caps = v.caps
        if m.fds:
            self.twin = socket.socket(fileno=m.fds[0])
            self.twin.settimeout(5)
        return v

    def send(self, command: int, payload: bytes = b"", fds=(), flags: int = 0,
             msg_id: int | None = None) -> int:
        if msg_id is None:
            msg_id = self.next_id
            self.next_id = (self.next_id + 1) & 0xFFFF
        P.send_message(self.sock, P.pack_message(msg_id, command, payload, flags), list(fds))
        return msg_id

    def send_raw(self, data: bytes, fds=()) -> None:
        P.send_message(self.sock, data, list(fds))

    def recv(self) -> P.Message:
        while True:
            m = self.reader.read()
            if m is None:
                raise ConnectionError("server closed the connection")
            if not m.is_reply and self.dma_handler is not None:
                reply = self.dma_handler(m.command, m.payload)
                P.send_message(self.sock, P.pack_message(m.msg_id, m.command, reply,
                                                         P.MsgFlag.REPLY))
                continue
            return m

    def call(self, command: int, payload: bytes = b"", fds=(), flags: int = 0) -> P.Message:
        msg_id = self.send(command, payload, fds, flags)
        m = self.recv()
        assert m.msg_id == msg_id, (m, msg_id)
        assert m.command == command, m
        assert m.is_reply, m
        return m

    def ok(self, command: int, payload: bytes = b"", fds=()) -> P.Message:
        m = self.call(command, payload, fds)
        assert not m.is_error, f"{P.Command(command).name} failed: errno {m.error}"
        return m

    def errno_of(self, command: int, payload: bytes = b"", fds=()) -> int:
        m = self.call(command, payload, fds)
        m.close_fds()
        assert m.is_error, f"{P.Command(command).name} unexpectedly succeeded: {m}"
        assert len(m.payload) == 0
        return m.error

    # conveniences
    def read(self, region: int, offset: int, size: int) -> bytes:
        m = self.ok(P.Command.REGION_READ, P.RegionAccess(region, offset, size).pack())
        return P.RegionAccess.unpack(m.payload, with_data=True).data

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.ok(P.Command.REGION_WRITE, P.RegionAccess(region, offset, len(data), data).pack())

    def read32(self, region: int, offset: int) -> int:
        return struct.unpack("<I", self.read(region, offset, 4))[0]

    def write32(self, region: int, offset: int, value: int) -> None:
        self.write(region, offset, struct.pack("<I", value))

    def write64(self, region: int, offset: int, value: int) -> None:
        self.write(region, offset, struct.pack("<Q", value))

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds=(), bools=None):
        return self.call(P.Command.DEVICE_SET_IRQS,
                         P.IrqSet(index, flags, start, count, bools).pack(), fds)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
        if self.twin is not None:
            self.twin.close()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return pred()
