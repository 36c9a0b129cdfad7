"""A kernel image the guest harness can boot (:class:`Kernel`).

Its own module so that the guest runner (:mod:`pyvfio.testing.guest`) and the
kernel builder (:mod:`pyvfio.testing.kernel`) both use it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Kernel"]


@dataclass(frozen=True)
class Kernel:
    """A kernel image the guest can boot.

    ``modules_dir`` is ``/lib/modules/<release>`` for a modular kernel (the
    initramfs carries the modules it needs) and ``None`` for an all-built-in
    one.  ``config`` is the kernel's ``.config`` when known (Debian's
    ``/boot/config-<release>``); the guest gets a copy, so that a test can
    name the option a skipped feature lacks (:mod:`pyvfio.testing.kconfig`).
    """

    name: str
    image: Path
    modules_dir: Path | None = None
    config: Path | None = None
