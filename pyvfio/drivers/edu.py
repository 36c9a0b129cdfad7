"""A userspace driver for QEMU's ``edu`` teaching device, over any :class:`Device`.

The device (qemu/qemu ``hw/misc/edu.c``, ``docs/specs/edu.rst``): PCI
1234:11e8, BAR0 is 1 MiB of registers, one MSI vector or INTx pin A.

=========  ==================================================================
offset     register
=========  ==================================================================
0x00       identification ``0xRRrr00ed`` (major RR, minor rr)
0x04       liveness: reads back the bitwise NOT of what was written
0x08       factorial: write n, read n! (u32) once status bit 0 clears
0x20       status: bit 0 computing (RO), bit 7 raise IRQ 0x01 when done
0x24       interrupt status (RO)
0x60       raise interrupt (status |= value)
0x64       acknowledge interrupt (status &= ~value)
0x80/88/90 DMA source / destination / count
0x98       DMA command: bit 0 start, bit 1 direction (1: device -> RAM),
           bit 2 raise IRQ 0x100 when done
=========  ==================================================================

Below 0x80 only 4-byte accesses work (``edu_mmio_read`` returns all-ones for
others), so every register access here is one 4-byte access.  The device's
internal buffer is 4 KiB at device address 0x40000, and DMA addresses are
masked to 28 bits, so DMA buffers are allocated below 256 MiB of IOVA.  A
DMA completes on a timer about 100 ms of guest time after it is started.

The driver only uses the :class:`~pyvfio.device.Device` API, so it runs the
same over the legacy backend, iommufd, a vfio-user connection or fds handed
over by the broker.

Run the self-test with ``python -m pyvfio.drivers.edu BDF [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvfio.device import Device, DmaBuffer, EventFd, IrqIndex, Region

__all__ = ["EDU_DEVICE_ID", "EDU_VENDOR_ID", "Edu", "EduError", "main", "selftest"]

EDU_VENDOR_ID = 0x1234
EDU_DEVICE_ID = 0x11E8

REG_ID = 0x00
REG_LIVENESS = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

STATUS_COMPUTING = 0x01
STATUS_IRQ_ON_FACTORIAL = 0x80
IRQ_FACTORIAL = 0x001
IRQ_DMA = 0x100

DMA_START = 0x1
DMA_TO_RAM = 0x2  # direction bit: device -> RAM
DMA_IRQ = 0x4

DMA_BUFFER_ADDR = 0x40000  # the device's 4 KiB buffer, as seen in DMA addresses
DMA_BUFFER_SIZE = 0x1000
# The longest transfer every QEMU accepts.  edu_check_range() before QEMU 8.x
# compares the *exclusive* end with ``<``, so a transfer reaching the last
# byte of the buffer (0x40000+0x1000) is "out of bounds" -- and that is a
# hw_error() that kills the whole VM.  One byte less is always safe.
DMA_MAX_COUNT = DMA_BUFFER_SIZE - 1
DMA_ADDR_LIMIT = 1 << 28  # edu's default dma_mask


class EduError(Exception):
    """The device did not behave as an edu device should (wrong ID, timeout)."""


class Edu:
    """Driver for one edu device.  ``Edu(device)`` checks the IDs, enables memory
    decoding and bus mastering (DMA is refused by the device otherwise) and
    maps nothing else; interrupts are set up per use."""

    def __init__(self, device: Device, *, timeout: float = 10.0) -> None:
        self.device = device
        self.timeout = timeout
        cfg = device.config
        if (cfg.vendor_id, cfg.device_id) != (EDU_VENDOR_ID, EDU_DEVICE_ID):
            raise EduError(f"{device.name} is {cfg.vendor_id:04x}:{cfg.device_id:04x}, "
                           f"not an edu device ({EDU_VENDOR_ID:04x}:{EDU_DEVICE_ID:04x})")
        cfg.enable_bus_master()
        self.bar: Region = device.bar(0)
        self._irq: EventFd | None = None
        self._irq_index: int | None = None

    # ---- registers ----

    def read(self, offset: int) -> int:
        return self.bar.read32(offset)

    def write(self, offset: int, value: int) -> None:
        self.bar.write32(offset, value)

    @property
    def ident(self) -> int:
        return self.read(REG_ID)

    @property
    def version(self) -> tuple[int, int]:
        ident = self.ident
        return ident >> 24, (ident >> 16) & 0xFF

    def liveness(self, value: int) -> int:
        """Write ``value`` to the liveness register and return what it reads back
        (the bitwise NOT of ``value`` on a live device)."""
        self.write(REG_LIVENESS, value)
        return self.read(REG_LIVENESS)

    def _poll(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            if time.monotonic() > deadline:
                raise EduError(f"{self.device.name}: {what} did not finish in {self.timeout} s")
            time.sleep(0.0005)

    # ---- interrupts ----

    def enable_interrupts(self, kind: str = "msi") -> EventFd:
        """Route the device's interrupt to an eventfd: ``kind`` "msi" or "intx"."""
        index = {"msi": IrqIndex.MSI, "intx": IrqIndex.INTX}.get(kind)
        if index is None:
            raise ValueError(f"interrupt kind must be 'msi' or 'intx', not {kind!r}")
        self.disable_interrupts()
        (self._irq,) = self.device.enable_irq(index, 1)
        self._irq_index = index
        return self._irq

    def disable_interrupts(self) -> None:
        if self._irq_index is not None:
            self.device.disable_irq(self._irq_index)
        self._irq = None
        self._irq_index = None

    def wait_interrupt(self, expect: int, timeout: float | None = None) -> int:
        """Wait for the eventfd, check and acknowledge the interrupt status,
        and for INTx unmask the line (vfio auto-masks level interrupts).
        Returns the status bits seen."""
        if self._irq is None:
            raise EduError("interrupts are not enabled")
        if not self._irq.wait(self.timeout if timeout is None else timeout):
            raise EduError(f"{self.device.name}: no interrupt within "
                           f"{self.timeout if timeout is None else timeout} s "
                           f"(status {self.read(REG_IRQ_STATUS):#x})")
        status = self.read(REG_IRQ_STATUS)
        self.write(REG_IRQ_ACK, status)
        if self._irq_index == IrqIndex.INTX:
            self.device.unmask_irq(IrqIndex.INTX)
        if not status & expect:
            raise EduError(f"{self.device.name}: interrupt status {status:#x}, "
                           f"expected bit {expect:#x}")
        return status

    def raise_interrupt(self, value: int = 1) -> None:
        self.write(REG_IRQ_RAISE, value)

    # ---- factorial ----

    def factorial(self, n: int, *, interrupt: bool = False) -> int:
        """n! modulo 2**32, computed by the device; with ``interrupt`` the
        completion is signalled by IRQ 0x01 instead of polled."""
        if interrupt:
            self.write(REG_STATUS, STATUS_IRQ_ON_FACTORIAL)
            self.write(REG_FACTORIAL, n)
            self.wait_interrupt(IRQ_FACTORIAL)
            self.write(REG_STATUS, 0)
        else:
            self.write(REG_STATUS, 0)
            self.write(REG_FACTORIAL, n)
        self._poll(lambda: not self.read(REG_STATUS) & STATUS_COMPUTING, "factorial")
        return self.read(REG_FACTORIAL)

    # ---- DMA ----

    def _dma(self, src: int, dst: int, count: int, cmd: int, interrupt: bool,
             device_offset: int) -> None:
        if count <= 0 or device_offset < 0 or device_offset + count > DMA_MAX_COUNT:
            raise ValueError(f"edu DMA must stay within the first {DMA_MAX_COUNT:#x} bytes of "
                             f"the device buffer: offset {device_offset:#x} count {count:#x}")
        self._poll(lambda: not self.read(REG_DMA_CMD) & DMA_START, "previous DMA")
        # Only the low 32 bits are written: IOVAs are below 256 MiB.
        self.write(REG_DMA_SRC, src)
        self.write(REG_DMA_DST, dst)
        self.write(REG_DMA_COUNT, count)
        self.write(REG_DMA_CMD, cmd | DMA_START | (DMA_IRQ if interrupt else 0))
        if interrupt:
            self.wait_interrupt(IRQ_DMA)
        self._poll(lambda: not self.read(REG_DMA_CMD) & DMA_START, "DMA")

    @staticmethod
    def _check_iova(buf: DmaBuffer, offset: int, count: int) -> int:
        iova = buf.iova + offset
        if iova + count > DMA_ADDR_LIMIT:
            raise ValueError(f"IOVA {iova:#x} is above edu's 28-bit DMA mask; allocate with "
                             f"dma_alloc(..., below={DMA_ADDR_LIMIT:#x})")
        return iova

    def dma_to_device(self, buf: DmaBuffer, count: int, *, offset: int = 0,
                      device_offset: int = 0, interrupt: bool = False) -> None:
        """Copy ``count`` bytes of ``buf`` (host RAM) into the device's buffer."""
        iova = self._check_iova(buf, offset, count)
        self._dma(iova, DMA_BUFFER_ADDR + device_offset, count, 0, interrupt, device_offset)

    def dma_from_device(self, buf: DmaBuffer, count: int, *, offset: int = 0,
                        device_offset: int = 0, interrupt: bool = False) -> None:
        """Copy ``count`` bytes of the device's buffer into ``buf``."""
        iova = self._check_iova(buf, offset, count)
        self._dma(DMA_BUFFER_ADDR + device_offset, iova, count, DMA_TO_RAM, interrupt,
                  device_offset)

    def close(self) -> None:
        self.disable_interrupts()


# --- self-test -------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.name, "ok": self.ok, "detail": self.detail,
                "seconds": round(self.seconds, 4)}


@dataclass
class SelfTest:
    device: str
    backend: str
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "backend": self.backend, "ok": self.ok,
                "steps": [s.as_dict() for s in self.steps]}


def selftest(device: Device, *, interrupts: Sequence[str] = ("msi", "intx"),
             report: Callable[[Step], None] | None = None) -> SelfTest:
    """Exercise every feature of the device; each step records pass/fail and
    the run goes on after a failure so the report shows all of them."""
    result = SelfTest(device.name, device.backend)

    def step(name: str, fn: Callable[[], str]) -> None:
        t0 = time.monotonic()
        try:
            detail, ok = fn(), True
        except Exception as exc:  # a step's failure is data, not a crash
            if _interrupted(exc):
                # Ctrl-C left a request without its reply, so the clean-up
                # (unmapping the step's buffers) failed: that is not the step
                # failing, it is the run being interrupted.
                raise KeyboardInterrupt from exc
            detail, ok = f"{type(exc).__name__}: {exc}", False
        s = Step(name, ok, detail, time.monotonic() - t0)
        result.steps.append(s)
        if report is not None:
            report(s)

    try:
        edu = Edu(device)
    except Exception as exc:
        s = Step("identify", False, f"{type(exc).__name__}: {exc}")
        result.steps.append(s)
        if report is not None:
            report(s)
        return result

    def identify() -> str:
        ident = edu.ident
        if ident & 0xFFFF != 0x00ED:
            raise EduError(f"identification register reads {ident:#010x}, expected 0x....00ed")
        major, minor = edu.version
        return f"id {ident:#010x} (version {major}.{minor})"

    def liveness() -> str:
        for value in (0x12345678, 0xFFFFFFFF, 0):
            got = edu.liveness(value)
            if got != ~value & 0xFFFFFFFF:
                raise EduError(f"liveness({value:#x}) read {got:#x}, expected {~value & 0xFFFFFFFF:#x}")
        return "reads back the complement of 3 values"

    def factorial(interrupt: bool) -> Callable[[], str]:
        def run() -> str:
            got = edu.factorial(10, interrupt=interrupt)
            if got != 3628800:
                raise EduError(f"10! read {got}, expected 3628800")
            got = edu.factorial(13, interrupt=interrupt)
            if got != 6227020800 & 0xFFFFFFFF:
                raise EduError(f"13! read {got}, expected {6227020800 & 0xFFFFFFFF} (mod 2**32)")
            return "10! = 3628800, 13! mod 2**32 = 1932053504"
        return run

    def dma(interrupt: bool) -> Callable[[], str]:
        def run() -> str:
            pattern = os.urandom(DMA_MAX_COUNT)
            with device.dma_alloc(DMA_BUFFER_SIZE, below=DMA_ADDR_LIMIT) as src, \
                    device.dma_alloc(DMA_BUFFER_SIZE, below=DMA_ADDR_LIMIT) as dst:
                src.write(pattern)
                dst.write(b"\0" * DMA_BUFFER_SIZE)
                edu.dma_to_device(src, DMA_MAX_COUNT, interrupt=interrupt)
                edu.dma_from_device(dst, DMA_MAX_COUNT, interrupt=interrupt)
                back = dst.read(0, DMA_MAX_COUNT)
                if back != pattern:
                    bad = next(i for i in range(len(back)) if back[i] != pattern[i])
                    raise EduError(f"byte {bad:#x} differs after RAM->device->RAM "
                                   f"({back[bad]:#04x} != {pattern[bad]:#04x})")
                if dst.read(DMA_MAX_COUNT, 1) != b"\0":
                    raise EduError("the device wrote past the end of the transfer")
                return (f"{DMA_MAX_COUNT} random bytes RAM (IOVA {src.iova:#x}) -> device -> "
                        f"RAM (IOVA {dst.iova:#x}) byte-exact")
        return run

    def raised(kind: str) -> Callable[[], str]:
        def run() -> str:
            edu.enable_interrupts(kind)
            try:
                t0 = time.monotonic()
                edu.raise_interrupt(0x40)
                status = edu.wait_interrupt(0x40)
                first = time.monotonic() - t0
                # A second one proves the ack (and for INTx the unmask) worked.
                edu.raise_interrupt(0x40)
                edu.wait_interrupt(0x40)
                return f"raise 0x40 -> eventfd, status {status:#x}, {first * 1e3:.2f} ms; twice"
            finally:
                edu.disable_interrupts()
        return run

    def with_interrupts(kind: str, inner: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            edu.enable_interrupts(kind)
            try:
                return inner()
            finally:
                edu.disable_interrupts()
        return run

    step("identify", identify)
    step("liveness", liveness)
    step("factorial (polled)", factorial(False))
    step("dma (polled)", dma(False))
    for kind in interrupts:
        step(f"interrupt {kind} (raise/ack)", raised(kind))
        step(f"factorial ({kind} interrupt)", with_interrupts(kind, factorial(True)))
        step(f"dma ({kind} interrupt)", with_interrupts(kind, dma(True)))
    edu.close()
    return result


# --- command line ----------------------------------------------------------------------------


_EPILOG = """\
examples:
  python -m pyvfio.drivers.edu 0000:00:03.0              an edu bound to vfio-pci
  python -m pyvfio.drivers.edu 0000:00:03.0 --backend iommufd --json
  pyvfio serve edu --socket /tmp/edu.sock &              QEMU's edu, emulated in Python
  python -m pyvfio.drivers.edu --vfio-user /tmp/edu.sock
  python -m pyvfio.drivers.edu --broker /run/pyvfio-broker.sock 0000:00:03.0

exit status: 0 every step passed, 1 a step failed, 2 the device could not be opened
"""

INTERRUPT_KINDS = ("msi", "intx")


def open_from_args(args: argparse.Namespace) -> Device:
    """Open the device the way ``--vfio-user``/``--broker``/``--backend`` ask
    (the same options and rules as ``pyvfio info``)."""
    from pyvfio.kernel.commands import open_for_args

    return open_for_args(args)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``pyvfio info``'s device options, plus ``--root`` (a global option of
    ``pyvfio``)."""
    from pyvfio.kernel.commands import add_device_arguments as add

    add(parser)
    parser.add_argument("--root", default=os.environ.get("PYVFIO_ROOT", "/"), metavar="DIR",
                        help="read sysfs and /dev under DIR (default: $PYVFIO_ROOT or /)")


def _interrupt_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in INTERRUPT_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown interrupt kind {', '.join(map(repr, bad))}: use msi, intx, both "
            "(msi,intx) or '' for none")
    return kinds


def _interrupted(exc: BaseException) -> bool:
    from pyvfio.cli import interrupted

    return interrupted(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyvfio.drivers.edu``: exit 0 when every step passed, 1 when
    one failed, 2 when the device could not be opened, 130 on Ctrl-C (one
    line, at any point, also in the middle of a DMA); a closed pipe on stdout
    ends it quietly (exit 0).  ``--json`` errors: ``{"device", "ok": false,
    "steps", "error": {"message", "kind"}}``."""
    from pyvfio.cli import make_output_safe, reader_gone, stdout_gone

    make_output_safe()
    try:
        return _main(argv)
    except BrokenPipeError:
        if stdout_gone():
            return reader_gone()
        raise


def _main(argv: Sequence[str] | None) -> int:
    from pyvfio.cli import error_object, interrupted

    parser = argparse.ArgumentParser(
        prog="python -m pyvfio.drivers.edu",
        description=textwrap.fill(
            "Self-test of QEMU's edu device (1234:11e8) through any pyvfio Device: "
            "identification, liveness, factorial, DMA RAM->device->RAM through the IOMMU "
            "(byte-exact), MSI and INTx interrupts through eventfds. Each step prints ok or "
            "FAIL with what it saw; the run goes on after a failure.", 78),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help='print the result as JSON ("ok": true only when every step passed)')
    parser.add_argument("--interrupts", type=_interrupt_kinds, default=list(INTERRUPT_KINDS),
                        metavar="KINDS",
                        help="interrupt kinds to test, comma-separated: msi, intx "
                             "(default: msi,intx; '' for none)")
    args = parser.parse_args(argv)

    def show(s: Step) -> None:
        if not args.json:
            print(f"  [{'ok' if s.ok else 'FAIL':>4}] {s.name:<28} {s.detail}", flush=True)

    from pyvfio.errors import PyvfioError

    name = args.bdf or args.vfio_user
    steps: list[Step] = []

    def failed(exc: BaseException, message: str, code: int) -> int:
        print(f"edu: {message}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"device": name, "ok": False, "steps": [s.as_dict() for s in steps],
                              **error_object(exc, message)}, indent=2))
        return code

    def record(s: Step) -> None:
        steps.append(s)
        show(s)

    try:
        try:
            device = open_from_args(args)
        except (PyvfioError, OSError) as exc:
            if interrupted(exc):
                raise KeyboardInterrupt from exc
            return failed(exc, f"cannot open the device: {exc}", 2)
        with device:
            name = device.name
            if not args.json:
                print(f"edu self-test on {device.name} ({device.backend}: "
                      f"{device.backend_reason})")
            result = selftest(device, interrupts=args.interrupts, report=record)
    except KeyboardInterrupt as exc:
        done = f" after {len(steps)} step(s)" if steps else ""
        return failed(exc, f"interrupted{done}", 130)
    except (PyvfioError, OSError) as exc:
        if interrupted(exc):  # the close on the way out met the interrupted request
            return failed(KeyboardInterrupt(), "interrupted", 130)
        if isinstance(exc, BrokenPipeError):  # our reader left: main() decides
            raise
        return failed(exc, str(exc), 2)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(f"edu self-test: {'ok' if result.ok else 'FAILED'} "
              f"({sum(s.ok for s in result.steps)}/{len(result.steps)} steps passed)")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
