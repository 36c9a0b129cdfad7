"""Issue 14's CLI behaviours on a real kernel: the real sysfs through a real
pipe, one form of vfio_cdev in ls and check, a dry run's paths, and Ctrl-C
in the middle of a DMA through the kernel's VFIO (not only vfio-user)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from pyvfio.cli import main
from pyvfio.testing import topology


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def shell(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", f"set -o pipefail 2>/dev/null; {command}"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PY": sys.executable})


@pytest.mark.parametrize("command", ["ls", "groups --json", f"check {topology.EDU} --json"])
def test_real_sysfs_into_a_closed_pipe(guest_kernel: str, command: str) -> None:
    proc = shell(f'"$PY" -m pyvfio {command} | head -c 1 >/dev/null')
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_ls_and_check_agree_on_the_cdev(guest_kernel: str, vfio_bound, capsys) -> None:
    vfio_bound(topology.EDU)
    _, out, _ = run(capsys, "ls", topology.EDU, topology.EDU, "--json")
    (listed,) = json.loads(out)  # named twice, listed once
    code, out, _ = run(capsys, "check", topology.EDU, "--json")
    (checked,) = json.loads(out)
    assert code == 0
    for field in ("vfio_cdev", "vfio_cdev_path"):
        assert listed[field] == checked[field], field
    # The device cdev arrived in 6.6 (CONFIG_VFIO_DEVICE_CDEV); 6.1 already
    # registers the vfio-dev/vfioN device, but without a `dev` (no node).
    # Whatever the kernel, both commands say the same in the same two forms.
    name = listed["vfio_cdev"]
    if name is not None:
        assert listed["vfio_cdev_path"] == f"/dev/vfio/devices/{name}"
        if os.path.exists(f"/sys/bus/pci/devices/{topology.EDU}/vfio-dev/{name}/dev"):
            assert stat.S_ISCHR(os.stat(listed["vfio_cdev_path"]).st_mode)
    else:
        assert listed["vfio_cdev_path"] is None


def test_bind_dry_run_on_the_real_host(guest_kernel: str, capsys, tmp_path) -> None:
    code, out, _ = run(capsys, "bind", topology.EDU, "--dry-run", "--state-dir", str(tmp_path))
    assert code == 0 and "would go to vfio-pci" in out
    assert f"to /sys/bus/pci/devices/{topology.EDU}/driver_override" in out
    assert out.endswith("dry run: nothing was changed\n")
    assert not os.path.islink(f"/sys/bus/pci/devices/{topology.EDU}/driver") or \
        os.path.basename(os.readlink(f"/sys/bus/pci/devices/{topology.EDU}/driver")) != "vfio-pci"


def test_ctrl_c_during_a_kernel_dma(guest_kernel: str, vfio_bound) -> None:
    """The driver waits for edu's DMA (about 100 ms of guest time, far more
    under TCG): SIGINT then gives one line and exit 130, and the device can
    be opened again at once (everything was closed on the way out)."""
    vfio_bound(topology.EDU)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pyvfio.drivers.edu", topology.EDU,
                             "--interrupts", ""], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "factorial (polled)" in line:
            break
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.fail(f"the DMA step finished before the signal: {out}")
    assert proc.returncode == 130 and err.startswith("edu: interrupted"), (out, err)
    assert err.count("\n") == 1 and "FAIL" not in out
    again = subprocess.run([sys.executable, "-m", "pyvfio.drivers.edu", topology.EDU,
                            "--interrupts", ""], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
