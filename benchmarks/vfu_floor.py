"""The Python floors of a vfio-user server and client: what any Python code
pays per 4-byte REGION_READ round trip before it adds a line of its own.

- server: a loop of one ``recvmsg`` (fds may come with any message, so a
  server cannot use ``recv``), one header unpack and one ``sendall`` of the
  reply, answering each connection in turn (no checks, no device);
- client: ``os.write`` of a prebuilt request and one ``os.read`` on the
  socket's fd, the cheapest calls Python has: a reply to a register access
  carries no fds, and without a control buffer the kernel closes any that
  come, so a client may read it without ``recvmsg``.

Used by ``vfio_user_bench.py`` (timed) and ``callgrind.py`` (instructions).

    python benchmarks/vfu_floor.py serve SOCKET
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

HEADER = struct.Struct("=HHIII")
_SPACE = socket.CMSG_SPACE(16 * 4)
_VERSION_BODY = struct.pack("=HH", 0, 2) + b'{"capabilities":{}}\0'


def serve(path: str, connections: int | None = None) -> None:
    """Answer VERSION, then echo every request as a 4-byte REGION_READ reply,
    one connection after the other (``connections``: how many; None: forever)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    served = 0
    while connections is None or served < connections:
        conn, _ = listener.accept()
        served += 1
        with conn:
            data = conn.recv(4096)  # VERSION
            if not data:
                continue
            conn.sendall(HEADER.pack(HEADER.unpack_from(data)[0], 1, 16 + len(_VERSION_BODY),
                                     1, 0) + _VERSION_BODY)
            recvmsg, sendall = conn.recvmsg, conn.sendall
            unpack_from, pack = HEADER.unpack_from, HEADER.pack
            while True:
                data, _anc, _flags, _addr = recvmsg(65536, _SPACE, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    break
                msg_id, command, _size, _flags, _err = unpack_from(data)
                sendall(pack(msg_id, command, 36, 1, 0) + data[16:] + b"\0\0\0\0")


def client(path: str, n: int) -> float:
    """Negotiate, then ``n`` round trips; returns round trips per second."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(HEADER.pack(0, 1, 16 + len(_VERSION_BODY), 0, 0) + _VERSION_BODY)
        sock.recv(4096)
        request = struct.pack("=HHIIIQII", 1, 9, 32, 0, 0, 0, 0, 4)
        fd, write, read = sock.fileno(), os.write, os.read
        start = time.perf_counter()
        for _ in range(n):
            write(fd, request)
            read(fd, 65536)
        return n / (time.perf_counter() - start)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: vfu_floor.py serve SOCKET")
    serve(sys.argv[2])
