"""Reading and writing the host's sysfs, /dev and /proc under a root directory.

Every host path pyvfio touches is ``os.path.join(root, relative)``; the root is
``/`` on a real host and a directory tree in tests and benchmarks (psutil's
"file reads go through small helpers under an overridable root").

Reads are the hot path of ``pyvfio ls`` (thousands of devices, several files
each), so they use ``os.open``/``os.read`` directly: a Python file object costs
several times more than the two system calls it wraps.

Writes into sysfs go through a :class:`SysfsWriter`.  The default one writes
the file, which on a real kernel makes the kernel act (bind, unbind, probe).
A plain directory tree cannot react to a write, so a test installs a writer
for its root (:func:`install_writer`) that applies the kernel's semantics to
the tree: :class:`pyvfio.testing.fakesysfs.FakeSysfs`.
"""

from __future__ import annotations

import os
from typing import Protocol

_O_READ = os.O_RDONLY | os.O_CLOEXEC


def read_bytes(path: str, size: int = 65536) -> bytes | None:
    """The content of a sysfs attribute, or ``None`` if it does not exist or
    cannot be read (sysfs attributes vanish when a device goes away)."""
    try:
        fd = os.open(path, _O_READ)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_str(path: str) -> str | None:
    """A sysfs attribute as text with the trailing newline removed."""
    data = read_bytes(path)
    if data is None:
        return None
    return data.decode("utf-8", "replace").rstrip("\n")


def read_link_name(path: str) -> str | None:
    """The last component of a symlink's target (``driver``, ``iommu_group``,
    ``module`` links all name their object that way), or ``None``."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return target.rstrip("/").rpartition("/")[2]


def list_dir(path: str) -> list[str]:
    """Entry names of a directory, ``[]`` if it does not exist."""
    try:
        return os.listdir(path)
    except OSError:
        return []


class SysfsWriter(Protocol):
    """Writes one value into one sysfs attribute, raising :class:`OSError`
    with the kernel's errno when the kernel refuses it."""

    def write(self, path: str, data: str) -> None: ...


class RealSysfsWriter:
    """The writer for a real kernel: one ``write(2)`` of the whole value, as
    sysfs store functions expect."""

    def write(self, path: str, data: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)


_installed: dict[str, SysfsWriter] = {}


def _key(root: str) -> str:
    return os.path.realpath(root)


def install_writer(root: str, writer: SysfsWriter) -> None:
    """Route every sysfs write under ``root`` through ``writer`` (used by the
    fake kernel in :mod:`pyvfio.testing.fakesysfs`; the CLI picks it up too)."""
    _installed[_key(root)] = writer


def uninstall_writer(root: str) -> None:
    _installed.pop(_key(root), None)


def writer_for(root: str) -> SysfsWriter:
    """The writer installed for ``root``, else the real one."""
    if _installed:
        found = _installed.get(_key(root))
        if found is not None:
            return found
    return RealSysfsWriter()
