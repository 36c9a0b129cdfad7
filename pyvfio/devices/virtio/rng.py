"""virtio-rng: the entropy device (virtio 1.x, section 5.4), in a page.

One virtqueue (``requestq``); the driver posts device-writable buffers and
the device fills them with random bytes.  No feature bits, no configuration.
The guest's ``virtio_rng`` driver registers it as a hwrng, so
``/dev/hwrng`` returns what :attr:`VirtioRng.source` produced.

The source is a callable ``source(n) -> n bytes``: :func:`os.urandom` by
default, or :class:`SeededSource` for a reproducible stream (tests compare
what the guest read with the stream).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from pyvfio.devices.virtio.queue import DescriptorChain, SplitQueue
from pyvfio.devices.virtio.transport import VirtioPciDevice

__all__ = ["VIRTIO_ID_RNG", "SeededSource", "VirtioRng"]

VIRTIO_ID_RNG = 4
MAX_REQUEST = 64 << 10  # bytes served per request at most; the driver asks for less


class SeededSource:
    """A deterministic byte stream for tests: block ``i`` (64 bytes) is
    BLAKE2b-512 of ``seed`` and ``i``; the stream is read in order.
    :meth:`stream_of` gives the first ``n`` bytes of the same stream, to
    check what a driver read against."""

    BLOCK = 64

    def __init__(self, seed: int | bytes) -> None:
        self.seed = seed if isinstance(seed, bytes) else str(seed).encode()
        self.position = 0

    @classmethod
    def stream_of(cls, seed: int | bytes, n: int) -> bytes:
        return cls(seed)(n)

    def _block(self, i: int) -> bytes:
        return hashlib.blake2b(i.to_bytes(8, "little"), key=self.seed[:64]).digest()

    def __call__(self, n: int) -> bytes:
        first, end = self.position // self.BLOCK, self.position + n
        data = b"".join(self._block(i) for i in range(first, -(-end // self.BLOCK)))
        skip = self.position - first * self.BLOCK
        self.position = end
        return data[skip:skip + n]


class VirtioRng(VirtioPciDevice):
    """A virtio entropy device; PCI ``1af4:1044``, class 0x00ff (other)."""

    name = "virtio-rng"

    def __init__(self, source: Callable[[int], bytes] = os.urandom, *,
                 queue_size: int = 64) -> None:
        super().__init__(virtio_id=VIRTIO_ID_RNG, queue_sizes=[queue_size],
                         class_code=0x00FF00)
        self.source = source
        self.bytes_served = 0

    def handle_request(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        n = min(chain.writable_len, MAX_REQUEST)
        if n == 0:
            return 0
        written = chain.write(self._mem, self.source(n))
        self.bytes_served += written
        return written
