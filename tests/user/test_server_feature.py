"""DEVICE_FEATURE (migration, device state, DMA logging) and MIG_DATA_READ/WRITE."""

from __future__ import annotations

import errno
import struct

import pytest
from vfu_raw import RawClient

from pyvfio.device import SharedMemory
from pyvfio.devices.edu import EduDevice
from pyvfio.devices.model import PciDeviceModel
from pyvfio.user import protocol as P

F = P.FeatureFlag
S = P.MigState


def feature(c, flags: int, data: bytes = b"", argsz: int | None = None) -> P.Message:
    return c.call(P.Command.DEVICE_FEATURE, P.DeviceFeature(flags, data, argsz).pack())


def get_state(c) -> int:
    m = feature(c, F.GET | P.FeatureIndex.MIG_DEVICE_STATE, argsz=64)
    assert not m.is_error, m
    return P.MigStateMsg.unpack(P.DeviceFeature.unpack(m.payload, reply=True).data).device_state


def set_state(c, state: int) -> P.Message:
    return feature(c, F.SET | P.FeatureIndex.MIG_DEVICE_STATE, P.MigStateMsg(state).pack())


def read_stream(c, chunk: int = 1000) -> bytes:
    out = b""
    while True:
        m = c.ok(P.Command.MIG_DATA_READ, P.MigData(chunk, argsz=8 + chunk).pack())
        body = P.MigData.unpack(m.payload, with_data=True)
        out += body.data
        if body.size < chunk:
            return out


def write_stream(c, data: bytes, chunk: int = 1000) -> None:
    for pos in range(0, len(data), chunk):
        c.ok(P.Command.MIG_DATA_WRITE, P.MigData(len(data[pos:pos + chunk]),
                                                 data[pos:pos + chunk]).pack())


def test_migration_feature_flags(scratch_client, edu_client):
    for c, pre in ((scratch_client, True), (edu_client, False)):
        m = feature(c, F.GET | P.FeatureIndex.MIGRATION, argsz=16)
        flags = P.MigrationFeature.unpack(P.DeviceFeature.unpack(m.payload, reply=True).data).flags
        assert flags & P.MigrationFlag.STOP_COPY
        assert bool(flags & P.MigrationFlag.PRE_COPY) == pre


def test_probe(scratch_client):
    m = feature(scratch_client, F.PROBE | F.GET | F.SET | P.FeatureIndex.MIG_DEVICE_STATE)
    assert not m.is_error and len(m.payload) == 8
    m = feature(scratch_client, F.PROBE | F.SET | P.FeatureIndex.MIGRATION)
    assert m.is_error and m.error == errno.EINVAL  # as the kernel and libvfio-user
    m = feature(scratch_client, F.PROBE | F.SET | P.FeatureIndex.DMA_LOGGING_START)
    assert not m.is_error


def test_non_migratable_device(serve):
    dev = PciDeviceModel(vendor_id=1, device_id=2)
    dev.add_bar(0, 4096, access=lambda o, d, w: None if w else b"\0" * int(d))
    c = RawClient(serve(dev), negotiate=False)
    assert c.negotiate({"migration": {"pgsize": 4096}}).caps.migration is None
    m = feature(c, F.GET | P.FeatureIndex.MIGRATION, argsz=16)
    assert m.is_error and m.error == errno.EINVAL
    c.close()


@pytest.mark.parametrize("flags, data, argsz, err", [
    (F.GET | 99, b"", 64, errno.EINVAL),
    (F.GET | F.SET | P.FeatureIndex.MIG_DEVICE_STATE, b"", 64, errno.EINVAL),
    (P.FeatureIndex.MIG_DEVICE_STATE, b"", 64, errno.EINVAL),            # neither GET nor SET
    (F.SET | P.FeatureIndex.MIGRATION, b"", 64, errno.EINVAL),
    (F.GET | P.FeatureIndex.MIGRATION, b"", 8, errno.EINVAL),             # argsz too small
    (F.SET | P.FeatureIndex.MIG_DEVICE_STATE, b"\2\0\0", None, errno.EINVAL),
    (F.SET | P.FeatureIndex.MIG_DEVICE_STATE, struct.pack("=II", 0, 0), None, errno.EINVAL),
    (F.SET | P.FeatureIndex.MIG_DEVICE_STATE, struct.pack("=II", 9, 0), None, errno.EINVAL),
    (F.SET | P.FeatureIndex.DMA_LOGGING_START, struct.pack("=QII", 3000, 0, 0), None,
     errno.EINVAL),
    (F.SET | P.FeatureIndex.DMA_LOGGING_STOP, b"", None, errno.EINVAL),      # not started
    (F.GET | P.FeatureIndex.DMA_LOGGING_REPORT, struct.pack("=QQQ", 0, 4096, 4096), 64,
     errno.EINVAL),                                                          # not started
    (0x80000000 | F.GET | 1, b"", 64, errno.EINVAL),                         # unknown bit
])
def test_bad_features(scratch_client, flags, data, argsz, err):
    m = feature(scratch_client, flags, data, argsz)
    assert m.is_error and m.error == err
    assert get_state(scratch_client) == S.RUNNING


def test_short_feature_payload(scratch_client):
    for payload in (b"", b"\0" * 7, struct.pack("=II", 7, F.GET | 1)):
        assert scratch_client.errno_of(P.Command.DEVICE_FEATURE, payload) == errno.EINVAL


def test_state_machine_paths(scratch_client, scratch):
    c = scratch_client
    seen: list[tuple[str, str]] = []
    scratch.migration_state_changed = lambda old, new: seen.append((old, new))  # type: ignore[method-assign]
    assert not set_state(c, S.STOP_COPY).is_error  # RUNNING -> STOP -> STOP_COPY
    assert seen == [("RUNNING", "STOP"), ("STOP", "STOP_COPY")]
    m = set_state(c, S.PRE_COPY)                   # explicitly not allowed
    assert m.is_error and m.error == errno.EINVAL
    assert get_state(c) == S.STOP_COPY
    data = read_stream(c)
    assert not set_state(c, S.RESUMING).is_error   # via STOP
    write_stream(c, data)                          # its own state back
    assert not set_state(c, S.RUNNING).is_error
    seen.clear()
    assert not set_state(c, S.PRE_COPY).is_error
    assert not set_state(c, S.STOP).is_error       # PRE_COPY -> RUNNING -> STOP
    assert seen == [("RUNNING", "PRE_COPY"), ("PRE_COPY", "RUNNING"), ("RUNNING", "STOP")]


def test_mig_data_only_in_data_states(scratch_client):
    c = scratch_client
    assert c.errno_of(P.Command.MIG_DATA_READ, P.MigData(8, argsz=16).pack()) == errno.EINVAL
    assert c.errno_of(P.Command.MIG_DATA_WRITE, P.MigData(1, b"x").pack()) == errno.EINVAL


@pytest.mark.parametrize("cmd, payload", [
    (P.Command.MIG_DATA_READ, b"\0" * 7),
    (P.Command.MIG_DATA_READ, struct.pack("=II", 15, 8)),          # argsz < 8 + size
    (P.Command.MIG_DATA_READ, struct.pack("=II", 16, 8) + b"x"),   # data in a read
    (P.Command.MIG_DATA_WRITE, struct.pack("=II", 9, 2) + b"x"),   # size != data
])
def test_mig_data_malformed(scratch_client, cmd, payload):
    set_state(scratch_client, S.STOP_COPY if cmd == P.Command.MIG_DATA_READ else S.RESUMING)
    assert scratch_client.errno_of(cmd, payload) == errno.EINVAL


def test_mig_data_over_the_transfer_limit(scratch_client):
    set_state(scratch_client, S.STOP_COPY)
    n = (1 << 20) + 1
    assert scratch_client.errno_of(P.Command.MIG_DATA_READ, P.MigData(n, argsz=8 + n).pack()) \
        == errno.E2BIG


def test_migrate_scratch_between_two_servers(serve, scratch):
    from conftest import ScratchDevice
    dst_dev = ScratchDevice()
    src = RawClient(serve(scratch))
    dst = RawClient(serve(dst_dev))
    src.write32(0, 0, 0xABCD)
    scratch.ram.view[0x3000:0x3005] = b"state"
    src.write32(7, 0x10, 0xFEB00000)
    assert not set_state(src, S.PRE_COPY).is_error
    early = read_stream(src)
    assert early
    assert not set_state(src, S.STOP_COPY).is_error
    data = read_stream(src, 777)
    assert not set_state(dst, S.RESUMING).is_error
    write_stream(dst, early + data)  # both records: the last one wins
    assert not set_state(dst, S.RUNNING).is_error
    assert dst.read32(0, 0) == 0xABCD
    assert bytes(dst_dev.ram.view[0x3000:0x3005]) == b"state"
    assert dst.read32(7, 0x10) == 0xFEB00000
    src.close()
    dst.close()
    dst_dev.close()


def test_bad_stream_fails_resume_and_reset_recovers(scratch_client):
    c = scratch_client
    assert not set_state(c, S.RESUMING).is_error
    write_stream(c, b"garbage" * 10)
    m = set_state(c, S.STOP)
    assert m.is_error and m.error == errno.EINVAL
    assert get_state(c) == S.ERROR
    assert set_state(c, S.RUNNING).is_error
    c.ok(P.Command.DEVICE_RESET)
    assert get_state(c) == S.RUNNING


def test_migrate_edu(serve):
    a, b = EduDevice(dma_delay=0.001), EduDevice(dma_delay=0.001)
    src, dst = RawClient(serve(a)), RawClient(serve(b))
    src.write32(0, 4, 0x1234)
    src.write32(0, 0x60, 0x20)
    set_state(src, S.STOP_COPY)
    data = read_stream(src)
    set_state(dst, S.RESUMING)
    write_stream(dst, data)
    assert not set_state(dst, S.RUNNING).is_error
    assert dst.read32(0, 4) == 0xFFFFEDCB
    assert dst.read32(0, 0x24) == 0x20
    for c in (src, dst):
        c.close()
    a.close()
    b.close()


def test_dma_logging_of_model_writes(scratch_client, scratch):
    c = scratch_client
    mem = SharedMemory(64 * 1024)
    c.ok(P.Command.DMA_MAP, P.DmaMap(0x100000, mem.size).pack(), [mem.fd])
    ctl = P.DmaLoggingControl(4096, (P.DmaLoggingRange(0x100000, mem.size),))
    m = feature(c, F.SET | P.FeatureIndex.DMA_LOGGING_START, ctl.pack())
    assert not m.is_error
    assert feature(c, F.SET | P.FeatureIndex.DMA_LOGGING_START, ctl.pack()).error == errno.EBUSY
    with scratch.lock:
        scratch.dma_write(0x100000 + 5 * 4096 + 10, b"x" * 5000)  # pages 5 and 6
        scratch.dma_read(0x100000, 4096)                          # reads are not logged
    rep = P.DmaLoggingReport(0x100000, mem.size, 4096)
    m = feature(c, F.GET | P.FeatureIndex.DMA_LOGGING_REPORT, rep.pack(), argsz=64)
    out = P.DmaLoggingReport.unpack(P.DeviceFeature.unpack(m.payload, reply=True).data,
                                    reply=True)
    assert int.from_bytes(out.bitmap, "little") == 0b1100000
    m = feature(c, F.GET | P.FeatureIndex.DMA_LOGGING_REPORT, rep.pack(), argsz=64)
    out = P.DmaLoggingReport.unpack(P.DeviceFeature.unpack(m.payload, reply=True).data,
                                    reply=True)
    assert int.from_bytes(out.bitmap, "little") == 0  # the report cleared them
    # a too-small argsz is refused
    m = feature(c, F.GET | P.FeatureIndex.DMA_LOGGING_REPORT, rep.pack(), argsz=32)
    assert m.is_error and m.error == errno.EINVAL
    # unmap with the dirty bitmap (libvfio-user's GET_DIRTY_BITMAP)
    with scratch.lock:
        scratch.dma_write(0x100000 + 15 * 4096, b"y")
    unmap = P.DmaUnmap(0x100000, mem.size, P.DmaUnmapFlag.GET_DIRTY_BITMAP, 24 + 16 + 8, 4096, 8)
    m = c.ok(P.Command.DMA_UNMAP, unmap.pack())
    out_unmap = P.DmaUnmap.unpack(m.payload, reply=True)
    assert int.from_bytes(out_unmap.bitmap, "little") == 1 << 15
    assert not feature(c, F.SET | P.FeatureIndex.DMA_LOGGING_STOP).is_error
    mem.close()
