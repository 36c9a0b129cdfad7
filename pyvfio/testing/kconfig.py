"""The running kernel's build configuration, for guest tests that need a feature.

A guest test that needs, say, iommufd calls :func:`require` with the option
that provides it.  When the running kernel's ``.config`` says the option is
not set, the test is skipped with a reason that names the option and the
kernel release (``kernel 6.1.0-57-amd64 is built without CONFIG_IOMMUFD
(iommufd)``), whichever kernel that is: Debian 12's 6.1, Debian 13's 6.12 or a
kernel given by path.  When the option is set, or the configuration is
unknown, the test runs and fails if the feature is broken: a skip never
hides a kernel that claims the feature.

Where the configuration comes from, first found: ``/proc/config.gz``
(pyvfio-6.12 has ``CONFIG_IKCONFIG_PROC``), the copy the harness puts in the
run share (:data:`pyvfio.testing.guest.GUEST_KERNEL_CONFIG`, from
:attr:`pyvfio.testing.guest.Kernel.config`), ``/boot/config-<release>``.
"""

from __future__ import annotations

import gzip
import os
from functools import cache
from pathlib import Path

from pyvfio.testing.guest import GUEST_KERNEL_CONFIG
from pyvfio.testing.kernel import config_values


def config_sources(release: str | None = None) -> list[Path]:
    """Where the running kernel's configuration may be, in the order tried."""
    release = release or os.uname().release
    return [Path("/proc/config.gz"), Path(GUEST_KERNEL_CONFIG), Path(f"/boot/config-{release}")]


@cache
def running_config() -> dict[str, str] | None:
    """``{"CONFIG_VFIO": "m", ...}`` of the running kernel, unset options as
    ``n``; None when no source (:func:`config_sources`) is readable."""
    for path in config_sources():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        return config_values(data.decode("utf-8", "replace"))
    return None


def option(name: str) -> str | None:
    """``y``, ``m``, a value, or ``n`` (unset) for ``name`` in the running kernel's
    configuration; None when the configuration is unknown."""
    config = running_config()
    if config is None:
        return None
    return config.get(name, "n")


def lacking(*options: str) -> list[str]:
    """The options of ``options`` that the running kernel is known to be built
    without (unset or ``n``)."""
    return [name for name in options if option(name) == "n"]


def require(*options: str, feature: str) -> None:
    """Skip the calling test when the running kernel is built without one of
    ``options``; the reason names them, the kernel release and ``feature``."""
    missing = lacking(*options)
    if missing:
        import pytest

        pytest.skip(f"kernel {os.uname().release} is built without {', '.join(missing)} "
                    f"({feature})")


def require_feature(present: bool, *options: str, feature: str) -> None:
    """For a test that found ``feature`` missing (``present`` false): skip when
    the running kernel is built without one of ``options`` (the reason names
    them), or when its configuration is unknown (the reason says so); fail
    when the configuration has them all, since then the feature is broken,
    not absent.  Does nothing when ``present``."""
    if present:
        return
    import pytest

    release = os.uname().release
    missing = lacking(*options)
    if missing:
        pytest.skip(f"kernel {release} is built without {', '.join(missing)} ({feature})")
    if running_config() is None:
        pytest.skip(f"kernel {release} has no {feature} (its build configuration is unknown)")
    pytest.fail(f"kernel {release} is built with {', '.join(options)}, yet has no {feature}")
