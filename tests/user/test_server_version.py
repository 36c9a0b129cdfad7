"""VFIO_USER_VERSION: negotiation, capabilities, and what happens before it."""

from __future__ import annotations

import errno
import json
import socket
import struct

import pytest
from vfu_raw import RawClient

from pyvfio.user import protocol as P


def test_reply_keeps_major_and_takes_the_lower_minor(serve, edu):
    c = RawClient(serve(edu), negotiate=False)
    v = c.negotiate({"max_msg_fds": 4}, minor=1)
    assert (v.major, v.minor) == (0, 1)
    assert v.caps.max_msg_fds == 16
    assert v.caps.max_data_xfer_size == 1 << 20
    assert v.caps.max_dma_maps == 4096
    assert v.caps.pgsizes == 4096
    c.close()


def test_capabilities_are_a_subset_of_the_proposal(serve, edu):
    c = RawClient(serve(edu), negotiate=False)
    v = c.negotiate({})
    assert not v.caps.write_multiple and v.caps.migration is None and v.caps.twin_socket is None
    c.close()


def test_write_multiple_is_granted_when_proposed(serve, edu):
    c = RawClient(serve(edu), negotiate=False)
    v = c.negotiate({"write_multiple": True})
    assert v.caps.write_multiple
    c.close()


def test_twin_socket(serve, edu):
    c = RawClient(serve(edu), negotiate=False)
    v = c.negotiate({"twin_socket": {"supported": True}, "max_msg_fds": 2})
    assert v.caps.twin_socket == {"supported": True, "fd_index": 0}
    assert c.twin is not None
    assert c.twin.family == socket.AF_UNIX
    c.close()


def test_migration_capability_only_for_migratable_devices(serve, edu, scratch):
    for dev, expect in ((edu, True), (scratch, True)):
        c = RawClient(serve(dev), negotiate=False)
        v = c.negotiate({"migration": {"pgsize": 4096}})
        assert (v.caps.migration is not None) == expect
        c.close()


@pytest.mark.parametrize("payload", [
    b"",                              # no version at all
    b"\0",                            # truncated
    struct.pack("=HH", 0, 2) + b'{"capabilities":{}}',          # no NUL
    struct.pack("=HH", 0, 2) + b'{"capabilities":{}\0',         # bad JSON
    struct.pack("=HH", 0, 2) + b'[1,2]\0',                      # not an object
    struct.pack("=HH", 0, 2) + b'{"capabilities":[]}\0',        # caps not an object
    struct.pack("=HH", 0, 2) + b'{"capabilities":{"max_msg_fds":"8"}}\0',
    struct.pack("=HH", 0, 2) + b'{"capabilities":{"max_msg_fds":-1}}\0',
    struct.pack("=HH", 0, 2) + b'{"capabilities":{"max_data_xfer_size":true}}\0',
    struct.pack("=HH", 0, 2) + b'{"capabilities":{"migration":3}}\0',
    struct.pack("=HH", 0, 2) + b'\xff\xfe\0',                  # not UTF-8
])
def test_bad_version_is_refused_with_einval_and_closed(serve, edu, payload):
    c = RawClient(serve(edu), negotiate=False)
    assert c.errno_of(P.Command.VERSION, payload) == errno.EINVAL
    with pytest.raises(ConnectionError):
        c.recv()
    c.close()


def test_unsupported_major_is_refused(serve, edu):
    c = RawClient(serve(edu), negotiate=False)
    assert c.errno_of(P.Command.VERSION, P.Version(1, 0).pack()) == errno.ENOTSUP
    c.close()


def test_version_without_json_takes_defaults(serve, edu):
    c = RawClient(serve(edu), negotiate=False)
    m = c.ok(P.Command.VERSION, struct.pack("=HH", 0, 0))
    v = P.Version.unpack(m.payload)
    assert v.minor == 0
    assert json.loads(bytes(m.payload[4:-1]))["capabilities"]["max_msg_fds"] == 16
    assert c.read32(0, 0) == 0x010000ED
    c.close()


def test_first_command_must_be_version(serve, edu):
    c = RawClient(serve(edu), negotiate=False)
    assert c.errno_of(P.Command.DEVICE_GET_INFO, P.DeviceInfoMsg().pack()) == errno.EINVAL
    with pytest.raises(ConnectionError):
        c.recv()
    c.close()


def test_region_read_before_version_is_refused(serve, edu):
    c = RawClient(serve(edu), negotiate=False)
    assert c.errno_of(P.Command.REGION_READ, P.RegionAccess(0, 0, 4).pack()) == errno.EINVAL
    c.close()


def test_second_version_is_an_error_but_keeps_the_connection(edu_client):
    assert edu_client.errno_of(P.Command.VERSION, P.Version().pack()) == errno.EINVAL
    assert edu_client.read32(0, 0) == 0x010000ED


def test_version_with_an_fd_is_refused(serve, edu):
    import os
    c = RawClient(serve(edu), negotiate=False)
    r, w = os.pipe()
    try:
        assert c.errno_of(P.Command.VERSION, P.Version().pack(), [r]) == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    c.close()
