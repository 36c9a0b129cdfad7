"""QEMU >= 10.1 for the guest harness: the first QEMU with a vfio-user client.

``vfio-user-pci`` (QEMU's vfio-user *client*) arrived in QEMU 10.1.  Debian
12 ships 7.2 (10.0 in its backports); Debian 13's backports carries 11.x.
Its packages need Debian 13's libc, so they cannot be installed on Debian 12,
but they can be *unpacked* and run with their own dynamic loader:

1. a private apt configuration (its own source list, lists, cache and an
   empty dpkg status, under ``~/.cache/pyvfio/qemu/apt``) names the machine's
   own Debian archive (the URI read from its apt sources: no host name is
   written here) with a release and its backports suite;
2. ``apt-get install --download-only`` resolves ``qemu-system-x86`` and its
   runtime dependencies against that empty status, so it fetches the whole
   closure (about 90 packages, 37 MB) without touching the system;
3. each ``.deb`` is ``dpkg -x``-ed into ``~/.cache/pyvfio/qemu/<version>/tree``;
4. a small wrapper script beside the tree runs
   ``TREE/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path ...
   TREE/usr/bin/qemu-system-x86_64 -L TREE/usr/share/qemu -L TREE/usr/share/seabios``
   with ``QEMU_MODULE_DIR`` set to the tree's module folder.

The releases tried are the running one and the one after it (from
``distro-info-data``'s ``debian.csv``), each with its backports suite; the
first whose best ``qemu-system-x86`` is >= 10.1 wins.  On Debian 13 that is
its own backports; on Debian 12 it is Debian 13's.  A system
``qemu-system-x86_64`` that is already >= 10.1 is used as it is.

The result is cached and checked: the tree is written under a temporary name
and renamed into place only after the wrapper ran, reported the expected
version and listed ``vfio-user-pci``; later calls reuse it without touching
the network.  Command line::

    python3 -m pyvfio.testing.qemu            # provision if needed, print the wrapper path
    python3 -m pyvfio.testing.qemu --json     # the same, as a JSON object
    pyvfio guest-qemu                         # the same through the pyvfio CLI

Known limit: ``-device help`` loads every module QEMU knows; one the tree
lacks (the GUI and OpenGL modules are not unpacked) is then looked for in the
system's module folder, whose older build QEMU refuses with "Only modules
from the same build can be loaded".  Ask for one device's help
(``-device vfio-user-pci,help``) instead.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pyvfio.errors import PyvfioError
from pyvfio.testing import debian
from pyvfio.testing.initramfs import cache_dir

MIN_VERSION = (10, 1)
PACKAGE = "qemu-system-x86"
BINARY = "qemu-system-x86_64"
MULTIARCH = "x86_64-linux-gnu"
DISTRO_INFO_CSV = debian.DISTRO_INFO_CSV
KEYRING = debian.DEFAULT_KEYRING
MANIFEST = "manifest.json"
WRAPPER = BINARY  # the wrapper script's name in the version folder
# Bump when the unpacking recipe changes in a way that changes the tree.
RECIPE_VERSION = 1


class QemuProvisionError(PyvfioError):
    """Raised when no QEMU >= 10.1 can be found or provisioned: no suitable
    package in the releases tried, apt-get or dpkg-deb failed, or the unpacked
    binary did not run or reported another version."""


@dataclass(frozen=True)
class Qemu:
    """A ``qemu-system-x86_64`` with a vfio-user client.

    ``command`` is one executable path (the system binary, or the wrapper
    script of a private tree) that takes QEMU's ordinary arguments: pass it as
    ``Guest(qemu=...)``.  ``argv``/``env`` are the same thing without the
    wrapper: the argv prefix (loader, library path, binary, ``-L`` options) and
    the environment to add (``QEMU_MODULE_DIR``).
    """

    version: str  # upstream version as QEMU reports it: "11.1.3"
    command: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    package_version: str = ""  # Debian version ("1:11.1.3+ds-1~bpo13+1"); "" if unknown
    suite: str = ""  # the Debian suite it came from ("trixie-backports"); "" for the system's
    tree: Path | None = None  # the private tree; None for the system's binary

    def as_json(self) -> dict[str, object]:
        return {"version": self.version, "command": self.command, "argv": list(self.argv),
                "env": dict(self.env), "package_version": self.package_version,
                "suite": self.suite, "tree": str(self.tree) if self.tree else None}


# --- versions ---------------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, ...] | None:
    """``(11, 1, 3)`` from ``QEMU emulator version 11.1.3 (Debian ...)`` or from a
    Debian package version (``1:11.1.3+ds-1~bpo13+1``); ``None`` if neither."""
    match = re.search(r"QEMU emulator version (\d+(?:\.\d+)+)", text)
    if match is None:
        match = re.fullmatch(r"(?:\d+:)?(\d+(?:\.\d+)+)\S*", text.strip())
    if match is None:
        return None
    return tuple(int(p) for p in match.group(1).split("."))


def version_string(version: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in version)


def reported_version(argv: Sequence[str], env: Mapping[str, str] | None = None,
                     timeout: float = 30.0) -> tuple[int, ...] | None:
    """What ``argv --version`` reports; ``None`` if it does not run or says nothing useful."""
    try:
        proc = subprocess.run([*argv, "--version"], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(proc.stdout) if proc.returncode == 0 else None


def has_vfio_user_pci(argv: Sequence[str], env: Mapping[str, str] | None = None) -> bool:
    """Whether the binary knows the ``vfio-user-pci`` device (its help lists ``socket``)."""
    try:
        proc = subprocess.run([*argv, "-device", "vfio-user-pci,help"], capture_output=True,
                              text=True, timeout=30, env={**os.environ, **(env or {})})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "socket=" in proc.stdout


def system_qemu(which: str | None = None) -> Qemu | None:
    """The system's ``qemu-system-x86_64`` if it is >= 10.1, else ``None``."""
    path = which if which is not None else shutil.which(BINARY)
    if path is None:
        return None
    version = reported_version([path])
    if version is None or version < MIN_VERSION:
        return None
    return Qemu(version_string(version), path, (path,))


# --- releases and suites ----------------------------------------------------------------------


def releases_to_try(codename: str, distro_csv: Path = DISTRO_INFO_CSV,
                    today: str | None = None) -> list[str]:
    """The running release, then the next one if it has been released
    (:func:`pyvfio.testing.debian.released_after`); ``PYVFIO_QEMU_RELEASE``
    overrides both."""
    forced = os.environ.get("PYVFIO_QEMU_RELEASE")
    if forced:
        if not re.fullmatch(r"[a-z]+", forced):
            raise QemuProvisionError(f"PYVFIO_QEMU_RELEASE={forced!r}: give a Debian codename")
        return [forced]
    try:
        following = debian.released_after(codename, distro_csv, today)
    except debian.PackageError as exc:
        raise QemuProvisionError(f"{exc} (or set PYVFIO_QEMU_RELEASE to the Debian release "
                                 "whose backports to use)") from None
    return [codename] + ([following] if following else [])


def private_sources_text(uri: str, release: str, keyring: str | Path = KEYRING) -> str:
    """A one-line-format source list: ``release`` and ``release-backports`` of ``uri``."""
    return "".join(
        f"deb [signed-by={keyring}] {uri} {suite} main\n"
        for suite in (release, f"{release}-backports")
    )


# --- the private apt -------------------------------------------------------------------------


class PrivateApt:
    """apt-get and apt-cache with their own state under ``root``: their own
    source list, package lists, cache and an *empty* dpkg status, so that
    dependencies resolve to the full closure and nothing of the system's apt
    state is read or changed.  The machine's apt.conf (a proxy, say) still applies."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sources = root / "sources.list"
        for sub in ("lists/partial", "cache/archives/partial", "sources.list.d",
                    "preferences.d"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.status = root / "status"
        if not self.status.exists():
            self.status.write_text("")

    def options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::State": r, "Dir::State::Lists": r / "lists", "Dir::State::status": self.status,
            "Dir::Cache": r / "cache", "Dir::Cache::archives": r / "cache/archives",
            "Dir::Etc::SourceList": self.sources, "Dir::Etc::SourceParts": r / "sources.list.d",
            "Dir::Etc::Preferences": r / "preferences", "Dir::Etc::PreferencesParts":
            r / "preferences.d", "APT::Architecture": "amd64", "APT::Architectures": "amd64",
            # Our own lock files live in our own folders; the system's are not taken.
            "Debug::NoLocking": "1",
        }
        if os.geteuid() == 0:
            # The _apt sandbox user cannot write below root's home.
            opts["APT::Sandbox::User"] = "root"
        out: list[str] = []
        for key, value in opts.items():
            out += ["-o", f"{key}={value}"]
        return out

    def run(self, tool: str, args: Sequence[str], what: str, timeout: float = 900) -> str:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        try:
            proc = subprocess.run([tool, *self.options(), *args], capture_output=True, text=True,
                                  env=env, timeout=timeout)
        except FileNotFoundError:
            raise QemuProvisionError(f"{tool} not found: this needs a Debian system") from None
        except subprocess.TimeoutExpired:
            raise QemuProvisionError(f"{tool} {what} still running after {timeout:.0f} s") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise QemuProvisionError(f"{tool} {what} failed (exit {proc.returncode}):\n{tail}")
        return proc.stdout

    def update(self, sources_text: str) -> None:
        self.sources.write_text(sources_text)
        self.run("apt-get", ["-q", "update"], "update (private lists)")

    def versions(self, package: str) -> list[tuple[str, str]]:
        """``[(debian_version, suite)]`` of ``package`` in the private lists."""
        out = self.run("apt-cache", ["showpkg", package], f"showpkg {package}")
        found: list[tuple[str, str]] = []
        section = out.split("\nVersions: \n", 1)[1] if "\nVersions: \n" in out else ""
        for line in section.split("\n\n", 1)[0].splitlines():
            # 1:11.1.3+ds-1~bpo13+1 (/.../lists/<host>_debian_dists_trixie-backports_main_...)
            match = re.match(r"(\S+) \((.*)\)", line)
            if match:
                suite = re.search(r"_dists_([^_]+)_", match.group(2))
                found.append((match.group(1), suite.group(1) if suite else ""))
        return found

    def download_closure(self, package: str, version: str, suite: str) -> list[Path]:
        """Download ``package=version`` and everything it Depends on (not its
        Recommends) into a clean archive folder; return the ``.deb`` paths."""
        archives = self.root / "cache/archives"
        for old in archives.glob("*.deb"):
            old.unlink()
        self.run("apt-get", ["-q", "-y", "--download-only", "--no-install-recommends",
                             "-o", f"APT::Default-Release={suite}",
                             "install", f"{package}={version}"],
                 f"install --download-only {package}={version}")
        debs = sorted(archives.glob("*.deb"))
        if not debs:
            raise QemuProvisionError(f"apt-get downloaded nothing for {package}={version}")
        return debs


# --- the tree --------------------------------------------------------------------------------


def tree_argv(tree: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """The argv prefix and environment that run the tree's QEMU with its own loader."""
    # Both halves of a not-yet-merged /usr; a missing folder costs the loader nothing.
    library_path = ":".join(str(tree / p / MULTIARCH) for p in ("usr/lib", "lib"))
    argv = (str(tree / "usr/lib" / MULTIARCH / "ld-linux-x86-64.so.2"),
            "--library-path", library_path, str(tree / "usr/bin" / BINARY),
            "-L", str(tree / "usr/share/qemu"), "-L", str(tree / "usr/share/seabios"))
    env = {"QEMU_MODULE_DIR": str(tree / "usr/lib" / MULTIARCH / "qemu")}
    return argv, env


def wrapper_text(argv: Sequence[str], env: Mapping[str, str], comment: str) -> str:
    import shlex

    lines = ["#!/bin/sh", f"# Written by pyvfio.testing.qemu: {comment}",
             "# QEMU's own loader runs it, so the system's libraries are never mixed in."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f'exec {shlex.join(argv)} "$@"')
    return "\n".join(lines) + "\n"


def qemu_root(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "qemu"


def _folder_name(package_version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", package_version.split(":", 1)[-1])


def load_cached(folder: Path) -> Qemu | None:
    """The provisioned QEMU in ``folder`` if its manifest is complete and current."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if data.get("recipe") != RECIPE_VERSION:
        return None
    tree = folder / "tree"
    wrapper = folder / WRAPPER
    if not wrapper.is_file() or not tree.is_dir():
        return None
    argv, env = tree_argv(tree)
    return Qemu(str(data["version"]), str(wrapper), argv, env,
                package_version=str(data["package_version"]), suite=str(data["suite"]),
                tree=tree)


def cached_qemus(cache: Path | None = None) -> list[Qemu]:
    """Every complete provisioned QEMU >= 10.1 in the cache, newest first."""
    root = qemu_root(cache)
    found = [q for q in (load_cached(p) for p in root.glob("*/") if p.is_dir()) if q]
    found = [q for q in found if (parse_version(q.version) or (0,)) >= MIN_VERSION]
    return sorted(found, key=lambda q: parse_version(q.version) or (0,), reverse=True)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session provisioning waits here
        yield


def _unpack(debs: Sequence[Path], tree: Path) -> None:
    for deb in debs:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise QemuProvisionError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")


def provision(cache: Path | None = None, *, log: bool = True) -> Qemu:
    """Download and unpack the newest ``qemu-system-x86`` >= 10.1 of the releases
    tried (see the module docstring) unless that version is already cached."""
    root = qemu_root(cache)
    say = (lambda msg: print(f"pyvfio qemu: {msg}", file=sys.stderr)) if log else (
        lambda msg: None)
    with _locked(root):
        apt = PrivateApt(root / "apt")
        codename = debian.debian_codename()
        archive = debian.debian_archive(codename, debian.apt_sources())
        uri = archive.uris[0].rstrip("/")
        # The machine's own keyring for that archive (an inline key block cannot
        # go in a one-line source: then Debian's keyring).
        keyring = archive.signed_by if archive.signed_by and "\n" not in archive.signed_by \
            else KEYRING
        tried: list[str] = []
        for release in releases_to_try(codename):
            apt.update(private_sources_text(uri, release, keyring))
            versions = [(v, s) for v, s in apt.versions(PACKAGE)
                        if (parse_version(v) or (0,)) >= MIN_VERSION]
            tried.append(f"{release}: " + (", ".join(v for v, _ in apt.versions(PACKAGE))
                                           or "none"))
            if versions:
                break
        else:
            raise QemuProvisionError(
                f"no {PACKAGE} >= {version_string(MIN_VERSION)} in the releases tried ("
                + "; ".join(tried) + ")")
        package_version, suite = max(versions, key=lambda vs: parse_version(vs[0]) or (0,))
        folder = root / _folder_name(package_version)
        cached = load_cached(folder)
        if cached is not None:
            return cached
        started = time.monotonic()
        say(f"downloading {PACKAGE} {package_version} ({suite}) and its libraries")
        debs = apt.download_closure(PACKAGE, package_version, suite)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            tree = staging / "tree"
            say(f"unpacking {len(debs)} packages")
            _unpack(debs, tree)
            upstream = version_string(parse_version(package_version) or (0,))
            # The wrapper names the final folder; check through argv in staging.
            argv, env = tree_argv(tree)
            reported = reported_version(argv, env)
            if reported is None or version_string(reported) != upstream:
                raise QemuProvisionError(
                    f"the unpacked {BINARY} reports version "
                    f"{version_string(reported) if reported else 'nothing'}, expected {upstream}")
            if not has_vfio_user_pci(argv, env):
                raise QemuProvisionError(f"the unpacked {BINARY} {upstream} has no vfio-user-pci")
            final_argv, final_env = tree_argv(folder / "tree")
            (staging / WRAPPER).write_text(wrapper_text(
                final_argv, final_env, f"QEMU {package_version} from Debian's {suite}"))
            (staging / WRAPPER).chmod(0o755)
            (staging / MANIFEST).write_text(json.dumps({
                "recipe": RECIPE_VERSION, "version": upstream, "package_version": package_version,
                "suite": suite, "packages": [d.name for d in debs],
                "provisioned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.monotonic() - started, 1)}, indent=1) + "\n")
            if folder.exists():  # an incomplete earlier attempt
                shutil.rmtree(folder)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in (root / "apt/cache/archives").glob("*.deb"):
            old.unlink()  # the tree is what we keep
        result = load_cached(folder)
        assert result is not None
        say(f"{BINARY} {upstream} ready in {time.monotonic() - started:.0f} s: {result.command}")
        return result


_found: Qemu | None = None


def ensure_qemu(cache: Path | None = None, *, refresh: bool = False, log: bool = True) -> Qemu:
    """A QEMU >= 10.1: the system's, else the newest cached tree, else a new one
    (:func:`provision`).  ``refresh`` asks apt for a newer package even when one
    is cached.  Memoized per process."""
    global _found
    if _found is not None and not refresh and cache is None:
        return _found
    qemu = None if refresh else system_qemu()
    if qemu is None and not refresh:
        cached = cached_qemus(cache)
        if cached and reported_version(cached[0].argv, cached[0].env) == parse_version(
                cached[0].version):
            qemu = cached[0]
    if qemu is None:
        qemu = provision(cache, log=log)
    if cache is None:
        _found = qemu
    return qemu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m pyvfio.testing.qemu",
        description="Make sure a qemu-system-x86_64 >= 10.1 (with vfio-user-pci) is available: "
        "the system's, or Debian's package unpacked into ~/.cache/pyvfio/qemu. Prints the "
        "command to run it.",
        epilog="examples:\n  python3 -m pyvfio.testing.qemu\n"
               "  $(python3 -m pyvfio.testing.qemu) -device vfio-user-pci,help\n\n"
               "exit status: 0 ready, 2 could not provision (the reason is printed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--refresh", action="store_true",
                        help="ask the archive for a newer package even when one is cached")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    try:
        qemu = ensure_qemu(refresh=args.refresh)
    except PyvfioError as exc:
        print(f"pyvfio qemu: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(qemu.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(qemu.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
