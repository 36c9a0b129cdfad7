"""The vfio-user codec: round trips, and arbitrary bytes never raise anything
but ProtocolError."""

from __future__ import annotations

import errno
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvfio.errors import ProtocolError
from pyvfio.user import protocol as P

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

UNPACKERS = [
    P.Header.unpack,
    P.Version.unpack,
    P.DmaMap.unpack,
    P.DmaUnmap.unpack,
    lambda b: P.DmaUnmap.unpack(b, reply=True),
    P.DeviceInfoMsg.unpack,
    lambda b: P.DeviceInfoMsg.unpack(b, reply=True),
    P.RegionInfoMsg.unpack,
    lambda b: P.RegionInfoMsg.unpack(b, reply=True),
    P.RegionIoFds.unpack,
    lambda b: P.RegionIoFds.unpack(b, reply=True),
    P.IrqInfoMsg.unpack,
    P.IrqSet.unpack,
    lambda b: P.RegionAccess.unpack(b, with_data=True),
    lambda b: P.RegionAccess.unpack(b, with_data=False),
    P.RegionWriteMulti.unpack,
    lambda b: P.RegionWriteMulti.unpack(b, reply=True),
    lambda b: P.DmaAccess.unpack(b, with_data=True),
    lambda b: P.DmaAccess.unpack(b, with_data=False),
    P.DeviceFeature.unpack,
    P.MigrationFeature.unpack,
    P.MigStateMsg.unpack,
    P.DmaLoggingControl.unpack,
    P.DmaLoggingReport.unpack,
    lambda b: P.DmaLoggingReport.unpack(b, reply=True),
    lambda b: P.MigData.unpack(b, with_data=True),
    lambda b: P.MigData.unpack(b, with_data=False),
]


@pytest.mark.parametrize("unpack", UNPACKERS)
@settings(max_examples=120, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_protocol_error(unpack, data):
    try:
        unpack(data)
    except ProtocolError as exc:
        assert exc.errno in (errno.EINVAL, errno.E2BIG)


@pytest.mark.parametrize("unpack", UNPACKERS)
@settings(max_examples=60, deadline=None)
@given(prefix=st.sampled_from([b"", struct.pack("=I", 32), struct.pack("=II", 40, 1),
                               struct.pack("=IIII", 64, 0xF, 0, 32)]),
       data=st.binary(max_size=120))
def test_structured_prefixes_only_raise_protocol_error(unpack, prefix, data):
    try:
        unpack(prefix + data)
    except ProtocolError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["capabilities", "x"]),
                           st.dictionaries(st.sampled_from(
                               ["max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes",
                                "twin_socket", "write_multiple", "migration", "other"]),
                               json_values, max_size=4), max_size=2))
def test_version_json_only_raises_protocol_error(doc):
    payload = struct.pack("=HH", 0, 2) + json.dumps(doc).encode() + b"\0"
    try:
        P.Version.unpack(payload)
    except ProtocolError:
        pass


@given(msg_id=u16, command=u16, size=st.integers(16, 2**32 - 1), flags=u32, err=u32)
def test_header_round_trip(msg_id, command, size, flags, err):
    h = P.Header(msg_id, command, size, flags, err)
    assert P.Header.unpack(h.pack()) == h


def test_header_too_small_size():
    with pytest.raises(ProtocolError):
        P.Header.unpack(struct.pack("=HHIII", 1, 1, 15, 0, 0))


@given(fds=st.integers(0, 1024), xfer=st.integers(1, 2**40), maps=u32, pg=st.integers(1, 2**40),
       wm=st.booleans(), mig=st.booleans(), twin=st.booleans())
def test_version_round_trip(fds, xfer, maps, pg, wm, mig, twin):
    caps = P.Capabilities(fds, xfer, maps, pg, wm,
                          {"pgsize": 4096, "max_bitmap_size": 1 << 20} if mig else None,
                          {"supported": True, "fd_index": 0} if twin else None)
    v = P.Version(0, 2, caps)
    assert P.Version.unpack(v.pack()) == v


@given(iova=u64, size=u64, flags=st.integers(0, 3), offset=u64)
def test_dma_map_round_trip(iova, size, flags, offset):
    m = P.DmaMap(iova, size, flags, offset)
    assert P.DmaMap.unpack(m.pack()) == m


@given(iova=u64, size=u64, pgsize=u64, bitmap=st.binary(max_size=64))
def test_dma_unmap_round_trip(iova, size, pgsize, bitmap):
    plain = P.DmaUnmap(iova, size)
    assert P.DmaUnmap.unpack(plain.pack()) == plain
    req = P.DmaUnmap(iova, size, P.DmaUnmapFlag.GET_DIRTY_BITMAP, 40 + len(bitmap), pgsize,
                     len(bitmap))
    assert P.DmaUnmap.unpack(req.pack()) == req
    reply = P.DmaUnmap(iova, size, P.DmaUnmapFlag.GET_DIRTY_BITMAP, 40 + len(bitmap), pgsize,
                       len(bitmap), bitmap)
    assert P.DmaUnmap.unpack(reply.pack(), reply=True) == reply


@given(index=u32, size=u64, offset=u64, flags=st.integers(0, 7),
       areas=st.none() | st.lists(st.tuples(u64, u64), max_size=5).map(tuple),
       rtype=st.none() | st.tuples(u32, u32))
def test_region_info_round_trip(index, size, offset, flags, areas, rtype):
    info = P.RegionInfoMsg(index, flags=flags, size=size, offset=offset, sparse_areas=areas,
                           type=rtype)
    out = P.RegionInfoMsg.unpack(info.pack(), reply=True)
    assert (out.index, out.size, out.offset) == (index, size, offset)
    assert out.sparse_areas == areas and out.type == rtype
    assert out.argsz == info.full_size()


def test_region_info_capability_loop_is_refused():
    body = struct.pack("=IIIIQQ", 48, 8, 0, 32, 0, 0) + struct.pack("=HHI", 99, 1, 32) + b"\0" * 8
    with pytest.raises(ProtocolError):
        P.RegionInfoMsg.unpack(body, reply=True)


@given(index=st.integers(0, 4), start=st.integers(0, 64), bools=st.lists(st.booleans(),
                                                                          max_size=64))
def test_irq_set_round_trip(index, start, bools):
    s = P.IrqSet(index, 0x2 | 0x20, start, len(bools), tuple(bools))
    assert P.IrqSet.unpack(s.pack()) == P.IrqSet(index, 0x22, start, len(bools), tuple(bools),
                                                 20 + len(bools))


@given(region=u32, offset=u64, data=st.binary(max_size=64))
def test_region_access_round_trip(region, offset, data):
    a = P.RegionAccess(region, offset, len(data), data)
    assert P.RegionAccess.unpack(a.pack(), with_data=True) == a
    head = P.RegionAccess(region, offset, len(data))
    assert P.RegionAccess.unpack(head.pack(), with_data=False) == head


@given(writes=st.lists(st.tuples(u32, u64, st.binary(min_size=1, max_size=8)), min_size=1,
                       max_size=20))
def test_write_multi_round_trip(writes):
    w = P.RegionWriteMulti(tuple(P.WriteOne(r, o, d) for r, o, d in writes))
    assert P.RegionWriteMulti.unpack(w.pack()) == P.RegionWriteMulti(w.writes, len(writes))


@given(address=u64, data=st.binary(max_size=64))
def test_dma_access_round_trip(address, data):
    a = P.DmaAccess(address, len(data), data)
    assert P.DmaAccess.unpack(a.pack(), with_data=True) == a


@given(page=st.integers(0, 40).map(lambda b: 1 << b),
       ranges=st.lists(st.tuples(u64, u64), max_size=10))
def test_dma_logging_round_trip(page, ranges):
    c = P.DmaLoggingControl(page, tuple(P.DmaLoggingRange(i, n) for i, n in ranges))
    assert P.DmaLoggingControl.unpack(c.pack()) == c


@given(size=st.integers(0, 1000), data=st.binary(max_size=100))
def test_mig_data_round_trip(size, data):
    w = P.MigData(len(data), data)
    assert P.MigData.unpack(w.pack(), with_data=True).data == data
    r = P.MigData(size, argsz=8 + size)
    assert P.MigData.unpack(r.pack(), with_data=False).size == size


def test_pack_rejects_values_too_wide():
    with pytest.raises(ProtocolError):
        P.DmaMap(2**64, 1).pack()
    with pytest.raises(ProtocolError):
        P.Header(2**16, 1, 16).pack()


def test_command_numbers():
    assert [(c.name, c.value) for c in P.Command] == [
        ("VERSION", 1), ("DMA_MAP", 2), ("DMA_UNMAP", 3), ("DEVICE_GET_INFO", 4),
        ("DEVICE_GET_REGION_INFO", 5), ("DEVICE_GET_REGION_IO_FDS", 6),
        ("DEVICE_GET_IRQ_INFO", 7), ("DEVICE_SET_IRQS", 8), ("REGION_READ", 9),
        ("REGION_WRITE", 10), ("DMA_READ", 11), ("DMA_WRITE", 12), ("DEVICE_RESET", 13),
        ("REGION_WRITE_MULTI", 15), ("DEVICE_FEATURE", 16), ("MIG_DATA_READ", 17),
        ("MIG_DATA_WRITE", 18)]
    assert P.HEADER.size == 16
    assert (P.DmaMap.SIZE, P.DmaUnmap.SIZE, P.RegionInfoMsg.SIZE, P.IrqSet.SIZE,
            P.RegionIoFds.ENTRY_SIZE) == (32, 24, 32, 20, 40)
