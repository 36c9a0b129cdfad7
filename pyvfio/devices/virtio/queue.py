"""Split virtqueues, as a device sees them (virtio 1.x, section 2.7).

A split virtqueue lives in the driver's memory in three parts:

- the **descriptor table**, ``size`` entries of ``struct virtq_desc``
  (``le64 addr; le32 len; le16 flags; le16 next``);
- the **driver area** (avail ring): ``le16 flags; le16 idx; le16 ring[size];
  le16 used_event``;
- the **device area** (used ring): ``le16 flags; le16 idx;
  struct virtq_used_elem { le32 id; le32 len; } ring[size]; le16 avail_event``.

:class:`SplitQueue` reads and writes them only through a :class:`GuestMemory`
(for a device model: its DMA access, so every address is checked against the
client's DMA windows).  The driver is not trusted: a chain is bounded by the
queue size (a looping ``next`` chain ends in :class:`VirtqueueError` instead of
spinning), an indirect table by its length and by one level of nesting, and
the whole chain by :data:`MAX_CHAIN_BYTES`.  A device that meets a broken
queue sets ``DEVICE_NEEDS_RESET`` (section 2.1.2) rather than guessing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "MAX_CHAIN_BYTES",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Buffer",
    "DescriptorChain",
    "GuestMemory",
    "SplitQueue",
    "VirtqueueError",
]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768  # split queues: at most 2^15 entries (section 2.7)
MAX_CHAIN_BYTES = 64 << 20
"""The most bytes one descriptor chain may describe.  A chain is what one
request may make the device read or write; larger ones are refused."""

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class VirtqueueError(ValueError):
    """Raised when the driver's queue is malformed: a descriptor index out of
    the table, a chain longer than the queue (a loop), a nested or misaligned
    indirect table, a readable descriptor after a writable one, or memory the
    device cannot reach.  The device should then need a reset."""


class GuestMemory(Protocol):
    """What a queue needs: read and write the driver's memory by address
    (an IOVA for a vfio-user device).  Both raise ``OSError`` on an address
    that is not mapped."""

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Buffer:
    """One descriptor: ``len`` bytes at ``addr``, device-writable or not."""

    addr: int
    len: int
    writable: bool


@dataclass
class DescriptorChain:
    """The buffers of one request (head index ``head``): the readable ones
    first, then the writable ones, as the spec requires of the driver."""

    head: int
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.writable]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.writable]

    @property
    def readable_len(self) -> int:
        return sum(b.len for b in self.buffers if not b.writable)

    @property
    def writable_len(self) -> int:
        return sum(b.len for b in self.buffers if b.writable)

    def read(self, mem: GuestMemory, limit: int | None = None) -> bytes:
        """The readable bytes of the chain, in order (at most ``limit``)."""
        out = bytearray()
        for b in self.readable:
            n = b.len if limit is None else min(b.len, limit - len(out))
            if n <= 0:
                break
            out += mem.read(b.addr, n)
        return bytes(out)

    def write(self, mem: GuestMemory, data: bytes, skip: int = 0) -> int:
        """Write ``data`` into the writable buffers from byte ``skip`` of
        them on; return how many bytes were written (all, unless the
        buffers are shorter)."""
        pos = 0
        for b, start, n in self._spans(skip, len(data)):
            mem.write(b.addr + start, data[pos:pos + n])
            pos += n
        return pos

    def _spans(self, skip: int, size: int) -> Iterator[tuple[Buffer, int, int]]:
        for b in self.writable:
            if size <= 0:
                return
            if skip >= b.len:
                skip -= b.len
                continue
            n = min(b.len - skip, size)
            yield b, skip, n
            size -= n
            skip = 0


class SplitQueue:
    """One split virtqueue of a device.

    The transport fills in ``size``, ``desc``, ``driver``, ``device`` (the
    addresses the driver programmed) and ``enabled``; the device model calls
    :meth:`pop` for each new request and :meth:`push` when it is done, then
    :meth:`needs_interrupt` to decide whether to signal the driver.
    ``event_idx`` follows VIRTIO_F_EVENT_IDX (used_event / avail_event)."""

    def __init__(self, index: int, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to "
                             f"{MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.event_idx = False
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (section 4.1.4.3)."""
        self.size = self.max_size
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.enabled = False
        self.msix_vector = 0xFFFF
        self.last_avail = 0
        self.used_idx = 0
        self._signalled_used: int | None = None

    # ---- reading requests ----

    def avail_idx(self, mem: GuestMemory) -> int:
        return int(_U16.unpack(mem.read(self.driver + 2, 2))[0])

    def pending(self, mem: GuestMemory) -> int:
        """How many requests the driver has made available and we have not popped."""
        return (self.avail_idx(mem) - self.last_avail) & 0xFFFF

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or ``None``.  Raises
        :class:`VirtqueueError` on a malformed queue (nothing is consumed)."""
        if not self.enabled:
            return None
        pending = self.pending(mem)
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"queue {self.index}: avail idx is {pending} entries ahead "
                                 f"of the device in a {self.size}-entry queue")
        slot = self.last_avail % self.size
        head = int(_U16.unpack(mem.read(self.driver + 4 + 2 * slot, 2))[0])
        chain = self.walk(mem, head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            # avail_event: "tell me when you pass this": we want every kick.
            mem.write(self.device + 4 + 8 * self.size, _U16.pack(self.last_avail))
        return chain

    def _desc(self, mem: GuestMemory, table: int, index: int) -> tuple[int, int, int, int]:
        try:
            raw = mem.read(table + 16 * index, 16)
        except OSError as exc:
            raise VirtqueueError(f"queue {self.index}: descriptor {index} at "
                                 f"{table + 16 * index:#x} unreadable: {exc}") from None
        addr, length, flags, nxt = _DESC.unpack(raw)
        return addr, length, flags, nxt

    def walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        """Follow the chain that starts at descriptor ``head``."""
        if head >= self.size:
            raise VirtqueueError(f"queue {self.index}: head {head} outside the "
                                 f"{self.size}-entry table")
        chain = DescriptorChain(head)
        total = 0
        seen_writable = False
        table, table_len, index = self.desc, self.size, head
        in_indirect = False
        steps = 0
        while True:
            steps += 1
            if steps > table_len:
                raise VirtqueueError(f"queue {self.index}: chain from {head} is longer than "
                                     f"its {table_len}-entry table (a loop?)")
            addr, length, flags, nxt = self._desc(mem, table, index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtqueueError(f"queue {self.index}: nested indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise VirtqueueError(f"queue {self.index}: indirect table of {length} "
                                         "bytes")
                table, table_len, index = addr, length // 16, 0
                in_indirect = True
                steps = 0
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if seen_writable and not writable:
                raise VirtqueueError(f"queue {self.index}: readable descriptor after a "
                                     "writable one")
            seen_writable |= writable
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"queue {self.index}: chain from {head} describes more "
                                     f"than {MAX_CHAIN_BYTES} bytes")
            if addr + length > 1 << 64:
                raise VirtqueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x} wraps")
            chain.buffers.append(Buffer(addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise VirtqueueError(f"queue {self.index}: next {nxt} outside the "
                                     f"{table_len}-entry table")
            index = nxt

    # ---- completing requests ----

    def push(self, mem: GuestMemory, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` to the driver with ``written`` bytes written into
        its writable buffers: the used element, then the used index."""
        slot = self.used_idx % self.size
        mem.write(self.device + 4 + 8 * slot, _USED_ELEM.pack(chain.head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.write(self.device + 2, _U16.pack(self.used_idx))

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the
        last one: ``VIRTQ_AVAIL_F_NO_INTERRUPT``, or ``used_event`` with
        VIRTIO_F_EVENT_IDX (section 2.7.7.2)."""
        if self.event_idx:
            used_event = int(_U16.unpack(mem.read(self.driver + 4 + 2 * self.size, 2))[0])
            old = self._signalled_used
            new = self.used_idx
            self._signalled_used = new
            if old is None:
                return True
            # vring_need_event(): did the index pass used_event since `old`?
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags = int(_U16.unpack(mem.read(self.driver, 2))[0])
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
