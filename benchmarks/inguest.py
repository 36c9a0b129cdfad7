"""What kernel_bench.py and iommufd_bench.py both do inside the guest: put
the device on vfio-pci, count how often a loop runs, and build the bare
type1 map/unmap structs of their Python floor."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable


def bind_vfio(bdf: str) -> None:
    """Put ``bdf`` on vfio-pci with pyvfio's own managed bind (a no-op if it
    is there already); the guest is thrown away afterwards, so no restore."""
    from pyvfio.host import bind

    bind([bdf], driver="vfio-pci")


def rate(fn: Callable[[], None], batch: int, seconds: float) -> float:
    """Operations per second of ``fn``, which does ``batch`` of them per call."""
    # Warm up first: TCG translates new code on first use, and the first
    # measurement after opening a device was seen to run a few percent slow.
    warm_until = time.perf_counter() + min(0.1, seconds / 5)
    while time.perf_counter() < warm_until:
        fn()
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += batch
        t = time.perf_counter()
        if t - t0 >= seconds:
            return n / (t - t0)


def type1_structs(vaddr: int, iova: int, size: int
                  ) -> tuple[ctypes.Structure, ctypes.Structure]:
    """``VFIO_IOMMU_MAP_DMA`` (read+write) and ``VFIO_IOMMU_UNMAP_DMA`` args
    for ``size`` bytes at ``vaddr`` mapped at ``iova``."""
    from pyvfio.uapi import vfio as V

    m = V.vfio_iommu_type1_dma_map(
        argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_map),
        flags=V.VFIO_DMA_MAP_FLAG_READ | V.VFIO_DMA_MAP_FLAG_WRITE,
        vaddr=vaddr, iova=iova, size=size)
    u = V.vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_unmap),
                                     iova=iova, size=size)
    return m, u
