"""The next Debian release's kernel, booted on this machine: on Debian 12 that
is Debian 13's 6.12, so the Debian-13 path (a 6.12 Debian kernel with its own
module tree, virtio built in, no IOMMUFD) is proven here too.

The kernel package is fetched the way NOTES.md describes for QEMU (a private
apt configuration, ``apt-get download``, ``dpkg -x``: nothing on the system
changes; see :func:`pyvfio.testing.debian.fetch_kernel`) and cached in
``~/.cache/pyvfio/debian-kernels/<release>``.  Then:

- ``pyvfio demo --kernel PATH`` passes all 7 steps on it;
- ``pytest --guest-kernel PATH`` runs the selected guest tests there (the
  host's test IDs and the guest's agree), reports a skip that names the
  option the kernel lacks, and leaves nothing beside the kernel image.

On the newest released Debian there is no next release: skipped, with the
reason (the ``debian`` guest kernel is then that release's own).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvfio.testing import debian, guest
from pyvfio.testing.initramfs import cache_dir

CHECKOUT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which(guest.QEMU) is None, reason="QEMU is not installed")


def test_released_after(tmp_path: Path) -> None:
    csv = tmp_path / "debian.csv"
    csv.write_text("version,codename,series,created,release,eol\n"
                   "12,Bookworm,bookworm,2021-08-14,2023-06-10,2026-06-10\n"
                   "13,Trixie,trixie,2023-06-10,2025-08-09\n"
                   "14,Forky,forky,2025-08-09\n"
                   ",Sid,sid,1993-08-16\n")
    assert debian.released_after("bookworm", csv, today="2026-01-01") == "trixie"
    assert debian.released_after("bookworm", csv, today="2025-01-01") is None  # not yet
    assert debian.released_after("trixie", csv, today="2026-01-01") is None  # forky: testing
    with pytest.raises(debian.PackageError, match="does not list the release 'hamm'"):
        debian.released_after("hamm", csv)


@pytest.fixture(scope="module")
def next_release_kernel() -> Path:
    try:
        codename = debian.debian_codename()
        following = debian.released_after(codename)
    except debian.PackageError as exc:
        pytest.skip(str(exc))
    if following is None:
        pytest.skip(f"no Debian release after {codename} has been released: the debian guest "
                    "kernel is the newest release's own")
    return debian.fetch_kernel(following, cache_dir() / "debian-kernels" / following)


def test_the_unpacked_kernel_has_its_modules_and_config(next_release_kernel: Path) -> None:
    k = guest.kernel_by_name(str(next_release_kernel))
    assert k.modules_dir is not None and (k.modules_dir / "modules.dep").is_file()
    assert k.config is not None and "CONFIG_VFIO_PCI=" in k.config.read_text()


def test_demo_passes_every_step_on_it(next_release_kernel: Path) -> None:
    # The kernel act: its 7 steps run on the given kernel (the vfio-user act,
    # added since, is a QEMU 11 guest of its own and is tested in tests/vmm).
    proc = subprocess.run([sys.executable, "-m", "pyvfio", "demo", "--act", "kernel", "--kernel",
                           str(next_release_kernel)], cwd=CHECKOUT, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "demo: every step passed" in proc.stdout
    assert proc.stdout.count("--> ok:") == 7


def test_guest_tests_run_with_the_kernel_given_by_path(next_release_kernel: Path) -> None:
    before = sorted(os.listdir(next_release_kernel.parent))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-v",
         "--guest-kernel", str(next_release_kernel), "tests/guest/test_topology.py",
         "-k", "test_iommu_groups or test_iommufd_node"],
        cwd=CHECKOUT, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert re.search(rf"test_iommu_groups\[{re.escape(next_release_kernel.name)}\] PASSED", out), \
        out[-5000:]
    # Debian's kernels are built without IOMMUFD: the skip says so, naming the option.
    assert re.search(r"SKIPPED .*is built without CONFIG_IOMMUFD", out), out[-5000:]
    assert "1 passed, 1 skipped" in out
    # The run directory lives in a temp dir, not beside the kernel image (it used to
    # be created in /boot).
    assert sorted(os.listdir(next_release_kernel.parent)) == before
