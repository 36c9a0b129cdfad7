"""Reading and writing the host's sysfs, /dev and /proc under a root directory.

Every host path pyvfio touches is ``os.path.join(root, relative)``; the root is
``/`` on a real host and a directory tree in tests and benchmarks (psutil's
"file reads go through small helpers under an overridable root").

This module is the one sysfs reader below both host management
(:mod:`pyvfio.host.model`) and the kernel backends (:mod:`pyvfio.kernel`): the
attribute readers, and the few facts about one device that opening it needs
(driver, IOMMU group, VFIO cdev, whether a driver is a vfio driver), so the
kernel backends neither read sysfs their own way nor import the diagnosis.

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


# --- facts about one device, under a root -----------------------------------------------------


def pci_device_dir(root: str, address: str) -> str:
    """``ROOT/sys/bus/pci/devices/<address>`` (``address`` as sysfs names it)."""
    return os.path.join(root, "sys/bus/pci/devices", address)


def device_driver(device_dir: str) -> str | None:
    """The driver bound to the device at ``device_dir`` (its ``driver`` link), or None."""
    return read_link_name(os.path.join(device_dir, "driver"))


def device_iommu_group(device_dir: str) -> int | None:
    """The device's IOMMU group number (its ``iommu_group`` link), or None
    (no IOMMU, and vfio's no-IOMMU mode off)."""
    name = read_link_name(os.path.join(device_dir, "iommu_group"))
    return int(name) if name is not None and name.isdigit() else None


def device_cdev(device_dir: str) -> str | None:
    """``vfioX`` when the device has a VFIO device cdev (Linux 6.6+, bound to
    a vfio driver): the first ``vfio-dev/vfio*`` entry."""
    return next((n for n in sorted(list_dir(os.path.join(device_dir, "vfio-dev")))
                 if n.startswith("vfio")), None)


def device_header_type(device_dir: str) -> int | None:
    """The config-space header type (0 endpoint, 1 bridge, 2 CardBus), or None."""
    data = read_bytes(os.path.join(device_dir, "config"), 0x0F)
    return data[0x0E] & 0x7F if data is not None and len(data) > 0x0E else None


def is_vfio_driver(root: str, name: str | None, *, mdev: bool = False) -> bool:
    """Whether driver ``name`` gives its devices to VFIO: ``vfio-pci``, a
    variant driver built on ``vfio_pci_core`` (``mlx5_vfio_pci``...,
    recognised by name or by its module holding ``vfio_pci_core``, see
    ``ROOT/sys/module/vfio_pci_core/holders``), or, for an mdev (``mdev=True``),
    any driver: mdev drivers register their devices with vfio."""
    if not name:
        return False
    if mdev or name.startswith("vfio") or name.endswith(("vfio_pci", "vfio-pci")):
        return True
    module = read_link_name(os.path.join(root, "sys/bus/pci/drivers", name, "module"))
    if module is None:
        return False
    return module in list_dir(os.path.join(root, "sys/module/vfio_pci_core/holders"))


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
