"""The "pyvfio-6.12" guest kernel: a small, all-built-in 6.12 built from Debian's source.

Debian 12's own kernel (6.1) has only the legacy VFIO API, and Debian's
prebuilt 6.12 (trixie's, and bookworm-backports') has IOMMUFD off.  So the
guest suites get a second kernel built here from Debian's ``linux-source-6.12``
(from the suites apt already has when one carries it, trixie's main or
bookworm's security suite; else from the running release's backports, same
archive as the machine's apt sources): ``make tinyconfig`` plus
``guest-6.12.config`` beside this file, everything built in, so the guest's
initramfs carries no modules.  See issue 6 for the option list.

The image is cached in ``~/.cache/pyvfio/kernels/<key>/bzImage`` where
``<key>`` hashes the source package version and the fragment, so a build runs
only when the cache is cold (about 3.5 minutes on 2 cores).  After
configuring, every ``CONFIG_X=y`` of the fragment is checked in the final
``.config``: an option that did not stick (a dependency missing) fails the
build loudly instead of producing a kernel that quietly lacks a feature.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pyvfio.errors import PyvfioError
from pyvfio.testing import debian
from pyvfio.testing.initramfs import cache_dir
from pyvfio.testing.kernel_image import Kernel

NAME = "pyvfio-6.12"
SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
CONFIG_FRAGMENT = Path(__file__).with_name("guest-6.12.config")
BUILD_PACKAGES = ("gcc", "make", "libc6-dev", "flex", "bison", "bc", "libelf-dev",
                  "libssl-dev", "cpio", "xz-utils")
# Bump when the build recipe (not the fragment) changes in a way that changes the image.
RECIPE_VERSION = 1


class KernelBuildError(PyvfioError):
    """Raised when the guest kernel cannot be built: the source package is
    missing, an option of the fragment did not end up in .config, or make failed."""


def requested_options(fragment_text: str) -> dict[str, str]:
    """``{"CONFIG_VFIO": "y", "CONFIG_FOO": "n"}`` from a config fragment
    (``CONFIG_X=v`` lines and ``# CONFIG_X is not set`` lines)."""
    options: dict[str, str] = {}
    for line in fragment_text.splitlines():
        line = line.strip()
        unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if unset:
            options[unset.group(1)] = "n"
        elif line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            options[name] = value
    return options


def config_values(dot_config_text: str) -> dict[str, str]:
    """The values of a .config, unset options as ``n``."""
    return requested_options(dot_config_text)


def options_that_did_not_stick(requested: dict[str, str], dot_config: dict[str, str]) -> list[str]:
    """One line per requested option whose value differs in the final .config."""
    problems = []
    for name, want in requested.items():
        have = dot_config.get(name, "n")
        if have != want:
            problems.append(f"{name}={want} requested, .config has "
                            + (f"{name}={have}" if name in dot_config else "it absent"))
    return problems


def source_version() -> str:
    """The installed linux-source-6.12 package version, installing it if missing
    (see :func:`pyvfio.testing.debian.ensure_package_or_backport`: no suite pin
    when apt has a candidate, the release's backports only when it has none)."""
    debian.ensure_package_or_backport(SOURCE_PACKAGE)
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip() or not SOURCE_TARBALL.is_file():
        raise KernelBuildError(f"{SOURCE_PACKAGE} is not installed ({SOURCE_TARBALL} missing)")
    return proc.stdout.strip()


def cache_key(version: str, fragment_text: str) -> str:
    digest = hashlib.sha256(
        f"{NAME}\nrecipe {RECIPE_VERSION}\nsource {version}\n{fragment_text}".encode())
    return digest.hexdigest()[:16]


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def pyvfio_kernel(*, log: bool = True) -> Kernel:
    """The pyvfio-6.12 kernel, built first if the cache is cold."""
    fragment = CONFIG_FRAGMENT.read_text()
    version = source_version()
    out = kernels_dir() / cache_key(version, fragment)
    image = out / "bzImage"
    if image.is_file():
        return Kernel(NAME, image, config=out / "config")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if not image.is_file():
            build(out, version, fragment, log=log)
    return Kernel(NAME, image, config=out / "config")


def _run(argv: list[str], cwd: Path, log_file: Path, what: str) -> None:
    with open(log_file, "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.run(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise KernelBuildError(f"{what} failed (exit {proc.returncode}); log {log_file}:\n{tail}")


def build(out: Path, version: str, fragment: str, *, log: bool = True) -> Path:
    """Extract the source, configure, check the options, build; leave ``out/bzImage``."""
    debian.ensure_packages(BUILD_PACKAGES)
    started = time.monotonic()
    src_root = out / "src"
    obj = out / "obj"
    log_file = out / "build.log"
    shutil.rmtree(src_root, ignore_errors=True)
    shutil.rmtree(obj, ignore_errors=True)
    src_root.mkdir()
    obj.mkdir()
    log_file.write_text(f"{NAME} from {SOURCE_PACKAGE} {version}\n")
    if log:
        print(f"pyvfio: building the {NAME} guest kernel (cold cache, a few minutes); "
              f"log: {log_file}", file=sys.stderr, flush=True)
    _run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(src_root)], out, log_file, "extracting")
    trees = [p for p in src_root.iterdir() if (p / "Makefile").is_file()]
    if len(trees) != 1:
        raise KernelBuildError(f"{SOURCE_TARBALL} did not unpack to one kernel tree")
    src = trees[0]
    make = ["make", "-C", str(src), f"O={obj}"]
    (obj / "pyvfio.config").write_text(fragment)
    _run([*make, "tinyconfig"], out, log_file, "make tinyconfig")
    _run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(obj),
          str(obj / ".config"), str(obj / "pyvfio.config")], out, log_file, "merging the fragment")
    _run([*make, "olddefconfig"], out, log_file, "make olddefconfig")
    dot_config = (obj / ".config").read_text()
    problems = options_that_did_not_stick(requested_options(fragment), config_values(dot_config))
    if problems:
        raise KernelBuildError(
            f"{len(problems)} option(s) of {CONFIG_FRAGMENT.name} did not end up in .config "
            "(a dependency is missing from the fragment):\n  " + "\n  ".join(problems))
    configured = time.monotonic()
    _run([*make, f"-j{os.cpu_count() or 2}", "bzImage"], out, log_file, "make bzImage")
    image = obj / "arch/x86/boot/bzImage"
    shutil.copyfile(image, out / "bzImage.tmp")
    (out / "config").write_text(dot_config)
    (out / "build.json").write_text(json.dumps({
        "source": f"{SOURCE_PACKAGE} {version}",
        "configure_seconds": round(configured - started, 1),
        "build_seconds": round(time.monotonic() - configured, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "cpus": os.cpu_count(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=1) + "\n")
    os.replace(out / "bzImage.tmp", out / "bzImage")
    # The trees are 1.8 GB; the image, its .config and the log are what is kept.
    shutil.rmtree(src_root, ignore_errors=True)
    shutil.rmtree(obj, ignore_errors=True)
    if log:
        print(f"pyvfio: built {out / 'bzImage'} in {time.monotonic() - started:.0f} s",
              file=sys.stderr, flush=True)
    return out / "bzImage"
