"""The broker's policy: which users and groups may have which devices.

A policy is a TOML file (parsed with the standard library's ``tomllib``)::

    [broker]                       # optional; every key has a default
    max_clients = 64               # concurrent connections
    max_devices_per_client = 16

    [[rule]]
    name = "edu for nobody"        # optional, shown in the log
    users = ["nobody", 1000]       # user names or uids
    groups = ["kvm"]               # group names or gids (primary or supplementary)
    devices = ["0000:00:03.0"]     # PCI addresses
    ids = ["1234:11e8"]            # vendor:device (hex)
    iommu_groups = [5]             # IOMMU group numbers
    backends = ["iommufd", "legacy"]  # default: both
    managed = false                # bind the device to vfio-pci first if needed

A rule *applies to* a client when the client's uid is in ``users`` or any of
its gids is in ``groups`` (``"*"`` in ``users`` means everyone).  It *covers*
a device when the device's address is in ``devices``, or its vendor:device is
in ``ids`` (vendor and device both), or its IOMMU group is in ``iommu_groups``.
The first rule (in file order) that applies, covers, and allows the asked
backend decides (for ``auto``: the first that applies and covers); a rule that
covers the device with other backends leaves the decision to the next.
Nothing is allowed by default.

Validation is strict, because a typo in a policy must not silently grant or
deny: unknown tables and keys, malformed addresses and IDs, user or group
names that do not exist on this host, and rules that can never match are all
:class:`PolicyError`\\ s naming the file and the key.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvfio.broker.wire import PeerCredentials
from pyvfio.errors import UsageError
from pyvfio.pci.address import PciAddress

__all__ = ["BACKENDS", "DeviceIdentity", "Policy", "PolicyError", "Rule", "normalize_address"]

BACKENDS = ("legacy", "iommufd")

_ID = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$")

_BROKER_KEYS = {"max_clients", "max_devices_per_client"}
_RULE_KEYS = {"name", "users", "groups", "devices", "ids", "iommu_groups", "backends", "managed"}



def _check_policy_file(path: Path, st: os.stat_result) -> None:
    """The broker runs as root and does what the policy says: a policy that
    another user can write (or owns) would let them grant themselves any
    device.  Refused before it is parsed."""
    if not stat.S_ISREG(st.st_mode):
        raise PolicyError(f"policy {path} is not a regular file")
    if st.st_uid not in (0, os.geteuid()):
        raise PolicyError(f"policy {path} belongs to uid {st.st_uid}, not root: refusing a "
                          "policy another user controls (chown root it)")
    if st.st_mode & 0o022:
        raise PolicyError(f"policy {path} is writable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): refusing it (chmod go-w {path})")

class PolicyError(UsageError):
    """Raised when a policy file cannot be read or is invalid; the message names
    the file and the offending key."""


def normalize_address(text: str) -> str:
    """``00:03.0``, ``0000:00:03.0`` or ``10001:8a:00.0`` (VMD) ->
    ``0000:00:03.0`` / ``10001:8a:00.0``; UsageError otherwise
    (:class:`~pyvfio.pci.address.PciAddress` is the one parser)."""
    return PciAddress.normalize(text)


@dataclass(frozen=True)
class DeviceIdentity:
    """What policy matching needs to know about a device (read from sysfs)."""

    address: str
    vendor: int
    device: int
    iommu_group: int | None

    def describe(self) -> str:
        group = "none" if self.iommu_group is None else str(self.iommu_group)
        return f"{self.address} ({self.vendor:04x}:{self.device:04x}, IOMMU group {group})"


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]`` with names already resolved to ids."""

    index: int
    name: str
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    everyone: bool = False
    addresses: frozenset[str] = frozenset()
    ids: frozenset[tuple[int, int]] = frozenset()
    iommu_groups: frozenset[int] = frozenset()
    backends: tuple[str, ...] = BACKENDS
    managed: bool = False

    @property
    def label(self) -> str:
        return f"rule[{self.index}]" + (f" {self.name!r}" if self.name else "")

    def applies_to(self, peer: PeerCredentials) -> bool:
        return self.everyone or peer.uid in self.uids or bool(self.gids & peer.all_gids)

    def covers(self, dev: DeviceIdentity) -> bool:
        return (dev.address in self.addresses
                or (dev.vendor, dev.device) in self.ids
                or (dev.iommu_group is not None and dev.iommu_group in self.iommu_groups))


@dataclass(frozen=True)
class Decision:
    """The policy's answer: ``rule`` is set when allowed, ``reason`` says why."""

    allowed: bool
    reason: str
    rule: Rule | None = None
    backends: tuple[str, ...] = ()


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list)
    max_clients: int = 64
    max_devices_per_client: int = 16
    source: str = "<policy>"

    # ---- loading ----

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                _check_policy_file(path, os.fstat(f.fileno()))
                text = f.read().decode("utf-8")
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise PolicyError(f"policy {path} is not UTF-8: {exc}") from None
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<policy>",
                  user_lookup: Callable[[str], int] | None = None,
                  group_lookup: Callable[[str], int] | None = None) -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=source, user_lookup=user_lookup,
                             group_lookup=group_lookup)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<policy>",
                  user_lookup: Callable[[str], int] | None = None,
                  group_lookup: Callable[[str], int] | None = None) -> Policy:
        users = user_lookup or _lookup_user
        groups = group_lookup or _lookup_group
        unknown = set(data) - {"broker", "rule"}
        if unknown:
            raise PolicyError(f"{source}: unknown top-level key(s) {sorted(unknown)}; "
                              f"expected [broker] and [[rule]]")
        policy = cls(source=source)
        broker = data.get("broker", {})
        if not isinstance(broker, dict):
            raise PolicyError(f"{source}: 'broker' must be a table")
        _no_unknown(broker, _BROKER_KEYS, f"{source}: [broker]")
        for key in _BROKER_KEYS:
            if key in broker:
                value = broker[key]
                if not _is_int(value) or not 1 <= value <= 100_000:
                    raise PolicyError(f"{source}: [broker] {key} must be an integer in "
                                      f"1..100000, not {value!r}")
                setattr(policy, key, value)
        rules = data.get("rule", [])
        if not isinstance(rules, list):
            raise PolicyError(f"{source}: 'rule' must be an array of tables ([[rule]])")
        for i, raw in enumerate(rules):
            where = f"{source}: rule[{i}]"
            if not isinstance(raw, dict):
                raise PolicyError(f"{where} must be a table")
            policy.rules.append(_parse_rule(i, raw, where, users, groups))
        return policy

    # ---- deciding ----

    def decide(self, peer: PeerCredentials, dev: DeviceIdentity,
               backend: str = "auto") -> Decision:
        """May ``peer`` have ``dev`` with ``backend`` ("auto" = any the rule allows)?"""
        applicable = [r for r in self.rules if r.applies_to(peer)]
        if not applicable:
            return Decision(False, f"no rule of {self.source} applies to {_who(peer)}")
        covering = [r for r in applicable if r.covers(dev)]
        if not covering:
            return Decision(False, f"no rule of {self.source} allows {_who(peer)} the device "
                                   f"{dev.describe()}")
        for rule in covering:
            if backend == "auto":
                return Decision(True, f"allowed by {rule.label}", rule, rule.backends)
            if backend in rule.backends:
                return Decision(True, f"allowed by {rule.label}", rule, (backend,))
        labels = ", ".join(f"{r.label} allows {list(r.backends)}" for r in covering)
        return Decision(False, f"backend {backend!r} is not allowed for {_who(peer)} on "
                               f"{dev.address}: {labels}")


def _who(peer: PeerCredentials) -> str:
    return f"user {peer.user_name} (uid {peer.uid})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _list(raw: dict[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise PolicyError(f"{where}: {key!r} must be an array, not {value!r}")
    return value


def _lookup_user(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _lookup_group(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _resolve(values: Iterable[Any], kind: str, lookup: Callable[[str], int],
             where: str) -> frozenset[int]:
    out: set[int] = set()
    for v in values:
        if _is_int(v):
            if not 0 <= v < 2**32 - 1:
                raise PolicyError(f"{where}: {kind} id {v} is out of range")
            out.add(v)
        elif isinstance(v, str) and v:
            if v.isdigit():
                out.add(int(v))
                continue
            try:
                out.add(lookup(v))
            except KeyError:
                raise PolicyError(f"{where}: no {kind} named {v!r} on this host") from None
        else:
            raise PolicyError(f"{where}: {kind}s must be names or numeric ids, not {v!r}")
    return frozenset(out)


def _parse_rule(index: int, raw: dict[str, Any], where: str,
                users: Callable[[str], int], groups: Callable[[str], int]) -> Rule:
    _no_unknown(raw, _RULE_KEYS, where)
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise PolicyError(f"{where}: 'name' must be a string")
    user_values = _list(raw, "users", where)
    everyone = "*" in user_values
    uids = _resolve([u for u in user_values if u != "*"], "user", users, where)
    gids = _resolve(_list(raw, "groups", where), "group", groups, where)
    if not everyone and not uids and not gids:
        raise PolicyError(f"{where}: names no 'users' or 'groups', so it can never apply "
                          f"(use users = [\"*\"] for everyone)")
    addresses: set[str] = set()
    for a in _list(raw, "devices", where):
        try:
            addresses.add(normalize_address(a))
        except UsageError as exc:
            raise PolicyError(f"{where}: devices: {exc}") from None
    ids: set[tuple[int, int]] = set()
    for text in _list(raw, "ids", where):
        m = _ID.match(text) if isinstance(text, str) else None
        if not m:
            raise PolicyError(f"{where}: ids: not a vendor:device pair of 4-digit hex "
                              f"numbers: {text!r}")
        ids.add((int(m.group(1), 16), int(m.group(2), 16)))
    iommu_groups: set[int] = set()
    for g in _list(raw, "iommu_groups", where):
        if not _is_int(g) or g < 0:
            raise PolicyError(f"{where}: iommu_groups: not a group number: {g!r}")
        iommu_groups.add(g)
    if not addresses and not ids and not iommu_groups:
        raise PolicyError(f"{where}: names no 'devices', 'ids' or 'iommu_groups', so it "
                          f"covers no device")
    backends = raw.get("backends", list(BACKENDS))
    if (not isinstance(backends, list) or not backends
            or any(b not in BACKENDS for b in backends)):
        raise PolicyError(f"{where}: 'backends' must be a non-empty array of {list(BACKENDS)}, "
                          f"not {backends!r}")
    managed = raw.get("managed", False)
    if not isinstance(managed, bool):
        raise PolicyError(f"{where}: 'managed' must be true or false, not {managed!r}")
    return Rule(index=index, name=name, uids=uids, gids=gids, everyone=everyone,
                addresses=frozenset(addresses), ids=frozenset(ids),
                iommu_groups=frozenset(iommu_groups), backends=tuple(dict.fromkeys(backends)),
                managed=managed)
