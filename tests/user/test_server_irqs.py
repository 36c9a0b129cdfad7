"""DEVICE_SET_IRQS: every data/action combination, masking, fds."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from vfu_raw import wait_until

from pyvfio.device import IrqAction as A
from pyvfio.testing.fds import fd_numbers as open_fds
from pyvfio.user import protocol as P

EVENTFD_TRIGGER = A.DATA_EVENTFD | A.ACTION_TRIGGER


def efds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


def count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def fds():
    made: list[int] = []

    def make(n: int) -> list[int]:
        new = efds(n)
        made.extend(new)
        return new

    yield make
    for fd in made:
        os.close(fd)


def ok(c, index, flags, start, n, fds=(), bools=None):
    m = c.set_irqs(index, flags, start, n, fds, bools)
    assert not m.is_error, m
    return m


def err(c, index, flags, start, n, fds=(), bools=None):
    m = c.set_irqs(index, flags, start, n, fds, bools)
    assert m.is_error, m
    return m.error


def doorbell(c, vector: int) -> None:
    c.write32(0, 8, vector)


def test_msix_vectors_fire_their_eventfds(scratch_client, fds):
    ev = fds(4)
    ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 4, ev)
    doorbell(scratch_client, 2)
    assert [count(f) for f in ev] == [0, 0, 1, 0]


def test_mask_makes_pending_and_unmask_delivers(scratch_client, fds):
    ev = fds(4)
    ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 4, ev)
    ok(scratch_client, 2, A.DATA_NONE | A.ACTION_MASK, 1, 1)
    doorbell(scratch_client, 1)
    assert count(ev[1]) == 0
    ok(scratch_client, 2, A.DATA_NONE | A.ACTION_UNMASK, 1, 1)
    assert count(ev[1]) == 1
    ok(scratch_client, 2, A.DATA_NONE | A.ACTION_UNMASK, 1, 1)
    assert count(ev[1]) == 0  # delivered once


def test_bool_data_selects_vectors(scratch_client, fds):
    ev = fds(4)
    ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 4, ev)
    ok(scratch_client, 2, A.DATA_BOOL | A.ACTION_TRIGGER, 0, 4, bools=(True, False, True, False))
    assert [count(f) for f in ev] == [1, 0, 1, 0]
    ok(scratch_client, 2, A.DATA_BOOL | A.ACTION_MASK, 1, 2, bools=(False, True))
    ok(scratch_client, 2, A.DATA_NONE | A.ACTION_TRIGGER, 0, 4)
    assert [count(f) for f in ev] == [1, 1, 0, 1]


def test_mask_and_unmask_eventfds_are_signalled(scratch_client, fds):
    ev, mask_ev, unmask_ev = fds(1), fds(1), fds(1)
    ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 1, ev)
    ok(scratch_client, 2, A.DATA_EVENTFD | A.ACTION_MASK, 0, 1, mask_ev)
    ok(scratch_client, 2, A.DATA_EVENTFD | A.ACTION_UNMASK, 0, 1, unmask_ev)
    ok(scratch_client, 2, A.DATA_NONE | A.ACTION_MASK, 0, 1)
    assert count(mask_ev[0]) == 1
    ok(scratch_client, 2, A.DATA_NONE | A.ACTION_UNMASK, 0, 1)
    assert count(unmask_ev[0]) == 1


def test_intx_is_automasked_and_refires_while_asserted(scratch_client, fds):
    ev = fds(1)
    ok(scratch_client, 0, EVENTFD_TRIGGER, 0, 1, ev)
    scratch_client.write32(0, 16, 1)  # assert INTx
    assert count(ev[0]) == 1
    scratch_client.write32(0, 16, 1)
    assert count(ev[0]) == 0  # automasked
    ok(scratch_client, 0, A.DATA_NONE | A.ACTION_UNMASK, 0, 1)
    assert count(ev[0]) == 1  # still asserted: fires again on unmask
    scratch_client.write32(0, 16, 0)
    ok(scratch_client, 0, A.DATA_NONE | A.ACTION_UNMASK, 0, 1)
    assert count(ev[0]) == 0
    # Status bit 3 follows the line
    scratch_client.write32(0, 16, 1)
    assert scratch_client.read(7, 6, 2)[0] & 0x8


def test_intx_disable_bit_in_command_register_blocks_intx(scratch_client, fds):
    ev = fds(1)
    ok(scratch_client, 0, EVENTFD_TRIGGER, 0, 1, ev)
    scratch_client.write(7, 4, struct.pack("<H", 0x400))
    scratch_client.write32(0, 16, 1)
    assert count(ev[0]) == 0


def test_only_one_of_intx_msi_msix_at_a_time(scratch_client, fds):
    ok(scratch_client, 1, EVENTFD_TRIGGER, 0, 2, fds(2))
    assert err(scratch_client, 2, EVENTFD_TRIGGER, 0, 1, fds(1)) == errno.EINVAL
    assert err(scratch_client, 0, EVENTFD_TRIGGER, 0, 1, fds(1)) == errno.EINVAL
    ok(scratch_client, 1, A.DATA_NONE | A.ACTION_TRIGGER, 0, 0)  # disable MSI
    ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 1, fds(1))


def test_msi_preferred_by_raise_irq(scratch_client, fds):
    ev = fds(2)
    ok(scratch_client, 1, EVENTFD_TRIGGER, 0, 2, ev)
    doorbell(scratch_client, 1)
    assert [count(f) for f in ev] == [0, 1]


def test_deassign_with_no_fds_closes_them(scratch_client, scratch):
    before = open_fds()
    ev = efds(4)
    ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 4, ev)
    for f in ev:
        os.close(f)
    ok(scratch_client, 2, A.DATA_EVENTFD | A.ACTION_TRIGGER, 0, 4)  # no fds: de-assign
    assert wait_until(lambda: open_fds() == before)


def test_disable_all_with_count_zero(scratch_client, fds):
    ev = fds(4)
    ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 4, ev)
    ok(scratch_client, 2, A.DATA_NONE | A.ACTION_TRIGGER, 0, 0)
    doorbell(scratch_client, 0)
    assert count(ev[0]) == 0


def test_replacing_an_eventfd_closes_the_old_one(scratch_client):
    before = open_fds()
    for _ in range(5):
        ev = efds(1)
        ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 1, ev)
        os.close(ev[0])
    ok(scratch_client, 2, A.DATA_NONE | A.ACTION_TRIGGER, 0, 0)
    assert open_fds() == before


@pytest.mark.parametrize("index, flags, start, n, nfds", [
    (7, EVENTFD_TRIGGER, 0, 1, 1),                   # no such index
    (2, EVENTFD_TRIGGER, 3, 2, 2),                   # past the vectors
    (2, EVENTFD_TRIGGER, 0, 2, 1),                   # fd count mismatch
    (2, A.DATA_NONE | A.ACTION_TRIGGER, 0, 1, 1),    # fds without DATA_EVENTFD
    (2, A.DATA_NONE | A.ACTION_TRIGGER, 1, 0, 0),    # count 0 needs start 0
    (2, A.DATA_BOOL | A.ACTION_TRIGGER, 0, 0, 0),    # count 0 with BOOL
    (2, A.DATA_NONE | A.DATA_BOOL | A.ACTION_TRIGGER, 0, 1, 0),   # two DATA flags
    (2, A.DATA_NONE | A.ACTION_MASK | A.ACTION_UNMASK, 0, 1, 0),  # two ACTION flags
    (2, A.DATA_NONE, 0, 1, 0),                       # no ACTION
    (2, 0x40 | A.DATA_NONE | A.ACTION_MASK, 0, 1, 0),  # unknown bit
])
def test_bad_set_irqs_is_einval_and_closes_fds(scratch_client, index, flags, start, n, nfds):
    before = open_fds()
    ev = efds(nfds)
    assert err(scratch_client, index, flags, start, n, ev) == errno.EINVAL
    for f in ev:
        os.close(f)
    assert open_fds() == before


@pytest.mark.parametrize("payload", [
    b"\0" * 19,
    struct.pack("=IIIII", 19, 0x21, 2, 0, 1),                   # argsz != size
    struct.pack("=IIIII", 21, 0x21, 2, 0, 1),
    struct.pack("=IIIII", 20, 0x22, 2, 0, 2) + b"\1",           # bool data short
    struct.pack("=IIIII", 22, 0x22, 2, 0, 1) + b"\1\1",         # bool data long
    struct.pack("=IIIII", 24, 0x24, 2, 0, 1) + b"\0" * 4,       # data with EVENTFD
])
def test_bad_set_irqs_payloads(scratch_client, payload):
    assert scratch_client.errno_of(P.Command.DEVICE_SET_IRQS, payload) == errno.EINVAL


def test_non_eventfd_is_refused(scratch_client):
    r, w = os.pipe()
    try:
        assert err(scratch_client, 2, EVENTFD_TRIGGER, 0, 1, [r]) == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)


def test_disconnect_closes_every_eventfd(serve, scratch):
    from vfu_raw import RawClient
    path = serve(scratch)
    before = open_fds()
    c = RawClient(path)
    ev, mask_ev = efds(4), efds(4)
    ok(c, 2, EVENTFD_TRIGGER, 0, 4, ev)
    ok(c, 2, A.DATA_EVENTFD | A.ACTION_MASK, 0, 4, mask_ev)
    for f in ev + mask_ev:
        os.close(f)
    assert len(open_fds() - before) == 8 + 2  # server copies, both ends of the connection
    c.close()
    assert wait_until(lambda: open_fds() == before)
    assert not scratch.connected


def test_err_and_req_indexes(scratch_client, scratch, fds):
    err_ev, req_ev = fds(1), fds(1)
    ok(scratch_client, 3, EVENTFD_TRIGGER, 0, 1, err_ev)
    ok(scratch_client, 4, EVENTFD_TRIGGER, 0, 1, req_ev)
    with scratch.lock:
        assert scratch.report_error() and scratch.request_release()
    assert count(err_ev[0]) == 1 and count(req_ev[0]) == 1


def test_msix_table_masks_and_pba(scratch_client, scratch, fds):
    ev = fds(4)
    ok(scratch_client, 2, EVENTFD_TRIGGER, 0, 4, ev)
    ctrl = 16 * 3 + 12
    scratch_client.write32(2, ctrl, 1)                      # mask vector 3 in the table
    assert scratch_client.read32(2, ctrl) == 1
    doorbell(scratch_client, 3)
    assert count(ev[3]) == 0
    pba = 4096
    assert scratch_client.read(2, pba, 8)[0] == 0b1000      # pending
    scratch_client.write32(2, ctrl, 0)                      # unmask: delivered
    assert count(ev[3]) == 1 and scratch_client.read(2, pba, 8)[0] == 0
    # the function mask in config space masks them all
    from pyvfio.pci.config import CapId
    msix = scratch.config.caps[CapId.MSIX]
    scratch_client.write(7, msix + 2, struct.pack("<H", 0xC000))
    doorbell(scratch_client, 0)
    assert count(ev[0]) == 0
    scratch_client.write(7, msix + 2, struct.pack("<H", 0x8000))
    assert count(ev[0]) == 1
    # message address/data are plain storage
    scratch_client.write(2, 0, struct.pack("<QI", 0xFEE00000, 0x4021))
    assert scratch_client.read(2, 0, 12) == struct.pack("<QI", 0xFEE00000, 0x4021)
    assert scratch_client.read32(2, 0x1800) == 0  # beyond table/PBA: the model's callback
