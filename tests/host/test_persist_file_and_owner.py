"""The binding file's directory mode, stale temporary files from an
interrupted save (binding file and bind record), the exact message for a file that is not ours, and
``pci_owner`` keeping an address's hex digits lower case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvfio.errors import UsageError
from pyvfio.host.binding import BindState, bind, restore
from pyvfio.host.model import Host
from pyvfio.host.persist import PersistedBindings
from pyvfio.host.usage import pci_owner
from pyvfio.testing.fakesysfs import FakeSysfs

from .conftest import E1000_BRIDGED


def test_the_directory_is_made_rwxr_xr_x_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        config = PersistedBindings(str(tmp_path / "etc" / "pyvfio"))
        config.save([{"device": "0000:06:00.0", "group": False}])
    finally:
        os.umask(old)
    assert os.stat(config.directory).st_mode & 0o7777 == 0o755
    assert os.stat(config.path).st_mode & 0o7777 == 0o644


def test_a_longer_leftover_temporary_file_is_truncated(tmp_path: Path) -> None:
    config = PersistedBindings(str(tmp_path))
    Path(f"{config.path}.tmp.{os.getpid()}").write_text("x" * 10000)  # an interrupted save
    config.save([{"device": "0000:06:00.0", "group": False}])
    assert config.load() == [{"device": "0000:06:00.0", "group": False}]


def test_a_file_that_is_not_ours_says_what_was_expected(tmp_path: Path) -> None:
    config = PersistedBindings(str(tmp_path))
    Path(config.path).write_text('{"version": 1}')
    with pytest.raises(UsageError) as exc:
        config.load()
    assert str(exc.value) == (f"{config.path} is not a pyvfio binding configuration "
                              '(expected {"version": 1, "bindings": [...]})')


def test_pci_owner_is_lower_case() -> None:
    target = "../../devices/pci0000:00/0000:00:1c.0/0000:0a:00.0/net/eth0"
    assert pci_owner(target) == "0000:0a:00.0"
    assert pci_owner("../../devices/virtual/net/lo") is None


def test_a_longer_leftover_bind_record_temporary_is_truncated(fake: FakeSysfs, tmp_path: Path) -> None:
    class Crash(BaseException):
        pass

    class CrashingWriter:
        def write(self, path: str, data: str) -> None:
            if path.endswith("drivers_probe"):
                raise Crash  # the process dies after the first record save
            fake.write(path, data)

    state_dir = str(tmp_path / "state")
    os.makedirs(state_dir)
    Path(BindState(state_dir).path(E1000_BRIDGED) + f".tmp.{os.getpid()}").write_text("x" * 10000)
    with pytest.raises(Crash):
        bind(E1000_BRIDGED, root=fake.root, state_dir=state_dir, host=Host(fake.root, writer=CrashingWriter()))
    record = BindState(state_dir).load(E1000_BRIDGED)
    assert record is not None and record["device"] == E1000_BRIDGED
    restore(E1000_BRIDGED, root=fake.root, state_dir=state_dir)
    assert fake.devices[E1000_BRIDGED].driver == "e1000"
