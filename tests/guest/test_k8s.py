"""The Kubernetes device plugin on a real kernel: the plugin (``pyvfio
k8s-device-plugin``) and the kubelet stand-in run in the guest; Allocate's
answer is used for real by a "container" made with ``unshare``: a new mount
namespace whose ``/dev`` is a private tmpfs holding only the device nodes
Allocate returned (plus ``/dev/null``), entered as uid 65534 with a raised
memlock limit, as a container runtime would.  Inside it pyvfio's edu driver
passes its self-test on the allocated device (legacy on Debian's 6.1, iommufd
on pyvfio-6.12), and the same process cannot reach a device that was not
allocated (its node is absent and it may not mknod one)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

import pyvfio
from pyvfio.testing.topology import E1000E, EDU

pytestmark = pytest.mark.guest

NOBODY = 65534
RESOURCE = "pyvfio.io/edu"

# Runs as root in the new mount namespace, as a container runtime does: build
# /dev from the DeviceSpecs, raise the memlock limit, drop to nobody and exec
# the container's process (_WORKLOAD) with the environment Allocate gave.
_RUNTIME = r"""
import json, os, resource, stat, subprocess, sys, time
print(f"runtime: start {time.monotonic():.1f}", file=sys.stderr, flush=True)
specs, python, workload, forbidden = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
nodes = {s["container_path"]: os.stat(s["host_path"]).st_rdev for s in specs}
nodes["/dev/null"] = os.stat("/dev/null").st_rdev
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755,nosuid", "container-dev", "/dev"],
               check=True)
for path, rdev in nodes.items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, 0o666 | stat.S_IFCHR, rdev)
    os.chmod(path, 0o666)  # mknod's mode went through the umask
resource.setrlimit(resource.RLIMIT_MEMLOCK, (256 << 20, 256 << 20))
os.setgroups([]); os.setgid(65534); os.setuid(65534)
print(f"runtime: exec {python} as uid 65534 {time.monotonic():.1f}", file=sys.stderr, flush=True)
os.execv(python, [python, "-c", workload, forbidden])
"""

# The container's process: uid 65534, only the allocated nodes in /dev.
_WORKLOAD = r"""
import json, os, stat, sys, time
print(f"workload: start {time.monotonic():.1f}", file=sys.stderr, flush=True)
forbidden = sys.argv[1]
out = {"uid": os.getuid(), "dev": sorted(
    os.path.join(d, f) for d, _s, fs in os.walk("/dev") for f in fs)}
from pyvfio.drivers.edu import selftest
from pyvfio.kernel import open_device
address = os.environ["PCI_RESOURCE_PYVFIO_IO_EDU"]
print(f"workload: imported {time.monotonic():.1f}", file=sys.stderr, flush=True)
with open_device(address, "auto") as dev:
    print(f"workload: opened {time.monotonic():.1f}", file=sys.stderr, flush=True)
    result = selftest(dev, report=lambda s: print(f"workload: {s.name} {s.ok} "
                                                  f"{time.monotonic():.1f}", file=sys.stderr,
                                                  flush=True))
    out["backend"] = dev.backend
    out["selftest"] = result.as_dict()
try:
    os.open(forbidden, os.O_RDWR)
    out["forbidden_open"] = "opened"
except OSError as exc:
    out["forbidden_open"] = exc.errno
try:
    os.mknod("/dev/vfio/stolen", 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
    out["mknod"] = "made"
except OSError as exc:
    out["mknod"] = exc.errno
print(json.dumps(out))
"""


def _unprivileged_python() -> str:
    """An interpreter uid 65534 can execute: this one may live under /root
    (mode 0700); Debian's /usr/bin/python3 runs the checkout through
    PYTHONPATH (the edu driver needs only the standard library)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        path = os.path.realpath(candidate)
        chain = [path]
        while path != "/":
            path = os.path.dirname(path)
            chain.append(path)
        if os.path.exists(candidate) and all(os.stat(p).st_mode & 0o001 for p in chain):
            return candidate
    pytest.fail(f"no interpreter executable by uid {NOBODY}: {sys.executable} is under a "
                "private directory and /usr/bin/python3 is missing")


@pytest.fixture
def plugin_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="k8s-dp-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.guest_timeout(900)
def test_allocated_edu_works_in_a_container_and_nothing_else_is_reachable(
        guest_kernel, vfio_bound, plugin_dir):
    import errno

    from pyvfio.host import Host
    from pyvfio.testing.kubelet import Kubelet

    vfio_bound(EDU)
    vfio_bound(E1000E)  # a second vfio device on the host, never allocated
    host = Host("/")
    forbidden_group = host.device(E1000E).iommu_group
    forbidden = f"/dev/vfio/{forbidden_group}"
    assert os.path.exists(forbidden)
    config = os.path.join(plugin_dir, "k8s.toml")
    with open(config, "w") as f:
        f.write(f'[plugin]\nhealth_interval = 1\n[resources."{RESOURCE}"]\n'
                f'addresses = ["{EDU}"]\n')
    with Kubelet(plugin_dir) as kubelet:
        proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "k8s-device-plugin",
                                 "--config", config, "--plugin-dir", plugin_dir],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            kubelet.wait_for(lambda k: k.devices(RESOURCE).get(EDU) == "Healthy", timeout=120)
            reply = kubelet.admit(RESOURCE, 1)
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, log = proc.communicate(timeout=60)
        assert proc.returncode == 0, log
    specs = [{"container_path": d.container_path, "host_path": d.host_path,
              "permissions": d.permissions} for d in reply.devices]
    expected_backend = "legacy" if guest_kernel == "debian" else "iommufd"
    if expected_backend == "legacy":
        assert [s["host_path"] for s in specs] == ["/dev/vfio/vfio",
                                                   f"/dev/vfio/{host.device(EDU).iommu_group}"]
    else:
        cdev = Host("/").device(EDU).vfio_cdev
        assert [s["host_path"] for s in specs] == ["/dev/iommu", f"/dev/vfio/devices/{cdev}"]
    assert dict(reply.envs) == {"PCI_RESOURCE_PYVFIO_IO_EDU": EDU}
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(pyvfio.__file__)))
    env = {**os.environ, **reply.envs, "PYTHONPATH": checkout, "PYTHONDONTWRITEBYTECODE": "1",
           "HOME": "/nonexistent"}
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", _RUNTIME, json.dumps(specs), _unprivileged_python(), _WORKLOAD,
                          forbidden],
                         env=env, capture_output=True, text=True, timeout=600, cwd="/")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["uid"] == NOBODY
    assert out["dev"] == sorted(["/dev/null", *(s["container_path"] for s in specs)])
    assert out["backend"] == expected_backend
    failed = [s for s in out["selftest"]["steps"] if not s["ok"]]
    assert out["selftest"]["ok"], failed
    assert {s["step"] for s in out["selftest"]["steps"]} >= {"identify", "dma (polled)"}
    assert out["forbidden_open"] == errno.ENOENT
    assert out["mknod"] == errno.EPERM
    # The plugin logged the allocation with the backend it chose.
    assert f"allocate {EDU} -> {expected_backend} backend" in log
