"""Migration v2 of a kernel device, for real: two instances of the ``mtty``
mdev sample (a virtual 16550 UART with a loopback FIFO) on the pyvfio-6.12
guest kernel.  State written into one instance - scratch and line-control
registers, bytes waiting in the FIFO - is saved through the migration data fd
(PRE_COPY when offered, then STOP_COPY), loaded into the second (RESUMING ->
STOP) and read back there.  The same :func:`pyvfio.migration.migrate` moves
vfio-user devices between servers.

Debian's kernels (6.1, 6.12) are built without the mtty sample: skipped there,
with the missing option named.
"""

from __future__ import annotations

import contextlib
import glob
import os
import uuid
from collections.abc import Iterator

import pytest

from pyvfio.device import RegionIndex
from pyvfio.kernel.iommufd import Iommufd, IommufdDevice, open_cdev_device
from pyvfio.kernel.migration import KernelMigration
from pyvfio.migration import (
    MigFlag,
    MigrationError,
    MigState,
    load,
    migrate,
    migration_of,
    save,
)
from pyvfio.testing import kconfig

pytestmark = pytest.mark.guest

MTTY_PARENT = "/sys/class/mdev_bus/mtty"
# 16550 registers (include/uapi/linux/serial_reg.h), BAR0 of each mtty port.
UART_RX = UART_TX = 0
UART_LCR = 3
UART_LSR = 5
UART_SCR = 7
UART_LSR_DR = 0x01
# mtty's migration stream: struct mtty_data = 24-byte header + one
# struct serial_port (36 bytes) per port.
MTTY_HEADER = 24
MTTY_PORT = 36


@pytest.fixture
def mtty(guest_kernel: str) -> None:
    if not os.path.isdir(MTTY_PARENT):
        assert guest_kernel != "pyvfio-6.12", "pyvfio-6.12 has the mtty sample built in"
        kconfig.require_feature(False, "CONFIG_SAMPLE_VFIO_MDEV_MTTY",
                                feature=f"the mtty mdev sample, {MTTY_PARENT}")
    if not os.path.exists("/dev/iommu"):
        pytest.skip("mdev cdevs are opened through iommufd, which this kernel lacks")


@contextlib.contextmanager
def mdev_instances(count: int, ports: int = 1) -> Iterator[list[str]]:
    (type_dir,) = glob.glob(f"{MTTY_PARENT}/mdev_supported_types/*-{ports}")
    made: list[str] = []
    try:
        for _ in range(count):
            name = str(uuid.uuid4())
            with open(f"{type_dir}/create", "w") as f:
                f.write(name)
            made.append(name)
        yield made
    finally:
        for name in made:
            with contextlib.suppress(OSError), open(f"/sys/bus/mdev/devices/{name}/remove",
                                                    "w") as f:
                f.write("1")


@contextlib.contextmanager
def two_mttys(ports: int = 1) -> Iterator[tuple[IommufdDevice, IommufdDevice]]:
    with mdev_instances(2, ports) as (a, b), Iommufd.open() as ifd, \
            open_cdev_device(a, iommufd=ifd) as src, open_cdev_device(b, iommufd=ifd) as dst:
        yield src, dst


def put_state(dev: IommufdDevice, text: bytes, scratch: int, lcr: int) -> None:
    bar = dev.bar(0)
    bar.write8(UART_SCR, scratch)
    bar.write8(UART_LCR, lcr)
    for byte in text:
        bar.write8(UART_TX, byte)


def drain_fifo(dev: IommufdDevice) -> bytes:
    bar = dev.bar(0)
    out = bytearray()
    while bar.read8(UART_LSR) & UART_LSR_DR and len(out) < 64:
        out.append(bar.read8(UART_RX))
    return bytes(out)


def test_mtty_offers_migration(mtty: None) -> None:
    with two_mttys() as (src, _dst):
        mig = migration_of(src)
        assert isinstance(mig, KernelMigration)
        assert mig.flags == MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY
        assert mig.get_state() == MigState.RUNNING
        assert src.migration_flags() == 7
        assert src.region_info(RegionIndex.BAR0).size == 8


def test_describe_an_mdev_that_rejects_some_irq_indexes(mtty: None) -> None:
    # mtty counts five IRQ indexes but answers EINVAL for MSI-X: no vectors there.
    with two_mttys() as (src, _dst):
        irqs = {irq["name"]: irq["count"] for irq in src.describe()["irqs"]}
        assert irqs["INTX"] == 1 and irqs["MSIX"] == 0


def test_migrate_mtty_state_into_a_second_instance(mtty: None) -> None:
    with two_mttys() as (src, dst):
        put_state(src, b"pyvfio", scratch=0x5A, lcr=0x03)
        put_state(dst, b"", scratch=0x11, lcr=0x00)
        steps: list[str] = []
        report = migrate(src, dst, log=steps.append)
        # PRE_COPY carried the header while src still ran; STOP_COPY the port.
        assert report.precopy and report.precopy_rounds >= 1
        assert report.precopy_bytes == MTTY_HEADER
        assert report.stop_copy_bytes == MTTY_PORT
        assert report.src_states == ["PRE_COPY", "STOP_COPY", "STOP"]
        assert report.dst_states == ["RESUMING", "STOP", "RUNNING"]
        assert migration_of(dst).get_state() == MigState.RUNNING
        assert migration_of(src).get_state() == MigState.STOP
        bar = dst.bar(0)
        assert bar.read8(UART_SCR) == 0x5A
        assert bar.read8(UART_LCR) == 0x03
        assert drain_fifo(dst) == b"pyvfio"
        assert any("pre-copy round" in s for s in steps)


def test_save_and_load_without_precopy(mtty: None) -> None:
    with two_mttys(ports=2) as (src, dst):
        put_state(src, b"AB", scratch=0xC3, lcr=0x1B)
        blob = save(src)
        assert len(blob) == MTTY_HEADER + 2 * MTTY_PORT
        assert int.from_bytes(blob[:8], "little") == 0x7E9D09898C3E2C4E  # MTTY_MAGIC
        load(dst, blob)
        mig = migration_of(dst)
        mig.set_state(MigState.RUNNING)
        assert dst.bar(0).read8(UART_SCR) == 0xC3
        assert drain_fifo(dst) == b"AB"


def test_precopy_info_and_data_size(mtty: None) -> None:
    with two_mttys() as (src, _dst), migration_of(src) as mig:
        mig.set_state(MigState.PRE_COPY)
        info = mig.precopy_info()
        assert (info.initial_bytes, info.dirty_bytes) == (MTTY_HEADER, 0)
        assert len(mig.read_all()) == MTTY_HEADER
        assert mig.precopy_info().initial_bytes == 0
        mig.set_state(MigState.STOP_COPY)  # same data fd: the session goes on
        assert len(mig.read_all()) == MTTY_PORT
        size = mig.data_size()
        assert size is None or size >= MTTY_PORT
        mig.set_state(MigState.RUNNING)
        assert mig.data_fd == -1


def test_a_corrupt_stream_is_refused(mtty: None) -> None:
    with two_mttys() as (src, dst):
        blob = bytearray(save(src))
        blob[0] ^= 0xFF  # break the magic
        with pytest.raises((MigrationError, OSError)):
            load(dst, bytes(blob))


def test_stop_copy_to_pre_copy_is_refused_before_the_kernel(mtty: None) -> None:
    with two_mttys() as (src, _dst), migration_of(src) as mig:
        mig.set_state(MigState.STOP_COPY)
        with pytest.raises(MigrationError, match="no transition from STOP_COPY to PRE_COPY"):
            mig.set_state(MigState.PRE_COPY)
        assert mig.get_state() == MigState.STOP_COPY
        mig.set_state(MigState.RUNNING)
