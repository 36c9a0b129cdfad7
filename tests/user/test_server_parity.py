"""Peer parity where the spec is silent (answer as the kernel and
libvfio-user do) and the letter of the spec where it speaks (issue 16,
point 5)."""

from __future__ import annotations

import errno
import struct

import pytest
from vfu_raw import RawClient

from pyvfio.device import SharedMemory
from pyvfio.user import protocol as P

F = P.FeatureFlag
S = P.MigState
STATE = P.FeatureIndex.MIG_DEVICE_STATE


def feature(c: RawClient, flags: int, data: bytes = b"", argsz: int | None = None
            ) -> P.Message:
    return c.call(P.Command.DEVICE_FEATURE, P.DeviceFeature(flags, data, argsz).pack())


@pytest.mark.parametrize("flags", [
    F.PROBE | F.GET | 99,                                   # no such feature
    F.PROBE | F.SET | 99,
    F.SET | 99,
    F.PROBE | F.SET | P.FeatureIndex.MIGRATION,             # GET-only feature
    F.PROBE | F.GET | P.FeatureIndex.DMA_LOGGING_START,     # SET-only feature
    F.SET | P.FeatureIndex.DMA_LOGGING_REPORT,
    F.SET | 5,                                              # a kernel feature vfio-user lacks
])
def test_unsupported_set_or_probe_is_einval(scratch_client, flags):
    m = feature(scratch_client, flags, b"\0" * 16, 64)
    assert m.is_error and m.error == errno.EINVAL


@pytest.mark.parametrize("op", [F.SET, F.GET])
def test_set_is_size_checked_as_get_is(scratch_client, op):
    """argsz below the feature's structure is EINVAL for a SET as for a GET
    (the kernel's vfio_check_feature), even with the data present."""
    data = P.MigStateMsg(S.STOP).pack()
    m = feature(scratch_client, op | STATE, data, argsz=P.DeviceFeature.SIZE + 4)
    assert m.is_error and m.error == errno.EINVAL
    m = feature(scratch_client, F.GET | STATE, b"", 64)
    state = P.MigStateMsg.unpack(P.DeviceFeature.unpack(m.payload, reply=True).data)
    assert state.device_state == S.RUNNING                  # the refused SET did nothing


def test_set_reply_echoes_the_request_byte_for_byte(scratch_client):
    # device_state STOP, data_fd (unused by vfio-user) set to a pattern, and
    # an argsz larger than needed: all of it comes back unchanged.
    payload = struct.pack("=IIII", 64, F.SET | STATE, S.STOP, 0x5A5AA5A5)
    m = scratch_client.call(P.Command.DEVICE_FEATURE, payload)
    assert not m.is_error
    assert m.payload == payload
    payload = struct.pack("=IIII", 16, F.SET | STATE, S.RUNNING, 0xFFFFFFFF)
    m = scratch_client.call(P.Command.DEVICE_FEATURE, payload)
    assert m.payload == payload


def test_client_max_data_xfer_size_bounds_what_we_send(serve, scratch):
    c = RawClient(serve(scratch), caps={"max_msg_fds": 8, "max_data_xfer_size": 4096})
    # A region read whose reply would exceed the client's limit is refused ...
    m = c.call(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 8192))
    assert m.is_error and m.error == errno.E2BIG
    assert len(c.read(0, 0, 4096)) == 4096
    # ... a write of the same size is the client's to send (our limit is 1 MiB).
    c.ok(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(4096, 0, 8192) + b"\1" * 8192)
    # Migration data comes in pieces the client can take.
    assert not feature(c, F.SET | STATE, P.MigStateMsg(S.STOP_COPY).pack()).is_error
    sizes = []
    while True:
        m = c.ok(P.Command.MIG_DATA_READ, P.MigData(65536, argsz=8 + 65536).pack())
        body = P.MigData.unpack(m.payload, with_data=True)
        assert len(m.payload) <= 4096 + 8
        sizes.append(body.size)
        if body.size == 0:
            break
    assert sum(sizes) > 16384 and max(sizes) == 4096      # the whole state, in 4 KiB pieces
    c.close()


def test_unmap_of_a_never_mapped_range_succeeds(scratch_client):
    """As the kernel's type1 (and what QEMU's listener expects): nothing
    mapped there, nothing to do, no error.  A range that cuts a window is
    still refused, and the window stays."""
    mem = SharedMemory(4 * 4096)
    try:
        m = scratch_client.call(P.Command.DMA_MAP, P.DmaMap(0x10000, 0x4000, 3).pack(),
                                [mem.fd])
        assert not m.is_error
        m = scratch_client.ok(P.Command.DMA_UNMAP, P.DmaUnmap(0x80000, 0x1000).pack())
        assert P.DmaUnmap.unpack(m.payload, reply=True).address == 0x80000
        m = scratch_client.call(P.Command.DMA_UNMAP, P.DmaUnmap(0x11000, 0x1000).pack())
        assert m.is_error and m.error == errno.ENOENT
        m = scratch_client.call(P.Command.DMA_MAP, P.DmaMap(0x10000, 0x1000, 3).pack())
        assert m.is_error and m.error == errno.EEXIST       # still mapped
        scratch_client.ok(P.Command.DMA_UNMAP, P.DmaUnmap(0x10000, 0x4000).pack())
    finally:
        mem.close()
