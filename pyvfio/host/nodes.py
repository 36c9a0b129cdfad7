"""Is a vfio node under ``/dev`` the kernel's, or something left over?

vfio registers a group as ``/sys/class/vfio/N`` (``noiommu-N`` in no-IOMMU
mode) and a device cdev as ``/sys/class/vfio-dev/vfioX``; each has a ``dev``
attribute with the ``major:minor`` that devtmpfs/udev give the node
``/dev/vfio/N`` or ``/dev/vfio/devices/vfioX``.  A node counts only when it is
a character device whose ``st_rdev`` is that number: a node left from an
earlier driver or boot (a copied ``/dev``, a container's bind mount, a
``mknod`` by hand) can name another device or none, and opening it fails or,
worse, opens something else.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from pyvfio.host.sysfs import read_str

NODE_OK = "ok"  # the node exists and carries the kernel's device number
NODE_MISSING = "missing"  # the kernel registered it, the node is absent
NODE_STALE = "stale"  # the node exists but is not the kernel's
NODE_UNREGISTERED = "unregistered"  # neither the kernel nor /dev has it


@dataclass
class NodeCheck:
    """The verdict on one node: ``path`` as a process sees it, ``state`` one of
    the ``NODE_*`` values, a sentence saying why, and the files read."""

    path: str
    state: str
    detail: str
    evidence: list[tuple[str, str]] = field(default_factory=list)  # (file, what it said)
    kernel_devnum: str | None = None

    def lines(self) -> list[str]:
        return [f"{source}: {says}" for source, says in self.evidence]


def _devnum(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def check_node(prefix: str, node: str, class_entry: str) -> NodeCheck:
    """Compare ``node`` (``/dev/vfio/31``) with the kernel's ``class_entry``
    (``/sys/class/vfio/31``), both read under ``prefix`` (the root with a
    trailing slash)."""
    kernel = read_str(f"{prefix}{class_entry.lstrip('/')}/dev")
    evidence = [(f"{class_entry}/dev", kernel or "absent")]
    try:
        st = os.stat(prefix + node.lstrip("/"))
    except OSError:
        evidence.append((node, "absent"))
        if kernel is None:
            return NodeCheck(node, NODE_UNREGISTERED, f"{class_entry} and {node} do not exist", evidence)
        return NodeCheck(node, NODE_MISSING,
                         f"the kernel registered {class_entry} ({kernel}) but {node} does not exist",
                         evidence, kernel)
    if not stat.S_ISCHR(st.st_mode):
        evidence.append((node, "not a character device"))
        return NodeCheck(node, NODE_STALE, f"{node} is not a character device", evidence, kernel)
    have = _devnum(st.st_rdev)
    evidence.append((node, f"character device {have}"))
    if kernel is None:
        return NodeCheck(node, NODE_STALE,
                         f"{node} ({have}) is left over: the kernel has no {class_entry}",
                         evidence)
    if kernel != have:
        return NodeCheck(node, NODE_STALE,
                         f"{node} is device {have} but the kernel's {class_entry}/dev is {kernel}",
                         evidence, kernel)
    return NodeCheck(node, NODE_OK, f"{node} is the kernel's {kernel}", evidence, kernel)


def group_node_check(prefix: str, number: int, noiommu: bool) -> NodeCheck:
    name = f"noiommu-{number}" if noiommu else str(number)
    return check_node(prefix, f"/dev/vfio/{name}", f"/sys/class/vfio/{name}")


def cdev_node_check(prefix: str, cdev: str) -> NodeCheck:
    return check_node(prefix, f"/dev/vfio/devices/{cdev}", f"/sys/class/vfio-dev/{cdev}")
