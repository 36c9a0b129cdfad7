"""Split virtqueue code in-process: descriptor chains from hypothesis
against a reference walk, hostile chains bounded, the used ring and
interrupt suppression."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvfio.devices.virtio.queue import (
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Buffer,
    SplitQueue,
    VirtqueueError,
)

DESC, AVAIL, USED, INDIRECT = 0x0000, 0x4000, 0x8000, 0xC000
MEM_SIZE = 0x10000


class FlatMemory:
    """Guest memory of MEM_SIZE bytes; anything outside faults like an
    unmapped DMA address."""

    def __init__(self, size: int = MEM_SIZE) -> None:
        self.data = bytearray(size)
        self.reads = 0

    def read(self, addr: int, size: int) -> bytes:
        self.reads += 1
        if addr < 0 or addr + size > len(self.data):
            raise OSError(14, f"{addr:#x}+{size} not mapped")
        return bytes(self.data[addr:addr + size])

    def write(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > len(self.data):
            raise OSError(14, f"{addr:#x}+{len(data)} not mapped")
        self.data[addr:addr + len(data)] = data


def make_queue(size: int) -> SplitQueue:
    q = SplitQueue(0, size)
    q.desc, q.driver, q.device, q.enabled = DESC, AVAIL, USED, True
    return q


def put_desc(mem: FlatMemory, table: int, i: int, addr: int, length: int, flags: int,
             nxt: int) -> None:
    mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def publish(mem: FlatMemory, q: SplitQueue, heads: list[int]) -> None:
    idx = struct.unpack_from("<H", mem.data, AVAIL + 2)[0]
    for h in heads:
        mem.write(AVAIL + 4 + 2 * (idx % q.size), struct.pack("<H", h))
        idx = (idx + 1) & 0xFFFF
    mem.write(AVAIL + 2, struct.pack("<H", idx))


def reference_walk(descs: list[tuple[int, int, int, int]], head: int,
                   indirect: list[tuple[int, int, int, int]]) -> list[Buffer] | None:
    """The spec's rules with a visited set; None where the chain is invalid."""
    table, out, seen, writable_seen, nested = descs, [], set(), False, False
    i = head
    if i >= len(table):
        return None
    while True:
        if (id(table), i) in seen:
            return None
        seen.add((id(table), i))
        addr, length, flags, nxt = table[i]
        if flags & VIRTQ_DESC_F_INDIRECT:
            if nested or flags & VIRTQ_DESC_F_NEXT or length == 0 or length % 16:
                return None
            assert addr == INDIRECT  # the generator places one table
            table, i, nested = indirect[:length // 16], 0, True
            continue
        w = bool(flags & VIRTQ_DESC_F_WRITE)
        if writable_seen and not w:
            return None
        writable_seen |= w
        out.append(Buffer(addr, length, w))
        if not flags & VIRTQ_DESC_F_NEXT:
            return out
        if nxt >= len(table):
            return None
        i = nxt


desc_st = st.tuples(st.sampled_from([0x100, 0x2000, 0xF000]), st.integers(0, 4096),
                    st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                     VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                                     VIRTQ_DESC_F_INDIRECT]),
                    st.integers(0, 20))


@settings(max_examples=300, deadline=None)
@given(size_log=st.integers(0, 4), data=st.data())
def test_walk_matches_the_reference(size_log, data):
    size = 1 << size_log
    descs = data.draw(st.lists(desc_st, min_size=size, max_size=size))
    indirect = data.draw(st.lists(desc_st, min_size=0, max_size=8))
    # Indirect descriptors point at the one indirect table.
    descs = [(INDIRECT if f & VIRTQ_DESC_F_INDIRECT else a, ln if not f & VIRTQ_DESC_F_INDIRECT
              else 16 * data.draw(st.integers(0, len(indirect) + 1)), f, n)
             for a, ln, f, n in descs]
    head = data.draw(st.integers(0, size))
    mem = FlatMemory()
    for i, d in enumerate(descs):
        put_desc(mem, DESC, i, *d)
    for i, d in enumerate(indirect):
        put_desc(mem, INDIRECT, i, *d)
    q = make_queue(size)
    # Entries of the indirect table past those written read as zeros.
    expected = reference_walk(descs, head, indirect + [(0, 0, 0, 0)] * 16)
    if expected is None:
        with pytest.raises(VirtqueueError):
            q.walk(mem, head)
    else:
        assert q.walk(mem, head).buffers == expected


def test_loop_is_bounded_by_the_table():
    # Two descriptors pointing at each other in a 32768-entry table: the
    # walk gives up after one table's worth of steps, it does not spin.
    mem = FlatMemory(16 * 32768)
    q = make_queue(32768)
    q.desc = 0
    put_desc(mem, 0, 0, 0, 1, VIRTQ_DESC_F_NEXT, 1)
    put_desc(mem, 0, 1, 0, 1, VIRTQ_DESC_F_NEXT, 0)
    with pytest.raises(VirtqueueError, match="loop"):
        q.walk(mem, 0)
    assert mem.reads <= 32768 + 1


def test_chain_bytes_are_bounded():
    mem = FlatMemory()
    q = make_queue(4)
    for i in range(4):
        put_desc(mem, DESC, i, 0x100, MAX_CHAIN_BYTES // 3, VIRTQ_DESC_F_NEXT if i < 3 else 0,
                 i + 1)
    with pytest.raises(VirtqueueError, match="more than"):
        q.walk(mem, 0)


def test_avail_index_too_far_ahead():
    mem = FlatMemory()
    q = make_queue(4)
    mem.write(AVAIL + 2, struct.pack("<H", 5))
    with pytest.raises(VirtqueueError, match="ahead"):
        q.pop(mem)
    assert q.last_avail == 0


def test_pop_push_round_trip_and_wrap():
    mem = FlatMemory()
    q = make_queue(4)
    q.last_avail = q.used_idx = 0xFFFE
    mem.write(AVAIL + 2, struct.pack("<H", 0xFFFE))
    mem.write(USED + 2, struct.pack("<H", 0xFFFE))
    for i in range(4):
        put_desc(mem, DESC, i, 0x2000 + 16 * i, 16, VIRTQ_DESC_F_WRITE, 0)
    publish(mem, q, [3, 1, 2])
    chains = []
    while (c := q.pop(mem)) is not None:
        chains.append(c)
    assert [c.head for c in chains] == [3, 1, 2]
    for c in chains:
        assert c.write(mem, b"\xAA" * 20) == 16   # longer than the buffer: cut
        q.push(mem, c, 16)
    assert struct.unpack_from("<H", mem.data, USED + 2)[0] == 1  # wrapped past 0xFFFF
    elems = [struct.unpack_from("<II", mem.data, USED + 4 + 8 * (s % 4))
             for s in (0xFFFE, 0xFFFF, 0x10000)]
    assert elems == [(3, 16), (1, 16), (2, 16)]


def test_chain_write_skip_spans_buffers():
    mem = FlatMemory()
    q = make_queue(4)
    put_desc(mem, DESC, 0, 0x100, 4, VIRTQ_DESC_F_NEXT, 1)
    put_desc(mem, DESC, 1, 0x200, 3, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    put_desc(mem, DESC, 2, 0x300, 5, VIRTQ_DESC_F_WRITE, 0)
    chain = q.walk(mem, 0)
    assert (chain.readable_len, chain.writable_len) == (4, 8)
    assert chain.write(mem, b"abcd", skip=2) == 4
    assert mem.data[0x200:0x203] == b"\0\0a" and mem.data[0x300:0x303] == b"bcd"


def test_interrupt_suppression():
    mem = FlatMemory()
    q = make_queue(4)
    assert q.needs_interrupt(mem)
    mem.write(AVAIL, struct.pack("<H", 1))         # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not q.needs_interrupt(mem)
    # VIRTIO_F_EVENT_IDX: interrupt only when used idx passes used_event.
    q.event_idx = True
    mem.write(AVAIL + 4 + 2 * 4, struct.pack("<H", 2))  # used_event = 2
    q.used_idx = 1
    assert q.needs_interrupt(mem)                   # first one always
    q.used_idx = 2
    assert not q.needs_interrupt(mem)               # passed 1 -> 2, event at 2 not crossed
    q.used_idx = 3
    assert q.needs_interrupt(mem)                   # crossed 2


def test_bad_sizes():
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            SplitQueue(0, bad)
