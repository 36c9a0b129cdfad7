"""The vfio-user codec at the exact edge of every check: the last accepted
value is accepted and the first refused one is refused, with the errno a
server answers (EINVAL malformed, E2BIG over a limit).  Inputs are packed
here with :mod:`struct`, not with the codec under test."""

from __future__ import annotations

import errno
import json
import struct
import sys
from collections.abc import Callable
from typing import Any

import pytest

from pyvfio.errors import ProtocolError
from pyvfio.user.protocol import (
    Capabilities,
    DeviceFeature,
    DeviceInfoMsg,
    DmaAccess,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    DmaMap,
    DmaUnmap,
    Header,
    IrqInfoMsg,
    IrqSet,
    Message,
    MigData,
    MigrationFeature,
    MigStateMsg,
    RegionAccess,
    RegionInfoMsg,
    RegionIoFds,
    RegionWriteMulti,
    SubRegionIoFd,
    Version,
    WriteOne,
    pack_message,
)

pytestmark = pytest.mark.skipif(sys.byteorder != "little",
                                reason="the inputs are written in little-endian byte order")

OK = 0
EINVAL, E2BIG = errno.EINVAL, errno.E2BIG


def le(fmt: str, *values: int) -> bytes:
    return struct.pack("<" + fmt, *values)


def version(caps: Any, *, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps({"capabilities": caps}).encode() + b"\0"
    return le("HH", 0, 2) + body


def region_info_reply(chain: bytes, *, flags: int = 0xF, cap_offset: int = 32) -> bytes:
    return le("IIIIQQ", 32 + len(chain), flags, 0, cap_offset, 0x4000, 0) + chain


CASES: list[tuple[str, Callable[[], Any], int]] = [
    # --- VERSION ---
    ("version: no data", lambda: Version.unpack(le("HH", 0, 2)), OK),
    ("version: 3 bytes", lambda: Version.unpack(b"\0\0\2"), EINVAL),
    ("version: JSON of 64 KiB", lambda: Version.unpack(
        version(None, raw=b"{}" + b" " * (65536 - 3) + b"\0")), OK),
    ("version: JSON over 64 KiB", lambda: Version.unpack(
        version(None, raw=b"{}" + b" " * (65536 - 2) + b"\0")), E2BIG),
    ("version: not NUL-terminated", lambda: Version.unpack(version(None, raw=b"{}")), EINVAL),
    ("version: NUL inside", lambda: Version.unpack(version(None, raw=b"{}\0 \0")), EINVAL),
    ("version: not UTF-8", lambda: Version.unpack(version(None, raw=b"\xff\0")), EINVAL),
    ("version: not JSON", lambda: Version.unpack(version(None, raw=b"{\0")), EINVAL),
    ("version: not an object", lambda: Version.unpack(version(None, raw=b"[]\0")), EINVAL),
    ("version: capabilities not an object", lambda: Version.unpack(version([])), EINVAL),
    ("caps: max_msg_fds 0", lambda: Capabilities.from_json({"max_msg_fds": 0}), OK),
    ("caps: max_msg_fds 1024", lambda: Capabilities.from_json({"max_msg_fds": 1024}), OK),
    ("caps: max_msg_fds 1025", lambda: Capabilities.from_json({"max_msg_fds": 1025}), EINVAL),
    ("caps: max_msg_fds -1", lambda: Capabilities.from_json({"max_msg_fds": -1}), EINVAL),
    ("caps: max_msg_fds true", lambda: Capabilities.from_json({"max_msg_fds": True}), EINVAL),
    ("caps: max_msg_fds 1.0", lambda: Capabilities.from_json({"max_msg_fds": 1.0}), EINVAL),
    ("caps: max_data_xfer_size 1", lambda: Capabilities.from_json({"max_data_xfer_size": 1}),
     OK),
    ("caps: max_data_xfer_size 0", lambda: Capabilities.from_json({"max_data_xfer_size": 0}),
     EINVAL),
    ("caps: max_data_xfer_size 2**64-1",
     lambda: Capabilities.from_json({"max_data_xfer_size": 2**64 - 1}), OK),
    ("caps: max_data_xfer_size 2**64",
     lambda: Capabilities.from_json({"max_data_xfer_size": 2**64}), EINVAL),
    ("caps: max_dma_maps 0", lambda: Capabilities.from_json({"max_dma_maps": 0}), OK),
    ("caps: max_dma_maps 2**32-1", lambda: Capabilities.from_json({"max_dma_maps": 2**32 - 1}),
     OK),
    ("caps: max_dma_maps 2**32", lambda: Capabilities.from_json({"max_dma_maps": 2**32}),
     EINVAL),
    ("caps: pgsizes 1", lambda: Capabilities.from_json({"pgsizes": 1}), OK),
    ("caps: pgsizes 0", lambda: Capabilities.from_json({"pgsizes": 0}), EINVAL),
    ("caps: pgsizes 2**64", lambda: Capabilities.from_json({"pgsizes": 2**64}), EINVAL),
    ("caps: write_multiple 1", lambda: Capabilities.from_json({"write_multiple": 1}), EINVAL),
    ("caps: migration []", lambda: Capabilities.from_json({"migration": []}), EINVAL),
    ("caps: migration pgsize 1", lambda: Capabilities.from_json({"migration": {"pgsize": 1}}),
     OK),
    ("caps: migration pgsize 0", lambda: Capabilities.from_json({"migration": {"pgsize": 0}}),
     EINVAL),
    ("caps: migration pgsize 2**40",
     lambda: Capabilities.from_json({"migration": {"pgsize": 2**40}}), OK),
    ("caps: migration pgsize 2**40+1",
     lambda: Capabilities.from_json({"migration": {"pgsize": 2**40 + 1}}), EINVAL),
    ("caps: max_bitmap_size 0",
     lambda: Capabilities.from_json({"migration": {"max_bitmap_size": 0}}), OK),
    ("caps: max_bitmap_size -1",
     lambda: Capabilities.from_json({"migration": {"max_bitmap_size": -1}}), EINVAL),
    ("caps: max_bitmap_size 2**40+1",
     lambda: Capabilities.from_json({"migration": {"max_bitmap_size": 2**40 + 1}}), EINVAL),
    ("caps: twin_socket true", lambda: Capabilities.from_json({"twin_socket": True}), EINVAL),
    ("caps: twin supported 1",
     lambda: Capabilities.from_json({"twin_socket": {"supported": 1}}), EINVAL),
    ("caps: twin fd_index 1024",
     lambda: Capabilities.from_json({"twin_socket": {"fd_index": 1024}}), OK),
    ("caps: twin fd_index 1025",
     lambda: Capabilities.from_json({"twin_socket": {"fd_index": 1025}}), EINVAL),
    ("caps: twin fd_index -1",
     lambda: Capabilities.from_json({"twin_socket": {"fd_index": -1}}), EINVAL),
    # --- header ---
    ("header: 15 bytes", lambda: Header.unpack(b"\0" * 15), EINVAL),
    ("header: msg_size 16", lambda: Header.unpack(le("HHIII", 1, 1, 16, 0, 0)), OK),
    ("header: msg_size 15", lambda: Header.unpack(le("HHIII", 1, 1, 15, 0, 0)), EINVAL),
    ("pack_message: msg_id 2**16", lambda: pack_message(2**16, 1), EINVAL),
    # --- DMA_MAP ---
    ("dma_map: 31 bytes", lambda: DmaMap.unpack(le("IIQQQ", 32, 3, 0, 0, 1)[:31]), EINVAL),
    ("dma_map: 33 bytes", lambda: DmaMap.unpack(le("IIQQQ", 32, 3, 0, 0, 1) + b"\0"), EINVAL),
    ("dma_map: argsz 31", lambda: DmaMap.unpack(le("IIQQQ", 31, 3, 0, 0, 1)), EINVAL),
    ("dma_map: argsz 33", lambda: DmaMap.unpack(le("IIQQQ", 33, 3, 0, 0, 1)), EINVAL),
    # --- DMA_UNMAP ---
    ("dma_unmap: 23 bytes", lambda: DmaUnmap.unpack(le("IIQQ", 24, 0, 0, 1)[:23]), EINVAL),
    ("dma_unmap: 25 bytes", lambda: DmaUnmap.unpack(le("IIQQ", 24, 0, 0, 1) + b"\0"), EINVAL),
    ("dma_unmap: argsz 23", lambda: DmaUnmap.unpack(le("IIQQ", 23, 0, 0, 1)), EINVAL),
    ("dma_unmap: flags 4", lambda: DmaUnmap.unpack(le("IIQQ", 24, 4, 0, 1)), EINVAL),
    ("dma_unmap: ALL", lambda: DmaUnmap.unpack(le("IIQQ", 24, 2, 0, 0)), OK),
    ("dma_unmap: bitmap and ALL", lambda: DmaUnmap.unpack(le("IIQQQQ", 48, 3, 0, 1, 4096, 8)),
     EINVAL),
    ("dma_unmap: bitmap without its struct", lambda: DmaUnmap.unpack(le("IIQQ", 48, 1, 0, 1)),
     EINVAL),
    ("dma_unmap: bitmap argsz exact",
     lambda: DmaUnmap.unpack(le("IIQQQQ", 48, 1, 0, 1, 4096, 8)), OK),
    ("dma_unmap: bitmap argsz short",
     lambda: DmaUnmap.unpack(le("IIQQQQ", 47, 1, 0, 1, 4096, 8)), EINVAL),
    ("dma_unmap: request with bitmap data",
     lambda: DmaUnmap.unpack(le("IIQQQQ", 56, 1, 0, 1, 4096, 8) + b"\0" * 8), EINVAL),
    ("dma_unmap: reply bitmap short",
     lambda: DmaUnmap.unpack(le("IIQQQQ", 48, 1, 0, 1, 4096, 8) + b"\0" * 7, reply=True),
     EINVAL),
    ("dma_unmap: reply bitmap exact",
     lambda: DmaUnmap.unpack(le("IIQQQQ", 48, 1, 0, 1, 4096, 8) + b"\0" * 8, reply=True), OK),
    # --- DEVICE_GET_INFO / IRQ_INFO ---
    ("device_info: argsz 15", lambda: DeviceInfoMsg.unpack(le("IIII", 15, 0, 0, 0)), EINVAL),
    ("device_info: request 20 bytes",
     lambda: DeviceInfoMsg.unpack(le("IIIII", 16, 0, 0, 0, 0)), EINVAL),
    ("device_info: reply 20 bytes",
     lambda: DeviceInfoMsg.unpack(le("IIIII", 20, 0, 0, 0, 0), reply=True), OK),
    ("device_info: 15 bytes", lambda: DeviceInfoMsg.unpack(b"\0" * 15, reply=True), EINVAL),
    ("irq_info: argsz 15", lambda: IrqInfoMsg.unpack(le("IIII", 15, 0, 0, 0)), EINVAL),
    ("irq_info: request 17 bytes", lambda: IrqInfoMsg.unpack(le("IIII", 16, 0, 0, 0) + b"\0"),
     EINVAL),
    ("irq_info: reply 17 bytes",
     lambda: IrqInfoMsg.unpack(le("IIII", 16, 0, 0, 0) + b"\0", reply=True), OK),
    # --- DEVICE_GET_REGION_INFO ---
    ("region_info: argsz 31", lambda: RegionInfoMsg.unpack(le("IIIIQQ", 31, 0, 0, 0, 0, 0)),
     EINVAL),
    ("region_info: request 33 bytes",
     lambda: RegionInfoMsg.unpack(le("IIIIQQ", 32, 0, 0, 0, 0, 0) + b"\0"), EINVAL),
    ("region_info: cap before the end of the struct",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 1, 1, 0) + le("II", 0, 0),
                                                    cap_offset=24), reply=True), EINVAL),
    ("region_info: cap header past the end",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HH", 1, 1)), reply=True), EINVAL),
    ("region_info: cap header exactly at the end, empty sparse",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 1, 1, 0) + le("II", 0, 0)),
                                  reply=True), OK),
    ("region_info: truncated sparse head",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 1, 1, 0) + le("I", 0)),
                                  reply=True), EINVAL),
    ("region_info: sparse areas past the end",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 1, 1, 0) + le("II", 1, 0)
                                                    + le("Q", 0)), reply=True), EINVAL),
    ("region_info: 1024 sparse areas",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 1, 1, 0) + le("II", 1024, 0)
                                                    + b"\0" * 16 * 1024), reply=True), OK),
    ("region_info: 1025 sparse areas",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 1, 1, 0) + le("II", 1025, 0)
                                                    + b"\0" * 16 * 1025), reply=True), E2BIG),
    ("region_info: truncated type cap",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 2, 1, 0) + le("I", 1)),
                                  reply=True), EINVAL),
    ("region_info: a loop",
     lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 9, 1, 32)), reply=True), EINVAL),
    ("region_info: 64 caps",
     lambda: RegionInfoMsg.unpack(region_info_reply(b"".join(
         le("HHI", 9, 1, 32 + 8 * (i + 1) if i < 63 else 0) for i in range(64))), reply=True),
     OK),
    ("region_info: 65 caps",
     lambda: RegionInfoMsg.unpack(region_info_reply(b"".join(
         le("HHI", 9, 1, 32 + 8 * (i + 1) if i < 64 else 0) for i in range(65))), reply=True),
     EINVAL),
    # --- DEVICE_GET_REGION_IO_FDS ---
    ("io_fds: argsz 15", lambda: RegionIoFds.unpack(le("IIII", 15, 0, 0, 0)), EINVAL),
    ("io_fds: request flags", lambda: RegionIoFds.unpack(le("IIII", 16, 1, 0, 0)), EINVAL),
    ("io_fds: request count", lambda: RegionIoFds.unpack(le("IIII", 16, 0, 0, 1)), EINVAL),
    ("io_fds: reply count 1024, header only",
     lambda: RegionIoFds.unpack(le("IIII", 16 + 40 * 1024, 0, 0, 1024), reply=True), OK),
    ("io_fds: reply count 1025",
     lambda: RegionIoFds.unpack(le("IIII", 16, 0, 0, 1025), reply=True), E2BIG),
    ("io_fds: request 17 bytes", lambda: RegionIoFds.unpack(le("IIII", 16, 0, 0, 0) + b"\0"),
     EINVAL),
    ("io_fds: reply entries long",
     lambda: RegionIoFds.unpack(le("IIII", 56, 0, 0, 1) + b"\0" * 41, reply=True), EINVAL),
    ("io_fds: reply entries short",
     lambda: RegionIoFds.unpack(le("IIII", 96, 0, 0, 2) + b"\0" * 79, reply=True), EINVAL),
    # --- DEVICE_SET_IRQS ---
    ("set_irqs: 19 bytes", lambda: IrqSet.unpack(le("IIIII", 20, 0x21, 0, 0, 0)[:19]), EINVAL),
    ("set_irqs: argsz 21 for 20 bytes", lambda: IrqSet.unpack(le("IIIII", 21, 0x21, 0, 0, 0)),
     EINVAL),
    ("set_irqs: unknown flag", lambda: IrqSet.unpack(le("IIIII", 20, 0x61, 0, 0, 0)), EINVAL),
    ("set_irqs: two data flags", lambda: IrqSet.unpack(le("IIIII", 20, 0x25, 0, 0, 0)),
     EINVAL),
    ("set_irqs: two actions", lambda: IrqSet.unpack(le("IIIII", 20, 0x31, 0, 0, 0)), EINVAL),
    ("set_irqs: no action", lambda: IrqSet.unpack(le("IIIII", 20, 0x01, 0, 0, 0)), EINVAL),
    ("set_irqs: count 2048", lambda: IrqSet.unpack(le("IIIII", 20, 0x21, 0, 0, 2048)), OK),
    ("set_irqs: count 2049", lambda: IrqSet.unpack(le("IIIII", 20, 0x21, 0, 0, 2049)), EINVAL),
    ("set_irqs: start 2048", lambda: IrqSet.unpack(le("IIIII", 20, 0x21, 0, 2048, 0)), OK),
    ("set_irqs: start 2049", lambda: IrqSet.unpack(le("IIIII", 20, 0x21, 0, 2049, 0)), EINVAL),
    ("set_irqs: bools short",
     lambda: IrqSet.unpack(le("IIIII", 22, 0x22, 0, 0, 3) + b"\1\1"), EINVAL),
    ("set_irqs: data with DATA_NONE",
     lambda: IrqSet.unpack(le("IIIII", 21, 0x21, 0, 0, 1) + b"\1"), EINVAL),
    # --- REGION access ---
    ("region access: 15 bytes", lambda: RegionAccess.unpack(b"\0" * 15, with_data=False),
     EINVAL),
    ("region access: count at the limit",
     lambda: RegionAccess.unpack(le("QII", 0, 0, 8), with_data=False, max_count=8), OK),
    ("region access: count over the limit",
     lambda: RegionAccess.unpack(le("QII", 0, 0, 9), with_data=False, max_count=8), E2BIG),
    ("region access: data short",
     lambda: RegionAccess.unpack(le("QII", 0, 0, 4) + b"abc", with_data=True), EINVAL),
    ("region access: data long",
     lambda: RegionAccess.unpack(le("QII", 0, 0, 4) + b"abcde", with_data=True), EINVAL),
    ("region access: head with data",
     lambda: RegionAccess.unpack(le("QII", 0, 0, 4) + b"abcd", with_data=False), EINVAL),
    # --- REGION_WRITE_MULTI ---
    ("write_multi: 0 writes", lambda: RegionWriteMulti.unpack(le("Q", 0)), EINVAL),
    ("write_multi: 4096 writes", lambda: RegionWriteMulti.unpack(
        le("Q", 4096) + (le("QII", 0, 0, 1) + b"\0" * 8) * 4096), OK),
    ("write_multi: 4097 writes", lambda: RegionWriteMulti.unpack(
        le("Q", 4097) + (le("QII", 0, 0, 1) + b"\0" * 8) * 4097), EINVAL),
    ("write_multi: count 0", lambda: RegionWriteMulti.unpack(
        le("Q", 1) + le("QII", 0, 0, 0) + b"\0" * 8), EINVAL),
    ("write_multi: count 8", lambda: RegionWriteMulti.unpack(
        le("Q", 1) + le("QII", 0, 0, 8) + b"\0" * 8), OK),
    ("write_multi: count 9", lambda: RegionWriteMulti.unpack(
        le("Q", 1) + le("QII", 0, 0, 9) + b"\0" * 8), EINVAL),
    ("write_multi: short", lambda: RegionWriteMulti.unpack(
        le("Q", 2) + le("QII", 0, 0, 1) + b"\0" * 8), EINVAL),
    ("write_multi: long", lambda: RegionWriteMulti.unpack(
        le("Q", 1) + le("QII", 0, 0, 1) + b"\0" * 9), EINVAL),
    ("write_multi: 7 bytes", lambda: RegionWriteMulti.unpack(b"\0" * 7), EINVAL),
    ("write_multi: reply 9 bytes", lambda: RegionWriteMulti.unpack(b"\0" * 9, reply=True),
     EINVAL),
    ("write_multi: pack 9 bytes",
     lambda: RegionWriteMulti((WriteOne(0, 0, b"\0" * 9),)).pack(), EINVAL),
    # --- DMA access ---
    ("dma access: 12-byte write reply", lambda: DmaAccess.unpack(b"\0" * 12, with_data=False),
     OK),
    ("dma access: 12 bytes with data", lambda: DmaAccess.unpack(b"\0" * 12, with_data=True),
     EINVAL),
    ("dma access: count over the limit",
     lambda: DmaAccess.unpack(le("QQ", 0, 9), with_data=False, max_count=8), E2BIG),
    ("dma access: count at the limit",
     lambda: DmaAccess.unpack(le("QQ", 0, 8), with_data=False, max_count=8), OK),
    ("dma access: data long",
     lambda: DmaAccess.unpack(le("QQ", 0, 1) + b"ab", with_data=True), EINVAL),
    ("dma access: head with data",
     lambda: DmaAccess.unpack(le("QQ", 0, 1) + b"a", with_data=False), EINVAL),
    # --- DEVICE_FEATURE ---
    ("feature: 7 bytes", lambda: DeviceFeature.unpack(b"\0" * 7), EINVAL),
    ("feature: argsz 7", lambda: DeviceFeature.unpack(le("II", 7, 1 << 16 | 1)), EINVAL),
    ("feature: argsz 8", lambda: DeviceFeature.unpack(le("II", 8, 1 << 16 | 1)), OK),
    ("feature: bit 19", lambda: DeviceFeature.unpack(le("II", 8, 1 << 19)), EINVAL),
    ("feature: GET and SET", lambda: DeviceFeature.unpack(le("II", 8, 3 << 16)), EINVAL),
    ("feature: GET and SET in a reply", lambda: DeviceFeature.unpack(le("II", 8, 3 << 16),
                                                                     reply=True), OK),
    ("feature: GET, SET and PROBE", lambda: DeviceFeature.unpack(le("II", 8, 7 << 16)), OK),
    ("migration data: 9 bytes", lambda: MigrationFeature.unpack(b"\0" * 9), EINVAL),
    ("mig state: 7 bytes", lambda: MigStateMsg.unpack(b"\0" * 7), EINVAL),
    ("mig state: 9 bytes", lambda: MigStateMsg.unpack(b"\0" * 9), EINVAL),
    ("logging: 15 bytes", lambda: DmaLoggingControl.unpack(b"\0" * 15), EINVAL),
    ("logging: 1024 ranges", lambda: DmaLoggingControl.unpack(
        le("QII", 4096, 1024, 0) + b"\0" * 16 * 1024), OK),
    ("logging: 1025 ranges", lambda: DmaLoggingControl.unpack(
        le("QII", 4096, 1025, 0) + b"\0" * 16 * 1025), E2BIG),
    ("logging: ranges short", lambda: DmaLoggingControl.unpack(
        le("QII", 4096, 1, 0) + b"\0" * 15), EINVAL),
    ("logging: ranges long", lambda: DmaLoggingControl.unpack(
        le("QII", 4096, 1, 0) + b"\0" * 17), EINVAL),
    ("logging: no ranges, trailing byte", lambda: DmaLoggingControl.unpack(
        le("QII", 4096, 0, 0) + b"\0"), EINVAL),
    ("report: page_size 0", lambda: DmaLoggingReport.unpack(le("QQQ", 0, 4096, 0)), EINVAL),
    ("report: page_size 3", lambda: DmaLoggingReport.unpack(le("QQQ", 0, 4096, 3)), EINVAL),
    ("report: page_size 1", lambda: DmaLoggingReport.unpack(le("QQQ", 0, 4096, 1)), OK),
    ("report: request 25 bytes",
     lambda: DmaLoggingReport.unpack(le("QQQ", 0, 4096, 4096) + b"\0"), EINVAL),
    ("report: reply bitmap short", lambda: DmaLoggingReport.unpack(
        le("QQQ", 0, 65 * 4096, 4096) + b"\0" * 8, reply=True), EINVAL),
    ("report: reply bitmap exact", lambda: DmaLoggingReport.unpack(
        le("QQQ", 0, 65 * 4096, 4096) + b"\0" * 16, reply=True), OK),
    # --- MIG_DATA ---
    ("mig data: 7 bytes", lambda: MigData.unpack(b"\0" * 7, with_data=False), EINVAL),
    ("mig data: size over the limit",
     lambda: MigData.unpack(le("II", 100, 9), with_data=False, max_size=8), E2BIG),
    ("mig data: read argsz exact", lambda: MigData.unpack(le("II", 12, 4), with_data=False), OK),
    ("mig data: read argsz short", lambda: MigData.unpack(le("II", 11, 4), with_data=False),
     EINVAL),
    ("mig data: read with data", lambda: MigData.unpack(le("II", 12, 4) + b"abcd",
                                                        with_data=False), EINVAL),
    ("mig data: write argsz 7", lambda: MigData.unpack(le("II", 7, 0), with_data=True), EINVAL),
    ("mig data: write argsz 8", lambda: MigData.unpack(le("II", 8, 0), with_data=True), OK),
    ("mig data: write data short", lambda: MigData.unpack(le("II", 12, 4) + b"abc",
                                                          with_data=True), EINVAL),
    ("mig data: write data long", lambda: MigData.unpack(le("II", 12, 4) + b"abcde",
                                                         with_data=True), EINVAL),
]


# What a refusal's message starts with: the message it is about, by case name.
MESSAGE_NAMES = {
    "version": ("VERSION",), "caps": ("VERSION",), "header": ("header",),
    "pack_message": ("header",), "dma_map": ("DMA_MAP",), "dma_unmap": ("DMA_UNMAP",),
    "device_info": ("DEVICE_GET_INFO",), "irq_info": ("DEVICE_GET_IRQ_INFO",),
    "region_info": ("DEVICE_GET_REGION_INFO", "REGION_INFO"),
    "io_fds": ("DEVICE_GET_REGION_IO_FDS", "REGION_IO_FDS"), "set_irqs": ("DEVICE_SET_IRQS",),
    "region access": ("REGION access",), "write_multi": ("REGION_WRITE_MULTI",),
    "dma access": ("DMA access",), "feature": ("DEVICE_FEATURE",),
    "migration data": ("MIGRATION feature",), "mig state": ("MIG_DEVICE_STATE",),
    "logging": ("DMA_LOGGING",), "report": ("DMA_LOGGING_REPORT",),
    "mig data": ("MIG_DATA", "MIG_DATA_READ"),
}


@pytest.mark.parametrize("name, call, want", CASES, ids=[c[0] for c in CASES])
def test_edges(name: str, call: Callable[[], Any], want: int) -> None:
    if want == OK:
        call()
        return
    with pytest.raises(ProtocolError) as exc:
        call()
    assert exc.value.errno == want
    # the message names the message and says what is wrong
    text = str(exc.value)
    prefixes = MESSAGE_NAMES[name.split(":")[0]]
    assert any(text.startswith(p + " ") or text.startswith(p + ":") for p in prefixes), text
    assert text == text.strip() and len(text.split(":", 1)[-1].strip()) > 8, text


def test_capabilities_keep_unknown_keys_and_defaults() -> None:
    c = Capabilities.from_json({"future": {"x": 1}})
    assert c.extra == {"future": {"x": 1}}
    assert (c.max_msg_fds, c.max_data_xfer_size, c.max_dma_maps, c.pgsizes, c.write_multiple,
            c.migration, c.twin_socket) == (1, 1 << 20, 65535, 4096, False, None, None)
    assert c.to_json() == {"future": {"x": 1}, "max_msg_fds": 1, "max_data_xfer_size": 1 << 20,
                           "max_dma_maps": 65535, "pgsizes": 4096}
    m = Capabilities.from_json({"migration": {}})
    assert m.migration == {"pgsize": 4096, "max_bitmap_size": 256 << 20}
    t = Capabilities.from_json({"twin_socket": {}})
    assert t.twin_socket == {"supported": False}
    assert Capabilities.from_json({"twin_socket": {"supported": True, "fd_index": 2}}) \
        .twin_socket == {"supported": True, "fd_index": 2}


def test_region_info_pack_edges() -> None:
    r = RegionInfoMsg(index=1, flags=3, size=0x100, sparse_areas=((0, 0x10),))
    full = r.full_size()
    assert full == 32 + 8 + 8 + 16
    assert len(r.pack(max_size=full)) == full              # exactly enough: the chain
    short = r.pack(max_size=full - 1)                      # one byte short: the head
    assert len(short) == 32 and struct.unpack_from("<I", short)[0] == full
    assert struct.unpack_from("<I", short, 12)[0] == 0     # cap_offset
    assert struct.unpack_from("<I", short, 4)[0] == 3 | 8  # CAPS still set
    # unknown capability ids are skipped, known ones after them still read
    chain = le("HHI", 7, 1, 40) + le("HHI", 2, 1, 0) + le("II", 5, 6)
    got = RegionInfoMsg.unpack(region_info_reply(chain), reply=True)
    assert got.type == (5, 6) and got.sparse_areas is None
    # without the CAPS flag the chain is not read
    got = RegionInfoMsg.unpack(region_info_reply(chain, flags=3), reply=True)
    assert got.type is None


def test_region_io_fds_pack_edges() -> None:
    subs = (SubRegionIoFd(0x10, 4, 0), SubRegionIoFd(0x20, 8, 0, 1, 2, 3))
    r = RegionIoFds(index=2, sub_regions=subs)
    need = 16 + 2 * 40
    assert len(r.pack(max_size=need)) == need
    head = r.pack(max_size=need - 1)
    assert head == le("IIII", need, 0, 2, 2)
    assert RegionIoFds.unpack(head, reply=True).sub_regions == ()


def test_irq_set_pack_sizes() -> None:
    assert IrqSet(1, 0x22, 0, 3, (True, False, True)).pack() == \
        le("IIIII", 23, 0x22, 1, 0, 3) + b"\1\0\1"
    assert IrqSet(1, 0x24, 0, 3).pack() == le("IIIII", 20, 0x24, 1, 0, 3)
    assert IrqSet(1, 0x24, 0, 3, argsz=99).pack()[:4] == le("I", 99)
    # booleans go on the wire only with DATA_BOOL
    assert IrqSet(1, 0x24, 0, 2, (True, False)).pack() == le("IIIII", 20, 0x24, 1, 0, 2)
    s = IrqSet.unpack(le("IIIII", 22, 0x22, 1, 0, 2) + b"\0\7")
    assert s.bools == (False, True)


def test_feature_and_mig_data_pack_sizes() -> None:
    assert DeviceFeature(0x10001).pack() == le("II", 8, 0x10001)
    assert DeviceFeature(0x10001, b"abc").pack() == le("II", 11, 0x10001) + b"abc"
    assert MigData(16).pack() == le("II", 24, 16)
    assert MigData(2, b"ab").pack() == le("II", 10, 2) + b"ab"
    assert MigData(1, b"abcd").pack() == le("II", 12, 1) + b"abcd"
    assert DmaLoggingReport(0, 4096 * 64, 4096).bitmap_size == 8
    assert DmaLoggingReport(0, 4096 * 64 + 1, 4096).bitmap_size == 16
    assert DmaLoggingReport(0, 1, 4096).bitmap_size == 8
    assert DmaLoggingReport(0, 4096, 0).bitmap_size == 0


def test_message_properties_and_repr() -> None:
    m = Message(3, 9, 0x31, 5, b"xy", [])
    assert (m.is_reply, m.no_reply, m.is_error) == (True, True, True)
    assert m.header == Header(3, 9, 18, 0x31, 5)
    assert repr(m) == "<Message reply REGION_READ id=3 flags=0x31 error=5 payload=2B fds=[]>"
    m = Message(4, 99, 0x0, 0, b"", [])
    assert (m.is_reply, m.no_reply, m.is_error) == (False, False, False)
    assert repr(m) == "<Message command 99 id=4 flags=0x0 error=0 payload=0B fds=[]>"
    h = Header(1, 1, 16, 0x2F)
    assert (h.is_reply, h.no_reply, h.is_error) == (False, False, True)


@pytest.mark.parametrize("message, name", [
    (lambda: Header(2**16, 1, 16), "header"),
    (lambda: DmaAccess(2**64, 0), "DMA access"),
    (lambda: DeviceFeature(2**32), "DEVICE_FEATURE"),
    (lambda: MigrationFeature(2**64), "MIGRATION feature"),
    (lambda: MigStateMsg(2**32), "MIG_DEVICE_STATE"),
    (lambda: DmaLoggingControl(2**64), "DMA_LOGGING"),
    (lambda: DmaLoggingReport(2**64, 0, 1), "DMA_LOGGING_REPORT"),
    (lambda: RegionIoFds(index=2**32), "REGION_IO_FDS"),
    (lambda: RegionIoFds(index=0, sub_regions=(SubRegionIoFd(2**64, 0, 0),)), "sub-region"),
    (lambda: IrqSet(2**32, 0x21), "DEVICE_SET_IRQS"),
    (lambda: IrqInfoMsg(2**32), "DEVICE_GET_IRQ_INFO"),
    (lambda: DeviceInfoMsg(argsz=2**32), "DEVICE_GET_INFO"),
    (lambda: RegionAccess(2**32, 0, 0), "REGION access"),
    (lambda: DmaMap(2**64, 1), "DMA_MAP"),
    (lambda: DmaUnmap(2**64, 1), "DMA_UNMAP"),
    (lambda: MigData(2**32), "MIG_DATA"),
    (lambda: RegionInfoMsg(index=2**32), "REGION_INFO"),
    (lambda: Version(2**16), "VERSION"),
    (lambda: RegionWriteMulti(wr_cnt=2**64), "WRITE_MULTI"),
    (lambda: RegionWriteMulti((WriteOne(2**32, 0, b"a"),)), "WRITE_MULTI entry"),
    (lambda: DmaLoggingControl(4096, (DmaLoggingRange(2**64, 1),)), "DMA_LOGGING range"),
    (lambda: DmaUnmap(0, 1, flags=1, bitmap_pgsize=2**64), "DMA_UNMAP bitmap"),
    (lambda: RegionInfoMsg(index=0, sparse_areas=((2**64, 1),)), "sparse area"),
    (lambda: RegionInfoMsg(index=0, type=(2**32, 0)), "region type"),
])
def test_pack_names_the_message_whose_field_does_not_fit(message: Callable[[], Any],
                                                         name: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        message().pack()
    assert exc.value.errno == EINVAL
    assert str(exc.value).startswith(f"{name}: a field does not fit its wire width")


def test_region_io_fds_header_only_keeps_count() -> None:
    """A reply too big for the client's argsz: header only, with the count and
    argsz it would need."""
    assert RegionIoFds(index=1, argsz=96, count=2).pack() == le("IIII", 96, 0, 1, 2)


def test_big_messages_keep_every_header_field_and_their_fds() -> None:
    """Messages larger than one read are assembled; each keeps its own
    header fields and fds, and the reader is ready for the next one."""
    import os
    import socket

    from pyvfio.user.protocol import MessageReader, send_message

    a, b = socket.socketpair()
    reader = MessageReader(b, max_msg_size=1 << 20, bufsize=4096)
    r, w = os.pipe()
    try:
        first = le("HHIII", 7, 10, 16 + 50000, 0x10, 3) + b"a" * 50000
        second = le("HHIII", 8, 9, 16 + 30000, 0x1, 0) + b"b" * 30000
        send_message(a, first, [r])
        a.sendall(second)
        m1 = reader.read()
        m2 = reader.read()
        assert m1 is not None and m2 is not None
        assert (m1.msg_id, m1.command, m1.flags, m1.error, m1.payload, len(m1.fds)) == \
            (7, 10, 0x10, 3, b"a" * 50000, 1)
        assert (m2.msg_id, m2.command, m2.flags, m2.error, m2.payload, m2.fds) == \
            (8, 9, 0x1, 0, b"b" * 30000, [])
        assert m1.problem is None and m2.problem is None
        m1.close_fds()
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()
        reader.close()


@pytest.mark.parametrize("call, text", [
    (lambda: RegionIoFds.unpack(le("IIII", 16, 1, 0, 0)),
     "DEVICE_GET_REGION_IO_FDS: flags and count must be zero"),
    (lambda: RegionIoFds.unpack(le("IIII", 56, 0, 0, 1) + b"\0", reply=True),
     "REGION_IO_FDS reply: payload is 17 bytes, need exactly 56"),
    (lambda: RegionWriteMulti((WriteOne(0, 0, b"\0" * 9),)).pack(),
     "REGION_WRITE_MULTI: a write carries at most 8 bytes"),
    (lambda: RegionWriteMulti.unpack(b"\0" * 7),
     "REGION_WRITE_MULTI: payload is 7 bytes, need at least 8"),
    (lambda: RegionWriteMulti.unpack(b"\0" * 9, reply=True),
     "REGION_WRITE_MULTI reply: payload is 9 bytes, need exactly 8"),
    (lambda: DmaLoggingControl.unpack(b"\0" * 15),
     "DMA_LOGGING control: payload is 15 bytes, need at least 16"),
    (lambda: DmaLoggingControl.unpack(le("QII", 4096, 1, 0) + b"\0" * 15),
     "DMA_LOGGING ranges: payload is 31 bytes, need exactly 32"),
    (lambda: MigData.unpack(le("II", 12, 4) + b"abc", with_data=True),
     "MIG_DATA data: payload is 11 bytes, need exactly 12"),
    (lambda: MigData.unpack(le("II", 11, 4), with_data=False), "MIG_DATA_READ: argsz 11 < 12"),
    (lambda: DeviceFeature.unpack(le("II", 8, 0x30001)),
     "DEVICE_FEATURE: GET and SET together need PROBE"),
    (lambda: IrqSet.unpack(le("IIIII", 20, 0x23, 0, 0, 0)),
     "DEVICE_SET_IRQS: flags 0x23 need exactly one DATA and one ACTION flag"),
    (lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 1, 1, 0) + le("I", 1)),
                                  reply=True),
     "REGION_INFO: truncated sparse mmap capability"),
    (lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 1, 1, 0) + le("II", 1, 0)),
                                  reply=True),
     "REGION_INFO: sparse areas run past the reply"),
    (lambda: RegionInfoMsg.unpack(region_info_reply(le("HHI", 2, 1, 0) + le("I", 1)),
                                  reply=True),
     "REGION_INFO: truncated type capability"),
    (lambda: DmaUnmap.unpack(le("IIQQQ", 40, 1, 0, 4096, 4096)),
     "DMA_UNMAP with bitmap: payload is 32 bytes, need at least 40"),
    (lambda: DmaUnmap.unpack(le("IIQQQQ", 48, 1, 0, 4096, 4096, 8) + b"\0" * 8),
     "DMA_UNMAP: request carries bitmap data"),
])
def test_error_texts(call: Callable[[], Any], text: str) -> None:
    """The whole text of errors whose wording the edge table above checks
    only by prefix (the message name and errno)."""
    with pytest.raises(ProtocolError) as exc:
        call()
    assert str(exc.value) == text


def test_dma_write_reply_of_12_bytes_is_unsigned() -> None:
    """The spec's 12-byte DMA_WRITE reply (address u64, count u32): the top
    bits of both fields are data, not a sign."""
    got = DmaAccess.unpack(le("QI", 2**64 - 4096, 2**32 - 1), with_data=False)
    assert (got.address, got.count, got.data) == (2**64 - 4096, 2**32 - 1, b"")
