"""Debian packages the guest harness needs, installed on demand with apt-get.

The harness runs on Debian 12 (bookworm) or 13 (trixie).  When a package it
needs is missing it installs it the ordinary way, ``apt-get install``, as
root; without root it says which packages to install instead of failing
somewhere deeper.

Nothing here names a release or a host: the release codename comes from
``/etc/os-release``, every suite name is derived from it (``<codename>``,
``<codename>-backports``...), and the archive URI is the one the machine's own
apt sources use (one-line ``.list`` and deb822 ``.sources`` files alike).  A
package that apt has no candidate for in the configured suites (Debian 12
before its security suite carried ``linux-source-6.12``) is taken from the
backports suite of the running release, which is added to apt for it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvfio.errors import PyvfioError

OS_RELEASE = Path("/etc/os-release")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
BACKPORTS_SOURCES_FILE = APT_SOURCES_DIR / "pyvfio-backports.sources"


class PackageError(PyvfioError):
    """Raised when a Debian package the harness needs is missing and cannot be
    installed (not root, no apt-get, or apt-get failed)."""


_known_installed: set[str] = set()


def missing_packages(packages: Iterable[str]) -> list[str]:
    """Return the packages of ``packages`` that dpkg does not list as installed."""
    missing = []
    for name in packages:
        if name in _known_installed:
            continue
        try:
            proc = subprocess.run(
                ["dpkg-query", "-W", "-f=${Status}", name],
                capture_output=True, text=True, check=False,
            )
        except FileNotFoundError:
            raise PackageError(
                f"dpkg-query not found: install {name} by hand (the harness expects Debian)"
            ) from None
        if proc.returncode == 0 and proc.stdout.strip().endswith("ok installed"):
            _known_installed.add(name)
        else:
            missing.append(name)
    return missing


def _apt_get(args: Sequence[str], what: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise PackageError(f"apt-get {what} failed (exit {proc.returncode}):\n{tail}")


def ensure_packages(packages: Sequence[str], *, release: str | None = None,
                    update: bool = True) -> list[str]:
    """Install the packages of ``packages`` that are missing; return what was installed.

    ``release`` picks the suite for these packages only (``name/release``), so
    dependencies keep coming from the default suite: ``apt-get -t`` would
    instead upgrade unrelated installed packages (linux-libc-dev...) to
    backports.  ``update=False`` skips ``apt-get update`` (the caller just ran it).
    """
    missing = missing_packages(packages)
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PackageError(
            "missing Debian packages: " + " ".join(missing)
            + " (run scripts/setup as root, or apt-get install them)"
        )
    if update:
        _apt_get(["update", "-q"], "update")
    names = [f"{p}/{release}" if release else p for p in missing]
    _apt_get(["install", "-y", "-q", "--no-install-recommends", *names], "install " + " ".join(names))
    _known_installed.update(missing)
    return missing


# --- the running release and its suites ------------------------------------------------------

# Suite names apt also accepts for the release itself (they follow the codenames).
_RELEASE_ALIASES = ("stable", "oldstable", "oldoldstable", "testing", "unstable", "sid")


def debian_codename(os_release: Path = OS_RELEASE) -> str:
    """The running release's codename (``bookworm``, ``trixie``) from os-release(5).

    ``VERSION_CODENAME`` first; failing that the name in parentheses of
    ``VERSION="13 (trixie)"``.  Raises :class:`PackageError` naming the file
    when neither is there.
    """
    try:
        text = os_release.read_text(errors="replace")
    except OSError as exc:
        raise PackageError(f"cannot read {os_release}: {exc.strerror}") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    codename = fields.get("VERSION_CODENAME", "")
    if not codename:
        match = re.search(r"\(([a-z]+)\)", fields.get("VERSION", ""))
        codename = match.group(1) if match else ""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", codename):
        raise PackageError(f"no release codename in {os_release} (VERSION_CODENAME or VERSION)")
    return codename


def backports_suite(codename: str) -> str:
    """The backports suite of a release: ``trixie`` -> ``trixie-backports``."""
    return f"{codename}-backports"


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` entry of the apt configuration, whichever format it came in.

    A one-line ``sources.list`` entry has one URI and one suite; a deb822
    stanza may list several of each (``URIs:``, ``Suites:``).  ``signed_by`` is
    the ``Signed-By`` field or ``[signed-by=...]`` option, if any.
    """

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None
    path: Path


def _deb822_sources(path: Path) -> list[AptSource]:
    out = []
    for stanza in re.split(r"\n[ \t]*\n", path.read_text(errors="replace")):
        fields: dict[str, str] = {}
        last = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and last:  # a continuation line (multi-line Signed-By)
                fields[last] += "\n" + line.strip()
                continue
            key, sep, value = line.partition(":")
            if sep:
                last = key.strip().lower()
                fields[last] = value.strip()
        if "deb" not in fields.get("types", "").split() or "uris" not in fields:
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        out.append(AptSource(tuple(fields["uris"].split()), tuple(fields.get("suites", "").split()),
                             tuple(fields.get("components", "").split()),
                             fields.get("signed-by") or None, path))
    return out


def _one_line_sources(path: Path) -> list[AptSource]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        options: dict[str, str] = {}
        match = re.fullmatch(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        if match:
            for option in match.group(1).split():
                key, _, value = option.partition("=")
                options[key] = value
            words = match.group(2).split()
        elif line.startswith("deb ") or line.startswith("deb\t"):
            words = line.split()[1:]
        else:
            continue
        if len(words) >= 2:
            out.append(AptSource((words[0],), (words[1],), tuple(words[2:]),
                                 options.get("signed-by"), path))
    return out


def apt_sources(sources_dir: Path = APT_SOURCES_DIR,
                sources_list: Path = APT_SOURCES_LIST) -> list[AptSource]:
    """Every enabled ``deb`` entry of ``sources_list`` and of the ``*.list``
    and ``*.sources`` files in ``sources_dir``, in apt's reading order."""
    sources: list[AptSource] = []
    if sources_list.is_file():
        sources += _one_line_sources(sources_list)
    if sources_dir.is_dir():
        for path in sorted(sources_dir.iterdir()):
            if path.name.endswith(".list") and path.is_file():
                sources += _one_line_sources(path)
            elif path.name.endswith(".sources") and path.is_file():
                sources += _deb822_sources(path)
    return sources


def debian_archive(codename: str, sources: Sequence[AptSource]) -> AptSource:
    """The apt entry of the release's own suite (``Suites:`` holding ``codename``,
    or an alias such as ``stable``): the main archive, whose URI also serves the
    release's backports.  The security archive (``<codename>-security``) and
    third-party suites never match.  Raises :class:`PackageError` when no
    entry carries the release."""
    for wanted in ((codename,), _RELEASE_ALIASES):
        for source in sources:
            if any(s.rstrip("/") in wanted for s in source.suites):
                return source
    files = sorted({str(s.path) for s in sources}) or ["no deb entries at all"]
    raise PackageError(f"no apt source carries the {codename} suite ({', '.join(files)}): "
                       "cannot tell which Debian archive this machine uses")


def debian_archive_uri(sources_dir: Path = APT_SOURCES_DIR,
                       sources_list: Path = APT_SOURCES_LIST, *,
                       codename: str | None = None) -> str:
    """The URI of the main Debian archive in the machine's apt configuration
    (see :func:`debian_archive`); ``codename`` defaults to the running release's."""
    source = debian_archive(codename or debian_codename(), apt_sources(sources_dir, sources_list))
    return source.uris[0].rstrip("/")


def suite_configured(suite: str, sources: Sequence[AptSource]) -> bool:
    """Whether some apt entry already carries ``suite``."""
    return any(suite in (s.rstrip("/") for s in source.suites) for source in sources)


DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def backports_sources_text(uri: str, codename: str, signed_by: str | None = None) -> str:
    """The deb822 stanza for the release's backports suite at ``uri``.

    ``signed_by`` is the archive entry's own ``Signed-By`` (a keyring path; an
    inline key block is not copied), else Debian's archive keyring."""
    if not signed_by or "\n" in signed_by:
        signed_by = DEFAULT_KEYRING
    return (
        "# Added by pyvfio (pyvfio/testing/debian.py): the backports suite of the\n"
        "# machine's own Debian archive, for packages the release's suites lack.\n"
        "Types: deb\n"
        f"URIs: {uri}\n"
        f"Suites: {backports_suite(codename)}\n"
        "Components: main\n"
        f"Signed-By: {signed_by}\n"
    )


def ensure_backports(*, os_release: Path = OS_RELEASE, sources_dir: Path = APT_SOURCES_DIR,
                     sources_list: Path = APT_SOURCES_LIST) -> str:
    """Make sure apt knows the running release's backports suite; return its
    name (``bookworm-backports``).  Adds ``pyvfio-backports.sources`` to
    ``sources_dir`` (root only) when no entry carries the suite yet."""
    codename = debian_codename(os_release)
    suite = backports_suite(codename)
    sources = apt_sources(sources_dir, sources_list)
    if suite_configured(suite, sources):
        return suite
    archive = debian_archive(codename, sources)
    if os.geteuid() != 0:
        raise PackageError(f"apt does not know {suite}; run scripts/setup as root to add it")
    (sources_dir / BACKPORTS_SOURCES_FILE.name).write_text(
        backports_sources_text(archive.uris[0].rstrip("/"), codename, archive.signed_by))
    return suite


# --- candidates --------------------------------------------------------------------------------


def parse_candidate(policy_output: str) -> str | None:
    """The ``Candidate:`` version of ``apt-cache policy PKG`` output (None for
    ``(none)`` or a package apt does not know)."""
    match = re.search(r"^\s*Candidate:\s*(\S+)", policy_output, re.M)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def apt_candidate(package: str) -> str | None:
    """The version ``apt-get install package`` would install from the suites apt
    knows now, or None."""
    proc = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True,
                          check=False, env=dict(os.environ, LC_ALL="C"))
    return parse_candidate(proc.stdout) if proc.returncode == 0 else None


def ensure_package_or_backport(package: str, *, os_release: Path = OS_RELEASE,
                               sources_dir: Path = APT_SOURCES_DIR,
                               sources_list: Path = APT_SOURCES_LIST) -> str | None:
    """Install ``package`` if it is missing: with no suite pin when the suites
    apt already has carry it (trixie's main has ``linux-source-6.12``, and so
    does bookworm's security suite now), otherwise from the running release's
    backports suite, which is added to apt for it (:func:`ensure_backports`).

    Returns the suite it was pinned to (None: installed unpinned, or already
    there).  Raises :class:`PackageError` without root, or when neither the
    configured suites nor backports have it.
    """
    if not missing_packages([package]):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PackageError(f"missing Debian package: {package} "
                           "(run scripts/setup as root, or apt-get install it)")
    updated = apt_candidate(package) is None
    if updated:
        _apt_get(["update", "-q"], "update")  # the lists may be empty or stale
    if apt_candidate(package) is not None:
        ensure_packages([package], update=not updated)
        return None
    suite = ensure_backports(os_release=os_release, sources_dir=sources_dir,
                             sources_list=sources_list)
    _apt_get(["update", "-q"], "update")
    if apt_candidate(package) is None:
        raise PackageError(f"apt has no {package} in this machine's suites nor in {suite}")
    ensure_packages([package], release=suite, update=False)
    return suite


def releases_from_depends(depends: str) -> list[str]:
    """Kernel releases named by a ``linux-image-amd64`` ``Depends`` field, in order:
    ``linux-image-6.1.0-57-amd64 (= 6.1.192-3)`` -> ``6.1.0-57-amd64``;
    ``linux-image-6.12.48+deb13-amd64-unsigned`` -> ``6.12.48+deb13-amd64``."""
    releases = []
    for alternative in re.split(r"[,|]", depends):
        words = alternative.split()
        if words and words[0].startswith("linux-image-"):
            release = words[0].removeprefix("linux-image-").removesuffix("-unsigned")
            if release not in releases:
                releases.append(release)
    return releases


# --- another release's kernel, unpacked privately -----------------------------------------------

DISTRO_INFO_CSV = Path("/usr/share/distro-info/debian.csv")


def released_after(codename: str, distro_csv: Path = DISTRO_INFO_CSV,
                   today: str | None = None) -> str | None:
    """The Debian release after ``codename`` in ``distro-info-data``'s table if it
    has been released by ``today`` (ISO date; default: now), else None."""
    import csv
    import datetime

    today = today or datetime.date.today().isoformat()
    try:
        with distro_csv.open(newline="") as fh:
            rows = [row for row in csv.DictReader(fh) if row.get("series")]
    except OSError as exc:
        raise PackageError(f"cannot read {distro_csv} ({exc.strerror}): "
                           "install distro-info-data") from None
    names = [row["series"] for row in rows]
    if codename not in names:
        raise PackageError(f"{distro_csv} does not list the release {codename!r}")
    index = names.index(codename) + 1
    if index < len(rows) and rows[index].get("release") and rows[index]["release"] <= today:
        return names[index]
    return None


def fetch_kernel(codename: str, dest: Path) -> Path:
    """Debian ``codename``'s kernel (what its ``linux-image-amd64`` depends on),
    unpacked under ``dest/tree`` without touching the system: a private apt
    configuration in ``dest/apt`` (its own sources list with this machine's
    archive URI and keyring and the ``codename`` suite, its own lists, cache and
    an empty dpkg status), ``apt-get download``, ``dpkg -x``, then ``depmod``
    (what the package's postinst would do).  Returns the ``vmlinuz`` path, for
    ``--kernel``/``--guest-kernel``.  Reuses an earlier unpacked tree.

    Raises :class:`PackageError` when apt, dpkg or depmod fails.
    """
    tree = dest / "tree"
    done = sorted(tree.glob("boot/vmlinuz-*"))
    if done:
        return done[-1]
    archive = debian_archive(debian_codename(), apt_sources())
    keyring = archive.signed_by if archive.signed_by and "\n" not in archive.signed_by \
        else DEFAULT_KEYRING
    apt = dest / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "parts", "debs"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    (apt / "sources.list").write_text(
        f"deb [signed-by={keyring}] {archive.uris[0].rstrip('/')} {codename} main\n")
    options = [f"-oDir::Etc::SourceList={apt / 'sources.list'}",
               f"-oDir::Etc::SourceParts={apt / 'parts'}",
               f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::State::Status={apt / 'status'}",
               f"-oDir::Cache={apt / 'cache'}", "-oDebug::NoLocking=1"]
    if os.geteuid() == 0:
        options.append("-oAPT::Sandbox::User=root")  # _apt may not reach a cache under /root

    def run(argv: list[str], what: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              env=dict(os.environ, LC_ALL="C"))
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise PackageError(f"{what} failed (exit {proc.returncode}):\n{tail}")
        return proc.stdout

    run(["apt-get", *options, "-q", "update"], f"apt-get update ({codename}, private lists)")
    shown = run(["apt-cache", *options, "show", "linux-image-amd64"],
                f"apt-cache show linux-image-amd64 ({codename})")
    depends = re.search(r"^Depends:\s*(.*)$", shown, re.M)
    releases = releases_from_depends(depends.group(1) if depends else "")
    if not releases:
        raise PackageError(f"{codename}'s linux-image-amd64 names no kernel package")
    release = releases[0]
    debs = apt / "debs"
    run(["apt-get", *options, "-q", "download", f"linux-image-{release}"],
        f"apt-get download linux-image-{release}", cwd=debs)
    deb = sorted(debs.glob(f"linux-image-{release}_*.deb"))[-1]
    staging = dest / "tree.partial"
    shutil.rmtree(staging, ignore_errors=True)
    run(["dpkg", "-x", str(deb), str(staging)], f"dpkg -x {deb.name}")
    base = staging / "usr" if (staging / "usr/lib/modules" / release).is_dir() else staging
    run(["depmod", "-b", str(base), release], f"depmod -b {base} {release}")
    os.replace(staging, tree)
    return tree / "boot" / f"vmlinuz-{release}"
