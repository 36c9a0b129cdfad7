"""What the iommufd objects share: the error for a kernel without iommufd,
paths under a root, dirty bitmaps, and :class:`IommufdHandle`, the part of an
:class:`~pyvfio.kernel.iommufd.Iommufd` its objects use.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from typing import Protocol

from pyvfio.errors import PyvfioError, UsageError
from pyvfio.uapi import iommufd as U

U64_MAX = (1 << 64) - 1


class IommufdUnavailable(PyvfioError):
    """Raised when the running kernel has no iommufd (``/dev/iommu`` is missing:
    Linux before 6.2, or built without ``CONFIG_IOMMUFD``, like Debian 12's),
    or the device has no cdev (Linux before 6.6, or no ``CONFIG_VFIO_DEVICE_CDEV``)."""


def _path(root: str, relative: str) -> str:
    return os.path.join(root, relative.lstrip("/"))


def _bitmap(bits: int, pages: Iterable[int]) -> ctypes.Array[ctypes.c_uint64]:
    words = (ctypes.c_uint64 * max(1, -(-bits // 64)))()
    for page in pages:
        if not 0 <= page < bits:
            raise UsageError(f"page {page} is outside the {bits}-page range")
        words[page // 64] |= 1 << (page % 64)
    return words


class IommufdHandle(Protocol):
    """The part of an :class:`~pyvfio.kernel.iommufd.Iommufd` that the objects
    living in it (:class:`~pyvfio.kernel.iommufd.Ioas`,
    :class:`~pyvfio.kernel.iommufd.Hwpt`, :class:`~pyvfio.kernel.iommufd.MockDevice`)
    use: its fd, its name for messages, ``IOMMU_DESTROY`` and ``IOMMU_OPTION``."""

    fd: int
    name: str

    def fileno(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def destroy(self, object_id: int) -> None: ...

    def set_option(self, option: U.OptionId, value: int, object_id: int = 0) -> None: ...
