"""pyvfio.testing.debian: the release codename and every suite name derived
from the running system (os-release, apt sources in one-line .list and deb822
.sources form), for Debian 12 (bookworm) and 13 (trixie), and the choice
between an unpinned install and the release's backports suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvfio.testing import debian

OS_RELEASE = {
    "bookworm": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\n'
                'ID=debian\n',
    "trixie": 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\n'
              'VERSION_ID="13"\nVERSION="13 (trixie)"\nVERSION_CODENAME=trixie\n'
              'DEBIAN_VERSION_FULL=13.1\nID=debian\n',
}
# What each release's installer writes (host names replaced by an example mirror).
KEYRING = {"bookworm": "/usr/share/keyrings/debian-archive-keyring.gpg",
           "trixie": "/usr/share/keyrings/debian-archive-keyring.pgp"}
MIRROR = "http://mirror.example/debian"


def deb822(codename: str) -> str:
    return (f"Types: deb\nURIs: {MIRROR}/\nSuites: {codename} {codename}-updates\n"
            f"Components: main\nSigned-By: {KEYRING[codename]}\n\n"
            f"Types: deb\nURIs: {MIRROR}-security\nSuites: {codename}-security\n"
            f"Components: main\nSigned-By: {KEYRING[codename]}\n")


def one_line(codename: str) -> str:
    return (f"deb {MIRROR}-security {codename}-security main\n"
            f"# deb {MIRROR}/ {codename}-backports main\n"
            f"deb [arch=amd64 signed-by={KEYRING[codename]}] {MIRROR}/ {codename} main\n"
            f"deb {MIRROR}/ {codename}-updates main\n")


@pytest.fixture(params=[(c, f) for c in ("bookworm", "trixie") for f in (".sources", ".list")],
                ids=lambda p: f"{p[0]}{p[1]}")
def machine(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, Path]:
    """A fake /etc: os-release and apt sources of one release in one format."""
    codename, form = request.param
    etc = tmp_path / "etc"
    (etc / "apt/sources.list.d").mkdir(parents=True)
    (etc / "os-release").write_text(OS_RELEASE[codename])
    if form == ".sources":
        (etc / "apt/sources.list.d/debian.sources").write_text(deb822(codename))
    else:
        (etc / "apt/sources.list").write_text(one_line(codename))
    # a third-party source with a plain suite name must not pass for Debian's archive
    (etc / "apt/sources.list.d/aaa-vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n")
    return codename, form, etc


def paths(etc: Path) -> dict[str, Path]:
    return {"os_release": etc / "os-release", "sources_dir": etc / "apt/sources.list.d",
            "sources_list": etc / "apt/sources.list"}


def test_codename_and_suites_come_from_the_running_system(machine: tuple[str, str, Path]) -> None:
    codename, _form, etc = machine
    p = paths(etc)
    assert debian.debian_codename(p["os_release"]) == codename
    assert debian.backports_suite(codename) == f"{codename}-backports"
    sources = debian.apt_sources(p["sources_dir"], p["sources_list"])
    archive = debian.debian_archive(codename, sources)
    assert archive.uris == (f"{MIRROR}/",) and codename in archive.suites
    assert archive.signed_by == KEYRING[codename]
    assert debian.debian_archive_uri(p["sources_dir"], p["sources_list"],
                                     codename=codename) == MIRROR
    assert debian.suite_configured(f"{codename}-security", sources)
    assert not debian.suite_configured(f"{codename}-backports", sources)  # commented out
    other = "trixie" if codename == "bookworm" else "bookworm"
    with pytest.raises(debian.PackageError, match=f"no apt source carries the {other} suite"):
        debian.debian_archive(other, sources)


def test_backports_are_added_with_the_machines_uri_and_keyring(
        machine: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    codename, _form, etc = machine
    monkeypatch.setattr(debian.os, "geteuid", lambda: 0)
    suite = debian.ensure_backports(**paths(etc))
    assert suite == f"{codename}-backports"
    added = etc / "apt/sources.list.d/pyvfio-backports.sources"
    stanza = debian._deb822_sources(added)
    assert [(s.uris, s.suites, s.signed_by) for s in stanza] == [
        ((MIRROR,), (suite,), KEYRING[codename])]
    before = added.read_text()
    assert debian.ensure_backports(**paths(etc)) == suite  # known now: nothing rewritten
    assert added.read_text() == before


def test_backports_need_root_and_name_the_suite(machine: tuple[str, str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    codename, _form, etc = machine
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    with pytest.raises(debian.PackageError, match=f"apt does not know {codename}-backports"):
        debian.ensure_backports(**paths(etc))
    assert not (etc / "apt/sources.list.d/pyvfio-backports.sources").exists()


def test_codename_from_version_when_version_codename_is_missing(tmp_path: Path) -> None:
    f = tmp_path / "os-release"
    f.write_text('NAME="Debian GNU/Linux"\nVERSION="13 (trixie)"\n')
    assert debian.debian_codename(f) == "trixie"
    f.write_text('NAME="Debian GNU/Linux"\n')
    with pytest.raises(debian.PackageError, match=f"no release codename in {f}"):
        debian.debian_codename(f)
    with pytest.raises(debian.PackageError, match="cannot read"):
        debian.debian_codename(tmp_path / "missing")


def test_release_alias_suites_and_disabled_stanzas(tmp_path: Path) -> None:
    (tmp_path / "a.sources").write_text(
        "Types: deb\nURIs: http://old.example/debian\nSuites: trixie\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: trixie\n")
    (tmp_path / "b.list").write_text("deb http://m.example/debian stable main contrib\n")
    sources = debian.apt_sources(tmp_path, tmp_path / "sources.list")
    assert [s.uris for s in sources] == [("http://m.example/debian",)]
    assert debian.debian_archive("trixie", sources).uris == ("http://m.example/debian",)


def test_candidate_parsing() -> None:
    policy = ("linux-source-6.12:\n  Installed: (none)\n  Candidate: 6.12.48-1\n"
              "  Version table:\n     6.12.48-1 500\n")
    assert debian.parse_candidate(policy) == "6.12.48-1"
    assert debian.parse_candidate(policy.replace("6.12.48-1\n  Version", "(none)\n  V")) is None
    assert debian.parse_candidate("") is None


class FakeApt:
    """apt as ensure_package_or_backport sees it: candidates per suite set."""

    def __init__(self, etc: Path, codename: str, in_release: bool) -> None:
        self.etc = etc
        self.codename = codename
        self.in_release = in_release
        self.calls: list[list[str]] = []
        self.updated = False

    def candidate(self, package: str) -> str | None:
        if not self.updated:
            return None  # empty lists on a fresh machine
        if self.in_release:
            return "6.12.48-1"
        backports = (self.etc / "apt/sources.list.d/pyvfio-backports.sources").exists()
        return "6.12.95-1~bpo12+1" if backports else None

    def apt_get(self, args: list[str], what: str) -> None:
        self.calls.append(list(args))
        if args[0] == "update":
            self.updated = True


@pytest.mark.parametrize("in_release", [True, False], ids=["in-release", "only-backports"])
def test_install_unpinned_when_apt_has_a_candidate_else_from_backports(
        machine: tuple[str, str, Path], in_release: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    codename, _form, etc = machine
    apt = FakeApt(etc, codename, in_release)
    monkeypatch.setattr(debian.os, "geteuid", lambda: 0)
    monkeypatch.setattr(debian.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(debian, "missing_packages", lambda names: list(names))
    monkeypatch.setattr(debian, "apt_candidate", apt.candidate)
    monkeypatch.setattr(debian, "_apt_get", apt.apt_get)
    pinned = debian.ensure_package_or_backport("linux-source-6.12", **paths(etc))
    installs = [c for c in apt.calls if c[0] == "install"]
    assert len(installs) == 1
    added = etc / "apt/sources.list.d/pyvfio-backports.sources"
    if in_release:  # trixie's main, bookworm's security suite: no pin, no backports
        assert pinned is None and installs[0][-1] == "linux-source-6.12"
        assert not added.exists()
        assert apt.calls.count(["update", "-q"]) == 1
    else:
        assert pinned == f"{codename}-backports"
        assert installs[0][-1] == f"linux-source-6.12/{codename}-backports"
        assert f"URIs: {MIRROR}\n" in added.read_text()
        assert apt.calls.count(["update", "-q"]) == 2  # the lists, then with backports


def test_missing_everywhere_is_a_clear_error(machine: tuple[str, str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    codename, _form, etc = machine
    monkeypatch.setattr(debian.os, "geteuid", lambda: 0)
    monkeypatch.setattr(debian.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(debian, "missing_packages", lambda names: list(names))
    monkeypatch.setattr(debian, "apt_candidate", lambda package: None)
    monkeypatch.setattr(debian, "_apt_get", lambda args, what: None)
    with pytest.raises(debian.PackageError,
                       match=f"no linux-source-6.12 in this machine's suites nor in {codename}-backports"):
        debian.ensure_package_or_backport("linux-source-6.12", **paths(etc))


def test_without_root_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(debian, "missing_packages", lambda names: list(names))
    with pytest.raises(debian.PackageError, match=r"missing Debian package: linux-source-6\.12"):
        debian.ensure_package_or_backport("linux-source-6.12")


def test_the_running_system_is_read() -> None:
    """On this machine: the codename, and an archive entry that carries it."""
    if not debian.OS_RELEASE.is_file() or not debian.APT_SOURCES_DIR.is_dir():
        pytest.skip("not a Debian machine (no /etc/os-release or /etc/apt)")
    codename = debian.debian_codename()
    archive = debian.debian_archive(codename, debian.apt_sources())
    assert archive.uris and "security" not in archive.uris[0]
