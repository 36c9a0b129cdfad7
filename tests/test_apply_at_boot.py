"""``pyvfio apply`` re-binds from the configuration file in a fresh boot.

Two boots of a real kernel (Debian's, standard topology) share one
configuration directory: the first runs ``pyvfio bind --persist``, the host
carries the directory over (as /etc survives a reboot), the second boots
with edu on no driver and runs ``pyvfio apply`` as the boot unit would.
Runs on the host (it boots its own guests), so it is not under tests/guest.
"""

from __future__ import annotations

import json
import shutil

import pytest

from pyvfio.errors import PyvfioError
from pyvfio.testing import guest, topology

pytestmark = pytest.mark.guest

CONFIG = f"{guest.GUEST_OUT}/etc-pyvfio"  # the run share: survives the guest, like /etc


def _boot(script: str, run_dir: object = None) -> guest.GuestResult:
    try:
        kernel = guest.kernel_by_name("debian")
    except (PyvfioError, OSError) as exc:
        pytest.skip(f"no Debian guest kernel here: {exc}")
    vm = guest.Guest(kernel, topology.standard())
    return vm.run(["sh", "-c", script], timeout=600, run_dir=run_dir)  # type: ignore[arg-type]


def test_apply_rebinds_in_a_fresh_boot(tmp_path) -> None:
    first = _boot(
        f"python3 -m pyvfio bind --persist --config-dir {CONFIG} {topology.EDU} && "
        f"python3 -m pyvfio persist list --json --config-dir {CONFIG} > $PYVFIO_GUEST_OUT/list.json"
    )
    try:
        assert first.returncode == 0, first.output
        listed = json.loads((first.out_dir / "list.json").read_text())
        assert [(e["device"], e["vendor_id"], e["device_id"]) for e in listed] == [
            (topology.EDU, "1234", "11e8")]
        second_dir = tmp_path / "boot2"
        (second_dir / "out").mkdir(parents=True)
        shutil.copytree(first.out_dir / "etc-pyvfio", second_dir / "out" / "etc-pyvfio")
    finally:
        first.cleanup()
    out = guest.GUEST_OUT
    second = _boot(
        f"python3 -m pyvfio check --json {topology.EDU} > {out}/before.json; "
        f"python3 -m pyvfio apply --json --config-dir {CONFIG} > {out}/apply.json; "
        f"echo $? > {out}/apply.rc; "
        f"python3 -m pyvfio check --json {topology.EDU} > {out}/after.json",
        run_dir=second_dir,
    )
    (before,) = json.loads((second.out_dir / "before.json").read_text())
    assert before["driver"] is None and not before["ready"], "a fresh boot starts unbound"
    applied = json.loads((second.out_dir / "apply.json").read_text())
    assert (second.out_dir / "apply.rc").read_text().strip() == "0", applied
    assert [(b["device"], b["status"]) for b in applied["bindings"]] == [(topology.EDU, "bound")]
    (after,) = json.loads((second.out_dir / "after.json").read_text())
    assert after["driver"] == "vfio-pci" and after["ready"], after["problems"]
