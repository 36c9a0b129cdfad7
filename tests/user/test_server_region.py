"""REGION_READ / REGION_WRITE / REGION_WRITE_MULTI, config space, reset."""

from __future__ import annotations

import errno
import struct

import pytest

from pyvfio.pci.config import CapId, ConfigSpace
from pyvfio.user import protocol as P


def test_callback_and_memory_backed_accesses(scratch_client, scratch):
    scratch_client.write32(0, 0, 0x11223344)
    assert scratch_client.read32(0, 0) == 0x11223344
    assert scratch.writes[-1] == (0, struct.pack("<I", 0x11223344))
    scratch.ram.view[0x2000:0x2004] = b"WXYZ"
    assert scratch_client.read(0, 0x2000, 4) == b"WXYZ"  # through the callback
    big = bytes(range(256)) * 16
    scratch_client.write(0, 0x1000, big)  # one 4 KiB access
    assert bytes(scratch.ram.view[0x1000:0x2000]) == big


@pytest.mark.parametrize("region, offset, count", [
    (0, 16384, 1), (0, 16380, 8), (0, 2**63, 4), (0, 2**64 - 4, 8),
    (1, 0, 4),            # empty BAR
    (7, 4096, 1), (9, 60, 8), (10, 0, 4), (2**32 - 1, 0, 4),
])
def test_out_of_range_access_is_einval(scratch_client, region, offset, count):
    c = scratch_client
    assert c.errno_of(P.Command.REGION_READ, P.RegionAccess(region, offset, count).pack()) \
        == errno.EINVAL
    assert c.errno_of(P.Command.REGION_WRITE, P.RegionAccess(region, offset, count,
                                                             b"\0" * count).pack()) \
        == errno.EINVAL


@pytest.mark.parametrize("cmd, payload, err", [
    (P.Command.REGION_READ, b"\0" * 15, errno.EINVAL),
    (P.Command.REGION_READ, P.RegionAccess(0, 0, 4).pack() + b"x", errno.EINVAL),
    (P.Command.REGION_WRITE, P.RegionAccess(0, 0, 4, b"abc").pack(), errno.EINVAL),
    (P.Command.REGION_WRITE, struct.pack("=QII", 0, 0, 4) + b"abcde", errno.EINVAL),
    (P.Command.REGION_READ, P.RegionAccess(0, 0, (1 << 20) + 1).pack(), errno.E2BIG),
])
def test_malformed_access(scratch_client, cmd, payload, err):
    assert scratch_client.errno_of(cmd, payload) == err


def test_zero_count_access(scratch_client):
    m = scratch_client.ok(P.Command.REGION_READ, P.RegionAccess(0, 0, 0).pack())
    assert len(m.payload) == 16


def test_callback_errors_become_error_replies(scratch_client):
    assert scratch_client.errno_of(P.Command.REGION_READ, P.RegionAccess(0, 0x800, 4).pack()) \
        == errno.EIO
    assert scratch_client.read32(0, 0) == 0  # the connection is fine


def test_no_reply_flag(scratch_client, scratch):
    c = scratch_client
    c.send(P.Command.REGION_WRITE, P.RegionAccess(0, 0, 4, b"\1\0\0\0").pack(),
           flags=P.MsgFlag.NO_REPLY)
    c.send(P.Command.REGION_READ, P.RegionAccess(0, 99999, 4).pack(), flags=P.MsgFlag.NO_REPLY)
    assert c.read32(0, 0) == 1  # the next reply is this one's; the failed one sent nothing


def test_pipelined_commands_are_answered_in_order(scratch_client):
    c = scratch_client
    ids = [c.send(P.Command.REGION_READ, P.RegionAccess(9, i, 1).pack()) for i in range(50)]
    for i, msg_id in enumerate(ids):
        m = c.recv()
        assert m.msg_id == msg_id and m.payload[16:] == bytes([i])


def test_write_multi(scratch_client, scratch):
    writes = tuple(P.WriteOne(0, 0x100 + 8 * i, bytes([i]) * 8) for i in range(10))
    m = scratch_client.ok(P.Command.REGION_WRITE_MULTI, P.RegionWriteMulti(writes).pack())
    assert P.RegionWriteMulti.unpack(m.payload, reply=True).wr_cnt == 10
    assert bytes(scratch.ram.view[0x100:0x150]) == b"".join(bytes([i]) * 8 for i in range(10))


@pytest.mark.parametrize("payload", [
    b"\0" * 7,
    struct.pack("=Q", 0),
    struct.pack("=Q", 2) + struct.pack("=QII8s", 0, 0, 4, b""),
    struct.pack("=Q", 1) + struct.pack("=QII8s", 0, 0, 9, b""),
    struct.pack("=Q", 1) + struct.pack("=QII8s", 16384, 0, 4, b""),
])
def test_write_multi_bad(scratch_client, payload):
    assert scratch_client.errno_of(P.Command.REGION_WRITE_MULTI, payload) == errno.EINVAL


def config(c) -> ConfigSpace:
    return ConfigSpace(lambda o, n: c.read(7, o, n), lambda o, d: c.write(7, o, d), size=4096)


def test_config_space_identity_and_capabilities(scratch_client):
    cfg = config(scratch_client)
    assert cfg.read(0, 4) == struct.pack("<HH", 0x1B36, 0x0042)
    caps = {cap.id for cap in cfg.capabilities()}
    assert {CapId.PM, CapId.MSI, CapId.MSIX, CapId.EXP} <= caps


def test_bar_sizing(scratch_client):
    c = scratch_client
    c.write32(7, 0x10, 0xFFFFFFFF)
    assert c.read32(7, 0x10) == 0xFFFFC000  # 16 KiB, 32-bit memory
    c.write32(7, 0x18, 0xFFFFFFFF)
    c.write32(7, 0x1C, 0xFFFFFFFF)
    assert c.read32(7, 0x18) == 0xFFFFE004  # 8 KiB, 64-bit
    assert c.read32(7, 0x1C) == 0xFFFFFFFF
    c.write32(7, 0x14, 0xFFFFFFFF)
    assert c.read32(7, 0x14) == 0  # no BAR1
    c.write32(7, 0x10, 0xFEB00000)
    assert c.read32(7, 0x10) == 0xFEB00000


def test_read_only_and_w1c_config_bits(scratch_client):
    c = scratch_client
    c.write32(7, 0, 0)
    assert c.read32(7, 0) == 0x00421B36  # IDs are read-only
    c.write(7, 4, struct.pack("<H", 0xFFFF))
    assert struct.unpack("<H", c.read(7, 4, 2))[0] == 0x0547  # only the writable bits


def test_msi_and_msix_enable_bits(scratch_client, scratch):
    c = scratch_client
    msi, msix = scratch.config.caps[CapId.MSI], scratch.config.caps[CapId.MSIX]
    c.write(7, msi + 2, struct.pack("<H", 0x0001))
    assert scratch.config.msi_enabled
    c.write(7, msix + 2, struct.pack("<H", 0xC000))
    assert scratch.config.msix_enabled and scratch.config.msix_function_masked
    assert struct.unpack("<H", c.read(7, msix + 2, 2))[0] == 0xC003  # table size 4-1 kept


def test_device_reset_and_flr(scratch_client, scratch):
    c = scratch_client
    c.write32(0, 0, 5)
    c.write(7, 4, struct.pack("<H", 0x6))
    c.ok(P.Command.DEVICE_RESET)
    assert scratch.resets == 1 and c.read32(0, 0) == 0
    assert struct.unpack("<H", c.read(7, 4, 2))[0] == 0
    exp = scratch.config.caps[CapId.EXP]
    c.write32(0, 0, 5)
    c.write(7, exp + 8, struct.pack("<H", 0x8000 | 0x2810))  # Initiate FLR
    assert scratch.resets == 2 and c.read32(0, 0) == 0
    assert not struct.unpack("<H", c.read(7, exp + 8, 2))[0] & 0x8000
    assert c.errno_of(P.Command.DEVICE_RESET, b"x") == errno.EINVAL
