"""`pyvfio serve` for a root that serves an unprivileged VMM, and for users'
own models; the documented `Server` script shuts down cleanly (issue 14)."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvfio.cli import main
from pyvfio.errors import PeerError
from pyvfio.user.client import connect

DOCS = Path(__file__).resolve().parents[2] / "docs"

MODEL_SOURCE = '''
from pyvfio.devices.model import PciDeviceModel


class Careless(PciDeviceModel):
    """BAR0: offset 0 reads 0x1234abcd; 4 returns None; 8 returns too few bytes."""

    name = "careless"

    def __init__(self):
        super().__init__(vendor_id=0x1B36, device_id=0x0102, class_code=0xFF0000)
        self.add_bar(0, 4096, access=self.registers)

    def registers(self, offset, data, is_write):
        if is_write:
            return None
        if offset == 4:
            return None
        if offset == 8:
            return b"\\x01"
        return (0x1234ABCD).to_bytes(4, "little")[:data]


class NotAModel:
    pass
'''


class Served:
    def __init__(self, proc: subprocess.Popen[str], path: Path) -> None:
        self.proc = proc
        self.path = path

    def stop(self, sig: int = signal.SIGTERM) -> str:
        self.proc.send_signal(sig)
        _out, err = self.proc.communicate(timeout=30)
        return err


def start_serve(*argv: str, path: Path, cwd: Path | None = None) -> Served:
    proc = subprocess.Popen([sys.executable, "-m", "pyvfio", "serve", *argv, "--socket", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1])
        assert time.monotonic() < deadline, "the socket did not appear"
        time.sleep(0.02)
    time.sleep(0.1)  # chown/chmod follow the bind
    return Served(proc, path)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "mymodels.py").write_text(MODEL_SOURCE)
    return tmp_path


def test_socket_mode(sockdir: Path) -> None:
    s = start_serve("edu", "--socket-mode", "0660", path=sockdir / "edu.sock")
    try:
        assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o660
    finally:
        err = s.stop()
    assert s.proc.returncode == 0 and "Traceback" not in err
    assert not s.path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a socket to another user")
def test_socket_owner_lets_that_user_connect(sockdir: Path) -> None:
    """Served by root, owned by nobody (0600 by default): nobody's client
    connects, and the socket is not world-connectable."""
    os.chmod(sockdir, 0o755)
    s = start_serve("edu", "--socket-owner", "nobody", path=sockdir / "edu.sock")
    try:
        st = os.stat(s.path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o600)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
             "-m", "pyvfio", "info", "--vfio-user", str(s.path), "--json"],
            capture_output=True, text=True, timeout=60, cwd="/",
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert proc.returncode == 0, proc.stderr
        assert '"backend": "vfio-user"' in proc.stdout
    finally:
        s.stop()


@pytest.mark.parametrize("argv, message", [
    (["edu", "--socket-mode", "rw"], "not an octal mode: 'rw'"),
    (["edu", "--socket-mode", "1777"], "outside 0000..0777"),
    (["edu", "--socket-owner", "no-such-user-xyz"], "no such user: 'no-such-user-xyz'"),
    (["edu", "--socket-owner", "root:no-such-group-xyz"], "no such group: 'no-such-group-xyz'"),
])
def test_bad_socket_permissions_are_usage_errors(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", *argv, "--socket", "/tmp/never.sock"])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists("/tmp/never.sock")


def test_model_module_class_is_served_and_its_bugs_are_logged(model_dir: Path, sockdir: Path) -> None:
    s = start_serve("--model", "mymodels:Careless", path=sockdir / "c.sock", cwd=model_dir)
    try:
        with connect(str(s.path), timeout=10) as dev:
            assert (dev.config.vendor_id, dev.config.device_id) == (0x1B36, 0x0102)
            bar = dev.bar(0)
            assert bar.read32(0) == 0x1234ABCD
            with pytest.raises(PeerError):
                bar.read32(4)
            with pytest.raises(PeerError):
                bar.read32(8)
            assert bar.read32(0) == 0x1234ABCD  # the connection survives
    finally:
        err = s.stop()
    assert s.proc.returncode == 0, err
    assert f"pyvfio: serving careless on {s.path}" in err
    assert (f"{s.path}: region 0 read callback at offset 0x4 returned NoneType for a 4-byte "
            "read; the client gets EIO") in err
    assert (f"{s.path}: region 0 read callback at offset 0x8 returned 1 bytes for a 4-byte "
            "read; the client gets EIO") in err
    assert "Traceback" not in err


@pytest.mark.parametrize("spec, message", [
    ("nosuchmodule:X", "--model nosuchmodule:X: no module named 'nosuchmodule' on sys.path"),
    ("mymodels:Missing", "--model mymodels:Missing: module mymodels has no 'Missing'"),
    ("mymodels:NotAModel", "--model mymodels:NotAModel: NotAModel is not a PciDeviceModel subclass"),
    ("mymodels", "--model takes MODULE:CLASS (e.g. mymodels:Checksum), not 'mymodels'"),
])
def test_bad_model_spec(capsys, monkeypatch, model_dir: Path, spec: str, message: str) -> None:
    monkeypatch.chdir(model_dir)
    monkeypatch.syspath_prepend(str(model_dir))
    code = main(["serve", "--model", spec, "--socket", "/tmp/never.sock"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pyvfio serve: {message}") and err.count("\n") == 1


def test_model_and_named_model_exclude_each_other(capsys) -> None:
    code = main(["serve", "edu", "--model", "x:Y", "--socket", "/tmp/never.sock"])
    assert code == 2
    assert "name one model: edu or --model x:Y, not both" in capsys.readouterr().err


# --- the documented Server script ------------------------------------------------------------


@pytest.fixture
def docs_script(tmp_path: Path, sockdir: Path) -> Iterator[tuple[Path, Path]]:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```",
                                      (DOCS / "vfio-user.md").read_text(), re.S)
                if "class Checksum" in b]
    assert '"/tmp/checksum.sock"' in block
    path = sockdir / "checksum.sock"
    script = tmp_path / "checksum.py"
    script.write_text(block.replace('"/tmp/checksum.sock"', repr(str(path))))
    yield script, path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_docs_server_script_stops_cleanly(docs_script: tuple[Path, Path], sig: int) -> None:
    script, path = docs_script
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with connect(str(path), timeout=10) as dev:
        assert dev.bar(0).read32(0) == 0xC0FFEE
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == "", (proc.returncode, err)
    assert not path.exists()


def test_serve_refuses_a_symlink_and_a_live_server(capsys, sockdir: Path, edu_socket: str) -> None:
    """serve follows the broker's rules for its socket path (pyvfio.sockets)."""
    link = sockdir / "link.sock"
    link.symlink_to(edu_socket)
    assert main(["serve", "edu", "--socket", str(link)]) == 2
    assert f"refusing to listen at {link}: it is a symlink" in capsys.readouterr().err
    assert main(["serve", "edu", "--socket", edu_socket]) == 2
    assert (capsys.readouterr().err ==
            f"pyvfio serve: another vfio-user server is already listening on {edu_socket}\n")
    assert link.is_symlink() and os.path.exists(edu_socket)
