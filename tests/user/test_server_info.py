"""DEVICE_GET_INFO, DEVICE_GET_REGION_INFO (capability chains, region fds),
DEVICE_GET_REGION_IO_FDS and DEVICE_GET_IRQ_INFO, with argsz rules."""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest
from vfu_raw import wait_until

from pyvfio.device import DeviceFlag, IrqFlag, RegionFlag
from pyvfio.user import protocol as P


def region_info(c, index: int, argsz: int = 4096) -> P.Message:
    return c.call(P.Command.DEVICE_GET_REGION_INFO, P.RegionInfoMsg(index, argsz=argsz).pack())


def test_device_info(scratch_client):
    m = scratch_client.ok(P.Command.DEVICE_GET_INFO, P.DeviceInfoMsg().pack())
    info = P.DeviceInfoMsg.unpack(m.payload, reply=True)
    assert info.argsz == 16
    assert info.flags == DeviceFlag.PCI | DeviceFlag.RESET
    assert info.num_regions == 10  # 0..8 plus the device-specific region 9
    assert info.num_irqs == 5


@pytest.mark.parametrize("payload", [
    b"", b"\0" * 15, b"\0" * 17,
    struct.pack("=IIII", 15, 0, 0, 0),    # argsz smaller than the reply
])
def test_device_info_bad_argsz_or_size(scratch_client, payload):
    assert scratch_client.errno_of(P.Command.DEVICE_GET_INFO, payload) == errno.EINVAL


def test_bar_with_sparse_mmap_gives_the_region_fd(scratch_client, scratch):
    m = region_info(scratch_client, 0)
    info = P.RegionInfoMsg.unpack(m.payload, reply=True)
    assert info.size == 16384
    assert info.flags & RegionFlag.MMAP and info.flags & RegionFlag.CAPS
    assert info.sparse_areas == ((4096, 12288),)
    assert len(m.fds) == 1
    # the fd maps the very memory the model serves
    mm = mmap.mmap(m.fds[0], 16384, offset=info.offset)
    scratch.ram.view[5000:5004] = b"mmio"
    assert mm[5000:5004] == b"mmio"
    mm[6000:6003] = b"abc"
    assert bytes(scratch.ram.view[6000:6003]) == b"abc"
    mm.close()
    m.close_fds()


def test_small_argsz_returns_the_needed_size_and_no_caps(scratch_client):
    m = region_info(scratch_client, 0, argsz=32)
    assert not m.is_error
    assert len(m.payload) == 32
    info = P.RegionInfoMsg.unpack(m.payload, reply=True)
    assert info.argsz == 32 + 8 + 8 + 16  # header, sparse cap head, nr_areas, one area
    assert info.cap_offset == 0 and info.sparse_areas is None
    assert m.fds == []  # no fd until the client asks with enough room


@pytest.mark.parametrize("payload", [
    b"", b"\0" * 31, b"\0" * 33,
    struct.pack("=IIIIQQ", 31, 0, 0, 0, 0, 0),      # argsz < 32
    struct.pack("=IIIIQQ", 32, 0, 10, 0, 0, 0),     # index out of range
    struct.pack("=IIIIQQ", 32, 0, 2**31, 0, 0, 0),
    struct.pack("=IIIIQQ", 2**31, 0, 0, 0, 0, 0),   # absurd argsz
])
def test_region_info_bad_requests(scratch_client, payload):
    assert scratch_client.errno_of(P.Command.DEVICE_GET_REGION_INFO, payload) == errno.EINVAL


def test_type_capability_of_a_device_specific_region(scratch_client):
    info = P.RegionInfoMsg.unpack(region_info(scratch_client, 9).payload, reply=True)
    assert info.type == (0x8086, 7)
    assert info.size == 64
    assert scratch_client.read(9, 4, 4) == bytes([4, 5, 6, 7])


def test_config_and_empty_regions(scratch_client):
    cfg = P.RegionInfoMsg.unpack(region_info(scratch_client, 7).payload, reply=True)
    assert cfg.size == 4096 and cfg.flags == RegionFlag.READ | RegionFlag.WRITE
    for index in (1, 3, 4, 5, 6, 8):
        empty = P.RegionInfoMsg.unpack(region_info(scratch_client, index).payload, reply=True)
        assert empty.size == 0 and empty.flags == 0


def test_region_io_fds_empty_list(scratch_client):
    m = scratch_client.ok(P.Command.DEVICE_GET_REGION_IO_FDS,
                          P.RegionIoFds(2, argsz=4096).pack())
    reply = P.RegionIoFds.unpack(m.payload, reply=True)
    assert (reply.index, reply.count, reply.sub_regions) == (2, 0, ())
    assert m.fds == []


def test_region_io_fds_deliver_writes(scratch_client, scratch):
    m = scratch_client.call(P.Command.DEVICE_GET_REGION_IO_FDS, P.RegionIoFds(0, argsz=16).pack())
    small = P.RegionIoFds.unpack(m.payload, reply=True)
    assert (small.count, small.argsz, small.sub_regions, m.fds) == (2, 16 + 80, (), [])
    m = scratch_client.ok(P.Command.DEVICE_GET_REGION_IO_FDS,
                          P.RegionIoFds(0, argsz=4096).pack())
    reply = P.RegionIoFds.unpack(m.payload, reply=True)
    assert [(s.offset, s.size, s.type, s.flags, s.data) for s in reply.sub_regions] == \
        [(0x40, 4, P.IoFdType.IOEVENTFD, 1, 7), (0x44, 4, P.IoFdType.IOEVENTFD, 0, 0)]
    assert len(m.fds) == 2
    os.eventfd_write(m.fds[reply.sub_regions[0].fd_index], 1)  # what KVM would do
    os.eventfd_write(m.fds[reply.sub_regions[1].fd_index], 2)
    assert wait_until(lambda: (0x40, b"\7\0\0\0") in scratch.writes
                      and scratch.writes.count((0x44, b"\0\0\0\0")) == 2)
    m.close_fds()


@pytest.mark.parametrize("payload", [
    b"\0" * 15,
    struct.pack("=IIII", 15, 0, 0, 0),      # argsz
    struct.pack("=IIII", 16, 1, 0, 0),      # flags must be 0
    struct.pack("=IIII", 16, 0, 0, 3),      # count must be 0
    struct.pack("=IIII", 16, 0, 1, 0),      # empty region
    struct.pack("=IIII", 16, 0, 99, 0),     # no such region
])
def test_region_io_fds_bad_requests(scratch_client, payload):
    assert scratch_client.errno_of(P.Command.DEVICE_GET_REGION_IO_FDS, payload) == errno.EINVAL


def test_irq_info(scratch_client):
    expect = {0: (1, IrqFlag.EVENTFD | IrqFlag.MASKABLE | IrqFlag.AUTOMASKED),
              1: (2, IrqFlag.EVENTFD | IrqFlag.MASKABLE | IrqFlag.NORESIZE),
              2: (4, IrqFlag.EVENTFD | IrqFlag.MASKABLE | IrqFlag.NORESIZE),
              3: (1, IrqFlag.EVENTFD), 4: (1, IrqFlag.EVENTFD)}
    for index, (count, flags) in expect.items():
        m = scratch_client.ok(P.Command.DEVICE_GET_IRQ_INFO, P.IrqInfoMsg(index).pack())
        info = P.IrqInfoMsg.unpack(m.payload, reply=True)
        assert (info.index, info.count, info.flags) == (index, count, flags)


def test_edu_has_no_msix(edu_client):
    m = edu_client.ok(P.Command.DEVICE_GET_IRQ_INFO, P.IrqInfoMsg(2).pack())
    assert P.IrqInfoMsg.unpack(m.payload, reply=True).count == 0


@pytest.mark.parametrize("payload", [
    b"\0" * 15, b"\0" * 17,
    struct.pack("=IIII", 15, 0, 0, 0),
    struct.pack("=IIII", 16, 0, 5, 0),
])
def test_irq_info_bad_requests(scratch_client, payload):
    assert scratch_client.errno_of(P.Command.DEVICE_GET_IRQ_INFO, payload) == errno.EINVAL


def test_client_without_fds_gets_no_mmap(serve, scratch):
    from vfu_raw import RawClient
    c = RawClient(serve(scratch), caps={"max_msg_fds": 0})
    m = region_info(c, 0)
    info = P.RegionInfoMsg.unpack(m.payload, reply=True)
    assert not info.flags & RegionFlag.MMAP and info.sparse_areas is None and m.fds == []
    scratch.ram.view[0x3000:0x3002] = b"ok"
    assert c.read(0, 0x3000, 2) == b"ok"
    c.close()
