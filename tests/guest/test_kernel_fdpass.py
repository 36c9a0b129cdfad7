"""fds opened in one process and passed over SCM_RIGHTS to another, which
rebuilds the device from them and drives edu (seed 000: a management layer
opens /dev/vfio/* and hands the fds to an unprivileged VMM)."""

from __future__ import annotations

import json

import pytest

from pyvfio.kernel import open_device
from pyvfio.testing.topology import EDU

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = pytest.mark.guest

_CHILD = r"""
import json, os, socket, sys
from pyvfio.drivers.edu import selftest
from pyvfio.kernel.legacy import device_from_fds
sock = socket.socket(fileno=int(sys.argv[1]))
msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 8)
names = json.loads(msg)
fd = dict(zip(names, fds))
# No path under /dev/vfio is opened by this process.
dev = device_from_fds(fd["device"], "0000:00:03.0", group_fd=fd["group"],
                      container_fd=fd["container"])
with dev:
    result = selftest(dev)
    opened = sorted(os.readlink(f"/proc/self/fd/{n}") for n in fds)
print(json.dumps({"result": result.as_dict(), "opened": opened, "pid": os.getpid()}))
"""


def test_fds_passed_over_scm_rights_drive_edu() -> None:
    with helpers.vfio_bound(EDU):
        dev = open_device(EDU, "legacy")
        fds = dev.fds()
        assert set(fds) == {"device", "group", "container"}
        proc = helpers.send_fds_to_child(_CHILD, fds)
        dev.close()  # the sender lets go; the receiver's copies keep everything open
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    data = json.loads(out.strip().splitlines()[-1])
    failed = [s for s in data["result"]["steps"] if not s["ok"]]
    assert not failed
    assert data["result"]["ok"] is True
    assert any(p.endswith("/dev/vfio/vfio") for p in data["opened"])
