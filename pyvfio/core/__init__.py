"""The backend-neutral device core (QEMU's ``hw/vfio`` split: a neutral core
plus backends), one module per concept:

- :mod:`.flags`: the ``linux/vfio.h`` flag and index values
- :mod:`.info`: :class:`DeviceInfo`, :class:`RegionInfo`, :class:`IrqInfo`
- :mod:`.eventfd`: :class:`EventFd`
- :mod:`.dma`: :class:`SharedMemory`, :class:`IovaAllocator`, :class:`DmaSpace`,
  :class:`DmaBuffer`
- :mod:`.region`: :class:`Region`, :class:`MappedRegion`
- :mod:`.device`: :class:`Device`

Import from :mod:`pyvfio.device`, the public face, which re-exports them all.
"""
