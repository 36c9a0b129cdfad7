"""DmaTable's files: windows of one file share one mapping or fd, unsealed
files are never mmapped, and every count is bounded."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal

import pytest

from pyvfio.user.dma import DmaFault, DmaTable
from pyvfio.user.protocol import DmaMapFlag

RW = int(DmaMapFlag.READ | DmaMapFlag.WRITE)
RO = int(DmaMapFlag.READ)


def memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def open_fds(fd: int) -> int:
    """How many of this process's fds refer to ``fd``'s file (``fd`` included):
    exact whatever other tests' threads open or close meanwhile."""
    st = os.fstat(fd)
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            other = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd, or one closed since
        n += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
    return n


def test_windows_of_one_file_share_one_mapping():
    fd = memfd(64 * 4096)
    table = DmaTable()
    before = open_fds(fd)
    for i in range(64):
        table.add(0x100000 + i * 0x10000, 4096, RW, fd, i * 4096)
    assert table.files == 1 and open_fds(fd) == before + 1  # CPython's mmap: one dup
    table.write(0x100000 + 5 * 0x10000 + 8, b"five")
    assert os.pread(fd, 4, 5 * 4096 + 8) == b"five"
    table.remove_all()
    assert table.files == 0 and open_fds(fd) == before
    os.close(fd)


def test_access_and_growth_make_separate_files():
    fd = memfd(2 * 4096)                     # shrink sealed, may grow
    table = DmaTable()
    table.add(0x1000, 4096, RW, fd, 0)
    table.add(0x2000, 4096, RO, fd, 0)        # read-only: its own mapping
    assert table.files == 2
    os.ftruncate(fd, 4 * 4096)
    table.add(0x3000, 4096, RW, fd, 3 * 4096)  # past the first mapping's end
    assert table.files == 3
    table.write(0x3000, b"grown")
    assert os.pread(fd, 5, 3 * 4096) == b"grown"
    with pytest.raises(DmaFault) as exc:
        table.write(0x2000, b"x")              # the window's protection
    assert exc.value.errno == errno.EACCES
    table.remove(0x1000, 4096)
    assert table.files == 2
    table.remove_all()
    os.close(fd)


def test_unsealed_file_uses_pread_and_never_grows_the_file():
    fd = memfd(4096, seals=0)
    table = DmaTable()
    m = table.add(0x1000, 4096, RW, fd, 0)
    assert m.view is None and m.file is not None
    table.write(0x1000, b"abc")
    assert table.read(0x1000, 3) == b"abc"
    buf = bytearray(3)
    table.readinto(0x1000, buf)
    assert buf == b"abc"
    os.ftruncate(fd, 2)
    for op in (lambda: table.read(0x1000, 3), lambda: table.write(0x1000 + 100, b"x")):
        with pytest.raises(DmaFault) as exc:
            op()
        assert exc.value.errno == errno.EFAULT
    assert os.fstat(fd).st_size == 2           # a write did not extend the client's file
    with pytest.raises(DmaFault):
        table.view(0x1000, 1)                  # no zero-copy view of such a window
    table.remove_all()
    os.close(fd)


def test_files_per_client_are_bounded():
    table = DmaTable(max_files=3)
    fds = [memfd(4096) for _ in range(4)]
    for i, fd in enumerate(fds[:3]):
        table.add(0x1000 * (i + 1), 4096, RW, fd)
    with pytest.raises(OSError) as exc:
        table.add(0x10000, 4096, RW, fds[3])
    assert exc.value.errno == errno.ENOSPC
    table.add(0x20000, 4096, RW, fds[0])       # another window of a held file is fine
    table.remove_all()
    for fd in fds:
        os.close(fd)


def test_non_regular_fds_are_refused():
    r, w = os.pipe()
    table = DmaTable()
    with pytest.raises(OSError) as exc:
        table.add(0x1000, 4096, RW, r)
    assert exc.value.errno == errno.EINVAL and len(table) == 0
    os.close(r)
    os.close(w)


def test_a_held_view_keeps_the_mapping_until_released():
    fd = memfd(4096)
    table = DmaTable()
    before = open_fds(fd)
    table.add(0x1000, 4096, RW, fd)
    view = table.view(0x1000, 16, write=True)
    table.remove(0x1000, 4096)                 # the model still holds a view
    view[0:2] = b"ok"                          # still mapped: no SIGBUS, no error
    view.release()
    table.add(0x2000, 4096, RW, fd)
    table.remove(0x2000, 4096)                 # the next unmap reaps the lingering one
    assert open_fds(fd) == before
    assert os.pread(fd, 2, 0) == b"ok"
    os.close(fd)


def test_a_file_that_cannot_be_sealed_is_read_and_written_with_pread(tmp_path):
    # A regular file on ext4 (F_GET_SEALS: EINVAL) or tmpfs (F_SEAL_SEAL only) can
    # always shrink: it is never mmapped.
    path = tmp_path / "ram"
    path.write_bytes(bytes(2 * 4096))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    table = DmaTable()
    m = table.add(0x1000, 2 * 4096, RW, fd)
    assert m.view is None and m.file is not None and m.file.mm is None
    assert open_fds(fd) == 2                   # ours and the table's one dup
    table.write(0x1000 + 4096 - 2, b"span")    # over the page boundary, one pwrite
    assert path.read_bytes()[4096 - 2:4096 + 2] == b"span"
    assert table.read(0x1000 + 4096 - 1, 2) == b"pa"
    table.remove_all()
    assert open_fds(fd) == 1 and m.file is None
    os.close(fd)


def test_file_refusals_say_why():
    r, w = os.pipe()
    table = DmaTable(max_files=1)
    with pytest.raises(OSError) as exc:
        table.add(0x1000, 4096, RW, r)
    assert exc.value.strerror == ("DMA_MAP: the fd is not a regular file (a memfd, or a file "
                                  "on tmpfs or hugetlbfs)")
    os.close(r)
    os.close(w)
    fds = [memfd(4096) for _ in range(2)]
    table.add(0x1000, 4096, RW, fds[0])
    with pytest.raises(OSError) as exc:
        table.add(0x2000, 4096, RW, fds[1])
    assert (exc.value.errno, exc.value.strerror) == (
        errno.ENOSPC, "DMA_MAP: windows already hold 1 files (at most 1 per client)")
    table.remove_all()
    for fd in fds:
        os.close(fd)


def test_unsealed_windows_at_an_offset_share_one_fd_until_the_last_goes():
    fd = memfd(4 * 4096, seals=0)
    os.pwrite(fd, bytes(range(256)) * 64, 0)
    table = DmaTable()
    a = table.add(0x10000, 2 * 4096, RW, fd, 2 * 4096)  # file [0x2000, 0x4000)
    b = table.add(0x20000, 4096, RW, fd, 4096)          # file [0x1000, 0x2000)
    assert a.file is b.file and a.file is not None and table.files == 1
    dup = a.file.fd
    assert fcntl.fcntl(dup, fcntl.F_GETFD) & fcntl.FD_CLOEXEC   # no leak into children
    buf = bytearray(16)
    table.readinto(0x10000 + 8, buf)                    # file offset 0x2008
    assert bytes(buf) == os.pread(fd, 16, 2 * 4096 + 8)
    # a write that ends exactly at the end of the file is not "past" it
    table.write(0x10000 + 2 * 4096 - 4, b"last")
    assert os.pread(fd, 4, 4 * 4096 - 4) == b"last" and os.fstat(fd).st_size == 4 * 4096
    table.remove(0x20000, 4096)                         # one window of two goes
    assert table.files == 1 and a.file is not None and a.file.fd == dup
    assert table.read(0x10000 + 4096 * 2 - 4, 4) == b"last"  # the fd is still open
    table.remove(0x10000, 2 * 4096)
    assert table.files == 0
    with pytest.raises(OSError):
        os.fstat(dup)                                   # closed with the last window
    os.close(fd)


def test_sealed_windows_share_one_mapping_until_the_last_goes():
    fd = memfd(2 * 4096)
    table = DmaTable()
    table.add(0x1000, 4096, RW, fd)
    b = table.add(0x2000, 4096, RW, fd, 4096)
    table.remove(0x1000, 4096)
    assert table.files == 1 and b.file is not None and b.file.mm is not None
    table.add(0x3000, 4096, RW, fd)                     # the same mapping again
    assert table.files == 1 and table.mappings[-1].file is b.file
    table.remove_all()
    os.close(fd)


def test_truncated_file_faults_say_where():
    fd = memfd(2 * 4096, seals=0)
    table = DmaTable()
    table.add(0x1000, 2 * 4096, RW, fd)
    os.ftruncate(fd, 4096)
    with pytest.raises(DmaFault) as exc:
        table.read(0x1000 + 4096, 3)
    assert (exc.value.errno, exc.value.strerror) == (
        errno.EFAULT, "DMA read of file offset 0x1000+0x3: the client's file is shorter now")
    with pytest.raises(DmaFault) as exc:
        table.write(0x1000 + 4094, b"abc")
    assert (exc.value.errno, exc.value.strerror) == (
        errno.EFAULT, "DMA write of file offset 0xffe+0x3: the client's file is shorter now")
    table.remove_all()
    os.close(fd)


def test_a_dup_on_fd_zero_is_closed_too():
    fd = memfd(4096, seals=0)
    saved = os.dup(0)
    try:
        os.close(0)                                     # the lowest free fd is now 0
        table = DmaTable()
        m = table.add(0x1000, 4096, RW, fd)
        assert m.file is not None and m.file.fd == 0    # F_DUPFD_CLOEXEC from 0
        table.remove_all()
        with pytest.raises(OSError):
            os.fstat(0)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(fd)


def test_a_short_pwrite_is_a_fault():
    # RLIMIT_FSIZE cuts a write short without changing the file's size: the one
    # way to make pwrite write less than asked on a file that is big enough.
    fd = memfd(2 * 4096, seals=0)
    table = DmaTable()
    table.add(0x1000, 2 * 4096, RW, fd)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096 + 2, limit[1]))
    try:
        with pytest.raises(DmaFault) as exc:
            table.write(0x1000 + 4096, b"abcd")   # 2 of 4 bytes fit under the limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert (exc.value.errno, exc.value.strerror) == (
        errno.EFAULT, "DMA write of file offset 0x1000: short write")
    assert os.fstat(fd).st_size == 2 * 4096
    table.remove_all()
    os.close(fd)
