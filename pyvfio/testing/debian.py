"""Debian packages the guest harness needs, installed on demand with apt-get.

The harness runs on a Debian machine (the CI machine and the developers' are
the same image).  When a package it needs is missing it installs it the
ordinary way, ``apt-get install``, as root; without root it says which
packages to install instead of failing somewhere deeper.

The backports suite (for ``linux-source-6.12``) is added with the archive URI
the machine's own apt configuration already uses: no host name is written
here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from pyvfio.errors import PyvfioError

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


def ensure_packages(packages: Sequence[str], *, release: str | None = None) -> list[str]:
    """Install the packages of ``packages`` that are missing; return what was installed.

    ``release`` picks the suite for these packages only (``name/release``), so
    dependencies keep coming from the default suite: ``apt-get -t`` would
    instead upgrade unrelated installed packages (linux-libc-dev...) to
    backports.
    """
    missing = missing_packages(packages)
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PackageError(
            "missing Debian packages: " + " ".join(missing)
            + " (run scripts/setup as root, or apt-get install them)"
        )
    _apt_get(["update", "-q"], "update")
    names = [f"{p}/{release}" if release else p for p in missing]
    _apt_get(["install", "-y", "-q", "--no-install-recommends", *names], "install " + " ".join(names))
    _known_installed.update(missing)
    return missing


def debian_archive_uri(sources_dir: Path = APT_SOURCES_DIR,
                       sources_list: Path = APT_SOURCES_LIST) -> str:
    """The URI of the main Debian archive in the machine's apt configuration.

    Reads deb822 ``*.sources`` files (``URIs:`` of a stanza whose ``Suites:``
    holds a plain release such as ``bookworm``) and one-line ``sources.list``
    entries.  The security archive is skipped: it carries no backports.
    """
    candidates: list[tuple[str, str]] = []  # (uri, suites)
    files = sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []
    for path in files:
        if path == BACKPORTS_SOURCES_FILE:
            continue
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and "uris" in fields:
                candidates.extend((u, fields.get("suites", "")) for u in fields["uris"].split())
    lists = [sources_list] + (sorted(sources_dir.glob("*.list")) if sources_dir.is_dir() else [])
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                rest = [w for w in words[1:] if not w.startswith("[")]
                if len(rest) >= 2:
                    candidates.append((rest[0], rest[1]))
    for uri, suites in candidates:
        if "security" in uri or "security" in suites:
            continue
        if any(re.fullmatch(r"[a-z]+", s) for s in suites.split()):
            return uri.rstrip("/")
    raise PackageError(
        "cannot find the Debian archive in the apt configuration "
        f"({sources_dir}/*.sources, {sources_list})"
    )


def debian_codename() -> str:
    """The release codename (``bookworm``) from /etc/os-release."""
    text = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.M)
    if not match:
        raise PackageError("no VERSION_CODENAME in /etc/os-release")
    return match.group(1)


def backports_sources_text(uri: str, codename: str) -> str:
    return (
        "# Added by pyvfio (pyvfio/testing/debian.py): the backports suite of the\n"
        "# machine's own Debian archive, for linux-source-6.12.\n"
        "Types: deb\n"
        f"URIs: {uri}\n"
        f"Suites: {codename}-backports\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def ensure_backports() -> str:
    """Make sure apt knows the backports suite; return its name (``bookworm-backports``)."""
    codename = debian_codename()
    suite = f"{codename}-backports"
    configured = [BACKPORTS_SOURCES_FILE, APT_SOURCES_LIST, *APT_SOURCES_DIR.glob("*.sources"),
                  *APT_SOURCES_DIR.glob("*.list")]
    for path in configured:
        if path.is_file() and re.search(rf"^[^#]*\b{suite}\b", path.read_text(errors="replace"), re.M):
            return suite
    if os.geteuid() != 0:
        raise PackageError(f"apt does not know {suite}; run scripts/setup as root to add it")
    BACKPORTS_SOURCES_FILE.write_text(backports_sources_text(debian_archive_uri(), codename))
    return suite
