"""DEVICE_FEATURE (migration, migration state, DMA dirty logging) and
MIG_DATA_READ / MIG_DATA_WRITE of a connection.

Where the spec is silent, as the kernel (``vfio_check_feature``) and
libvfio-user answer: a feature the device does not support, or an operation
(GET, SET, PROBE) it does not support on a feature, is ``EINVAL``; a GET and
a SET are both refused with ``EINVAL`` when ``argsz`` is smaller than the
feature's structure.  Where it speaks, to the letter: the reply to a SET is
the request, byte for byte (unused fields included), and every reply's data
fits the client's ``max_data_xfer_size``.
"""

from __future__ import annotations

import errno

from pyvfio.device import PAGE_SIZE
from pyvfio.errors import ProtocolError
from pyvfio.user import protocol as P
from pyvfio.user.server._base import ConnectionBase
from pyvfio.user.server.migration import _STATE_NAMES, _STATE_VALUES

# The data each feature's GET returns or SET takes (linux/vfio.h structs),
# without the 8-byte vfio_user_device_feature header.
_FEATURE_MINSZ = {
    P.FeatureIndex.MIGRATION: 8,            # vfio_device_feature_migration
    P.FeatureIndex.MIG_DEVICE_STATE: 8,     # vfio_device_feature_mig_state
    P.FeatureIndex.DMA_LOGGING_START: 16,   # vfio_device_feature_dma_logging_control
    P.FeatureIndex.DMA_LOGGING_STOP: 0,
    P.FeatureIndex.DMA_LOGGING_REPORT: 24,  # vfio_device_feature_dma_logging_report
}


class FeatureHandlers(ConnectionBase):
    """DEVICE_FEATURE and the migration data stream."""

    def _feature(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.DeviceFeature.unpack(m.payload)
        index = req.feature
        mig = self.owner.migration
        migratable = self.device.supports_migration()
        supported = {
            P.FeatureIndex.MIGRATION: (migratable, False),
            P.FeatureIndex.MIG_DEVICE_STATE: (migratable, migratable),
            P.FeatureIndex.DMA_LOGGING_START: (False, True),
            P.FeatureIndex.DMA_LOGGING_STOP: (False, True),
            P.FeatureIndex.DMA_LOGGING_REPORT: (True, False),
        }
        if index not in supported:
            raise ProtocolError(f"unknown device feature {index}", errno.EINVAL)
        can_get, can_set = supported[P.FeatureIndex(index)]
        if req.probe:
            if (req.get and not can_get) or (req.set and not can_set) or \
                    not (can_get or can_set):
                raise ProtocolError(f"feature {index} does not support that", errno.EINVAL)
            return P.DeviceFeature(req.flags, b"", P.DeviceFeature.SIZE).pack(), []
        if req.get == req.set:
            raise ProtocolError("DEVICE_FEATURE needs exactly one of GET and SET", errno.EINVAL)
        if (req.get and not can_get) or (req.set and not can_set):
            raise ProtocolError(f"feature {index} cannot be {'read' if req.get else 'set'}",
                                errno.EINVAL)
        minsz = P.DeviceFeature.SIZE + _FEATURE_MINSZ[P.FeatureIndex(index)]
        if (req.argsz or 0) < minsz:
            raise ProtocolError(f"DEVICE_FEATURE {index}: argsz {req.argsz} < {minsz}",
                                errno.EINVAL)
        out = b""
        if index == P.FeatureIndex.MIGRATION:
            flags = P.MigrationFlag.STOP_COPY | (P.MigrationFlag.PRE_COPY if mig.pre_copy else 0)
            out = P.MigrationFeature(flags).pack()
        elif index == P.FeatureIndex.MIG_DEVICE_STATE:
            if req.set:
                st = P.MigStateMsg.unpack(req.data)
                name = _STATE_NAMES.get(st.device_state)  # type: ignore[call-overload]
                if name is None or name == "ERROR":
                    raise ProtocolError(f"bad migration state {st.device_state}", errno.EINVAL)
                mig.transition(name)
            out = P.MigStateMsg(_STATE_VALUES[mig.state]).pack()
        elif index == P.FeatureIndex.DMA_LOGGING_START:
            ctl = P.DmaLoggingControl.unpack(req.data)
            ps = ctl.page_size
            if ps == 0 or ps & (ps - 1):
                raise ProtocolError(f"DMA logging page size {ps}", errno.EINVAL)
            if self.dma.log_page_size:
                raise OSError(errno.EBUSY, "DMA logging is already on")
            # Track at least whole pages: a 1-byte granularity would make the
            # dirty set as large as what the model writes.  Reports in finer
            # units then mark every unit of a dirty page (over-reporting is
            # allowed; missing a dirty byte is not).
            self.dma.start_logging(max(ps, PAGE_SIZE))
            out = ctl.pack()
        elif index == P.FeatureIndex.DMA_LOGGING_STOP:
            if not self.dma.log_page_size:
                raise OSError(errno.EINVAL, "DMA logging is not on")
            self.dma.stop_logging()
            out = req.data
        else:  # DMA_LOGGING_REPORT
            rep = P.DmaLoggingReport.unpack(req.data)
            if not self.dma.log_page_size:
                raise OSError(errno.EINVAL, "DMA logging is not on")
            need = P.DeviceFeature.SIZE + P.DmaLoggingReport.SIZE + rep.bitmap_size
            if (req.argsz or 0) < need or need > self._client_max_xfer:
                raise ProtocolError(f"DMA_LOGGING_REPORT needs argsz {need}", errno.EINVAL)
            out = P.DmaLoggingReport(rep.iova, rep.length, rep.page_size,
                                     self.dma.dirty_bitmap(rep.iova, rep.length,
                                                           rep.page_size)).pack()
        if req.set:
            return bytes(m.payload), []  # the spec: the reply equals the request
        if (req.argsz or 0) < P.DeviceFeature.SIZE + len(out):
            raise ProtocolError(f"DEVICE_FEATURE: argsz {req.argsz} too small", errno.EINVAL)
        return P.DeviceFeature(req.flags, out).pack(), []

    def _mig_read(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.MigData.unpack(m.payload, with_data=False,
                               max_size=self.owner.max_data_xfer_size)
        # A shorter read is allowed (the client reads on); a longer reply than
        # the client's max_data_xfer_size is not.
        data = self.owner.migration.read(min(req.size, self._client_max_xfer))
        return P.MigData(len(data), data).pack(), []

    def _mig_write(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.MigData.unpack(m.payload, with_data=True,
                               max_size=self.owner.max_data_xfer_size)
        self.owner.migration.write(req.data)
        return b"", []
