"""Every vfio-user message, both directions, against bytes written by hand
from the spec's tables (QEMU ``docs/interop/vfio-user.rst``).

The other codec tests round-trip (pack with the codec, unpack with the codec)
and the client/server tests use the same codec on both ends, so a field
swapped in both ``pack`` and ``unpack`` passes them all.  Here each fixture is
a literal byte string, one field per line with its offset and width from the
spec, never produced by the code under test.  Each test:

- decodes the fixture (header with :meth:`Header.unpack`, body with the
  message class) and checks every field by name;
- builds the message from its fields and checks the codec gives the same bytes.

All integers are little-endian (the spec says host order; these tests run on
little-endian hosts only).  Field values are chosen distinct so that two
fields swapped show.  Where pyvfio follows libvfio-user beyond the spec
(DMA_UNMAP's dirty bitmap, the 16-byte DMA_WRITE reply) the fixture says so.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvfio.user.protocol import (
    Capabilities,
    Command,
    DeviceFeature,
    DeviceInfoMsg,
    DmaAccess,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    DmaMap,
    DmaMapFlag,
    DmaUnmap,
    DmaUnmapFlag,
    FeatureFlag,
    FeatureIndex,
    Header,
    IoFdType,
    IrqInfoMsg,
    IrqSet,
    MessageReader,
    MigData,
    MigrationFeature,
    MigrationFlag,
    MigState,
    MigStateMsg,
    MsgFlag,
    RegionAccess,
    RegionCapId,
    RegionInfoMsg,
    RegionIoFds,
    RegionWriteMulti,
    SubRegionIoFd,
    Version,
    WriteOne,
    pack_message,
)

pytestmark = pytest.mark.skipif(sys.byteorder != "little",
                                reason="the fixtures are written in little-endian byte order")


def wire(text: str) -> bytes:
    """Hex digits, whitespace ignored, ``#`` starts a comment to the end of
    the line."""
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in text.splitlines()))


def split(message: bytes) -> tuple[Header, bytes]:
    return Header.unpack(message[:16]), message[16:]


def check_header(h: Header, msg_id: int, command: int, msg_size: int, flags: int,
                 error: int = 0) -> None:
    assert (h.msg_id, h.command, h.msg_size, h.flags, h.error) == \
        (msg_id, command, msg_size, flags, error)


def check_encode(message: bytes, payload: bytes) -> None:
    """The codec rebuilds the whole message from the decoded header and the
    freshly packed payload."""
    h = Header.unpack(message[:16])
    assert Header(h.msg_id, h.command, h.msg_size, h.flags, h.error).pack() == message[:16]
    assert pack_message(h.msg_id, h.command, payload, h.flags, h.error) == message


# --- the spec's numbers -----------------------------------------------------------------------


def test_command_numbers_are_the_spec_table():
    assert {c.name: int(c) for c in Command} == {
        "VERSION": 1, "DMA_MAP": 2, "DMA_UNMAP": 3, "DEVICE_GET_INFO": 4,
        "DEVICE_GET_REGION_INFO": 5, "DEVICE_GET_REGION_IO_FDS": 6,
        "DEVICE_GET_IRQ_INFO": 7, "DEVICE_SET_IRQS": 8, "REGION_READ": 9,
        "REGION_WRITE": 10, "DMA_READ": 11, "DMA_WRITE": 12, "DEVICE_RESET": 13,
        "REGION_WRITE_MULTI": 15, "DEVICE_FEATURE": 16, "MIG_DATA_READ": 17,
        "MIG_DATA_WRITE": 18,
    }


def test_flag_and_state_numbers_are_the_spec_tables():
    assert (int(MsgFlag.COMMAND), int(MsgFlag.REPLY), int(MsgFlag.NO_REPLY),
            int(MsgFlag.ERROR)) == (0x0, 0x1, 0x10, 0x20)
    assert (int(DmaMapFlag.READ), int(DmaMapFlag.WRITE)) == (1, 2)
    assert (int(FeatureFlag.MASK), int(FeatureFlag.GET), int(FeatureFlag.SET),
            int(FeatureFlag.PROBE)) == (0xFFFF, 1 << 16, 1 << 17, 1 << 18)
    assert {f.name: int(f) for f in FeatureIndex} == {
        "MIGRATION": 1, "MIG_DEVICE_STATE": 2, "DMA_LOGGING_START": 6,
        "DMA_LOGGING_STOP": 7, "DMA_LOGGING_REPORT": 8}
    # "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE": the state table
    assert {s.name: int(s) for s in MigState} == {
        "ERROR": 0, "STOP": 1, "RUNNING": 2, "STOP_COPY": 3, "RESUMING": 4,
        "RUNNING_P2P": 5, "PRE_COPY": 6, "PRE_COPY_P2P": 7}
    assert (int(MigrationFlag.STOP_COPY), int(MigrationFlag.P2P),
            int(MigrationFlag.PRE_COPY)) == (1, 2, 4)
    assert (int(IoFdType.IOEVENTFD), int(IoFdType.IOREGIONFD)) == (0, 1)
    assert (int(RegionCapId.SPARSE_MMAP), int(RegionCapId.TYPE)) == (1, 2)


# --- header -----------------------------------------------------------------------------------

ERROR_REPLY = wire("""
    0700        # msg_id 7
    0200        # command 2 (DMA_MAP)
    10000000    # msg_size 16: an error reply is the header only
    21000000    # flags: type 1 (reply) | bit 5 (Error)
    11000000    # error 17 (EEXIST: "a command to map over an existing region")
""")


def test_error_reply_header():
    h, payload = split(ERROR_REPLY)
    check_header(h, 7, Command.DMA_MAP, 16, 0x21, errno.EEXIST)
    assert h.is_reply and h.is_error and not h.no_reply
    assert payload == b""
    check_encode(ERROR_REPLY, b"")


NO_REPLY_WRITE = wire("""
    0900 0a00 20000000   # msg_id 9, command 10 (REGION_WRITE), msg_size 32
    10000000             # flags: type 0 (command) | bit 4 (No_reply)
    00000000             # error (reserved in a command)
    6400000000000000     # offset 0x64
    00000000             # region 0
    00000000             # count 0 (no data)
""")


def test_no_reply_command_header():
    h, payload = split(NO_REPLY_WRITE)
    check_header(h, 9, Command.REGION_WRITE, 32, 0x10)
    assert h.no_reply and not h.is_reply and not h.is_error
    body = RegionAccess.unpack(payload, with_data=True)
    assert (body.offset, body.region, body.count, body.data) == (0x64, 0, 0, b"")


def test_header_type_bits_are_0_to_3():
    h = Header.unpack(wire("0100 0100 10000000 0f000000 00000000"))
    assert not h.is_reply  # type 0xf is no reply: the whole nibble is the type
    h = Header.unpack(wire("0100 0100 10000000 31000000 00000000"))  # reply|error|bit 4
    assert h.is_reply and h.is_error and h.no_reply


# --- VERSION ----------------------------------------------------------------------------------

VERSION_JSON_REQ = (b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
                    b'"max_dma_maps":65535,"pgsizes":4096,"twin_socket":{"supported":true}}}\0')
VERSION_REQ = wire("""
    0100        # msg_id 1
    0100        # command 1 (VERSION)
    99000000    # msg_size 153 = 16 + 4 + 133
    00000000    # flags: command
    00000000    # error
    0000        # version major 0
    0200        # version minor 2
""") + VERSION_JSON_REQ     # version data, NUL-terminated JSON (133 bytes)

VERSION_JSON_REPLY = (b'{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":65536,'
                      b'"max_dma_maps":128,"pgsizes":4096,"write_multiple":true,'
                      b'"migration":{"pgsize":4096,"max_bitmap_size":1048576}}}\0')
VERSION_REPLY = wire("""
    0100 0100   # msg_id 1, command 1
    c0000000    # msg_size 192 = 16 + 4 + 172
    01000000    # flags: reply
    00000000
    0000 0100   # major 0, minor 1 (a reply may lower the minor)
""") + VERSION_JSON_REPLY


def test_version_request():
    h, payload = split(VERSION_REQ)
    check_header(h, 1, Command.VERSION, 153, MsgFlag.COMMAND)
    v = Version.unpack(payload)
    assert (v.major, v.minor) == (0, 2)
    assert v.capabilities is not None
    c = v.capabilities
    assert (c.max_msg_fds, c.max_data_xfer_size, c.max_dma_maps, c.pgsizes) == \
        (8, 1048576, 65535, 4096)
    assert c.twin_socket == {"supported": True}
    assert c.write_multiple is False and c.migration is None and c.extra == {}
    built = Version(0, 2, Capabilities(max_msg_fds=8, max_data_xfer_size=1048576,
                                       max_dma_maps=65535, pgsizes=4096,
                                       twin_socket={"supported": True}))
    assert built.pack() == payload
    check_encode(VERSION_REQ, built.pack())


def test_version_reply():
    h, payload = split(VERSION_REPLY)
    check_header(h, 1, Command.VERSION, 192, MsgFlag.REPLY)
    v = Version.unpack(payload)
    assert (v.major, v.minor) == (0, 1)
    c = v.caps
    assert (c.max_msg_fds, c.max_data_xfer_size, c.max_dma_maps, c.pgsizes) == \
        (1, 65536, 128, 4096)
    assert c.write_multiple is True
    assert c.migration == {"pgsize": 4096, "max_bitmap_size": 1048576}
    assert c.twin_socket is None
    built = Version(0, 1, Capabilities(max_msg_fds=1, max_data_xfer_size=65536,
                                       max_dma_maps=128, pgsizes=4096, write_multiple=True,
                                       migration={"pgsize": 4096,
                                                  "max_bitmap_size": 1048576}))
    check_encode(VERSION_REPLY, built.pack())


VERSION_BARE = wire("""
    0200 0100 14000000 00000000 00000000   # msg_id 2, VERSION, msg_size 20
    0000 0200                              # major 0, minor 2, no version data
""")


def test_version_without_data_takes_the_spec_defaults():
    h, payload = split(VERSION_BARE)
    check_header(h, 2, Command.VERSION, 20, 0)
    v = Version.unpack(payload)
    assert (v.major, v.minor, v.capabilities) == (0, 2, None)
    # the defaults the spec's capability table gives
    assert (v.caps.max_msg_fds, v.caps.max_data_xfer_size, v.caps.max_dma_maps,
            v.caps.pgsizes, v.caps.write_multiple) == (1, 1048576, 65535, 4096, False)
    check_encode(VERSION_BARE, Version(0, 2).pack())


# --- DMA_MAP ----------------------------------------------------------------------------------

DMA_MAP_REQ = wire("""
    0300 0200 30000000 00000000 00000000   # msg_id 3, DMA_MAP, msg_size 48 = 16 + 32
    20000000            # argsz 32
    03000000            # flags: readable | writeable
    0010000000000000    # offset 0x1000 into the fd
    0000000001000000    # address 0x1_0000_0000
    0000200000000000    # size 0x20_0000
""")
DMA_MAP_REPLY = wire("0300 0200 10000000 01000000 00000000")  # no payload


def test_dma_map_request_and_reply():
    h, payload = split(DMA_MAP_REQ)
    check_header(h, 3, Command.DMA_MAP, 48, 0)
    m = DmaMap.unpack(payload)
    assert (m.argsz, m.flags, m.offset, m.address, m.size) == \
        (32, DmaMapFlag.READ | DmaMapFlag.WRITE, 0x1000, 0x1_0000_0000, 0x20_0000)
    check_encode(DMA_MAP_REQ, DmaMap(address=0x1_0000_0000, size=0x20_0000, flags=3,
                                     offset=0x1000).pack())
    h, payload = split(DMA_MAP_REPLY)
    check_header(h, 3, Command.DMA_MAP, 16, MsgFlag.REPLY)
    assert payload == b""
    check_encode(DMA_MAP_REPLY, b"")


DMA_MAP_READONLY_NO_FD = wire("""
    0400 0200 30000000 00000000 00000000
    20000000 01000000   # argsz 32, flags: readable only
    0000000000000000    # offset 0: not mappable (no fd)
    00f0ffff00000000    # address 0xffff_f000
    0010000000000000    # size 0x1000
""")


def test_dma_map_read_only_without_fd():
    m = DmaMap.unpack(split(DMA_MAP_READONLY_NO_FD)[1])
    assert (m.flags, m.offset, m.address, m.size) == (DmaMapFlag.READ, 0, 0xFFFF_F000, 0x1000)
    check_encode(DMA_MAP_READONLY_NO_FD,
                 DmaMap(address=0xFFFF_F000, size=0x1000, flags=DmaMapFlag.READ).pack())


# --- DMA_UNMAP --------------------------------------------------------------------------------

DMA_UNMAP_REQ = wire("""
    0500 0300 28000000 00000000 00000000   # msg_id 5, DMA_UNMAP, msg_size 40 = 16 + 24
    18000000            # argsz 24 (largest reply payload)
    00000000            # flags (unused in this version)
    0000000001000000    # address 0x1_0000_0000
    0000200000000000    # size 0x20_0000
""")
DMA_UNMAP_REPLY = wire("""
    0500 0300 28000000 01000000 00000000   # reply: "the original DMA entry in the request"
    18000000 00000000 0000000001000000 0000200000000000
""")


def test_dma_unmap_request_and_reply():
    for message, flags in ((DMA_UNMAP_REQ, 0), (DMA_UNMAP_REPLY, MsgFlag.REPLY)):
        h, payload = split(message)
        check_header(h, 5, Command.DMA_UNMAP, 40, flags)
        u = DmaUnmap.unpack(payload, reply=bool(flags))
        assert (u.argsz, u.flags, u.address, u.size) == (24, 0, 0x1_0000_0000, 0x20_0000)
        assert u.bitmap == b"" and not u.wants_bitmap
        check_encode(message, DmaUnmap(address=0x1_0000_0000, size=0x20_0000).pack())


# libvfio-user's extension (flags bit 0, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP):
# struct vfio_user_bitmap {pgsize u64, size u64} follows the entry; the reply appends the bitmap.
DMA_UNMAP_BITMAP_REQ = wire("""
    0600 0300 38000000 00000000 00000000   # msg_size 56 = 16 + 24 + 16
    30000000            # argsz 48 = 24 + 16 + 8 bytes of bitmap
    01000000            # flags: GET_DIRTY_BITMAP
    0000100000000000    # address 0x10_0000
    0000040000000000    # size 0x4_0000 (64 pages of 4 KiB)
    0010000000000000    # bitmap.pgsize 4096
    0800000000000000    # bitmap.size 8 bytes
""")
DMA_UNMAP_BITMAP_REPLY = wire("""
    0600 0300 40000000 01000000 00000000   # msg_size 64 = 16 + 48
    30000000 01000000 0000100000000000 0000040000000000 0010000000000000 0800000000000000
    0500000000000080    # the bitmap: pages 0, 2 and 63 dirty
""")


def test_dma_unmap_with_dirty_bitmap():
    h, payload = split(DMA_UNMAP_BITMAP_REQ)
    check_header(h, 6, Command.DMA_UNMAP, 56, 0)
    u = DmaUnmap.unpack(payload)
    assert (u.argsz, u.flags, u.address, u.size, u.bitmap_pgsize, u.bitmap_size, u.bitmap) == \
        (48, DmaUnmapFlag.GET_DIRTY_BITMAP, 0x10_0000, 0x4_0000, 4096, 8, b"")
    assert u.reply_size == 48
    check_encode(DMA_UNMAP_BITMAP_REQ,
                 DmaUnmap(address=0x10_0000, size=0x4_0000, flags=1, argsz=48,
                          bitmap_pgsize=4096, bitmap_size=8).pack())
    h, payload = split(DMA_UNMAP_BITMAP_REPLY)
    check_header(h, 6, Command.DMA_UNMAP, 64, 1)
    r = DmaUnmap.unpack(payload, reply=True)
    assert (r.address, r.size, r.bitmap_pgsize, r.bitmap_size) == (0x10_0000, 0x4_0000, 4096, 8)
    assert int.from_bytes(r.bitmap, "little") == (1 << 0) | (1 << 2) | (1 << 63)
    check_encode(DMA_UNMAP_BITMAP_REPLY,
                 DmaUnmap(address=0x10_0000, size=0x4_0000, flags=1, argsz=48,
                          bitmap_pgsize=4096, bitmap_size=8,
                          bitmap=bytes.fromhex("0500000000000080")).pack())


DMA_UNMAP_ALL = wire("""
    0700 0300 28000000 00000000 00000000
    18000000 02000000   # argsz 24, flags: ALL (VFIO_DMA_UNMAP_FLAG_ALL)
    0000000000000000 0000000000000000
""")


def test_dma_unmap_all():
    u = DmaUnmap.unpack(split(DMA_UNMAP_ALL)[1])
    assert (u.flags, u.address, u.size) == (DmaUnmapFlag.ALL, 0, 0)
    check_encode(DMA_UNMAP_ALL, DmaUnmap(address=0, size=0, flags=DmaUnmapFlag.ALL).pack())


# --- DEVICE_GET_INFO --------------------------------------------------------------------------

DEVICE_INFO_REQ = wire("""
    0800 0400 20000000 00000000 00000000   # msg_id 8, DEVICE_GET_INFO, msg_size 32
    10000000            # argsz 16
    00000000 00000000 00000000   # flags, num_regions, num_irqs: zero in a request
""")
DEVICE_INFO_REPLY = wire("""
    0800 0400 20000000 01000000 00000000
    10000000            # argsz 16
    03000000            # flags: VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI
    09000000            # num_regions 9
    05000000            # num_irqs 5
""")


def test_device_get_info():
    h, payload = split(DEVICE_INFO_REQ)
    check_header(h, 8, Command.DEVICE_GET_INFO, 32, 0)
    d = DeviceInfoMsg.unpack(payload)
    assert (d.argsz, d.flags, d.num_regions, d.num_irqs) == (16, 0, 0, 0)
    check_encode(DEVICE_INFO_REQ, DeviceInfoMsg().pack())
    h, payload = split(DEVICE_INFO_REPLY)
    check_header(h, 8, Command.DEVICE_GET_INFO, 32, 1)
    d = DeviceInfoMsg.unpack(payload, reply=True)
    assert (d.argsz, int(d.flags), d.num_regions, d.num_irqs) == (16, 3, 9, 5)
    check_encode(DEVICE_INFO_REPLY,
                 DeviceInfoMsg(argsz=16, flags=3, num_regions=9, num_irqs=5).pack())


# --- DEVICE_GET_REGION_INFO -------------------------------------------------------------------

REGION_INFO_REQ = wire("""
    0a00 0500 30000000 00000000 00000000   # msg_id 10, REGION_INFO, msg_size 48 = 16 + 32
    00010000            # argsz 256 (largest reply)
    00000000            # flags
    02000000            # index 2 (BAR2)
    00000000            # cap_offset
    0000000000000000    # size
    0000000000000000    # offset
""")
REGION_INFO_REPLY = wire("""
    0a00 0500 30000000 01000000 00000000
    20000000            # argsz 32: no capabilities
    03000000            # flags: READ | WRITE
    07000000            # index 7 (the config space)
    00000000            # cap_offset 0
    0001000000000000    # size 256
    0000000000070000    # offset 7 << 40 (VFIO_PCI_INDEX_TO_OFFSET, as the kernel does)
""")


def test_region_info_request_and_plain_reply():
    h, payload = split(REGION_INFO_REQ)
    check_header(h, 10, Command.DEVICE_GET_REGION_INFO, 48, 0)
    r = RegionInfoMsg.unpack(payload)
    assert (r.argsz, r.flags, r.index, r.cap_offset, r.size, r.offset) == (256, 0, 2, 0, 0, 0)
    check_encode(REGION_INFO_REQ, RegionInfoMsg(index=2, argsz=256).pack())
    h, payload = split(REGION_INFO_REPLY)
    check_header(h, 10, Command.DEVICE_GET_REGION_INFO, 48, 1)
    r = RegionInfoMsg.unpack(payload, reply=True)
    assert (r.argsz, r.flags, r.index, r.cap_offset, r.size, r.offset) == \
        (32, 3, 7, 0, 256, 7 << 40)
    assert r.sparse_areas is None and r.type is None
    check_encode(REGION_INFO_REPLY, RegionInfoMsg(index=7, flags=3, size=256,
                                                  offset=7 << 40).pack())


REGION_INFO_CAPS_REPLY = wire("""
    0b00 0500 70000000 01000000 00000000   # msg_size 112 = 16 + 96
    60000000            # argsz 96 = 32 + 48 (sparse mmap cap) + 16 (type cap)
    0f000000            # flags: READ | WRITE | MMAP | CAPS
    02000000            # index 2
    20000000            # cap_offset 32 (from the start of the region info)
    0040000000000000    # size 0x4000
    0000000000020000    # offset 2 << 40
    # VFIO cap header at 32: id 1 (SPARSE_MMAP), version 1, next 80
    0100 0100 50000000
    02000000 00000000   # nr_areas 2, reserved
    0000000000000000 0010000000000000   # area 0: offset 0, size 0x1000
    0030000000000000 0008000000000000   # area 1: offset 0x3000, size 0x800
    # VFIO cap header at 80: id 2 (TYPE), version 1, next 0 (end)
    0200 0100 00000000
    00000080 01000000   # type 0x8000_0000 (VFIO_REGION_TYPE_PCI_VENDOR_TYPE), subtype 1
""")
REGION_INFO_CAPS_SHORT_REPLY = wire("""
    0c00 0500 30000000 01000000 00000000   # the request's argsz was 32: header part only
    60000000            # argsz 96: what the capabilities would need
    0f000000 02000000
    00000000            # cap_offset 0: no chain in this reply
    0040000000000000 0000000000020000
""")


def test_region_info_reply_with_capabilities():
    h, payload = split(REGION_INFO_CAPS_REPLY)
    check_header(h, 11, Command.DEVICE_GET_REGION_INFO, 112, 1)
    r = RegionInfoMsg.unpack(payload, reply=True)
    assert (r.argsz, r.flags, r.index, r.cap_offset, r.size, r.offset) == \
        (96, 0xF, 2, 32, 0x4000, 2 << 40)
    assert r.sparse_areas == ((0, 0x1000), (0x3000, 0x800))
    assert r.type == (0x8000_0000, 1)
    built = RegionInfoMsg(index=2, flags=0x7, size=0x4000, offset=2 << 40,
                          sparse_areas=((0, 0x1000), (0x3000, 0x800)), type=(0x8000_0000, 1))
    assert built.full_size() == 96
    check_encode(REGION_INFO_CAPS_REPLY, built.pack())
    check_encode(REGION_INFO_CAPS_SHORT_REPLY, built.pack(max_size=32))
    short = RegionInfoMsg.unpack(split(REGION_INFO_CAPS_SHORT_REPLY)[1], reply=True)
    assert (short.argsz, short.cap_offset, short.sparse_areas, short.type) == (96, 0, None, None)


# --- DEVICE_GET_REGION_IO_FDS -----------------------------------------------------------------

IO_FDS_REQ = wire("""
    0d00 0600 20000000 00000000 00000000   # msg_id 13, REGION_IO_FDS, msg_size 32
    00100000            # argsz 4096
    00000000            # flags 0
    03000000            # index 3
    00000000            # count 0
""")
IO_FDS_REPLY = wire("""
    0d00 0600 70000000 01000000 00000000   # msg_size 112 = 16 + 16 + 2 * 40
    60000000            # argsz 96
    00000000            # flags 0
    03000000            # index 3
    02000000            # count 2
    # sub-region 0, ioeventfd
    0010000000000000    # offset 0x1000
    0400000000000000    # size 4
    00000000            # fd_index 0
    00000000            # type 0 (VFIO_USER_IO_FD_TYPE_IOEVENTFD)
    01000000            # flags 1 (KVM_IOEVENTFD_FLAG_DATAMATCH)
    00000000            # padding
    efbeadde00000000    # datamatch 0xdeadbeef
    # sub-region 1, ioregionfd
    0020000000000000    # offset 0x2000
    0800000000000000    # size 8
    01000000            # fd_index 1
    01000000            # type 1 (VFIO_USER_IO_FD_TYPE_IOREGIONFD)
    02000000            # flags 2
    00000000            # padding
    8877665544332211    # user_data 0x1122334455667788
""")


def test_region_io_fds():
    h, payload = split(IO_FDS_REQ)
    check_header(h, 13, Command.DEVICE_GET_REGION_IO_FDS, 32, 0)
    q = RegionIoFds.unpack(payload)
    assert (q.argsz, q.flags, q.index, q.count, q.sub_regions) == (4096, 0, 3, 0, ())
    check_encode(IO_FDS_REQ, RegionIoFds(index=3, argsz=4096).pack())
    h, payload = split(IO_FDS_REPLY)
    check_header(h, 13, Command.DEVICE_GET_REGION_IO_FDS, 112, 1)
    r = RegionIoFds.unpack(payload, reply=True)
    assert (r.argsz, r.flags, r.index, r.count) == (96, 0, 3, 2)
    a, b = r.sub_regions
    assert (a.offset, a.size, a.fd_index, a.type, a.flags, a.data) == \
        (0x1000, 4, 0, IoFdType.IOEVENTFD, 1, 0xDEADBEEF)
    assert (b.offset, b.size, b.fd_index, b.type, b.flags, b.data) == \
        (0x2000, 8, 1, IoFdType.IOREGIONFD, 2, 0x1122334455667788)
    built = RegionIoFds(index=3, sub_regions=(
        SubRegionIoFd(0x1000, 4, 0, IoFdType.IOEVENTFD, 1, 0xDEADBEEF),
        SubRegionIoFd(0x2000, 8, 1, IoFdType.IOREGIONFD, 2, 0x1122334455667788)))
    check_encode(IO_FDS_REPLY, built.pack(max_size=4096))


# --- DEVICE_GET_IRQ_INFO ----------------------------------------------------------------------

IRQ_INFO_REQ = wire("""
    0e00 0700 20000000 00000000 00000000   # msg_id 14, IRQ_INFO, msg_size 32
    10000000 00000000   # argsz 16, flags 0
    02000000            # index 2 (VFIO_PCI_MSIX_IRQ_INDEX)
    00000000            # count 0
""")
IRQ_INFO_REPLY = wire("""
    0e00 0700 20000000 01000000 00000000
    10000000            # argsz 16
    0b000000            # flags: EVENTFD | MASKABLE | NORESIZE
    02000000            # index 2
    20000000            # count 32
""")


def test_irq_info():
    h, payload = split(IRQ_INFO_REQ)
    check_header(h, 14, Command.DEVICE_GET_IRQ_INFO, 32, 0)
    q = IrqInfoMsg.unpack(payload)
    assert (q.argsz, q.flags, q.index, q.count) == (16, 0, 2, 0)
    check_encode(IRQ_INFO_REQ, IrqInfoMsg(index=2).pack())
    h, payload = split(IRQ_INFO_REPLY)
    check_header(h, 14, Command.DEVICE_GET_IRQ_INFO, 32, 1)
    r = IrqInfoMsg.unpack(payload, reply=True)
    assert (r.argsz, int(r.flags), r.index, r.count) == (16, 0xB, 2, 32)
    check_encode(IRQ_INFO_REPLY, IrqInfoMsg(index=2, flags=0xB, count=32).pack())


# --- DEVICE_SET_IRQS --------------------------------------------------------------------------

SET_IRQS_EVENTFD = wire("""
    0f00 0800 24000000 00000000 00000000   # msg_id 15, SET_IRQS, msg_size 36 = 16 + 20
    14000000            # argsz 20 (the whole request payload)
    24000000            # flags: DATA_EVENTFD | ACTION_TRIGGER (the eventfds go as SCM_RIGHTS)
    02000000            # index 2
    03000000            # start 3
    05000000            # count 5
""")
SET_IRQS_BOOL = wire("""
    1000 0800 27000000 00000000 00000000   # msg_size 39 = 16 + 20 + 3
    17000000            # argsz 23
    0a000000            # flags: DATA_BOOL | ACTION_MASK
    01000000            # index 1
    06000000            # start 6
    03000000            # count 3
    01 00 01            # data: mask sub-indexes 6 and 8
""")
SET_IRQS_NONE = wire("""
    1100 0800 24000000 00000000 00000000
    14000000 11000000   # argsz 20, flags: DATA_NONE | ACTION_UNMASK
    00000000            # index 0 (INTx)
    00000000 01000000   # start 0, count 1
""")
SET_IRQS_REPLY = wire("1100 0800 10000000 01000000 00000000")  # no payload


def test_set_irqs_eventfd():
    h, payload = split(SET_IRQS_EVENTFD)
    check_header(h, 15, Command.DEVICE_SET_IRQS, 36, 0)
    s = IrqSet.unpack(payload)
    assert (s.argsz, s.flags, s.index, s.start, s.count, s.bools) == \
        (20, 0x24, 2, 3, 5, None)
    check_encode(SET_IRQS_EVENTFD, IrqSet(index=2, flags=0x24, start=3, count=5).pack())


def test_set_irqs_bool():
    h, payload = split(SET_IRQS_BOOL)
    check_header(h, 16, Command.DEVICE_SET_IRQS, 39, 0)
    s = IrqSet.unpack(payload)
    assert (s.argsz, s.flags, s.index, s.start, s.count, s.bools) == \
        (23, 0x0A, 1, 6, 3, (True, False, True))
    check_encode(SET_IRQS_BOOL, IrqSet(index=1, flags=0x0A, start=6, count=3,
                                       bools=(True, False, True)).pack())


def test_set_irqs_none_and_reply():
    h, payload = split(SET_IRQS_NONE)
    check_header(h, 17, Command.DEVICE_SET_IRQS, 36, 0)
    s = IrqSet.unpack(payload)
    assert (s.argsz, s.flags, s.index, s.start, s.count) == (20, 0x11, 0, 0, 1)
    check_encode(SET_IRQS_NONE, IrqSet(index=0, flags=0x11, start=0, count=1).pack())
    h, payload = split(SET_IRQS_REPLY)
    check_header(h, 17, Command.DEVICE_SET_IRQS, 16, 1)
    assert payload == b""


# --- REGION_READ / REGION_WRITE ---------------------------------------------------------------

REGION_READ_REQ = wire("""
    1200 0900 20000000 00000000 00000000   # msg_id 18, REGION_READ, msg_size 32
    0800000000000000    # offset 8
    01000000            # region 1
    04000000            # count 4
""")
REGION_READ_REPLY = wire("""
    1200 0900 24000000 01000000 00000000   # msg_size 36 = 16 + 16 + 4
    0800000000000000 01000000 04000000
    ed000001            # data: 0x010000ed
""")
REGION_WRITE_REQ = wire("""
    1300 0a00 28000000 00000000 00000000   # msg_id 19, REGION_WRITE, msg_size 40
    8000000000000000    # offset 0x80
    00000000            # region 0
    08000000            # count 8
    0100000000000040    # data
""")
REGION_WRITE_REPLY = wire("""
    1300 0a00 20000000 01000000 00000000
    8000000000000000 00000000 08000000     # offset, region, count: no data
""")


def test_region_read():
    h, payload = split(REGION_READ_REQ)
    check_header(h, 18, Command.REGION_READ, 32, 0)
    a = RegionAccess.unpack(payload, with_data=False)
    assert (a.offset, a.region, a.count, a.data) == (8, 1, 4, b"")
    check_encode(REGION_READ_REQ, RegionAccess(region=1, offset=8, count=4).pack())
    h, payload = split(REGION_READ_REPLY)
    check_header(h, 18, Command.REGION_READ, 36, 1)
    a = RegionAccess.unpack(payload, with_data=True)
    assert (a.offset, a.region, a.count) == (8, 1, 4)
    assert int.from_bytes(a.data, "little") == 0x010000ED
    check_encode(REGION_READ_REPLY, RegionAccess(1, 8, 4, bytes.fromhex("ed000001")).pack())


def test_region_access_heads_packed_whole_and_from_parts():
    # The server's and the client's fast paths pack these heads without the
    # message classes: REGION_ACCESS_MESSAGE field by field, REGION_ACCESS_PARTS
    # from the parts region_access_parts fixes (the client's register reads).
    from pyvfio.user.protocol import (
        REGION_ACCESS_MESSAGE,
        REGION_ACCESS_PARTS,
        region_access_parts,
    )

    assert REGION_ACCESS_MESSAGE.pack(18, 9, 32, 0, 0, 8, 1, 4) == REGION_READ_REQ
    assert REGION_ACCESS_MESSAGE.pack(18, 9, 36, 1, 0, 8, 1, 4) == REGION_READ_REPLY[:32]
    request, region_count = region_access_parts(9, 32, 0, 1, 4)
    reply, reply_region_count = region_access_parts(9, 36, 1, 1, 4)
    assert (request, reply) == (REGION_READ_REQ[2:16], REGION_READ_REPLY[2:16])
    assert region_count == reply_region_count == REGION_READ_REQ[24:32]
    assert REGION_ACCESS_PARTS.pack(18, request, 8, region_count) == REGION_READ_REQ
    assert REGION_ACCESS_PARTS.pack(18, reply, 8, region_count) == REGION_READ_REPLY[:32]
    assert REGION_ACCESS_MESSAGE.unpack(REGION_WRITE_REPLY) == (19, 10, 32, 1, 0, 0x80, 0, 8)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1))
def test_region_access_parts_pack_what_the_whole_message_packs(
        msg_id: int, command: int, size: int, flags: int, offset: int, region: int,
        count: int) -> None:
    from pyvfio.user.protocol import (
        REGION_ACCESS_MESSAGE,
        REGION_ACCESS_PARTS,
        region_access_parts,
    )

    head, region_count = region_access_parts(command, size, flags, region, count)
    assert REGION_ACCESS_PARTS.pack(msg_id, head, offset, region_count) == \
        REGION_ACCESS_MESSAGE.pack(msg_id, command, size, flags, 0, offset, region, count)


def test_region_write():
    h, payload = split(REGION_WRITE_REQ)
    check_header(h, 19, Command.REGION_WRITE, 40, 0)
    a = RegionAccess.unpack(payload, with_data=True)
    assert (a.offset, a.region, a.count) == (0x80, 0, 8)
    assert int.from_bytes(a.data, "little") == 0x4000_0000_0000_0001
    check_encode(REGION_WRITE_REQ,
                 RegionAccess(0, 0x80, 8, (0x4000_0000_0000_0001).to_bytes(8, "little")).pack())
    h, payload = split(REGION_WRITE_REPLY)
    check_header(h, 19, Command.REGION_WRITE, 32, 1)
    a = RegionAccess.unpack(payload, with_data=False)
    assert (a.offset, a.region, a.count, a.data) == (0x80, 0, 8, b"")
    check_encode(REGION_WRITE_REPLY, RegionAccess(0, 0x80, 8).pack())


# --- DMA_READ / DMA_WRITE (server -> client) --------------------------------------------------

DMA_READ_REQ = wire("""
    0100 0b00 20000000 00000000 00000000   # the server's msg_id 1, DMA_READ, msg_size 32
    4000000001000000    # address 0x1_0000_0040
    0600000000000000    # count 6
""")
DMA_READ_REPLY = wire("""
    0100 0b00 26000000 01000000 00000000   # msg_size 38 = 16 + 16 + 6
    4000000001000000 0600000000000000
    68656c6c6f21        # data "hello!"
""")
DMA_WRITE_REQ = wire("""
    0200 0c00 23000000 00000000 00000000   # msg_id 2, DMA_WRITE, msg_size 35
    0000040000000000    # address 0x4_0000
    0300000000000000    # count 3
    616263              # data "abc"
""")
DMA_WRITE_REPLY_SPEC = wire("""
    0200 0c00 1c000000 01000000 00000000   # msg_size 28 = 16 + 12
    0000040000000000    # address
    03000000            # count: 4 bytes in the spec's reply table
""")
DMA_WRITE_REPLY_LIBVFIO_USER = wire("""
    0200 0c00 20000000 01000000 00000000   # msg_size 32: libvfio-user echoes the 16-byte head
    0000040000000000 0300000000000000
""")


def test_dma_read():
    h, payload = split(DMA_READ_REQ)
    check_header(h, 1, Command.DMA_READ, 32, 0)
    d = DmaAccess.unpack(payload, with_data=False)
    assert (d.address, d.count, d.data) == (0x1_0000_0040, 6, b"")
    check_encode(DMA_READ_REQ, DmaAccess(0x1_0000_0040, 6).pack())
    h, payload = split(DMA_READ_REPLY)
    check_header(h, 1, Command.DMA_READ, 38, 1)
    d = DmaAccess.unpack(payload, with_data=True)
    assert (d.address, d.count, d.data) == (0x1_0000_0040, 6, b"hello!")
    check_encode(DMA_READ_REPLY, DmaAccess(0x1_0000_0040, 6, b"hello!").pack())


def test_dma_write():
    h, payload = split(DMA_WRITE_REQ)
    check_header(h, 2, Command.DMA_WRITE, 35, 0)
    d = DmaAccess.unpack(payload, with_data=True)
    assert (d.address, d.count, d.data) == (0x4_0000, 3, b"abc")
    check_encode(DMA_WRITE_REQ, DmaAccess(0x4_0000, 3, b"abc").pack())
    for message, size in ((DMA_WRITE_REPLY_SPEC, 28), (DMA_WRITE_REPLY_LIBVFIO_USER, 32)):
        h, payload = split(message)
        check_header(h, 2, Command.DMA_WRITE, size, 1)
        d = DmaAccess.unpack(payload, with_data=False)
        assert (d.address, d.count, d.data) == (0x4_0000, 3, b"")
    # pyvfio answers as libvfio-user does, which a spec-table reader takes too
    check_encode(DMA_WRITE_REPLY_LIBVFIO_USER, DmaAccess(0x4_0000, 3).pack())


# --- DEVICE_RESET -----------------------------------------------------------------------------

RESET_REQ = wire("1400 0d00 10000000 00000000 00000000")    # msg_id 20, DEVICE_RESET, no payload
RESET_REPLY = wire("1400 0d00 10000000 01000000 00000000")


def test_device_reset():
    for message, flags in ((RESET_REQ, 0), (RESET_REPLY, 1)):
        h, payload = split(message)
        check_header(h, 20, Command.DEVICE_RESET, 16, flags)
        assert payload == b""
        check_encode(message, b"")


# --- REGION_WRITE_MULTI -----------------------------------------------------------------------

WRITE_MULTI_REQ = wire("""
    1500 0f00 48000000 00000000 00000000   # msg_id 21, WRITE_MULTI, msg_size 72 = 16 + 8 + 2*24
    0200000000000000    # wr_cnt 2
    6000000000000000    # write 0: offset 0x60
    00000000            #   region 0
    04000000            #   count 4
    0100000000000000    #   data (8 bytes; 4 used)
    8800000000000000    # write 1: offset 0x88
    02000000            #   region 2
    08000000            #   count 8
    0102030405060708    #   data
""")
WRITE_MULTI_REPLY = wire("""
    1500 0f00 18000000 01000000 00000000
    0200000000000000    # wr_cnt 2: writes completed
""")


def test_region_write_multi():
    h, payload = split(WRITE_MULTI_REQ)
    check_header(h, 21, Command.REGION_WRITE_MULTI, 72, 0)
    m = RegionWriteMulti.unpack(payload)
    assert m.wr_cnt == 2
    a, b = m.writes
    assert (a.offset, a.region, a.data) == (0x60, 0, b"\x01\x00\x00\x00")
    assert (b.offset, b.region, b.data) == (0x88, 2, bytes.fromhex("0102030405060708"))
    check_encode(WRITE_MULTI_REQ, RegionWriteMulti((
        WriteOne(region=0, offset=0x60, data=b"\x01\x00\x00\x00"),
        WriteOne(region=2, offset=0x88, data=bytes.fromhex("0102030405060708")))).pack())
    h, payload = split(WRITE_MULTI_REPLY)
    check_header(h, 21, Command.REGION_WRITE_MULTI, 24, 1)
    r = RegionWriteMulti.unpack(payload, reply=True)
    assert (r.wr_cnt, r.writes) == (2, ())
    check_encode(WRITE_MULTI_REPLY, RegionWriteMulti(wr_cnt=2).pack())


# --- DEVICE_FEATURE ---------------------------------------------------------------------------

FEATURE_MIGRATION_REQ = wire("""
    1600 1000 18000000 00000000 00000000   # msg_id 22, DEVICE_FEATURE, msg_size 24
    10000000            # argsz 16: room for the 8-byte reply data
    01000100            # flags: index 1 (MIGRATION) | GET (bit 16)
""")
FEATURE_MIGRATION_REPLY = wire("""
    1600 1000 20000000 01000000 00000000   # msg_size 32
    10000000 01000100
    0500000000000000    # data: flags STOP_COPY | PRE_COPY
""")


def test_feature_migration_get():
    h, payload = split(FEATURE_MIGRATION_REQ)
    check_header(h, 22, Command.DEVICE_FEATURE, 24, 0)
    f = DeviceFeature.unpack(payload)
    assert (f.argsz, f.flags, f.feature, f.get, f.set, f.probe, f.data) == \
        (16, 0x10001, FeatureIndex.MIGRATION, True, False, False, b"")
    check_encode(FEATURE_MIGRATION_REQ,
                 DeviceFeature(FeatureFlag.GET | FeatureIndex.MIGRATION, argsz=16).pack())
    h, payload = split(FEATURE_MIGRATION_REPLY)
    check_header(h, 22, Command.DEVICE_FEATURE, 32, 1)
    f = DeviceFeature.unpack(payload, reply=True)
    assert (f.argsz, f.flags) == (16, 0x10001)
    mig = MigrationFeature.unpack(f.data)
    assert mig.flags == MigrationFlag.STOP_COPY | MigrationFlag.PRE_COPY == 5
    check_encode(FEATURE_MIGRATION_REPLY,
                 DeviceFeature(0x10001, MigrationFeature(5).pack()).pack())


FEATURE_STATE_SET = wire("""
    1700 1000 20000000 00000000 00000000   # msg_id 23, msg_size 32
    10000000            # argsz 16
    02000200            # flags: index 2 (MIG_DEVICE_STATE) | SET (bit 17)
    03000000            # device_state 3 (VFIO_DEVICE_STATE_STOP_COPY)
    ffffffff            # data_fd: unused in vfio-user
""")
FEATURE_STATE_SET_REPLY = wire("""
    1700 1000 20000000 01000000 00000000
    10000000 02000200 03000000 ffffffff
""")
FEATURE_STATE_GET_REPLY = wire("""
    1800 1000 20000000 01000000 00000000
    10000000 02000100   # flags: index 2 | GET
    04000000            # device_state 4 (VFIO_DEVICE_STATE_RESUMING)
    ffffffff
""")


def test_feature_mig_device_state():
    for message, flags in ((FEATURE_STATE_SET, 0), (FEATURE_STATE_SET_REPLY, 1)):
        h, payload = split(message)
        check_header(h, 23, Command.DEVICE_FEATURE, 32, flags)
        f = DeviceFeature.unpack(payload, reply=bool(flags))
        assert (f.argsz, f.feature, f.set, f.get) == (16, FeatureIndex.MIG_DEVICE_STATE, True,
                                                      False)
        s = MigStateMsg.unpack(f.data)
        assert (s.device_state, s.data_fd) == (MigState.STOP_COPY, 0xFFFFFFFF)
        assert s.device_state == 3
        check_encode(message, DeviceFeature(FeatureFlag.SET | FeatureIndex.MIG_DEVICE_STATE,
                                            MigStateMsg(MigState.STOP_COPY).pack()).pack())
    h, payload = split(FEATURE_STATE_GET_REPLY)
    check_header(h, 24, Command.DEVICE_FEATURE, 32, 1)
    f = DeviceFeature.unpack(payload, reply=True)
    s = MigStateMsg.unpack(f.data)
    assert (f.feature, f.get, s.device_state) == (2, True, 4)
    assert MigState(s.device_state) is MigState.RESUMING
    check_encode(FEATURE_STATE_GET_REPLY,
                 DeviceFeature(0x10002, MigStateMsg(MigState.RESUMING).pack()).pack())


FEATURE_PROBE = wire("""
    1900 1000 18000000 00000000 00000000   # msg_id 25, msg_size 24
    08000000            # argsz 8
    06000600            # flags: index 6 (DMA_LOGGING_START) | SET | PROBE
""")


def test_feature_probe_request_and_reply():
    h, payload = split(FEATURE_PROBE)
    check_header(h, 25, Command.DEVICE_FEATURE, 24, 0)
    f = DeviceFeature.unpack(payload)
    assert (f.argsz, f.feature, f.get, f.set, f.probe, f.data) == \
        (8, FeatureIndex.DMA_LOGGING_START, False, True, True, b"")
    built = DeviceFeature(FeatureFlag.PROBE | FeatureFlag.SET | FeatureIndex.DMA_LOGGING_START)
    check_encode(FEATURE_PROBE, built.pack())
    # "The reply payload must be the same as the request payload for ... probing"
    reply = FEATURE_PROBE[:8] + b"\x01\x00\x00\x00" + FEATURE_PROBE[12:]
    f = DeviceFeature.unpack(split(reply)[1], reply=True)
    assert (f.argsz, f.flags) == (8, 0x60006)


LOGGING_START = wire("""
    1a00 1000 38000000 00000000 00000000   # msg_id 26, msg_size 56 = 16 + 8 + 16 + 16
    28000000            # argsz 40
    06000200            # flags: index 6 (DMA_LOGGING_START) | SET
    0010000000000000    # page_size 4096
    01000000            # num_ranges 1
    00000000            # reserved
    0000000001000000    # range 0: iova 0x1_0000_0000
    0000200000000000    #          length 0x20_0000
""")
LOGGING_STOP = wire("""
    1b00 1000 28000000 00000000 00000000   # msg_id 27, msg_size 40
    18000000            # argsz 24
    07000200            # flags: index 7 (DMA_LOGGING_STOP) | SET
    0010000000000000 00000000 00000000     # page_size 4096, num_ranges 0, reserved
""")


def test_feature_dma_logging_start_and_stop():
    h, payload = split(LOGGING_START)
    check_header(h, 26, Command.DEVICE_FEATURE, 56, 0)
    f = DeviceFeature.unpack(payload)
    assert (f.argsz, f.feature, f.set) == (40, FeatureIndex.DMA_LOGGING_START, True)
    c = DmaLoggingControl.unpack(f.data)
    assert c.page_size == 4096
    assert c.ranges == (DmaLoggingRange(iova=0x1_0000_0000, length=0x20_0000),)
    check_encode(LOGGING_START, DeviceFeature(
        FeatureFlag.SET | FeatureIndex.DMA_LOGGING_START,
        DmaLoggingControl(4096, (DmaLoggingRange(0x1_0000_0000, 0x20_0000),)).pack()).pack())
    h, payload = split(LOGGING_STOP)
    check_header(h, 27, Command.DEVICE_FEATURE, 40, 0)
    f = DeviceFeature.unpack(payload)
    c = DmaLoggingControl.unpack(f.data)
    assert (f.feature, c.page_size, c.ranges) == (FeatureIndex.DMA_LOGGING_STOP, 4096, ())
    check_encode(LOGGING_STOP, DeviceFeature(FeatureFlag.SET | FeatureIndex.DMA_LOGGING_STOP,
                                             DmaLoggingControl(4096).pack()).pack())


LOGGING_REPORT_REQ = wire("""
    1c00 1000 30000000 00000000 00000000   # msg_id 28, msg_size 48 = 16 + 8 + 24
    28000000            # argsz 40: room for the 8-byte bitmap
    08000100            # flags: index 8 (DMA_LOGGING_REPORT) | GET
    0000100000000000    # iova 0x10_0000
    0000040000000000    # length 0x4_0000 (64 pages)
    0010000000000000    # page_size 4096
""")
LOGGING_REPORT_REPLY = wire("""
    1c00 1000 38000000 01000000 00000000   # msg_size 56 = 16 + 8 + 24 + 8
    28000000 08000100
    0000100000000000 0000040000000000 0010000000000000
    0300000000000080    # bitmap (at offset 24 of the data): pages 0, 1 and 63
""")


def test_feature_dma_logging_report():
    h, payload = split(LOGGING_REPORT_REQ)
    check_header(h, 28, Command.DEVICE_FEATURE, 48, 0)
    f = DeviceFeature.unpack(payload)
    assert (f.argsz, f.feature, f.get) == (40, FeatureIndex.DMA_LOGGING_REPORT, True)
    r = DmaLoggingReport.unpack(f.data)
    assert (r.iova, r.length, r.page_size, r.bitmap) == (0x10_0000, 0x4_0000, 4096, b"")
    assert r.bitmap_size == 8
    check_encode(LOGGING_REPORT_REQ, DeviceFeature(
        FeatureFlag.GET | FeatureIndex.DMA_LOGGING_REPORT,
        DmaLoggingReport(0x10_0000, 0x4_0000, 4096).pack(), argsz=40).pack())
    h, payload = split(LOGGING_REPORT_REPLY)
    check_header(h, 28, Command.DEVICE_FEATURE, 56, 1)
    f = DeviceFeature.unpack(payload, reply=True)
    r = DmaLoggingReport.unpack(f.data, reply=True)
    assert (r.iova, r.length, r.page_size) == (0x10_0000, 0x4_0000, 4096)
    assert int.from_bytes(r.bitmap, "little") == 0b11 | (1 << 63)
    check_encode(LOGGING_REPORT_REPLY, DeviceFeature(
        0x10008, DmaLoggingReport(0x10_0000, 0x4_0000, 4096,
                                  bytes.fromhex("0300000000000080")).pack()).pack())


# --- MIG_DATA_READ / MIG_DATA_WRITE -----------------------------------------------------------

MIG_READ_REQ = wire("""
    1d00 1100 18000000 00000000 00000000   # msg_id 29, MIG_DATA_READ, msg_size 24
    08010000            # argsz 264 = 8 + 256
    00010000            # size 256
""")
MIG_READ_REPLY = wire("""
    1d00 1100 1d000000 01000000 00000000   # msg_size 29 = 16 + 8 + 5
    0d000000            # argsz 13
    05000000            # size 5: less than asked, the stream has ended
    7374617465          # data "state"
""")
MIG_WRITE_REQ = wire("""
    1e00 1200 1d000000 00000000 00000000   # msg_id 30, MIG_DATA_WRITE, msg_size 29
    0d000000 05000000 7374617465
""")
MIG_WRITE_REPLY = wire("1e00 1200 10000000 01000000 00000000")  # no payload


def test_mig_data_read():
    h, payload = split(MIG_READ_REQ)
    check_header(h, 29, Command.MIG_DATA_READ, 24, 0)
    m = MigData.unpack(payload, with_data=False)
    assert (m.argsz, m.size, m.data) == (264, 256, b"")
    check_encode(MIG_READ_REQ, MigData(256).pack())
    h, payload = split(MIG_READ_REPLY)
    check_header(h, 29, Command.MIG_DATA_READ, 29, 1)
    m = MigData.unpack(payload, with_data=True)
    assert (m.argsz, m.size, m.data) == (13, 5, b"state")
    check_encode(MIG_READ_REPLY, MigData(5, b"state").pack())


def test_mig_data_write():
    h, payload = split(MIG_WRITE_REQ)
    check_header(h, 30, Command.MIG_DATA_WRITE, 29, 0)
    m = MigData.unpack(payload, with_data=True)
    assert (m.argsz, m.size, m.data) == (13, 5, b"state")
    check_encode(MIG_WRITE_REQ, MigData(5, b"state").pack())
    h, payload = split(MIG_WRITE_REPLY)
    check_header(h, 30, Command.MIG_DATA_WRITE, 16, 1)
    assert payload == b""


# --- framing: the same bytes through a socket -------------------------------------------------

EVERY_MESSAGE = [
    ERROR_REPLY, NO_REPLY_WRITE, VERSION_REQ, VERSION_REPLY, VERSION_BARE, DMA_MAP_REQ,
    DMA_MAP_REPLY, DMA_MAP_READONLY_NO_FD, DMA_UNMAP_REQ, DMA_UNMAP_REPLY,
    DMA_UNMAP_BITMAP_REQ, DMA_UNMAP_BITMAP_REPLY, DMA_UNMAP_ALL, DEVICE_INFO_REQ,
    DEVICE_INFO_REPLY, REGION_INFO_REQ, REGION_INFO_REPLY, REGION_INFO_CAPS_REPLY,
    REGION_INFO_CAPS_SHORT_REPLY, IO_FDS_REQ, IO_FDS_REPLY, IRQ_INFO_REQ, IRQ_INFO_REPLY,
    SET_IRQS_EVENTFD, SET_IRQS_BOOL, SET_IRQS_NONE, SET_IRQS_REPLY, REGION_READ_REQ,
    REGION_READ_REPLY, REGION_WRITE_REQ, REGION_WRITE_REPLY, DMA_READ_REQ, DMA_READ_REPLY,
    DMA_WRITE_REQ, DMA_WRITE_REPLY_SPEC, DMA_WRITE_REPLY_LIBVFIO_USER, RESET_REQ, RESET_REPLY,
    WRITE_MULTI_REQ, WRITE_MULTI_REPLY, FEATURE_MIGRATION_REQ, FEATURE_MIGRATION_REPLY,
    FEATURE_STATE_SET, FEATURE_STATE_SET_REPLY, FEATURE_STATE_GET_REPLY, FEATURE_PROBE,
    LOGGING_START, LOGGING_STOP, LOGGING_REPORT_REQ, LOGGING_REPORT_REPLY, MIG_READ_REQ,
    MIG_READ_REPLY, MIG_WRITE_REQ, MIG_WRITE_REPLY,
]


def test_every_command_has_a_fixture_both_ways():
    seen = {(int.from_bytes(m[2:4], "little"), int.from_bytes(m[8:12], "little") & 0xF)
            for m in EVERY_MESSAGE}
    assert seen >= {(int(c), t) for c in Command for t in (0, 1)}


def test_every_fixture_states_its_own_size():
    for m in EVERY_MESSAGE:
        assert int.from_bytes(m[4:8], "little") == len(m), m[:16].hex()


def test_reader_splits_the_fixtures_as_the_spec_frames_them():
    """All fixtures back to back in one stream: :class:`MessageReader` cuts
    them at each ``msg_size`` and gives every header field by name."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"".join(EVERY_MESSAGE))
        a.shutdown(socket.SHUT_WR)
        reader = MessageReader(b)
        got = []
        while (m := reader.read()) is not None:
            got.append(m)
    assert len(got) == len(EVERY_MESSAGE)
    for m, raw in zip(got, EVERY_MESSAGE, strict=True):
        h = Header.unpack(raw[:16])
        assert (m.msg_id, m.command, m.flags, m.error) == (h.msg_id, h.command, h.flags, h.error)
        assert m.payload == raw[16:]
        assert m.fds == [] and m.problem is None
        assert m.is_reply == bool(h.flags & 1)
        assert (m.no_reply, m.is_error) == (bool(h.flags & 0x10), bool(h.flags & 0x20))


# --- decode, then encode: the same bytes, for any well-formed input ---------------------------
#
# The fuzz tests elsewhere check that arbitrary bytes raise nothing but
# ProtocolError.  Here, bytes laid out as the spec's tables say (random field
# values, lengths consistent) must decode, and encode back to the input: no
# field is dropped, moved or altered on the way.

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
small = st.binary(max_size=40)


def le(fmt: str, *values: int) -> bytes:
    return struct.pack("<" + fmt, *values)


IRQ_SET_FLAGS = [d | a for d in (0x1, 0x4) for a in (0x8, 0x10, 0x20)]  # not DATA_BOOL
FEATURE_FLAGS = [1 << 16, 1 << 17, 1 << 18, (1 << 18) | (1 << 16), (1 << 18) | (3 << 16)]

CANONICAL = {
    "header": (st.builds(lambda i, c, n, f, e: le("HHIII", i, c, n, f, e), u16, u16,
                         st.integers(16, 2**32 - 1), u32, u32),
               lambda b: Header.unpack(b).pack()),
    "DMA_MAP": (st.builds(lambda f, o, a, s: le("IIQQQ", 32, f, o, a, s),
                          st.integers(0, 3), u64, u64, u64),
                lambda b: DmaMap.unpack(b).pack()),
    "DMA_UNMAP": (st.builds(lambda n, f, a, s: le("IIQQ", n, f, a, s),
                            st.integers(24, 2**32 - 1), st.sampled_from([0, 2]), u64, u64),
                  lambda b: DmaUnmap.unpack(b).pack()),
    "DMA_UNMAP bitmap request": (
        st.builds(lambda x, a, s, p, n: le("IIQQQQ", 40 + n + x, 1, a, s, p, n),
                  st.integers(0, 100), u64, u64, u64, st.integers(0, 4096)),
        lambda b: DmaUnmap.unpack(b).pack()),
    "DMA_UNMAP bitmap reply": (
        st.builds(lambda n, a, s, p, bm: le("IIQQQQ", n, 1, a, s, p, len(bm)) + bm,
                  u32, u64, u64, u64, small),
        lambda b: DmaUnmap.unpack(b, reply=True).pack()),
    "DEVICE_GET_INFO": (st.builds(lambda n, f, r, i: le("IIII", n, f, r, i),
                                  st.integers(16, 2**32 - 1), u32, u32, u32),
                        lambda b: DeviceInfoMsg.unpack(b).pack()),
    "DEVICE_GET_REGION_INFO": (
        st.builds(lambda n, f, i, c, s, o: le("IIIIQQ", n, f, i, c, s, o),
                  st.integers(32, 2**32 - 1), u32, u32, u32, u64, u64),
        lambda b: RegionInfoMsg.unpack(b).pack()),
    "DEVICE_GET_REGION_IO_FDS": (st.builds(lambda n, i: le("IIII", n, 0, i, 0),
                                           st.integers(16, 2**32 - 1), u32),
                                 lambda b: RegionIoFds.unpack(b).pack()),
    "DEVICE_GET_IRQ_INFO": (st.builds(lambda n, f, i, c: le("IIII", n, f, i, c),
                                      st.integers(16, 2**32 - 1), u32, u32, u32),
                            lambda b: IrqInfoMsg.unpack(b).pack()),
    "DEVICE_SET_IRQS": (st.builds(lambda f, i, s, c: le("IIIII", 20, f, i, s, c),
                                  st.sampled_from(IRQ_SET_FLAGS), u32, st.integers(0, 2048),
                                  st.integers(0, 2048)),
                        lambda b: IrqSet.unpack(b).pack()),
    "REGION_READ/WRITE with data": (st.builds(lambda o, r, d: le("QII", o, r, len(d)) + d,
                                              u64, u32, small),
                                    lambda b: RegionAccess.unpack(b, with_data=True).pack()),
    "REGION_READ/WRITE head": (st.builds(lambda o, r, c: le("QII", o, r, c), u64, u32,
                                         st.integers(0, 1 << 20)),
                               lambda b: RegionAccess.unpack(b, with_data=False).pack()),
    "REGION_WRITE_MULTI reply": (st.builds(lambda n: le("Q", n), u64),
                                 lambda b: RegionWriteMulti.unpack(b, reply=True).pack()),
    "DMA_READ/WRITE with data": (st.builds(lambda a, d: le("QQ", a, len(d)) + d, u64, small),
                                 lambda b: DmaAccess.unpack(b, with_data=True).pack()),
    "DMA_READ/WRITE head": (st.builds(lambda a, c: le("QQ", a, c), u64, st.integers(0, 1 << 20)),
                            lambda b: DmaAccess.unpack(b, with_data=False).pack()),
    "DEVICE_FEATURE": (st.builds(lambda n, i, f, d: le("II", n, i | f) + d,
                                 st.integers(8, 2**32 - 1), u16, st.sampled_from(FEATURE_FLAGS),
                                 small),
                       lambda b: DeviceFeature.unpack(b).pack()),
    "MIGRATION data": (st.builds(lambda f: le("Q", f), u64),
                       lambda b: MigrationFeature.unpack(b).pack()),
    "MIG_DEVICE_STATE data": (st.builds(lambda s, f: le("II", s, f), u32, u32),
                              lambda b: MigStateMsg.unpack(b).pack()),
    "DMA_LOGGING_START data": (
        st.builds(lambda p, r: le("QII", p, len(r), 0) + b"".join(le("QQ", *x) for x in r),
                  u64, st.lists(st.tuples(u64, u64), max_size=4)),
        lambda b: DmaLoggingControl.unpack(b).pack()),
    "DMA_LOGGING_REPORT data": (st.builds(lambda i, n, p: le("QQQ", i, n, 1 << p), u64, u64,
                                          st.integers(0, 63)),
                                lambda b: DmaLoggingReport.unpack(b).pack()),
    "MIG_DATA with data": (st.builds(lambda x, d: le("II", 8 + len(d) + x, len(d)) + d,
                                     st.integers(0, 1000), small),
                           lambda b: MigData.unpack(b, with_data=True).pack()),
    "MIG_DATA_READ request": (st.builds(lambda x, n: le("II", 8 + n + x, n),
                                        st.integers(0, 1000), st.integers(0, 1 << 20)),
                              lambda b: MigData.unpack(b, with_data=False).pack()),
}


@pytest.mark.parametrize("name", sorted(CANONICAL))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_decode_then_encode_gives_the_input_back(name: str, data: st.DataObject) -> None:
    strategy, round_trip = CANONICAL[name]
    raw = data.draw(strategy)
    assert round_trip(raw) == raw
