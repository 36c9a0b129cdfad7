"""The Python API as a driver writer meets it: errors name the device and the
region, reprs say what an object is, the edu driver on a device that is not
an edu says so, and ``pyvfio info`` reads right."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from pyvfio.cli import main
from pyvfio.device import DmaBuffer, IrqIndex
from pyvfio.devices.model import PciDeviceModel
from pyvfio.drivers import edu as edu_driver
from pyvfio.errors import ClosedError, UsageError
from pyvfio.user.client import connect


def test_out_of_range_access_names_device_and_region(edu_socket: str) -> None:
    with connect(edu_socket) as dev:
        bar0 = dev.bar(0)
        with pytest.raises(UsageError) as exc:
            bar0.read32(0x100000)
        assert str(exc.value) == (f"{edu_socket}: 4-byte access at 0x100000 is outside region 0 "
                                  "(BAR0), which is 0x100000 bytes")
        with pytest.raises(UsageError, match=r"outside region 0 \(BAR0\)"):
            bar0.read(0xFFFFF, 2)  # the generic (non-fast-path) accessor says the same
        with pytest.raises(UsageError, match=r"outside region 7 \(CONFIG\), which is 0x100"):
            dev.region(7).write16(0xFF, 0)


def test_unimplemented_bar_says_so(edu_socket: str) -> None:
    with connect(edu_socket) as dev, pytest.raises(UsageError) as exc:
        dev.bar(1).read32(0)
    assert str(exc.value) == (f"{edu_socket}: region 1 (BAR1) is not implemented (size 0); "
                              "`pyvfio info` lists the regions the device has")


def test_reprs(edu_socket: str) -> None:
    with connect(edu_socket) as dev:
        assert repr(dev) == f"<VfioUserDevice {edu_socket} (vfio-user)>"
        assert repr(dev.config) == f"<ConfigSpace of {edu_socket} (0x100 bytes)>"
        assert repr(dev.bar(0)).startswith("<Region BAR0 size=0x100000 ")
        assert repr(dev.dma) == (f"<VfioUserDmaSpace of {edu_socket}: 0 mapping(s), "
                                 "fds shared>")
        buf = dev.dma_alloc(4096)
        assert repr(buf) == f"<DmaBuffer iova={buf.iova:#x} size=0x1000>"
        assert "1 mapping(s)" in repr(dev.dma)
        (irq,) = dev.enable_irq(IrqIndex.MSI)
        assert repr(irq) == f"<EventFd fd={irq.fd}>"
    assert repr(dev) == f"<VfioUserDevice {edu_socket} (closed)>"
    assert repr(buf).endswith(" closed>")
    assert repr(irq) == "<EventFd closed>"


def test_dma_buffer_after_close_and_out_of_bounds(edu_socket: str) -> None:
    with connect(edu_socket) as dev:
        buf: DmaBuffer = dev.dma_alloc(4096)
        with pytest.raises(UsageError, match="overruns <DmaBuffer"):
            buf.write(b"x" * 8, 4092)
        with pytest.raises(UsageError, match="is outside <DmaBuffer"):
            buf.read(4000, 200)
        buf.write(b"abcd", 4092)
        assert buf.read(4092, 4) == b"abcd"
        buf.close()
        with pytest.raises(ClosedError, match=r"<DmaBuffer iova=0x[0-9a-f]+ size=0x1000 closed> "
                                              r"is closed \(unmapped and freed\)"):
            buf.read(0, 4)
        with pytest.raises(ClosedError):
            buf.write(b"late")


def test_closed_device_says_so(edu_socket: str) -> None:
    dev = connect(edu_socket)
    bar0 = dev.bar(0)
    dev.close()
    with pytest.raises(ClosedError, match=f"{edu_socket} is closed"):
        bar0.read32(0)


class NotAnEdu(PciDeviceModel):
    name = "not-edu"

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1B36, device_id=0x0101, class_code=0xFF0000, intx=True)
        self.add_bar(0, 4096, access=lambda off, data, is_write: None if is_write else
                     bytes(data))


def test_edu_driver_on_another_device(serve: Callable[[PciDeviceModel], str], capsys) -> None:
    path = serve(NotAnEdu())
    assert edu_driver.main(["--vfio-user", path, "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert result["steps"] == [{
        "step": "identify", "ok": False, "seconds": 0.0,
        "detail": f"EduError: {path} is 1b36:0101, not an edu device (1234:11e8)"}]
    assert edu_driver.main(["--vfio-user", path]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] identify" in out and "edu self-test: FAILED (0/1 steps passed)" in out


def test_info_table_over_vfio_user(edu_socket: str, capsys) -> None:
    assert main(["info", "--vfio-user", edu_socket]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"device   {edu_socket}"
    assert lines[1].startswith("backend  vfio-user (vfio-user server at ")
    assert lines[2].startswith("ids      1234:11e8 ")
    assert any(line.split()[:3] == ["0", "BAR0", "0x100000"] for line in lines)
    assert any(line.split()[:3] == ["1", "MSI", "1"] for line in lines)


def test_info_json_over_vfio_user(edu_socket: str, capsys) -> None:
    assert main(["info", "--vfio-user", edu_socket, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == "vfio-user" and data["ids"]["device"] == "11e8"
    assert [r["index"] for r in data["regions"] if r["size"]] == [0, 7]
