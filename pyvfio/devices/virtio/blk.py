"""virtio-blk backed by a file (virtio 1.x, section 5.2).

One virtqueue (``requestq``).  Each request is a chain: a 16-byte header
(``struct virtio_blk_req``: ``le32 type; le32 reserved; le64 sector``)
readable by the device, then data buffers (readable for a write,
writable for a read), then one writable status byte.  Served here:

==========  ==========================================================
``IN``      read ``sector * 512`` onwards into the data buffers (pread)
``OUT``     write the data buffers there (pwrite; refused when read-only)
``FLUSH``   ``fsync`` the file (offered as ``VIRTIO_BLK_F_FLUSH``: the
            guest's ``sync`` reaches the host's disk)
``GET_ID``  the 20-byte serial (``pyvfio`` and the file's inode number)
==========  ==========================================================

Anything else is ``VIRTIO_BLK_S_UNSUPP``; an access past the end of the
file, an unaligned length or a request over :data:`MAX_REQUEST_BYTES` is
``VIRTIO_BLK_S_IOERR``.  The capacity is the file's size in 512-byte
sectors when the device is created (a trailing partial sector is not used).
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from pyvfio.devices.model import DmaFault
from pyvfio.devices.virtio.queue import DescriptorChain, SplitQueue, VirtqueueError
from pyvfio.devices.virtio.transport import VirtioPciDevice
from pyvfio.errors import UsageError

__all__ = [
    "SECTOR_SIZE",
    "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_FLUSH",
    "VIRTIO_BLK_F_RO",
    "VIRTIO_BLK_F_SEG_MAX",
    "VIRTIO_BLK_F_SIZE_MAX",
    "VIRTIO_ID_BLOCK",
    "BlkStatus",
    "BlkType",
    "VirtioBlk",
]

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_ID_BYTES = 20
SIZE_MAX = 1 << 20  # largest segment, bytes
MAX_REQUEST_BYTES = 4 << 20
_HEADER = struct.Struct("<IIQ")
_CONFIG = struct.Struct("<QII4xI")  # capacity, size_max, seg_max, (geometry), blk_size


class BlkType:
    """``VIRTIO_BLK_T_*``."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8


class BlkStatus:
    """``VIRTIO_BLK_S_*``."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class VirtioBlk(VirtioPciDevice):
    """A virtio block device on ``path`` (a regular file or a block device);
    PCI ``1af4:1042``, class 0x0100 (SCSI storage, as QEMU's).  With
    ``read_only`` the file is opened read-only and ``VIRTIO_BLK_F_RO`` is
    offered.  Raises :class:`~pyvfio.errors.UsageError` naming the path when
    it cannot be opened or holds less than one sector."""

    name = "virtio-blk"

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 queue_size: int = 128) -> None:
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            hint = " (create it first, e.g. truncate -s 64M FILE)" \
                if exc.errno == errno.ENOENT else ""
            raise UsageError(f"virtio-blk: cannot open {self.path}: "
                             f"{exc.strerror or exc}{hint}") from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise UsageError(f"virtio-blk: {self.path} is not a regular file or block "
                                 "device")
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < SECTOR_SIZE:
                raise UsageError(f"virtio-blk: {self.path} holds {size} bytes, less than one "
                                 f"{SECTOR_SIZE}-byte sector (e.g. truncate -s 64M FILE)")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.read_only = read_only
        self.capacity = size // SECTOR_SIZE
        self.serial = f"pyvfio-{st.st_ino}".encode()[:VIRTIO_BLK_ID_BYTES]
        features = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX
                    | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
                    | (1 << VIRTIO_BLK_F_RO if read_only else 0))
        self.seg_max = queue_size - 2  # the header and the status take two
        super().__init__(virtio_id=VIRTIO_ID_BLOCK, queue_sizes=[queue_size],
                         features=features, class_code=0x010000)
        self.stats = {"in": 0, "out": 0, "flush": 0, "get_id": 0, "errors": 0}

    def device_config(self) -> bytes:
        return _CONFIG.pack(self.capacity, SIZE_MAX, self.seg_max, SECTOR_SIZE).ljust(64, b"\0")

    def handle_request(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        mem = self._mem
        status_at = chain.writable_len - 1
        if status_at < 0 or chain.readable_len < _HEADER.size:
            raise VirtqueueError(f"virtio-blk: request {chain.head} has no header or no "
                                 "status byte")
        kind, _reserved, sector = _HEADER.unpack(chain.read(mem, _HEADER.size))
        data_in = status_at  # device-writable data bytes before the status
        data_out = chain.readable_len - _HEADER.size
        status, written = BlkStatus.OK, 0
        try:
            if kind == BlkType.IN:
                self._check_range(sector, data_in)
                data = os.pread(self.fd, data_in, sector * SECTOR_SIZE)
                if len(data) != data_in:
                    raise OSError(errno.EIO, "short read")
                written = chain.write(mem, data)
                self.stats["in"] += 1
            elif kind == BlkType.OUT:
                if self.read_only:
                    raise OSError(errno.EROFS, "read-only device")
                self._check_range(sector, data_out)
                data = chain.read(mem)[_HEADER.size:]
                if os.pwrite(self.fd, data, sector * SECTOR_SIZE) != len(data):
                    raise OSError(errno.EIO, "short write")
                self.stats["out"] += 1
            elif kind == BlkType.FLUSH:
                if not self.read_only:
                    os.fsync(self.fd)
                self.stats["flush"] += 1
            elif kind == BlkType.GET_ID:
                ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:data_in]
                written = chain.write(mem, ident)
                self.stats["get_id"] += 1
            else:
                status = BlkStatus.UNSUPP
        except DmaFault:
            raise  # the driver's memory, not the file: the queue is broken
        except OSError:
            status = BlkStatus.IOERR
            self.stats["errors"] += 1
        chain.write(mem, bytes([status]), skip=status_at)
        return written + 1

    def _check_range(self, sector: int, length: int) -> None:
        if length % SECTOR_SIZE or length > MAX_REQUEST_BYTES:
            raise OSError(errno.EINVAL, f"request of {length} bytes")
        if sector + length // SECTOR_SIZE > self.capacity:
            raise OSError(errno.ENOSPC, f"sector {sector}+{length // SECTOR_SIZE} past "
                          f"{self.capacity}")

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
