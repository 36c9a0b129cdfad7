"""Migration of a vfio-user device: DEVICE_FEATURE, the v2 state machine over
MIG_DEVICE_STATE and MIG_DATA_READ / MIG_DATA_WRITE, DMA dirty-page logging,
and :class:`VfioUserMigration`, the neutral :class:`pyvfio.migration.Migration`
built on them.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyvfio.device import PAGE_SIZE
from pyvfio.errors import PeerError
from pyvfio.migration import MigFlag, Migration, MigrationError, MigState, arc_path
from pyvfio.user import protocol as P
from pyvfio.user.client._base import ClientBase
from pyvfio.user.protocol import Command

# --- migration -------------------------------------------------------------------------------


class VfioUserMigration(Migration):
    """:class:`pyvfio.migration.Migration` over ``DEVICE_FEATURE`` and
    ``MIG_DATA_READ``/``WRITE``.

    ``set_state`` walks the kernel's arcs (:func:`~pyvfio.migration.arc_path`)
    one ``MIG_DEVICE_STATE`` SET at a time, so it works with a server that
    implements only the direct arcs the spec lists (a server that does
    combination transitions itself is not bothered by single arcs).
    """

    def __init__(self, device: MigrationCalls) -> None:
        self.device = device
        self.name = device.name
        self._flags: MigFlag | None = None

    @property
    def flags(self) -> MigFlag:
        if self._flags is None:
            try:
                self._flags = MigFlag(int(self.device.migration_flags()))
            except PeerError:  # the server does not offer the MIGRATION feature
                self._flags = MigFlag(0)
        return self._flags

    def get_state(self) -> MigState:
        return MigState(int(self.device.get_mig_state()))

    def set_state(self, state: MigState) -> None:
        target = MigState(int(state))
        for step in arc_path(self.get_state(), target, self.flags):
            reached = self.device.set_mig_state(step)
            if int(reached) != int(step):
                raise MigrationError(f"{self.name}: asked for {step.name}, the server reports "
                                     f"{P.MigState(int(reached)).name}", "state")

    def read_data(self, size: int) -> bytes:
        return self.device.mig_data_read(size)

    def write_data(self, data: bytes) -> int:
        self.device.mig_data_write(data)
        return len(data)


class MigrationCalls(ClientBase):
    """DEVICE_FEATURE, migration and dirty-page logging calls."""

    def device_feature(self, feature: int, flags: int, data: bytes = b"",
                       max_reply: int = 0) -> bytes:
        """Raw ``VFIO_USER_DEVICE_FEATURE``: returns the reply's data."""
        argsz = P.DeviceFeature.SIZE + max(len(data), max_reply)
        reply = self._request(Command.DEVICE_FEATURE,
                              P.DeviceFeature(feature | flags, data, argsz).pack())
        msg = self._unpack(P.DeviceFeature.unpack, reply.payload, reply=True)
        if msg.feature != feature:
            raise self._malformed(f"DEVICE_FEATURE {feature} answered for {msg.feature}")
        if len(msg.data) > max(len(data), max_reply):
            raise self._malformed(f"DEVICE_FEATURE reply carries {len(msg.data)} bytes, over "
                                  f"the {max(len(data), max_reply)} asked for")
        return msg.data

    # migration (v2 state machine over DEVICE_FEATURE and MIG_DATA_*)

    def migration(self) -> VfioUserMigration:
        """The neutral :class:`pyvfio.migration.Migration` of this device (what
        :func:`pyvfio.migration.migrate` uses); the calls below are the raw
        protocol operations it is built on."""
        self._ensure_open()
        return VfioUserMigration(self)

    def migration_flags(self) -> P.MigrationFlag:
        """``VFIO_DEVICE_FEATURE_MIGRATION``: what the device supports
        (raises :class:`PeerError` when it cannot migrate)."""
        data = self.device_feature(P.FeatureIndex.MIGRATION, P.FeatureFlag.GET,
                                   max_reply=P.MigrationFeature.SIZE)
        return P.MigrationFlag(self._unpack(P.MigrationFeature.unpack, data).flags)

    def get_mig_state(self) -> P.MigState:
        data = self.device_feature(P.FeatureIndex.MIG_DEVICE_STATE, P.FeatureFlag.GET,
                                   max_reply=P.MigStateMsg.SIZE)
        return self._mig_state(self._unpack(P.MigStateMsg.unpack, data).device_state)

    def set_mig_state(self, state: int) -> P.MigState:
        """Move the device to ``state`` (one arc or a path the server takes);
        returns the state the server reports."""
        data = self.device_feature(P.FeatureIndex.MIG_DEVICE_STATE, P.FeatureFlag.SET,
                                   P.MigStateMsg(int(P.MigState(state))).pack())
        if not data:
            return P.MigState(state)
        return self._mig_state(self._unpack(P.MigStateMsg.unpack, data).device_state)

    def _mig_state(self, value: int) -> P.MigState:
        try:
            return P.MigState(value)
        except ValueError:
            raise self._malformed(f"unknown migration state {value}") from None

    def mig_data_read(self, size: int | None = None) -> bytes:
        """One ``MIG_DATA_READ`` of up to ``size`` bytes (default: the
        transfer limit); fewer bytes than asked means the stream is drained."""
        size = self.max_xfer if size is None else min(size, self.max_xfer)
        reply = self._request(Command.MIG_DATA_READ, P.MigData(size, argsz=8 + size).pack())
        msg = self._unpack(P.MigData.unpack, reply.payload, with_data=True, max_size=size)
        return msg.data

    def mig_data_read_all(self) -> bytes:
        """Read migration data until the server has no more."""
        parts = []
        while True:
            chunk = self.mig_data_read()
            parts.append(chunk)
            if len(chunk) < self.max_xfer:
                return b"".join(parts)

    def mig_data_write(self, data: bytes) -> None:
        """Send migration data to a device in ``RESUMING``, split to the limit."""
        view = memoryview(bytes(data))
        for start in range(0, len(view), self.max_xfer):
            chunk = bytes(view[start:start + self.max_xfer])
            self._request(Command.MIG_DATA_WRITE,
                          P.MigData(len(chunk), chunk, argsz=8).pack())

    def dma_logging_start(self, page_size: int = PAGE_SIZE,
                          ranges: Iterable[tuple[int, int]] = ()) -> int:
        """Start dirty logging of the device's DMA writes over ``ranges``
        (``(iova, length)``; none: everything).  Returns the page size the
        server chose."""
        body = P.DmaLoggingControl(page_size, tuple(P.DmaLoggingRange(i, n)
                                                    for i, n in ranges)).pack()
        data = self.device_feature(P.FeatureIndex.DMA_LOGGING_START, P.FeatureFlag.SET, body)
        if not data:
            return page_size
        return int(self._unpack(P.DmaLoggingControl.unpack, data).page_size)

    def dma_logging_stop(self) -> None:
        self.device_feature(P.FeatureIndex.DMA_LOGGING_STOP, P.FeatureFlag.SET,
                            P.DmaLoggingControl(0).pack())

    def dma_logging_report(self, iova: int, length: int, page_size: int = PAGE_SIZE) -> list[int]:
        """IOVAs of the pages (of ``page_size``) the device wrote in
        ``[iova, iova+length)`` since the last report."""
        request = P.DmaLoggingReport(iova, length, page_size)
        data = self.device_feature(P.FeatureIndex.DMA_LOGGING_REPORT, P.FeatureFlag.GET,
                                   request.pack(), max_reply=request.SIZE + request.bitmap_size)
        report = self._unpack(P.DmaLoggingReport.unpack, data, reply=True)
        if (report.iova, report.length, report.page_size) != (iova, length, page_size):
            raise self._malformed("DMA_LOGGING_REPORT answered for another range")
        pages = -(-length // page_size)
        bits = int.from_bytes(report.bitmap, "little")
        return [iova + i * page_size for i in range(pages) if bits >> i & 1]
