"""Hypothesis over what a server may answer: whatever the bytes, the client
returns the right value for a correct reply and otherwise raises one of the
documented errors (``ProtocolError``, ``PeerError``, ``ConnectionClosed``) —
never anything else, never a hang, never a leaked fd.

No thread and no server: the device sits on one end of a socketpair and the
test writes the "reply" into the other end before the call.  The client's
request is read back and checked too.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvfio.device import DeviceFlag, DeviceInfo
from pyvfio.errors import ConnectionClosed, PeerError, ProtocolError
from pyvfio.testing.fds import fd_targets
from pyvfio.user.client import VfioUserDevice
from pyvfio.user.protocol import HEADER, REGION_ACCESS, Capabilities, MessageReader

ALLOWED = (ProtocolError, PeerError, ConnectionClosed)


def assert_no_new_fds(before: set[str]) -> None:
    """No fd open now that was not open before, compared by slot *and* target
    (``fd_targets``), so a leaked fd that reuses a slot some other thread freed
    still shows.  The fd table is the process's: a thread left by an earlier
    test may still be closing its sockets, which is not our leak (CI saw fds
    54 and 85 close during this test), so only new entries count.  Give such
    a thread a moment; a leak of ours stays."""
    deadline = time.monotonic() + 10.0
    while fd_targets() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fd_targets() - before == set()


def make_device() -> tuple[VfioUserDevice, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    timeout = struct.pack("@ll", 0, 50_000)  # 50 ms: an incomplete reply times out fast
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
    reader = MessageReader(ours, max_msg_size=1 << 16, max_fds=16)
    dev = VfioUserDevice("fuzz", ours, reader, (0, 2), Capabilities(), timeout=0.05,
                         share_dma_fds=True, twin=None)
    dev._info = DeviceInfo(DeviceFlag.PCI, 9, 5)  # as if DEVICE_GET_INFO had said so
    # region 0: 4 KiB, read/write, as if REGION_INFO had said so
    # ID 0 went to VERSION, so the device's first request (REGION_INFO) is 1
    theirs.sendall(HEADER.pack(1, 5, 48, 1, 0) + struct.pack("=IIIIQQ", 32, 3, 0, 0, 0x1000, 0))
    dev.bar(0)
    theirs.recv(4096)  # the REGION_INFO request
    return dev, theirs


READ_ID = 2
"""The message ID of the register read after make_device's REGION_INFO."""


def valid_reply(msg_id: int, offset: int, value: bytes) -> bytes:
    payload = REGION_ACCESS.pack(offset, 0, len(value)) + value
    return HEADER.pack(msg_id, 9, 16 + len(payload), 1, 0) + payload


replies = st.one_of(
    st.binary(max_size=80),  # anything
    st.builds(  # a header with arbitrary fields and an arbitrary payload
        lambda msg_id, cmd, size, flags, err, body: HEADER.pack(msg_id, cmd, size, flags, err)
        + body,
        st.sampled_from([READ_ID, 0, 1, 3, 0xFFFF]), st.sampled_from([9, 10, 11, 0, 0xFFFF]),
        st.one_of(st.integers(0, 80), st.sampled_from([0xFFFFFFFF, 1 << 20])),
        st.sampled_from([1, 0x21, 0x11, 0, 0x2, 0xFFFFFFFF]), st.integers(0, 200),
        st.binary(max_size=64)),
    st.builds(  # a correct reply, truncated or extended
        lambda cut, extra: valid_reply(READ_ID, 0x40, b"\x11\x22\x33\x44")[:cut] + extra,
        st.integers(0, 36), st.binary(max_size=8)),
    st.just(valid_reply(READ_ID, 0x40, b"\x11\x22\x33\x44")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply=replies)
def test_any_reply_to_a_register_read(reply: bytes) -> None:
    before = fd_targets()
    dev, theirs = make_device()
    try:
        theirs.sendall(reply)
        good_head = HEADER.pack(READ_ID, 9, 36, 1, 0) + REGION_ACCESS.pack(0x40, 0, 4)
        good = len(reply) >= 36 and reply.startswith(good_head)
        try:
            value = dev.bar(0).read32(0x40)
        except ALLOWED:
            assert not good
        else:
            # only a correct reply (maybe followed by bytes of a next message) gets through
            assert good
            assert value == int.from_bytes(reply[32:36], "little")
        request = theirs.recv(4096)
        assert request[:32] == HEADER.pack(READ_ID, 9, 32, 0, 0) + REGION_ACCESS.pack(0x40, 0, 4)
    finally:
        dev.close()
        theirs.close()
    assert_no_new_fds(before)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=120), fds=st.integers(0, 3))
def test_any_reply_to_region_info(body: bytes, fds: int) -> None:
    """Arbitrary REGION_INFO payloads, with arbitrary fds attached."""
    from pyvfio.user.protocol import send_message

    before = fd_targets()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 50_000))
    dev = VfioUserDevice("fuzz", ours, MessageReader(ours, max_fds=16), (0, 2), Capabilities(),
                         timeout=0.05, share_dma_fds=True, twin=None)
    dev._info = DeviceInfo(DeviceFlag.PCI, 9, 5)
    pipes = [os.pipe() for _ in range(fds)]
    try:
        send_message(theirs, HEADER.pack(1, 5, 16 + len(body), 1, 0) + body,
                     [r for r, _w in pipes])
        try:
            info = dev.region_info(0)
        except ALLOWED:
            pass
        else:
            assert info.size < 1 << 63
            for area in info.mmap_areas:
                assert area.offset + area.size <= info.size
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        dev.close()
        theirs.close()
    assert_no_new_fds(before)
