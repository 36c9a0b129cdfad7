"""The standard guest PCI topology, at fixed addresses.

::

    00:03.0  EDU             edu, alone on the root bus: its own IOMMU group, no driver
    00:04.0  ROOT_PORT       pcie-root-port (secondary bus 01)
    01:00.0  PCI_BRIDGE      pcie-pci-bridge (secondary bus 02)
    02:01.0  EDU_BRIDGED     edu        } one IOMMU group with the bridge: devices behind a
    02:02.0  E1000_BRIDGED   e1000      } PCIe-to-PCI bridge cannot be told apart by the IOMMU
    00:05.0  E1000E          e1000e (MSI-X), on its host driver e1000e

Conventional PCI behind the bridge shares the bridge's requester ID, so the
IOMMU groups the bridge and both devices together: the multi-device group of
seed 004, with E1000_BRIDGED bound to its host driver ``e1000`` at boot (the
group is not viable until it is unbound).  The addresses and groups are
asserted against a real guest by ``tests/guest/test_topology.py``.

The NICs get a ``hubport`` netdev with nothing else on the hub: a backend
that carries no traffic anywhere (QEMU warns about a NIC without one).
"""

from __future__ import annotations

import os

EDU = "0000:00:03.0"
ROOT_PORT = "0000:00:04.0"
PCI_BRIDGE = "0000:01:00.0"
EDU_BRIDGED = "0000:02:01.0"
E1000_BRIDGED = "0000:02:02.0"
E1000E = "0000:00:05.0"

EDU_VENDOR_DEVICE = (0x1234, 0x11E8)
E1000_VENDOR_DEVICE = (0x8086, 0x100E)
E1000E_VENDOR_DEVICE = (0x8086, 0x10D3)

# The group the bridge forms: every member, the bridge included.
BRIDGED_GROUP_MEMBERS = (PCI_BRIDGE, EDU_BRIDGED, E1000_BRIDGED)

# Host driver each device has right after boot (None: no driver binds it).
BOOT_DRIVERS: dict[str, str | None] = {
    EDU: None,
    EDU_BRIDGED: None,
    E1000_BRIDGED: "e1000",
    E1000E: "e1000e",
}


def standard() -> list[str]:
    """QEMU arguments for the standard topology (see the module docstring)."""
    return [
        "-device", "edu,id=edu,bus=pcie.0,addr=0x3",
        "-device", "pcie-root-port,id=rp0,bus=pcie.0,addr=0x4,chassis=1",
        "-device", "pcie-pci-bridge,id=br0,bus=rp0,addr=0x0",
        "-device", "edu,id=edu-bridged,bus=br0,addr=0x1",
        "-netdev", "hubport,id=net-e1000,hubid=0",
        "-device", "e1000,id=e1000-bridged,netdev=net-e1000,bus=br0,addr=0x2",
        "-netdev", "hubport,id=net-e1000e,hubid=1",
        "-device", "e1000e,id=e1000e,netdev=net-e1000e,bus=pcie.0,addr=0x5",
    ]


# The "storage" topology: the standard one plus an NVMe controller on the
# root bus (its own IOMMU group) backed by a small raw image, for the
# host-safety tests (a mounted filesystem must keep the device from vfio).
NVME = "0000:00:06.0"
NVME_IMAGE_BYTES = 32 << 20


def storage() -> list[str]:
    """The standard topology plus ``-device nvme`` at :data:`NVME` on a fresh
    sparse raw image (removed when this process exits)."""
    import atexit
    import tempfile

    fd, image = tempfile.mkstemp(prefix="pyvfio-nvme-", suffix=".raw")
    os.ftruncate(fd, NVME_IMAGE_BYTES)
    os.close(fd)
    atexit.register(_remove, image)
    return [
        *standard(),
        "-drive", f"file={image},if=none,id=nvme-disk,format=raw",
        "-device", "nvme,id=nvme0,serial=pyvfio0,drive=nvme-disk,bus=pcie.0,addr=0x6",
    ]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


TOPOLOGIES = {
    "standard": standard,
    "storage": storage,
    "none": list,
}


def by_name(name: str) -> list[str]:
    """QEMU arguments of the topology called ``name`` (``standard`` or ``none``)."""
    try:
        return TOPOLOGIES[name]()
    except KeyError:
        from pyvfio.errors import UsageError

        raise UsageError(f"unknown topology {name!r}: use " + ", ".join(TOPOLOGIES)) from None
