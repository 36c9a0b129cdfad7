"""The host as sysfs shows it: PCI devices, IOMMU groups, diagnosis, binding.

Public API (other parts of pyvfio call these; keep the names)::

    host = Host(root="/")            # every path read under root
    host.device("01:00.0")           # PciDevice; DeviceNotFound if absent
    host.devices(), host.groups(), host.group(12)
    host.diagnose("0000:01:00.0")    # Diagnosis: .ready .viable .in_use .problems .as_dict()
    normalize_bdf("01:00.0")         # "0000:01:00.0"; UsageError on garbage
    require_ready(bdf, root="/")     # NotViable / DeviceInUse / NotBoundToVfio with .problems
    bind([bdf], group=True), restore([bdf]) / restore(all_devices=True)
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyvfio.host.binding import BindResult, BindState, bind, restore, state_dir_for
    from pyvfio.host.diagnosis import Diagnosis, Member, Problem, diagnose, require_ready
    from pyvfio.host.host import Host
    from pyvfio.host.model import (
        DRIVER_KINDS,
        IommuGroup,
        PciDevice,
        ReservedRegion,
        normalize_bdf,
    )
    from pyvfio.host.sysfs import (
        RealSysfsWriter,
        SysfsWriter,
        install_writer,
        uninstall_writer,
    )

# Loaded on first use: `pyvfio ls` needs the model, not binding or diagnosis,
# and every module imported is start-up time for each command.  ``Host`` is
# the model's Host with the diagnosis methods (pyvfio.host.host).
_HOME = {
    "BindResult": "binding", "BindState": "binding", "bind": "binding", "restore": "binding",
    "state_dir_for": "binding",
    "Diagnosis": "diagnosis", "Member": "diagnosis", "Problem": "diagnosis",
    "diagnose": "diagnosis", "require_ready": "diagnosis",
    "Host": "host", "DRIVER_KINDS": "model", "IommuGroup": "model", "PciDevice": "model",
    "ReservedRegion": "model", "normalize_bdf": "model",
    "RealSysfsWriter": "sysfs", "SysfsWriter": "sysfs", "install_writer": "sysfs",
    "uninstall_writer": "sysfs",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'pyvfio.host' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"pyvfio.host.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DRIVER_KINDS",
    "BindResult",
    "BindState",
    "Diagnosis",
    "Host",
    "IommuGroup",
    "Member",
    "PciDevice",
    "Problem",
    "RealSysfsWriter",
    "ReservedRegion",
    "SysfsWriter",
    "bind",
    "diagnose",
    "install_writer",
    "normalize_bdf",
    "require_ready",
    "restore",
    "state_dir_for",
    "uninstall_writer",
]
