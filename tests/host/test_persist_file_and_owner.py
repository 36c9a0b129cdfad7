"""The binding file's directory mode, a stale temporary file from an
interrupted save, the exact message for a file that is not ours, and
``pci_owner`` keeping an address's hex digits lower case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvfio.errors import UsageError
from pyvfio.host.persist import PersistedBindings
from pyvfio.host.usage import pci_owner


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
