"""The guest's initramfs: static busybox, an ``/init`` script and kernel modules.

The init script mounts the host's ``/`` read-only over virtio 9p (tag
``hostroot``), mounts fresh proc/sys/devtmpfs and tmpfs for the writable
places (``/tmp``, ``/run``, ``/var/tmp``, ``/dev/shm``), mounts the run share
(tag ``pyvfiorun``, read-write) at ``/run/pyvfio`` and the bytecode cache
(tag ``pyvfiopyc``, read-write) at ``/run/pyvfio-pycache``, then ``chroot``s into the
host root and runs ``/run/pyvfio/run.sh``, which the host wrote for this run.
The command therefore never enters the initramfs: one image serves every run
of a kernel and is cached under ``~/.cache/pyvfio/initramfs/`` by a hash of
everything that goes into it.

For a modular kernel (Debian's), the modules the guest needs are resolved
through ``modules.dep`` and loaded in dependency order with ``insmod``;
``name.param=value`` words on the kernel command line are passed on to
``insmod`` (busybox's insmod does not read /proc/cmdline as modprobe does).
The archive is written here in the ``newc`` cpio format, so building it needs
neither root (for /dev/console) nor the cpio tool.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvfio.errors import PyvfioError

# Bump when the layout or the init script's contract changes (part of the cache key).
FORMAT_VERSION = 4

HOSTROOT_TAG = "hostroot"
RUN_TAG = "pyvfiorun"
GUEST_RUN_DIR = "/run/pyvfio"  # where the run share is mounted inside the guest's root
PYCACHE_TAG = "pyvfiopyc"
GUEST_PYCACHE_DIR = "/run/pyvfio-pycache"  # PYTHONPYCACHEPREFIX in the guest (read-write)
START_MARKER = "PYVFIO-GUEST-START"
EXIT_MARKER = "PYVFIO-GUEST-EXIT="

# What the guest needs, by module name; dependencies are added from modules.dep.
# Names that a release does not have (vfio_virqfd merged into vfio in 6.2) or
# has built in are skipped.
GUEST_MODULES = (
    "virtio_pci", "9pnet_virtio", "9p",                 # the host root
    "irqbypass", "vfio", "vfio_iommu_type1", "vfio_virqfd",
    "vfio_pci_core", "vfio_pci",                        # legacy VFIO
    "mdev",                                             # mediated devices (if modular)
    "e1000", "e1000e",                                  # the topology's NICs
    "nvme",                                             # the storage topology's disk
    "virtio_rng", "virtio_blk",                         # virtio devices pyvfio serves
    "crc32c_generic", "ext4",                           # filesystems on those disks
)

DEFAULT_BUSYBOX = Path("/bin/busybox")

INIT_SCRIPT = f"""#!/bin/busybox sh
# pyvfio guest init (pyvfio/testing/initramfs.py).  Runs /run/pyvfio/run.sh in
# the host's root, reports its exit status, powers off.
/bin/busybox mkdir -p /bin /proc /sys /dev /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
die() {{
    echo "pyvfio-init: $*"
    echo "{EXIT_MARKER}init-failed"
    poweroff -f
    exit 1
}}
cmdline=$(cat /proc/cmdline)
while read -r file name; do
    [ -n "$file" ] || continue
    args=""
    for word in $cmdline; do
        case "$word" in "$name".*=*) args="$args ${{word#"$name".}}";; esac
    done
    insmod "/lib/modules/$file" $args || echo "pyvfio-init: insmod $file failed"
done < /etc/pyvfio-modules
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {HOSTROOT_TAG} /newroot \\
    || die "cannot mount the host root (9p tag {HOSTROOT_TAG})"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts 2>/dev/null
# A second view of the host root, taken before the tmpfs mounts hide parts of
# it: a checkout under /tmp (CI clones there) is bound back from it below.
mkdir -p /host
mount --bind /newroot /host || die "cannot bind the host root"
for dir in /tmp /run /var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs "/newroot$dir" || die "cannot mount tmpfs on $dir"
done
mkdir -p /newroot{GUEST_RUN_DIR}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {RUN_TAG} /newroot{GUEST_RUN_DIR} \\
    || die "cannot mount the run share (9p tag {RUN_TAG})"
mkdir -p /newroot{GUEST_PYCACHE_DIR}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {PYCACHE_TAG} /newroot{GUEST_PYCACHE_DIR} \
    || die "cannot mount the bytecode cache share (9p tag {PYCACHE_TAG})"
if [ -f /newroot{GUEST_RUN_DIR}/expose ]; then
    while read -r path; do
        [ -n "$path" ] || continue
        mkdir -p "/newroot$path"
        mount --bind "/host$path" "/newroot$path" || die "cannot expose $path"
    done < /newroot{GUEST_RUN_DIR}/expose
fi
echo "{START_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime)"
chroot /newroot /bin/sh {GUEST_RUN_DIR}/run.sh
rc=$?
echo "$rc" > /newroot{GUEST_RUN_DIR}/status
sync
echo "{EXIT_MARKER}$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"""


class InitramfsError(PyvfioError):
    """Raised when the initramfs cannot be built (no static busybox, a module
    file that cannot be read or decompressed)."""


# --- cpio (newc) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: a directory, regular file or character device."""

    name: str
    mode: int  # including the file type bits (0o040000 dir, 0o100000 file, 0o020000 chr)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Serialize ``entries`` as a ``newc`` (SVR4, no CRC) cpio archive.

    Header: magic ``070701`` then 13 eight-digit hex fields (ino, mode, uid,
    gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
    namesize including the NUL, check); name and data are each padded to 4
    bytes.  Times and owners are zero so the bytes depend only on the input.
    """
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        is_dir = entry.mode & 0o170000 == 0o040000
        fields = (ino, entry.mode, 0, 0, 2 if is_dir else 1, 0, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


# --- modules -------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """``kernel/drivers/vfio/pci/vfio-pci.ko.xz`` -> ``vfio_pci`` (the kernel's spelling)."""
    base = os.path.basename(path)
    base = base.split(".ko", 1)[0]
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (relative path, [paths of its dependencies]) from modules.dep."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[module_name(path.strip())] = (path.strip(), deps.split())
    return table


def resolve_modules(dep_table: dict[str, tuple[str, list[str]]],
                    wanted: Sequence[str]) -> list[str]:
    """Relative paths of ``wanted`` modules and their dependencies, dependencies first.

    Names not in the table (built in, or absent in this release) are skipped.
    """
    by_path = {path: name for name, (path, _) in dep_table.items()}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name not in dep_table or dep_table[name][0] in order or name in visiting:
            return
        visiting.add(name)
        path, deps = dep_table[name]
        for dep in deps:
            visit(by_path.get(dep, module_name(dep)))
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def read_module(path: Path) -> bytes:
    """The ELF bytes of a module file, decompressing .xz/.gz/.zst (busybox insmod loads raw ELF)."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            raise InitramfsError(f"{path}: zstd-compressed module and no zstd tool")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    raise InitramfsError(f"{path}: not a kernel module file")


# --- the image -----------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("PYVFIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyvfio")
    return Path(base)


def initramfs_entries(busybox: Path, modules_dir: Path | None,
                      wanted: Sequence[str] = GUEST_MODULES) -> list[CpioEntry]:
    """Everything that goes into the image, in archive order."""
    if not busybox.is_file():
        raise InitramfsError(f"{busybox} not found: install busybox-static")
    entries = [CpioEntry(d, 0o040755) for d in
               ("bin", "dev", "etc", "lib", "lib/modules", "newroot", "proc", "sys", "tmp")]
    # The kernel opens /dev/console for init's stdio before anything is mounted.
    entries.append(CpioEntry("dev/console", 0o020600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", 0o100755, busybox.read_bytes()))
    entries.append(CpioEntry("init", 0o100755, INIT_SCRIPT.encode()))
    load_lines = []
    if modules_dir is not None:
        dep_file = modules_dir / "modules.dep"
        if not dep_file.is_file():
            raise InitramfsError(f"{dep_file} not found: is {modules_dir} a module tree?")
        for rel in resolve_modules(parse_modules_dep(dep_file.read_text()), wanted):
            flat = module_name(rel) + ".ko"
            entries.append(CpioEntry("lib/modules/" + flat, 0o100644,
                                     read_module(modules_dir / rel)))
            load_lines.append(f"{flat} {module_name(rel)}\n")
    entries.append(CpioEntry("etc/pyvfio-modules", 0o100644, "".join(load_lines).encode()))
    return entries


def build_initramfs(modules_dir: Path | None, *, busybox: Path = DEFAULT_BUSYBOX,
                    wanted: Sequence[str] = GUEST_MODULES, cache: Path | None = None) -> Path:
    """Return the path of the initramfs for a kernel whose modules are in ``modules_dir``
    (``None`` for an all-built-in kernel), building it if the cache has no copy.

    The cache key hashes every member's name, mode and bytes, so a new busybox,
    a changed module or a new init script yields a new image.
    """
    entries = initramfs_entries(busybox, modules_dir, wanted)
    digest = hashlib.sha256(b"pyvfio-initramfs %d\n" % FORMAT_VERSION)
    for e in entries:
        digest.update(b"%s %o %d:%d %d\n" % (e.name.encode(), e.mode, *e.rdev, len(e.data)))
        digest.update(e.data)
    directory = (cache or cache_dir()) / "initramfs"
    path = directory / f"{digest.hexdigest()[:20]}.cpio"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".building-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cpio_newc(entries))
        os.replace(tmp, path)  # atomic: concurrent builders write the same bytes
    except BaseException:
        os.unlink(tmp)
        raise
    return path
