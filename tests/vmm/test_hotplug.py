"""Hotplug of a Python device into a running VM, end to end.

``pyvfio serve --control`` starts with no device.  A guest boots on QEMU >= 10.1
with an empty ``pcie-root-port`` and a QMP socket.  Then, while the guest runs:
the control socket adds an edu device to the server; QMP ``device_add`` plugs a
``vfio-user-pci`` on that socket into the root port (the ``qemu.qmp`` library
is the QMP client); the guest's kernel sees it arrive (pciehp), binds it to
vfio-pci and pyvfio's edu driver drives it; the server refuses to remove a
device a VM holds (DeviceBusy); QMP ``device_del`` unplugs it (the guest
kernel lets go); and the server's remove then succeeds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyvfio.testing import vmm
from pyvfio.user.control import ControlClient, ControlError

GUEST_SCRIPT = r'''
import os, pathlib, subprocess, sys, time
out = pathlib.Path(os.environ["PYVFIO_GUEST_OUT"])

def put(name, text):  # whole or not at all: the host reads a file as soon as it exists
    tmp = out / (name + ".tmp")
    tmp.write_text(text)
    tmp.rename(out / name)
def edu():
    for d in pathlib.Path("/sys/bus/pci/devices").iterdir():
        try:
            ids = ((d / "vendor").read_text().strip(), (d / "device").read_text().strip())
        except FileNotFoundError:  # removed while we looked: that is the unplug
            continue
        if ids == ("0x1234", "0x11e8"):
            return d.name
def wait(cond, what, limit=600):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            print("timed out waiting for", what, flush=True); sys.exit(3)
        time.sleep(0.2)
assert edu() is None, "edu present before the hotplug"
put("ready", "booted")
wait(lambda: edu() is not None, "the hotplugged device")
bdf = edu()
print("hotplugged:", bdf, flush=True)
put("seen", bdf)
py = sys.executable
ok = subprocess.run([py, "-m", "pyvfio", "bind", bdf]).returncode == 0 and subprocess.run(
    [py, "-m", "pyvfio.drivers.edu", bdf]).returncode == 0
put("driven", "ok" if ok else "failed")
wait(lambda: edu() is None, "the device to go")
print("unplugged:", bdf, flush=True)
sys.exit(0 if ok else 5)
'''


def wait_file(path: Path, limit: float, runner: threading.Thread) -> str:
    end = time.monotonic() + limit
    while not path.exists():
        assert runner.is_alive(), f"the guest ended before {path.name}"
        assert time.monotonic() < end, f"no {path.name} after {limit:.0f} s"
        time.sleep(0.2)
    return path.read_text()


def test_hotplug_a_served_device_into_a_running_guest_and_unplug_it(tmp_path: Path) -> None:
    from qemu.qmp import QMPClient  # the test extra

    control, sock, qmp_sock = tmp_path / "ctl.sock", tmp_path / "hot.sock", tmp_path / "qmp"
    proc = vmm.start_server(control, stderr=tmp_path / "serve.log")
    vm = vmm.vfio_user_guest("debian", [], qmp=qmp_sock, extra=[
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,addr=0x7,chassis=1"])
    run_dir = tmp_path / "run"
    results: dict[str, Any] = {}

    def run_guest() -> None:
        try:
            results["guest"] = vm.run(["python3", "-c", GUEST_SCRIPT], timeout=1200,
                                      run_dir=run_dir)
        except Exception as exc:  # reported by the main thread
            results["error"] = exc

    runner = threading.Thread(target=run_guest, daemon=True)
    runner.start()
    ctl = ControlClient(str(control))
    try:
        wait_file(run_dir / "out/ready", 900, runner)
        added = ctl.execute("device-add", {"model": "edu", "socket": str(sock), "id": "hot"})
        assert added["client"] is None

        async def qmp(*commands: tuple[str, dict[str, Any]]) -> list[Any]:
            client = QMPClient("pyvfio-test")
            await client.connect(str(qmp_sock))
            try:
                return [await client.execute(name, args) for name, args in commands]
            finally:
                await client.disconnect()

        asyncio.run(qmp(("device_add", {
            "driver": "vfio-user-pci", "id": "hot0", "bus": "rp1",
            "socket": {"path": str(sock), "type": "unix"}})))
        assert ctl.wait_event("CLIENT_CONNECTED", 60, {"id": "hot"})
        bdf = wait_file(run_dir / "out/seen", 300, runner)
        assert bdf.startswith("0000:01:00.")  # behind the root port
        assert wait_file(run_dir / "out/driven", 600, runner) == "ok"
        # The unplug blocker: QEMU still holds the device.
        with pytest.raises(ControlError) as busy:
            ctl.execute("device-remove", {"id": "hot"})
        assert busy.value.error_class == "DeviceBusy"
        assert sock.exists()

        async def unplug() -> dict[str, Any]:
            client = QMPClient("pyvfio-test")
            await client.connect(str(qmp_sock))
            try:
                with client.listener(("DEVICE_DELETED",)) as listener:
                    await client.execute("device_del", {"id": "hot0"})
                    async for event in listener:
                        if event["data"].get("device") == "hot0":
                            return dict(event)
            finally:
                await client.disconnect()
            raise AssertionError("no DEVICE_DELETED")

        deleted = asyncio.run(asyncio.wait_for(unplug(), 300))
        assert deleted["data"]["device"] == "hot0"
        ctl.wait_event("CLIENT_DISCONNECTED", 60, {"id": "hot"})
        assert ctl.execute("device-remove", {"id": "hot"}) == {
            "id": "hot", "disconnected-client": False}
        assert not sock.exists()
        runner.join(600)
        assert "error" not in results, results.get("error")
        result = results["guest"]
        assert result.returncode == 0, result.output + result.console[-3000:]
        assert "edu self-test: ok (10/10 steps passed)" in result.output
        assert f"unplugged: {bdf}" in result.output
        result.cleanup()
    finally:
        ctl.close()
        assert vmm.stop_server(proc) == 0
        runner.join(5)
