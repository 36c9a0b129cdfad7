"""Virtio devices written in Python, driven by a real guest's own Linux drivers.

On the host, pyvfio serves virtio-rng / virtio-blk on a socket; a guest is
booted on QEMU >= 10.1 (:mod:`pyvfio.testing.qemu`) with a ``vfio-user-pci``
device on that socket.  In the guest, Debian's kernel enumerates
1af4:1044 / 1af4:1042, ``virtio_pci`` binds it and hands it to ``virtio_rng``
(``/dev/hwrng``) or ``virtio_blk`` (``/dev/vda``): drivers we did not write.

- virtio-rng (plain guest RAM: every queue access is a DMA_READ/DMA_WRITE
  message to QEMU): the bytes the guest reads from ``/dev/hwrng`` are a run
  of the model's seeded stream.
- virtio-blk (guest RAM in a shared memfd, mapped by the server): the guest
  makes an ext2 filesystem, mounts it, writes a file and a random blob,
  ``sync``s and unmounts; on the host, ``e2fsck -fn`` is clean and
  ``debugfs`` reads back exactly what the guest wrote, and the model saw the
  guest's FLUSH.

The guest kernel is Debian's (its ``virtio_rng``/``virtio_blk``/``ext4``
modules are in the initramfs); the pyvfio-6.12 kernel is built without
those drivers.  Each test boots one guest under TCG (1-3 minutes here).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvfio.devices.virtio.blk import VirtioBlk
from pyvfio.devices.virtio.rng import SeededSource
from pyvfio.testing import guest, qemu
from pyvfio.user.server import Server

SLOT = 6
BDF = f"0000:00:{SLOT:02x}.0"
SEED = 20261129


def _vfio_user_device(sock: Path) -> list[str]:
    spec = {"driver": "vfio-user-pci", "socket": {"path": str(sock), "type": "unix"},
            "bus": "pcie.0", "addr": f"{SLOT:#x}"}
    return ["-device", json.dumps(spec, separators=(",", ":"))]


def _guest(sock: Path, *, memfd: bool) -> guest.Guest:
    q = qemu.ensure_qemu(log=False)
    return guest.Guest(guest.kernel_by_name("debian"), _vfio_user_device(sock),
                       qemu=q.command, iommu=True, iommu_caching_mode=True,
                       memory_backend="memfd" if memfd else None)


@pytest.fixture
def rng_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """``pyvfio serve virtio-rng --seed`` as its own process, as a user runs it."""
    sock, log = tmp_path / "rng.sock", tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", "virtio-rng",
                                 "--seed", str(SEED), "--socket", str(sock)],
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "pyvfio serve did not create its socket"
        time.sleep(0.05)
    yield proc, sock, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_guest_virtio_rng_reads_the_models_bytes(rng_server):
    proc, sock, log = rng_server
    vm = _guest(sock, memfd=False)
    script = (
        f"B=/sys/bus/pci/devices/{BDF}; cat $B/vendor $B/device; "
        "basename $(readlink $B/driver); "
        "ls $B/ | grep '^virtio'; "
        "cat /sys/class/misc/hw_random/rng_current; "
        "head -c 256 /dev/hwrng | od -An -tx1 -v | tr -d ' \\n'; echo; "
        "V=$(ls $B/ | grep '^virtio'); grep \"$V-\" /proc/interrupts; "
        # Unbind and bind again: the driver resets the device (status 0) and
        # negotiates anew; the device serves the new queue.
        f"echo {BDF} > /sys/bus/pci/drivers/virtio-pci/unbind; "
        f"echo {BDF} > /sys/bus/pci/drivers/virtio-pci/bind; "
        "echo REBOUND; cat /sys/class/misc/hw_random/rng_current; "
        "head -c 64 /dev/hwrng | od -An -tx1 -v | tr -d ' \\n'; echo")
    result = vm.run(["sh", "-c", script], timeout=900)
    try:
        assert result.returncode == 0, result.output + result.console[-3000:]
        lines = result.output.split()
        assert lines[:3] == ["0x1af4", "0x1044", "virtio-pci"], result.output
        assert lines[4].startswith("virtio_rng"), result.output   # the hwrng in use
        virtio = lines[3]
        irq_lines = [ln for ln in result.output.splitlines() if f"{virtio}-" in ln]
        # MSI-X, one vector per queue: the guest took the transport's MSI-X
        # (INTx would show one shared "virtioN" line) and the queue vector fired.
        assert any(ln.endswith(f"{virtio}-config") for ln in irq_lines), result.output
        (queue_irq,) = [ln for ln in irq_lines if ln.endswith(f"{virtio}-input")]
        assert sum(int(w) for w in queue_irq.split()[1:] if w.isdigit()) > 0, queue_irq
        read = bytes.fromhex(next(w for w in lines if len(w) == 512))
        assert len(read) == 256
        # What /dev/hwrng returned is a run of the model's stream (the kernel's
        # hwrng core also takes some bytes for itself, before and between).
        stream = SeededSource.stream_of(SEED, 16 << 20)
        assert read[:64] in stream, "the guest read bytes the model never produced"
        after = result.output.split("REBOUND", 1)[1].split()
        assert after[0].startswith("virtio_rng"), result.output
        again = bytes.fromhex(after[1])
        assert len(again) == 64 and again in stream and again not in read
        assert proc.poll() is None              # the server outlives QEMU
        assert "Traceback" not in log.read_text()
    finally:
        result.cleanup()


def test_guest_virtio_blk_mkfs_mount_write_flush(tmp_path):
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(32 << 20)
    model = VirtioBlk(disk)
    sock = tmp_path / "blk.sock"
    server = Server()
    server.add(model, str(sock))
    server.start()
    seen = {"windows": 0, "mapped": 0, "files": 0}
    stop = threading.Event()

    def watch() -> None:  # what QEMU's shared memfd RAM became in the server
        while not stop.wait(0.2):
            with model.lock:
                conn = model._conn
                if conn is not None:
                    maps = conn.dma.mappings
                    seen["windows"] = max(seen["windows"], len(maps))
                    seen["mapped"] = max(seen["mapped"], sum(m.mapped for m in maps))
                    seen["files"] = max(seen["files"], conn.dma.files)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    vm = _guest(sock, memfd=True)
    script = (
        f"set -e; B=/sys/bus/pci/devices/{BDF}; cat $B/vendor $B/device; "
        "basename $(readlink $B/driver); "
        "D=/dev/$(ls /sys/bus/virtio/drivers/virtio_blk/*/block/); echo $D; "
        "cat /sys/block/${D#/dev/}/size; "
        "mke2fs -q -F -t ext2 -L pyvfio $D; "
        "mkdir -p /tmp/mnt; mount -t ext2 $D /tmp/mnt; "
        "echo 'written by the guest through virtio_blk' > /tmp/mnt/hello.txt; "
        "head -c 1048576 /dev/urandom > /tmp/mnt/blob; "
        "sha256sum /tmp/mnt/blob | cut -d' ' -f1 > $PYVFIO_GUEST_OUT/blob.sha256; "
        "sync; umount /tmp/mnt; echo done")
    try:
        result = vm.run(["sh", "-c", script], timeout=1200)
        with model.lock:
            stats = dict(model.stats)
        sha = (result.out_dir / "blob.sha256").read_text().strip() \
            if (result.out_dir / "blob.sha256").exists() else ""
        result.cleanup()
    finally:
        stop.set()
        watcher.join(5)
        server.close()
        model.close()
    assert result.returncode == 0, result.output + result.console[-3000:]
    lines = result.output.split()
    assert lines[:3] == ["0x1af4", "0x1042", "virtio-pci"], result.output
    assert lines[3].startswith("/dev/vd") and lines[4] == str(32 << 20 >> 9)
    assert lines[-1] == "done"
    assert stats["out"] > 0 and stats["in"] > 0
    assert stats["flush"] > 0, stats                 # the guest's sync reached the file
    # QEMU's memfd is size-sealed: the server took the mmap fast path, one
    # mapping (one fd) per RAM block however many windows the vIOMMU made.
    assert seen["mapped"] > 0 and seen["files"] <= 4, seen
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(disk)], capture_output=True,
                         text=True)
    assert cat.stdout == "written by the guest through virtio_blk\n", cat.stderr
    dump = tmp_path / "blob"
    subprocess.run(["debugfs", "-R", f"dump /blob {dump}", str(disk)], capture_output=True,
                   check=True)
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == sha
