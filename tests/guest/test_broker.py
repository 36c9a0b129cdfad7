"""The fd broker on a real kernel: an unprivileged user (uid 65534, nobody)
that cannot open /dev/vfio/N itself drives edu through the broker (DMA and
interrupts), on the legacy and the iommufd backend; refusals for a device
outside the policy and for a non-viable group carry the diagnosis; 50
clients leave no fd behind in the broker; the QEMU arguments use fds the
VMM really inherits."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import pyvfio
from pyvfio.testing import kconfig
from pyvfio.testing.fds import fd_numbers
from pyvfio.testing.topology import E1000_BRIDGED, E1000E, EDU, EDU_BRIDGED

try:
    from . import kernel_helpers as helpers
except ImportError:
    import kernel_helpers as helpers  # type: ignore[no-redef]

pytestmark = pytest.mark.guest

NOBODY = 65534
POLICY = f"""
[broker]
max_clients = 64

[[rule]]
name = "nobody's edus"
users = ["nobody"]
devices = ["{EDU}", "{EDU_BRIDGED}"]
"""


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[str]
    socket: str
    log: str
    dir: str

    def fds(self) -> set[int]:
        return fd_numbers(self.proc.pid)

    def records(self) -> list[dict[str, str]]:
        from pyvfio.broker.audit import parse_record
        with open(self.log) as f:
            return [parse_record(line) for line in f if " pyvfio-broker " in line]


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    d = tempfile.mkdtemp(prefix="pyvfio-broker-")
    os.chmod(d, 0o755)  # nobody must reach the socket
    policy = os.path.join(d, "policy.toml")
    with open(policy, "w") as f:
        f.write(POLICY)
    sock, log = os.path.join(d, "broker.sock"), os.path.join(d, "decisions.log")
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "broker", "--socket", sock,
                             "--policy", policy, "--log", log],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "broker did not start"
        time.sleep(0.05)
    b = BrokerProcess(proc, sock, log, d)
    try:
        yield b
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        shutil.rmtree(d, ignore_errors=True)
    assert proc.returncode == 0, err


def unprivileged_python() -> str:
    """An interpreter nobody can execute: the test's own may live under /root
    (mode 0700), or be a venv's link to such a one; Debian's /usr/bin/python3
    (stdlib only: all pyvfio's core needs) runs the checkout through PYTHONPATH."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(candidate) and reachable_by_others(candidate):
            return candidate
    pytest.skip(f"no interpreter executable by uid {NOBODY} ({sys.executable} is under a "
                "private directory and /usr/bin/python3 is missing)")


def reachable_by_others(path: str) -> bool:
    """Whether every directory on the way to ``path``, as written and with links
    resolved, lets others through (and ``path`` itself is theirs to read/run)."""
    return all(os.stat(p).st_mode & 0o001 for p in _ancestors(path))


def _ancestors(path: str) -> list[str]:
    out = []
    for start in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        p = start
        out.append(p)
        while p != "/":
            p = os.path.dirname(p)
            out.append(p)
    return out


_copy_for_nobody: list[str] = []


def nobody_pythonpath() -> str:
    """Where nobody imports pyvfio from: the checkout when others can reach it;
    otherwise (a checkout under /root, mode 0700) a copy of the package in a
    fresh world-readable temp dir, made once per test session."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(pyvfio.__file__)))
    if reachable_by_others(os.path.join(checkout, "pyvfio", "__init__.py")):
        return checkout
    if not _copy_for_nobody:
        d = tempfile.mkdtemp(prefix="pyvfio-for-nobody-")
        os.chmod(d, 0o755)
        shutil.copytree(os.path.join(checkout, "pyvfio"), os.path.join(d, "pyvfio"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for root, dirs, files in os.walk(d):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        _copy_for_nobody.append(d)
    return _copy_for_nobody[0]


def as_nobody(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HOME="/nonexistent",
               PYTHONPATH=nobody_pythonpath())
    return subprocess.run([unprivileged_python(), "-c", code, *args], user=NOBODY, group=NOBODY,
                          extra_groups=[], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def group_of(bdf: str) -> int:
    return int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group")))


def need_backend(backend: str) -> None:
    if backend == "iommufd":
        kconfig.require_feature(os.path.exists("/dev/iommu"), "CONFIG_IOMMUFD",
                                feature="iommufd, /dev/iommu")


_DRIVE_EDU = r"""
import errno, json, os, sys
from pyvfio.broker.client import open_device
from pyvfio.drivers.edu import selftest
args = json.loads(sys.argv[1])
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "direct": {}}
for node in args["nodes"]:
    try:
        os.close(os.open(node, os.O_RDWR))
        out["direct"][node] = "opened"
    except OSError as exc:
        out["direct"][node] = errno.errorcode[exc.errno]
with open_device(args["socket"], args["device"], backend=args["backend"]) as dev:
    out["backend"] = dev.backend
    out["reason"] = dev.backend_reason
    out["fds"] = sorted(os.readlink(f"/proc/self/fd/{n}") for n in dev.fds().values())
    out["selftest"] = selftest(dev).as_dict()
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ["legacy", "iommufd"])
def test_nobody_drives_edu_through_the_broker(broker: BrokerProcess, backend: str) -> None:
    need_backend(backend)
    with helpers.vfio_bound(EDU):
        nodes = [f"/dev/vfio/{group_of(EDU)}"]
        if backend == "iommufd":
            cdev = os.listdir(f"/sys/bus/pci/devices/{EDU}/vfio-dev")[0]
            nodes += ["/dev/iommu", f"/dev/vfio/devices/{cdev}"]
        out = last_json(as_nobody(_DRIVE_EDU, json.dumps(
            {"socket": broker.socket, "device": EDU, "backend": backend, "nodes": nodes})))
    assert (out["uid"], out["gid"], out["groups"]) == (NOBODY, NOBODY, [])
    # On its own, nobody may not open the device nodes...
    assert out["direct"] == {n: "EACCES" for n in nodes}
    # ...but with the broker's fds it runs the whole edu self-test.
    assert out["backend"] == backend
    assert out["reason"] == "fds passed by the pyvfio broker"
    steps = {s["step"]: s for s in out["selftest"]["steps"]}
    assert out["selftest"]["ok"], [s for s in steps.values() if not s["ok"]]
    assert any("dma" in n for n in steps) and any("msi" in n for n in steps)
    assert any("intx" in n for n in steps)
    if backend == "legacy":
        assert "/dev/vfio/vfio" in out["fds"] and f"/dev/vfio/{group_of(EDU)}" in out["fds"]
    else:
        assert "/dev/iommu" in out["fds"]
    granted = [r for r in broker.records() if r.get("event") == "open"]
    assert granted[-1]["decision"] == "granted" and granted[-1]["user"] == "nobody"
    assert granted[-1]["uid"] == str(NOBODY) and granted[-1]["backend"] == backend
    assert granted[-1]["rule"] == "rule[0] \"nobody's edus\""


_ASK = r"""
import json, sys
from pyvfio.broker.client import open_device
from pyvfio.errors import BrokerRefused
try:
    open_device(sys.argv[1], sys.argv[2]).close()
    print(json.dumps({"granted": True}))
except BrokerRefused as exc:
    print(json.dumps({"granted": False, "reason": exc.reason, "problems": exc.problems}))
"""


def test_device_outside_the_policy_is_refused(broker: BrokerProcess) -> None:
    out = last_json(as_nobody(_ASK, broker.socket, E1000E))
    assert out["granted"] is False
    assert out["reason"].startswith("no rule of ") and "user nobody (uid 65534)" in out["reason"]
    assert "0000:00:05.0 (8086:10d3" in out["reason"]
    rec = [r for r in broker.records() if r.get("event") == "open"][-1]
    assert (rec["decision"], rec["device"], rec["user"]) == ("refused", E1000E, "nobody")


def test_non_viable_group_is_refused_with_the_diagnosis(broker: BrokerProcess,
                                                        vfio_bound) -> None:
    vfio_bound(EDU_BRIDGED)  # its group-mate E1000_BRIDGED stays on e1000
    assert helpers.current_driver(E1000_BRIDGED) == "e1000"
    out = last_json(as_nobody(_ASK, broker.socket, EDU_BRIDGED))
    assert out["granted"] is False
    assert E1000_BRIDGED in out["reason"] and "e1000" in out["reason"]
    culprits = {(p["device"], p["driver"], p["kind"]) for p in out["problems"]}
    assert (E1000_BRIDGED, "e1000", "host-driver") in culprits
    rec = [r for r in broker.records() if r.get("event") == "open"][-1]
    assert rec["decision"] == "refused" and E1000_BRIDGED in rec["problems"]


_FIFTY = r"""
import json, socket, struct, sys, time
from pyvfio.broker import wire
from pyvfio.broker.client import BrokerSession, open_device
from pyvfio.errors import BrokerRefused
path, edu, other = sys.argv[1:4]
kinds = {}
for n in range(50):
    kind = n % 5
    if kind == 0:      # a real grant, used and closed
        # The broker releases a vanished client's lease when it notices the
        # hang-up, asynchronously: wait for that rather than race it.
        deadline = time.monotonic() + 60
        while True:
            try:
                dev = open_device(path, edu)
                break
            except BrokerRefused as exc:
                if time.monotonic() > deadline or not (
                        "leased" in exc.reason or "is held open by pid" in exc.reason):
                    raise
                time.sleep(0.1)
        assert dev.bar(0).read32(0) == 0x010000ed
        dev.close()
    elif kind == 1:    # refused
        try:
            open_device(path, other)
            raise SystemExit("granted a device outside the policy")
        except BrokerRefused:
            pass
    elif kind == 2:    # vanishes mid-message, holding a granted device
        s = BrokerSession(path)
        s.open_device(edu)
        s.sock.sendall(struct.pack(">I", 200) + b'{"op":')
        s.sock.close()
        # While this process still holds the group, the next client is refused:
        # by the lease table if the broker has not yet seen the disconnect,
        # else by the host's diagnosis naming this process.
        try:
            open_device(path, edu)
            raise SystemExit("granted a device another process holds")
        except BrokerRefused as exc:
            assert "is held open by pid" in exc.reason or "leased" in exc.reason, exc.reason
        s.close()
    elif kind == 3:    # oversized message
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(struct.pack(">I", 1 << 30))
        assert wire.recv_message(s).body["op"] == "greeting"  # the broker speaks first
        assert wire.recv_message(s).body["error"] == "bad-request"
        s.close()
    else:              # garbage, then gone
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b"\x00\x00\x00\x05hello")
        s.close()
    kinds[kind] = kinds.get(kind, 0) + 1
print(json.dumps(kinds))
"""


@pytest.mark.guest_timeout(900)  # 50 client processes under TCG on a loaded host
def test_fifty_clients_leave_no_fd_behind(broker: BrokerProcess) -> None:
    with helpers.vfio_bound(EDU):
        last_json(as_nobody(_ASK, broker.socket, EDU))  # warm up: imports, first session
        time.sleep(0.5)
        baseline = broker.fds()
        out = last_json(as_nobody(_FIFTY, broker.socket, EDU, E1000E))
        assert out == {"0": 10, "1": 10, "2": 10, "3": 10, "4": 10}
        deadline = time.monotonic() + 60
        while broker.fds() != baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        assert broker.fds() == baseline, sorted(broker.fds() ^ baseline)
        assert broker.proc.poll() is None
        # still serving, and the device is free again
        assert last_json(as_nobody(_ASK, broker.socket, EDU))["granted"] is True
    events = [r["event"] for r in broker.records()]
    assert events.count("connect") >= 52 and events.count("release") >= 52


@pytest.mark.parametrize("backend", ["legacy", "iommufd"])
def test_qemu_args_use_fds_the_vmm_inherits(broker: BrokerProcess, backend: str) -> None:
    need_backend(backend)
    # --exec stands in for QEMU: it prints its arguments and what its fds are.
    show = 'for a in "$@"; do echo "ARG $a"; done; for f in /proc/$$/fd/*; do echo "FD ${f##*/} $(readlink $f)"; done'
    code = ("import sys; from pyvfio.cli import main; sys.exit(main(sys.argv[1:]))")
    with helpers.vfio_bound(EDU):
        printed = as_nobody(code, "broker-open", "--socket", broker.socket, "--backend", backend,
                            "--print-qemu-args", EDU)
        execd = as_nobody(code, "broker-open", "--socket", broker.socket, "--backend", backend,
                          EDU, "--exec", "/bin/sh", "-c", show, "sh")
    assert printed.returncode == 0, printed.stderr
    line = printed.stdout.strip()
    assert execd.returncode == 0, execd.stderr
    args = [x[4:] for x in execd.stdout.splitlines() if x.startswith("ARG ")]
    fds = dict(x[3:].split(" ", 1) for x in execd.stdout.splitlines() if x.startswith("FD "))
    if backend == "iommufd":
        assert re.fullmatch(r"-object iommufd,id=iommufd0,fd=\d+ "
                            r"-device vfio-pci,id=hostdev0,iommufd=iommufd0,fd=\d+", line), line
        iommufd = re.search(r"iommufd,id=iommufd0,fd=(\d+)", " ".join(args)).group(1)
        device = re.search(r"iommufd=iommufd0,fd=(\d+)", " ".join(args)).group(1)
        assert fds[iommufd] == "/dev/iommu"
        assert fds[device].startswith("/dev/vfio/devices/vfio")
    else:
        g = group_of(EDU)
        assert re.fullmatch(rf"-object vfio-container,id=ct0,fd=\d+ "
                            rf"-object vfio-group,id=grp{g},fd=\d+,container=ct0 "
                            rf"-device vfio-pci,id=hostdev0,host={EDU},group=grp{g}", line), line
        container = re.search(r"vfio-container,id=ct0,fd=(\d+)", " ".join(args)).group(1)
        group = re.search(r"vfio-group,id=grp\d+,fd=(\d+)", " ".join(args)).group(1)
        assert fds[container] == "/dev/vfio/vfio" and fds[group] == f"/dev/vfio/{g}"


@pytest.mark.parametrize("backend", ["legacy", "iommufd"])
def test_edu_driver_and_pyvfio_info_take_broker(broker: BrokerProcess, backend: str) -> None:
    need_backend(backend)
    cli = "import sys; from pyvfio.cli import main; sys.exit(main(sys.argv[1:]))"
    edu = "import sys; from pyvfio.drivers.edu import main; sys.exit(main(sys.argv[1:]))"
    with helpers.vfio_bound(EDU):
        info = last_json_doc(as_nobody(cli, "info", "--broker", broker.socket, "--backend",
                                       backend, "--json", EDU))
        driver = last_json_doc(as_nobody(edu, "--broker", broker.socket, "--backend", backend,
                                         "--json", EDU))
    assert info["backend"] == backend and info["ids"]["vendor"] == "1234"
    assert info["backend_reason"] == "fds passed by the pyvfio broker"
    assert driver["ok"] is True and driver["backend"] == backend


def last_json_doc(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
