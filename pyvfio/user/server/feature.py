"""DEVICE_FEATURE (migration, migration state, DMA dirty logging) and
MIG_DATA_READ / MIG_DATA_WRITE of a connection.
"""

from __future__ import annotations

import errno

from pyvfio.errors import ProtocolError
from pyvfio.user import protocol as P
from pyvfio.user.server._base import ConnectionBase
from pyvfio.user.server.migration import _STATE_NAMES, _STATE_VALUES


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
            raise ProtocolError(f"unknown device feature {index}", errno.ENOTSUP)
        can_get, can_set = supported[P.FeatureIndex(index)]
        if req.probe:
            if (req.get and not can_get) or (req.set and not can_set) or \
                    not (can_get or can_set):
                raise ProtocolError(f"feature {index} does not support that", errno.ENOTSUP)
            return P.DeviceFeature(req.flags, b"", P.DeviceFeature.SIZE).pack(), []
        if req.get == req.set:
            raise ProtocolError("DEVICE_FEATURE needs exactly one of GET and SET", errno.EINVAL)
        if (req.get and not can_get) or (req.set and not can_set):
            raise ProtocolError(f"feature {index} cannot be {'read' if req.get else 'set'}",
                                errno.ENOTSUP)
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
            self.dma.start_logging(ps)
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
            if (req.argsz or 0) < need or need > self.owner.max_data_xfer_size:
                raise ProtocolError(f"DMA_LOGGING_REPORT needs argsz {need}", errno.EINVAL)
            out = P.DmaLoggingReport(rep.iova, rep.length, rep.page_size,
                                     self.dma.dirty_bitmap(rep.iova, rep.length,
                                                           rep.page_size)).pack()
        if req.get and (req.argsz or 0) < P.DeviceFeature.SIZE + len(out):
            raise ProtocolError(f"DEVICE_FEATURE: argsz {req.argsz} too small", errno.EINVAL)
        return P.DeviceFeature(req.flags, out).pack(), []

    def _mig_read(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.MigData.unpack(m.payload, with_data=False,
                               max_size=self.owner.max_data_xfer_size)
        data = self.owner.migration.read(req.size)
        return P.MigData(len(data), data).pack(), []

    def _mig_write(self, m: P.Message) -> tuple[bytes, list[int]]:
        req = P.MigData.unpack(m.payload, with_data=True,
                               max_size=self.owner.max_data_xfer_size)
        self.owner.migration.write(req.data)
        return b"", []
