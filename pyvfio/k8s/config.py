"""The device plugin's configuration file: which host devices form which
Kubernetes extended resource, and how they are handed out.

TOML (parsed with the standard library's ``tomllib``) or JSON (a ``.json``
file, or text starting with ``{``)::

    [plugin]                        # optional; every key has a default
    backend = "auto"                # "auto", "legacy" or "iommufd": the device nodes Allocate returns
    managed = false                 # bind selected devices to their vfio driver at start, restore at exit
    health_interval = 5.0           # seconds between host diagnoses (0.05 .. 3600)

    [resources."pyvfio.io/edu"]     # an extended resource name: DOMAIN/NAME
    ids = ["1234:11e8"]             # vendor:device, 4 hex digits each
    classes = ["00ff"]              # PCI class prefix: 2 (base), 4 (+sub) or 6 (+prog-if) hex digits
    drivers = ["vfio-pci"]          # the driver bound now ("none" for no driver)
    addresses = ["0000:00:03.0"]    # PCI addresses
    backend = "iommufd"             # per resource; overrides [plugin] backend
    managed = true                  # per resource; overrides [plugin] managed

The JSON form is the same tree: ``{"resources": {"pyvfio.io/edu": {"ids":
["1234:11e8"]}}}``.

**Selection.** A device belongs to a resource when it matches every selector
kind the resource names (within a kind, any listed value matches): ``ids``
and ``drivers`` together mean "these IDs while on these drivers".  A resource
names at least one selector.  Bridges are never selected.  When two resources
select devices of the same IOMMU group, the first resource in the file keeps
the group and the plugin logs the conflict.

**Validation** happens before anything else starts (the command exits 2 with
one line naming the file and the key): unknown keys, IDs that are not
``vvvv:dddd`` hex, malformed classes and addresses, bad backends, and resource
names that Kubernetes would refuse as extended resource names (rules of
``IsExtendedResourceName`` in k8s.io/kubernetes ``pkg/apis/core/v1/helper``:
a ``/``, not in the ``kubernetes.io`` domain, not starting with
``requests.``, and ``requests.`` + the name a qualified name: a DNS-1123
subdomain of at most 253 characters, ``/``, a name of at most 63 characters
of ``[A-Za-z0-9._-]`` starting and ending alphanumeric).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvfio.errors import UsageError

__all__ = [
    "BACKENDS",
    "ConfigError",
    "PluginConfig",
    "ResourceConfig",
    "check_resource_name",
    "env_name",
]

BACKENDS = ("auto", "legacy", "iommufd")
NO_DRIVER = "none"

_PLUGIN_KEYS = {"backend", "managed", "health_interval"}
_RESOURCE_KEYS = {"ids", "classes", "drivers", "addresses", "backend", "managed"}
_SELECTOR_KEYS = ("ids", "classes", "drivers", "addresses")

_ID = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$")
_CLASS = re.compile(r"^(?:0x)?([0-9a-fA-F]{2}|[0-9a-fA-F]{4}|[0-9a-fA-F]{6})$")
_ADDRESS = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
_DRIVER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# k8s.io/apimachinery/pkg/util/validation: qualifiedNameFmt and dns1123SubdomainFmt.
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")


class ConfigError(UsageError):
    """Raised when the configuration file cannot be read or is invalid; the
    message names the file and the offending key."""


def check_resource_name(name: str) -> str | None:
    """Why Kubernetes would refuse ``name`` as an extended resource name, or
    ``None`` when it is acceptable (kubelet's Register applies the same
    ``IsExtendedResourceName`` check)."""
    if not isinstance(name, str) or "/" not in name:
        return "an extended resource name is DOMAIN/NAME, e.g. pyvfio.io/edu"
    if "kubernetes.io/" in name:
        return "the kubernetes.io domain is reserved for Kubernetes' own resources"
    if name.startswith("requests."):
        return "a name starting with 'requests.' is reserved for quota"
    prefix, _, short = ("requests." + name).partition("/")
    if "/" in short:
        return "only one '/' is allowed"
    if len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix):
        return ("the domain must be a lower-case DNS subdomain (a-z, 0-9, '-', '.'; "
                "at most 244 characters)")
    if len(short) > 63 or not _QUALIFIED_NAME.match(short):
        return ("the part after '/' must be 1-63 characters of A-Z, a-z, 0-9, '-', '_', '.', "
                "starting and ending with a letter or digit")
    return None


def env_name(resource: str) -> str:
    """KubeVirt's environment variable for ``resource``: ``PCI_RESOURCE_`` and
    the name upper-cased with ``/`` and ``.`` replaced by ``_`` (kubevirt
    ``pkg/util`` ``ResourceNameToEnvVar``), e.g. ``pyvfio.io/edu`` ->
    ``PCI_RESOURCE_PYVFIO_IO_EDU``."""
    return "PCI_RESOURCE_" + resource.upper().replace("/", "_").replace(".", "_")


@dataclass(frozen=True)
class ResourceConfig:
    """One ``[resources."NAME"]`` table.  Empty selector sets are not used."""

    name: str
    ids: frozenset[tuple[int, int]] = frozenset()
    classes: tuple[str, ...] = ()  # lower-case hex prefixes of the 6-digit class code
    drivers: frozenset[str] = frozenset()  # NO_DRIVER for "no driver bound"
    addresses: frozenset[str] = frozenset()
    backend: str = "auto"
    managed: bool = False

    def matches(self, *, address: str, vendor_id: int, device_id: int, class_code: int,
                driver: str | None) -> bool:
        """Does a device with these properties belong to this resource?"""
        if self.ids and (vendor_id, device_id) not in self.ids:
            return False
        if self.classes and not any(f"{class_code:06x}".startswith(c) for c in self.classes):
            return False
        if self.drivers and (driver or NO_DRIVER) not in self.drivers:
            return False
        return not (self.addresses and address not in self.addresses)

    def describe(self) -> str:
        """The selectors as one line, for logs and ``--check``."""
        parts = []
        if self.ids:
            parts.append("ids " + ",".join(f"{v:04x}:{d:04x}" for v, d in sorted(self.ids)))
        if self.classes:
            parts.append("classes " + ",".join(self.classes))
        if self.drivers:
            parts.append("drivers " + ",".join(sorted(self.drivers)))
        if self.addresses:
            parts.append("addresses " + ",".join(sorted(self.addresses)))
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "resource": self.name,
            "ids": [f"{v:04x}:{d:04x}" for v, d in sorted(self.ids)],
            "classes": list(self.classes),
            "drivers": sorted(self.drivers),
            "addresses": sorted(self.addresses),
            "backend": self.backend,
            "managed": self.managed,
            "env": env_name(self.name),
        }


@dataclass
class PluginConfig:
    resources: list[ResourceConfig] = field(default_factory=list)
    health_interval: float = 5.0
    source: str = "<config>"

    @classmethod
    def load(cls, path: str | Path) -> PluginConfig:
        """Read and validate ``path``; :class:`ConfigError` names the file."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {path} is not UTF-8: {exc}") from None
        if path.suffix == ".json" or text.lstrip().startswith("{"):
            return cls.from_json(text, source=str(path))
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<config>") -> PluginConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<config>") -> PluginConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be an object")
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<config>") -> PluginConfig:
        _no_unknown(data, {"plugin", "resources"}, source)
        plugin = data.get("plugin", {})
        if not isinstance(plugin, dict):
            raise ConfigError(f"{source}: 'plugin' must be a table")
        _no_unknown(plugin, _PLUGIN_KEYS, f"{source}: [plugin]")
        default_backend = _backend(plugin.get("backend", "auto"), f"{source}: [plugin] backend")
        default_managed = _bool(plugin.get("managed", False), f"{source}: [plugin] managed")
        interval = plugin.get("health_interval", 5.0)
        if (isinstance(interval, bool) or not isinstance(interval, int | float)
                or not math.isfinite(interval) or not 0.05 <= interval <= 3600):
            raise ConfigError(f"{source}: [plugin] health_interval must be a number of seconds "
                              f"in 0.05..3600, not {interval!r}")
        resources = data.get("resources")
        if not isinstance(resources, dict) or not resources:
            raise ConfigError(f"{source}: name at least one resource, e.g. "
                              '[resources."pyvfio.io/edu"] with ids = ["1234:11e8"]')
        config = cls(health_interval=float(interval), source=source)
        for name, raw in resources.items():
            where = f'{source}: [resources."{name}"]'
            why = check_resource_name(name)
            if why is not None:
                raise ConfigError(f"{where}: not a valid extended resource name: {why}")
            if not isinstance(raw, dict):
                raise ConfigError(f"{where} must be a table of selectors")
            config.resources.append(_parse_resource(name, raw, where, default_backend,
                                                    default_managed))
        envs: dict[str, str] = {}
        for r in config.resources:
            other = envs.setdefault(env_name(r.name), r.name)
            if other != r.name:
                raise ConfigError(f"{source}: resources {other!r} and {r.name!r} give the same "
                                  f"environment variable {env_name(r.name)}; rename one")
        return config


def _no_unknown(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected one of {sorted(allowed)}")


def _backend(value: Any, where: str) -> str:
    if value not in BACKENDS:
        raise ConfigError(f"{where} must be one of {', '.join(BACKENDS)}, not {value!r}")
    return str(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    return value


def _strings(raw: dict[str, Any], key: str, where: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings, not {value!r}")
    return value


def _parse_resource(name: str, raw: dict[str, Any], where: str, default_backend: str,
                    default_managed: bool) -> ResourceConfig:
    _no_unknown(raw, _RESOURCE_KEYS, where)
    ids: set[tuple[int, int]] = set()
    for text in _strings(raw, "ids", where):
        m = _ID.match(text)
        if m is None:
            raise ConfigError(f"{where}: ids: {text!r} is not a vendor:device pair of 4-digit "
                              "hex numbers (e.g. 1234:11e8)")
        ids.add((int(m.group(1), 16), int(m.group(2), 16)))
    classes: list[str] = []
    for text in _strings(raw, "classes", where):
        m = _CLASS.match(text)
        if m is None:
            raise ConfigError(f"{where}: classes: {text!r} is not a PCI class of 2, 4 or 6 hex "
                              "digits (base class, +subclass, +prog-if; e.g. 0200 for Ethernet)")
        classes.append(m.group(1).lower())
    drivers: set[str] = set()
    for text in _strings(raw, "drivers", where):
        if not _DRIVER.match(text):
            raise ConfigError(f"{where}: drivers: {text!r} is not a driver name "
                              f"(use {NO_DRIVER!r} for devices without a driver)")
        drivers.add(text)
    addresses: set[str] = set()
    for text in _strings(raw, "addresses", where):
        m = _ADDRESS.match(text)
        if m is None:
            raise ConfigError(f"{where}: addresses: {text!r} is not a PCI address "
                              "(DDDD:BB:DD.F, e.g. 0000:00:03.0)")
        domain, bus, dev, fn = m.groups()
        addresses.add(f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}")
    if not (ids or classes or drivers or addresses):
        raise ConfigError(f"{where}: name at least one selector ({', '.join(_SELECTOR_KEYS)}) "
                          "with at least one value; an empty selector would take every device")
    return ResourceConfig(
        name=name,
        ids=frozenset(ids),
        classes=tuple(classes),
        drivers=frozenset(drivers),
        addresses=frozenset(addresses),
        backend=_backend(raw.get("backend", default_backend), f"{where} backend"),
        managed=_bool(raw.get("managed", default_managed), f"{where} managed"),
    )
