"""Handoff messages that are malformed or carry what cannot be handed over:
clear errors, and no fd left behind.  The real handoff (edu mid-DMA, no
reset) is tests/guest/test_handoff.py."""

from __future__ import annotations

import os
import socket

import pytest

from pyvfio.broker import handoff, wire
from pyvfio.errors import ProtocolError, UsageError
from pyvfio.testing.fds import fd_targets as open_fds


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


GOOD_HEADER = {"type": "pyvfio-handoff", "version": 1}


@pytest.mark.parametrize("body, match", [
    ({"type": "something-else", "version": 1, "spaces": [], "devices": [], "buffers": []},
     "not a version-1 pyvfio handoff"),
    ({**GOOD_HEADER, "version": 2, "spaces": [], "devices": [], "buffers": []},
     "not a version-1"),
    ({**GOOD_HEADER, "spaces": {}, "devices": [], "buffers": []}, "must be arrays"),
    ({**GOOD_HEADER, "spaces": [{"kind": "vfio-user"}], "devices": [], "buffers": []},
     "unknown space kind"),
    ({**GOOD_HEADER, "spaces": [{"kind": "legacy", "container": 7}], "devices": [],
      "buffers": []}, "not an fd index"),
    ({**GOOD_HEADER, "spaces": [{"kind": "legacy", "container": True}], "devices": [],
      "buffers": []}, "not an fd index"),
    ({**GOOD_HEADER, "spaces": [], "devices": [{"name": "x", "space": 0}], "buffers": []},
     "names space 0 of 0"),
    ({**GOOD_HEADER, "spaces": [], "devices": [], "buffers": [{"space": -1}]},
     "must be an integer >= 0"),
])
def test_malformed_handoffs_are_refused_and_fds_closed(pair, body, match) -> None:
    a, b = pair
    before = open_fds()
    carried = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    wire.send_message(a, body, carried)
    wire.close_fds(carried)
    with pytest.raises(ProtocolError, match=match):
        handoff.receive_devices(b)
    assert open_fds() == before


def test_a_file_that_is_not_a_container_is_refused(pair) -> None:
    """fd 0 of the message is /dev/null, not /dev/vfio/vfio: the kernel says so."""
    a, b = pair
    before = open_fds()
    null = os.open("/dev/null", os.O_RDONLY)
    wire.send_message(a, {**GOOD_HEADER, "spaces": [{"kind": "legacy", "container": 0}],
                          "devices": [], "buffers": []}, [null])
    os.close(null)
    with pytest.raises(OSError, match="VFIO_GET_API_VERSION"):
        handoff.receive_devices(b)
    assert open_fds() == before


def test_only_kernel_devices_can_be_sent(pair) -> None:
    from pyvfio.device import Device

    class NotKernel(Device):  # e.g. a vfio-user device: its fds mean nothing elsewhere
        def _get_info(self): raise NotImplementedError
        def _get_region_info(self, index): raise NotImplementedError
        def _region_read(self, index, offset, size): raise NotImplementedError
        def _region_write(self, index, offset, data): raise NotImplementedError
        def _region_mmap(self, info, offset, size): raise NotImplementedError
        def _get_irq_info(self, index): raise NotImplementedError
        def _set_irqs(self, index, flags, start, count, data): raise NotImplementedError
        def _reset(self): raise NotImplementedError
        def _close(self): pass

    a, _ = pair
    with pytest.raises(UsageError, match="only kernel VFIO devices can be handed over"):
        handoff.send_devices(a, [NotKernel("vfio-user:/x")])


def test_no_ack_means_nothing_is_released(pair) -> None:
    """If the receiver answers anything but an ack, the sender keeps its devices."""
    a, b = pair
    wire.send_message(b, {"type": "nope"})
    with pytest.raises(ProtocolError, match="did not acknowledge"):
        handoff.send_devices(a, [], [])
