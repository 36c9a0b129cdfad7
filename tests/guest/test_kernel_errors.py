"""The kernel backend's errors on a real kernel: each says what is wrong and
what to do, instead of a bare errno."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from pyvfio.device import SharedMemory
from pyvfio.errors import (
    ClosedError,
    IovaRangeError,
    KernelError,
    MemlockLimitError,
    NotBoundToVfio,
    NotViable,
)
from pyvfio.kernel import open_device
from pyvfio.testing.topology import E1000_BRIDGED, EDU, EDU_BRIDGED

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = pytest.mark.guest


def test_group_not_viable_names_the_e1000_and_its_driver(vfio_bound) -> None:
    assert helpers.current_driver(E1000_BRIDGED) == "e1000"
    # pyvfio bind refuses this (it checks the group first); bind by hand,
    # the way a careless admin would.
    vfio_bound(EDU_BRIDGED)
    with pytest.raises(NotViable) as exc:
        open_device(EDU_BRIDGED, "legacy")
    err = exc.value
    assert E1000_BRIDGED in str(err) and "e1000" in str(err)
    assert "Errno" not in str(err)
    blockers = [p for p in err.problems if p["device"] == E1000_BRIDGED]
    assert blockers and blockers[0]["driver"] == "e1000"
    # Nothing was left open: the group can be opened again at once.
    with pytest.raises(NotViable):
        open_device(EDU_BRIDGED, "legacy")


def test_device_not_bound_to_vfio() -> None:
    assert helpers.current_driver(EDU) is None
    with pytest.raises(NotBoundToVfio) as exc:
        open_device(EDU, "legacy")
    assert "pyvfio bind 0000:00:03.0" in str(exc.value)
    assert exc.value.problems


def test_dma_outside_the_iova_ranges() -> None:
    with helpers.vfio_bound(EDU), open_device(EDU, "legacy") as dev:
        ranges = dev.dma.iova_ranges
        # The MSI doorbell window of x86 is never translatable.
        assert not any(s <= 0xFEE00000 <= e for s, e in ranges)
        with pytest.raises(IovaRangeError) as exc:
            dev.dma_alloc(4096, iova=0xFEE00000)
        assert "0xfee00000" in str(exc.value)
        top = max(e for _s, e in ranges)
        with pytest.raises(IovaRangeError):
            dev.dma_alloc(4096, iova=(top + 1) & ~0xFFF)
        # A buffer inside the ranges still works afterwards.
        with dev.dma_alloc(4096) as buf:
            assert dev.dma.allocator.contains(buf.iova, 4096)


def test_repeated_map_unmap_then_use_after_close() -> None:
    """The map/unmap fast path (a repeat of the last call) still reports the
    kernel's errors, and a closed container refuses even a primed repeat."""
    memory = SharedMemory(4096)
    try:
        with helpers.vfio_bound(EDU), open_device(EDU, "legacy") as dev:
            container = dev.dma
            for _ in range(3):
                container.map(0x100000, memory)
                container.unmap(0x100000, 4096)
            container.map(0x100000, memory)
            with pytest.raises(IovaRangeError, match="already mapped") as exc:
                container.map(0x100000, memory)  # the same call again: EEXIST from the kernel
            assert exc.value.errno == errno.EEXIST
            container.unmap(0x100000, 4096)
            with pytest.raises(KernelError, match="unmapped 0x0 of 0x1000"):
                container.unmap(0x100000, 4096)  # nothing left there
            other = SharedMemory(4096)
            container.map(0x200000, other)
            container.unmap(0x200000, 4096)
            other.close()  # the fast path forgets it: a stale address never reaches the kernel
            with pytest.raises(ClosedError, match="closed memory"):
                container.map(0x200000, other)
        with pytest.raises(ClosedError):
            container.map(0x100000, memory)
        with pytest.raises(ClosedError):
            container.unmap(0x100000, 4096)
    finally:
        memory.close()


_MEMLOCK_CHILD = r"""
import json, os, resource, socket, sys
from pyvfio.errors import MemlockLimitError
from pyvfio.kernel.legacy import device_from_fds
sock = socket.socket(fileno=int(sys.argv[1]))
msg, fds, _flags, _addr = socket.recv_fds(sock, 1024, 3)
names = json.loads(msg)
fd = dict(zip(names, fds))
# Drop root (and with it CAP_IPC_LOCK) and the locked-memory limit.
resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
os.setgid(65534); os.setuid(65534)
dev = device_from_fds(fd["device"], "0000:00:03.0", group_fd=fd["group"],
                      container_fd=fd["container"])
out = {}
try:
    dev.dma_alloc(1 << 20)
    out["error"] = None
except MemlockLimitError as exc:
    out = {"error": "MemlockLimitError", "errno": exc.errno, "message": str(exc)}
small = dev.dma_alloc(16 * 1024)  # under the limit: still fine
out["small_ok"] = small.size == 16 * 1024
dev.close()
print(json.dumps(out))
"""


def _send_fds(bdf: str, script: str, extra_args: list[str] | None = None) -> dict:
    import socket

    with open_device(bdf, "legacy") as dev:
        fds = dev.fds()
        parent, child = socket.socketpair()
        with parent, child:
            proc = subprocess.Popen([sys.executable, "-c", script, str(child.fileno()),
                                     *(extra_args or [])],
                                    pass_fds=[child.fileno()], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            names = list(fds)
            socket.send_fds(parent, [json.dumps(names).encode()], [fds[n] for n in names])
        # Hand over: this process lets go of the device; the child's
        # duplicates keep the container, group and device alive.
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_memlock_limit_too_low_gives_a_clear_error() -> None:
    # Root has CAP_IPC_LOCK, which bypasses RLIMIT_MEMLOCK, so the mapping is
    # done by a child that received the fds and dropped to an unprivileged uid.
    with helpers.vfio_bound(EDU):
        out = _send_fds(EDU, _MEMLOCK_CHILD)
    assert out["error"] == "MemlockLimitError", out
    assert out["errno"] == 12
    assert "RLIMIT_MEMLOCK" in out["message"] and "65536" in out["message"]
    assert out["small_ok"] is True


def test_dma_entry_limit_gives_a_clear_error() -> None:
    param = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit"
    with open(param) as f:
        saved = f.read().strip()
    try:
        with open(param, "w") as f:
            f.write("2")
        with helpers.vfio_bound(EDU), open_device(EDU, "legacy") as dev:
            assert dev.dma.dma_avail == 2
            a = dev.dma_alloc(4096)
            b = dev.dma_alloc(4096)
            assert dev.dma.dma_avail == 0
            with pytest.raises(MemlockLimitError) as exc:
                dev.dma_alloc(4096)
            assert isinstance(exc.value, KernelError)
            assert "dma_entry_limit" in str(exc.value) and "(2 mappings)" in str(exc.value)
            a.close()
            b.close()
            assert dev.dma.dma_avail == 2
    finally:
        with open(param, "w") as f:
            f.write(saved)


def test_device_open_twice_is_in_use() -> None:
    from pyvfio.errors import DeviceInUse

    with helpers.vfio_bound(EDU), open_device(EDU, "legacy"):
        with pytest.raises(DeviceInUse) as exc:
            open_device(EDU, "legacy")
        assert "group" in str(exc.value)
    assert os.path.exists("/dev/vfio")
