"""Policy files: parsing, strict validation with clear errors, and matching."""

from __future__ import annotations

import pytest

from pyvfio.broker.policy import DeviceIdentity, Policy, PolicyError, normalize_address
from pyvfio.broker.wire import PeerCredentials

USERS = {"alice": 1000, "nobody": 65534}
GROUPS = {"kvm": 108, "nogroup": 65534}


def load(text: str) -> Policy:
    return Policy.from_toml(text, source="test.toml", user_lookup=USERS.__getitem__,
                            group_lookup=GROUPS.__getitem__)


EDU = DeviceIdentity("0000:00:03.0", 0x1234, 0x11E8, 5)
EDU2 = DeviceIdentity("0000:02:01.0", 0x1234, 0x11E8, 9)
E1000 = DeviceIdentity("0000:02:02.0", 0x8086, 0x100E, 9)
NIC = DeviceIdentity("0000:00:05.0", 0x8086, 0x10D3, 6)

ALICE = PeerCredentials(pid=10, uid=1000, gid=1000)
KVM_USER = PeerCredentials(pid=11, uid=2000, gid=2000, groups=(108,))
NOBODY = PeerCredentials(pid=12, uid=65534, gid=65534)

EXAMPLE = """
[broker]
max_clients = 8

[[rule]]
name = "alice's edu"
users = ["alice"]
devices = ["00:03.0"]
backends = ["iommufd"]

[[rule]]
groups = ["kvm"]
ids = ["1234:11E8"]
managed = true

[[rule]]
users = ["*"]
iommu_groups = [6]
"""


def test_example_parses() -> None:
    p = load(EXAMPLE)
    assert p.max_clients == 8 and p.max_devices_per_client == 16
    r0, r1, r2 = p.rules
    assert r0.uids == {1000} and r0.addresses == {"0000:00:03.0"} and r0.backends == ("iommufd",)
    assert r1.gids == {108} and r1.ids == {(0x1234, 0x11E8)} and r1.managed
    assert r2.everyone and r2.iommu_groups == {6}
    assert r0.label == "rule[0] \"alice's edu\""


def test_match_by_address_and_backend() -> None:
    p = load(EXAMPLE)
    d = p.decide(ALICE, EDU, "auto")
    assert d.allowed and d.rule is p.rules[0] and d.backends == ("iommufd",)
    d = p.decide(ALICE, EDU, "legacy")
    assert not d.allowed and "backend 'legacy' is not allowed" in d.reason
    assert not p.decide(ALICE, EDU2).allowed  # alice only has 00:03.0 (plus group 6)


def test_match_by_supplementary_group_and_ids() -> None:
    p = load(EXAMPLE)
    for dev in (EDU, EDU2):
        d = p.decide(KVM_USER, dev, "legacy")
        assert d.allowed and d.rule is p.rules[1] and d.rule.managed
    d = p.decide(KVM_USER, E1000)
    assert not d.allowed
    assert "0000:02:02.0 (8086:100e, IOMMU group 9)" in d.reason


def test_match_by_iommu_group_for_everyone() -> None:
    p = load(EXAMPLE)
    assert p.decide(NOBODY, NIC).allowed
    d = p.decide(NOBODY, EDU)
    assert not d.allowed and "uid 65534" in d.reason


def test_nothing_is_allowed_by_default() -> None:
    d = load("").decide(ALICE, EDU)
    assert not d.allowed and "no rule of test.toml applies" in d.reason


def test_numeric_ids_and_numeric_strings() -> None:
    p = load('[[rule]]\nusers = [1000, "65534"]\ngroups = [108]\ndevices = ["0000:00:03.0"]')
    assert p.rules[0].uids == {1000, 65534} and p.rules[0].gids == {108}


@pytest.mark.parametrize("text, match", [
    ("[[rule]\n", "not valid TOML"),
    ("[brokr]\n", r"unknown top-level key\(s\) \['brokr'\]"),
    ("[broker]\nmax_client = 3\n", r"\[broker\]: unknown key\(s\) \['max_client'\]"),
    ("[broker]\nmax_clients = 0\n", "max_clients must be an integer in 1..100000"),
    ("[broker]\nmax_clients = true\n", "max_clients must be an integer"),
    ("rule = 3\n", "must be an array of tables"),
    ('[[rule]]\nuser = ["alice"]\ndevices = ["00:03.0"]\n', r"rule\[0\]: unknown key\(s\) \['user'\]"),
    ('[[rule]]\ndevices = ["00:03.0"]\n', "names no 'users' or 'groups'"),
    ('[[rule]]\nusers = ["alice"]\n', "names no 'devices', 'ids' or 'iommu_groups'"),
    ('[[rule]]\nusers = ["mallory"]\ndevices = ["00:03.0"]\n', "no user named 'mallory'"),
    ('[[rule]]\ngroups = ["wheel"]\ndevices = ["00:03.0"]\n', "no group named 'wheel'"),
    ('[[rule]]\nusers = "alice"\ndevices = ["00:03.0"]\n', "'users' must be an array"),
    ('[[rule]]\nusers = [1.5]\ndevices = ["00:03.0"]\n', "names or numeric ids"),
    ('[[rule]]\nusers = [-1]\ndevices = ["00:03.0"]\n', "out of range"),
    ('[[rule]]\nusers = ["alice"]\ndevices = ["00:03"]\n', r"not a PCI address .*'00:03'"),
    ('[[rule]]\nusers = ["alice"]\ndevices = ["0000:00:20.0"]\n', "not a PCI address"),
    ('[[rule]]\nusers = ["alice"]\nids = ["1234-11e8"]\n', "not a vendor:device pair"),
    ('[[rule]]\nusers = ["alice"]\nids = ["12345:11e8"]\n', "not a vendor:device pair"),
    ('[[rule]]\nusers = ["alice"]\niommu_groups = ["5"]\n', "not a group number"),
    ('[[rule]]\nusers = ["alice"]\niommu_groups = [5]\nbackends = ["vfio-user"]\n', "'backends' must be"),
    ('[[rule]]\nusers = ["alice"]\niommu_groups = [5]\nbackends = []\n', "'backends' must be"),
    ('[[rule]]\nusers = ["alice"]\niommu_groups = [5]\nmanaged = "yes"\n', "'managed' must be true or false"),
    ('[[rule]]\nname = 3\nusers = ["alice"]\niommu_groups = [5]\n', "'name' must be a string"),
])
def test_bad_policies_are_clear_errors(text: str, match: str) -> None:
    with pytest.raises(PolicyError, match=match) as exc:
        load(text)
    assert str(exc.value).startswith("test.toml")


def test_load_from_file_errors(tmp_path) -> None:
    with pytest.raises(PolicyError, match=r"cannot read policy .*missing\.toml"):
        Policy.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(bad)
    good = tmp_path / "good.toml"
    good.write_text('[[rule]]\nusers = ["root"]\ndevices = ["0000:00:03.0"]\n')
    p = Policy.load(good)  # real name lookup through /etc/passwd
    assert p.rules[0].uids == {0} and p.source == str(good)


def test_a_policy_file_others_control_is_refused(tmp_path) -> None:
    """Who may write the policy file, checked before it is parsed: a file
    (not a directory or a FIFO), owned by root or by the broker's user, not
    writable by group or others (their execute bit does not matter)."""
    import os
    import stat

    from pyvfio.broker.policy import _check_policy_file

    def st(mode: int, uid: int) -> os.stat_result:
        return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))

    me = os.geteuid()
    for mode in (0o100600, 0o100644, 0o100645, 0o100754):
        _check_policy_file(tmp_path, st(mode, me))
        _check_policy_file(tmp_path, st(mode, 0))
    other = 1 if me != 1 else 2
    for mode, uid, text in [
        (stat.S_IFIFO | 0o600, me, f"policy {tmp_path} is not a regular file"),
        (0o100600, other, f"policy {tmp_path} belongs to uid {other}, not root: refusing a "
                          "policy another user controls (chown root it)"),
        (0o100620, me, f"policy {tmp_path} is writable by others (mode 0620): refusing it "
                       f"(chmod go-w {tmp_path})"),
        (0o100602, me, f"policy {tmp_path} is writable by others (mode 0602): refusing it "
                       f"(chmod go-w {tmp_path})"),
    ]:
        with pytest.raises(PolicyError) as exc:
            _check_policy_file(tmp_path, st(mode, uid))
        assert str(exc.value) == text
    shared = tmp_path / "shared.toml"
    shared.write_text('[[rule]]\nusers = ["root"]\ndevices = ["0000:00:03.0"]\n')
    shared.chmod(0o666)
    with pytest.raises(PolicyError) as exc:
        Policy.load(shared)
    assert str(exc.value) == (f"policy {shared} is writable by others (mode 0666): refusing it "
                              f"(chmod go-w {shared})")


@pytest.mark.parametrize("text, want", [
    ("00:03.0", "0000:00:03.0"), ("0000:0A:1f.7", "0000:0a:1f.7"), (" 0001:00:00.0 ", "0001:00:00.0"),
])
def test_normalize_address(text: str, want: str) -> None:
    assert normalize_address(text) == want


# --- negatives: what must be refused ----------------------------------------------------------

SAME_VENDOR_OTHER_DEVICE = DeviceIdentity("0000:00:06.0", 0x1234, 0x1111, 7)
OTHER_VENDOR_SAME_DEVICE = DeviceIdentity("0000:00:07.0", 0x8086, 0x11E8, 8)


def test_ids_match_vendor_and_device_together() -> None:
    """``ids = ["1234:11e8"]`` grants that device, not every device of vendor
    0x1234, and not a device of another vendor that shares the device id."""
    p = load('[[rule]]\nusers = ["alice"]\nids = ["1234:11e8"]\n')
    assert p.decide(ALICE, EDU).allowed
    for dev in (SAME_VENDOR_OTHER_DEVICE, OTHER_VENDOR_SAME_DEVICE):
        d = p.decide(ALICE, dev)
        assert not d.allowed and d.rule is None and d.backends == ()
        assert dev.address in d.reason


def test_devices_and_groups_match_exactly() -> None:
    p = load('[[rule]]\nusers = ["alice"]\ndevices = ["0000:00:03.0"]\niommu_groups = [9]\n')
    assert p.decide(ALICE, EDU).allowed
    assert p.decide(ALICE, E1000).allowed  # group 9
    for dev in (DeviceIdentity("0001:00:03.0", 0x1234, 0x11E8, 5),  # same BDF, other domain
                DeviceIdentity("0000:00:03.1", 0x1234, 0x11E8, 5),  # other function
                DeviceIdentity("0000:00:04.0", 0x1234, 0x11E8, None),  # no IOMMU group
                DeviceIdentity("0000:00:04.0", 0x1234, 0x11E8, 90)):  # group 9's neighbour
        assert not p.decide(ALICE, dev).allowed, dev


def test_first_rule_covering_the_device_but_not_the_backend() -> None:
    """Rules are taken in file order: the first that applies, covers the device
    and allows the asked backend decides.  A rule that covers the device with
    other backends does not refuse: the next covering rule may allow it
    (with its own ``managed``).  ``auto`` takes the first covering rule."""
    p = load(
        '[[rule]]\nname = "iommufd only"\nusers = ["alice"]\ndevices = ["00:03.0"]\n'
        'backends = ["iommufd"]\n'
        '[[rule]]\nname = "legacy, managed"\nusers = ["alice"]\nids = ["1234:11e8"]\n'
        'backends = ["legacy"]\nmanaged = true\n')
    first, second = p.rules
    d = p.decide(ALICE, EDU, "legacy")
    assert d.allowed and d.rule is second and d.backends == ("legacy",) and d.rule.managed
    assert d.reason == "allowed by rule[1] 'legacy, managed'"
    d = p.decide(ALICE, EDU, "iommufd")
    assert d.allowed and d.rule is first and d.backends == ("iommufd",) and not d.rule.managed
    d = p.decide(ALICE, EDU, "auto")
    assert d.allowed and d.rule is first and d.backends == ("iommufd",)
    # EDU2 is covered only by the second rule: iommufd is refused, naming what is allowed
    d = p.decide(ALICE, EDU2, "iommufd")
    assert not d.allowed and d.rule is None
    assert "backend 'iommufd' is not allowed" in d.reason
    assert "rule[1] 'legacy, managed' allows ['legacy']" in d.reason
    assert "rule[0]" not in d.reason  # rule 0 does not cover EDU2


def test_a_rule_for_someone_else_does_not_cover_for_this_user() -> None:
    """The rule that covers the device must also apply to the user: a device
    covered only by another user's rule is refused, even when some rule
    applies to this user."""
    p = load('[[rule]]\nusers = ["alice"]\ndevices = ["00:03.0"]\n'
             '[[rule]]\nusers = ["nobody"]\ndevices = ["00:05.0"]\n')
    assert not p.decide(ALICE, NIC).allowed
    assert not p.decide(NOBODY, EDU).allowed
    assert p.decide(NOBODY, NIC).allowed


@pytest.mark.parametrize("peer, applies", [
    (PeerCredentials(pid=1, uid=1000, gid=1000), True),             # alice by uid
    (PeerCredentials(pid=1, uid=3000, gid=108), True),              # kvm as the primary group
    (PeerCredentials(pid=1, uid=3000, gid=3000, groups=(5, 108)), True),  # kvm supplementary
    (PeerCredentials(pid=1, uid=108, gid=3000), False),             # uid equal to kvm's gid
    (PeerCredentials(pid=1, uid=3000, gid=1000), False),            # gid equal to alice's uid
    (PeerCredentials(pid=1, uid=3000, gid=3000, groups=(1000, 109)), False),  # near misses
    (PeerCredentials(pid=1, uid=1001, gid=107), False),
])
def test_users_and_groups_that_partly_match(peer: PeerCredentials, applies: bool) -> None:
    """uids are compared with ``users`` only and gids with ``groups`` only."""
    p = load('[[rule]]\nusers = ["alice"]\ngroups = ["kvm"]\ndevices = ["00:03.0"]\n')
    d = p.decide(peer, EDU)
    assert d.allowed is applies
    if not applies:
        assert d.reason.startswith("no rule of test.toml applies to user")
        assert f"(uid {peer.uid})" in d.reason


def test_everyone_is_only_the_star() -> None:
    """``"*"`` means everyone; a user list without it does not."""
    p = load('[[rule]]\nusers = ["*"]\ndevices = ["00:03.0"]\n')
    assert p.rules[0].everyone and p.rules[0].uids == frozenset()
    assert p.decide(PeerCredentials(pid=1, uid=4242, gid=4242), EDU).allowed
    p = load('[[rule]]\nusers = ["nobody"]\ndevices = ["00:03.0"]\n')
    assert not p.rules[0].everyone
    assert not p.decide(PeerCredentials(pid=1, uid=4242, gid=4242), EDU).allowed


# --- exact edges of validation and of the messages --------------------------------------------


def test_defaults_and_labels() -> None:
    p = Policy.from_toml('[[rule]]\nusers = ["root"]\ndevices = ["00:03.0"]\n')
    assert p.source == "<policy>" and (p.max_clients, p.max_devices_per_client) == (64, 16)
    r = p.rules[0]
    assert (r.name, r.label, r.managed, r.backends) == ("", "rule[0]", False,
                                                        ("legacy", "iommufd"))
    with pytest.raises(PolicyError, match=r"^<policy>: rule\[0\]: names no"):
        Policy.from_toml('[[rule]]\nusers = ["root"]\n')
    d = p.decide(PeerCredentials(pid=1, uid=0, gid=0), EDU)
    assert (d.allowed, d.reason, d.rule, d.backends) == (True, "allowed by rule[0]", r,
                                                         ("legacy", "iommufd"))


def test_describe_names_a_missing_group() -> None:
    assert DeviceIdentity("0000:00:03.0", 0x1234, 0x11E8, None).describe() == \
        "0000:00:03.0 (1234:11e8, IOMMU group none)"
    assert EDU.describe() == "0000:00:03.0 (1234:11e8, IOMMU group 5)"


def test_refusals_say_exactly_why() -> None:
    p = load('[[rule]]\nusers = ["alice"]\ndevices = ["00:03.0"]\nbackends = ["iommufd"]\n'
             '[[rule]]\nusers = ["alice"]\nids = ["1234:11e8"]\nbackends = ["iommufd"]\n')
    d = p.decide(ALICE, EDU, "legacy")
    assert (d.allowed, d.rule, d.backends) == (False, None, ())
    assert d.reason == ("backend 'legacy' is not allowed for user "
                        f"{ALICE.user_name} (uid 1000) on 0000:00:03.0: rule[0] allows "
                        "['iommufd'], rule[1] allows ['iommufd']")
    d = p.decide(ALICE, NIC)
    assert (d.allowed, d.backends) == (False, ())
    assert d.reason == (f"no rule of test.toml allows user {ALICE.user_name} (uid 1000) the "
                        "device 0000:00:05.0 (8086:10d3, IOMMU group 6)")
    d = p.decide(NOBODY, EDU)
    assert (d.allowed, d.backends) == (False, ())
    assert d.reason == f"no rule of test.toml applies to user {NOBODY.user_name} (uid 65534)"


@pytest.mark.parametrize("value, ok", [(1, True), (100_000, True), (0, False), (100_001, False)])
def test_broker_limits_edges(value: int, ok: bool) -> None:
    for key in ("max_clients", "max_devices_per_client"):
        text = f"[broker]\n{key} = {value}\n"
        if ok:
            assert getattr(load(text), key) == value
        else:
            with pytest.raises(PolicyError, match=f"{key} must be an integer in 1..100000"):
                load(text)


@pytest.mark.parametrize("uid, ok", [(0, True), (2**32 - 2, True), (2**32 - 1, False)])
def test_id_range_edges(uid: int, ok: bool) -> None:
    """0 (root) is a real id; 2**32 - 1 is (uid_t)-1, "no id"."""
    text = f'[[rule]]\nusers = [{uid}]\ngroups = [{uid}]\ndevices = ["00:03.0"]\n'
    if ok:
        r = load(text).rules[0]
        assert r.uids == {uid} and r.gids == {uid}
    else:
        with pytest.raises(PolicyError, match=f"user id {uid} is out of range"):
            load(text)


def test_numeric_strings_do_not_stop_the_list() -> None:
    r = load('[[rule]]\nusers = ["65534", "alice"]\ngroups = ["108", "nogroup"]\n'
             'devices = ["00:03.0"]\n').rules[0]
    assert r.uids == {65534, 1000} and r.gids == {108, 65534}


def test_iommu_group_zero_is_a_group() -> None:
    p = load('[[rule]]\nusers = ["alice"]\niommu_groups = [0]\n')
    assert p.rules[0].iommu_groups == {0}
    assert p.decide(ALICE, DeviceIdentity("0000:00:01.0", 0x8086, 0x29C0, 0)).allowed


@pytest.mark.parametrize("text, match", [
    ("broker = 3\n", r"^test\.toml: 'broker' must be a table$"),
    ("rule = [1]\n", r"^test\.toml: rule\[0\] must be a table$"),
    ('[[rule]]\nusers = ["alice"]\ngroups = "kvm"\ndevices = ["00:03.0"]\n',
     r"^test\.toml: rule\[0\]: 'groups' must be an array"),
    ('[[rule]]\nusers = ["alice"]\ndevices = "00:03.0"\n',
     r"^test\.toml: rule\[0\]: 'devices' must be an array"),
    ('[[rule]]\nusers = ["alice"]\nids = "1234:11e8"\n',
     r"^test\.toml: rule\[0\]: 'ids' must be an array"),
    ('[[rule]]\nusers = ["alice"]\niommu_groups = 5\n',
     r"^test\.toml: rule\[0\]: 'iommu_groups' must be an array"),
    ('[[rule]]\nusers = ["alice"]\nids = [1234]\n', "not a vendor:device pair of 4-digit hex"),
    ('[[rule]]\nusers = ["alice"]\niommu_groups = [-1]\n', "not a group number: -1"),
])
def test_more_bad_policies(text: str, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        load(text)


def test_normalize_address_refuses_what_is_not_text() -> None:
    from pyvfio.errors import UsageError
    with pytest.raises(UsageError, match="not a PCI address"):
        normalize_address(3)  # type: ignore[arg-type]
    assert normalize_address("ABCD:0F:1e.3") == "abcd:0f:1e.3"


def test_unreadable_policy_names_the_reason(tmp_path) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.load(tmp_path / "missing.toml")
    assert str(exc.value) == f"cannot read policy {tmp_path / 'missing.toml'}: " \
        "No such file or directory"


def test_from_dict_default_source_and_real_group_lookup() -> None:
    p = Policy.from_dict({"rule": [{"groups": ["root"], "devices": ["00:03.0"]}]})
    assert p.source == "<policy>"
    assert p.rules[0].gids == {0}  # through /etc/group
    with pytest.raises(PolicyError, match=r"^<policy>: unknown top-level key"):
        Policy.from_dict({"rules": []})
