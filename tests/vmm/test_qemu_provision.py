"""QEMU >= 10.1 provisioning (pyvfio.testing.qemu) and the harness options it serves.

The pure pieces (version parsing, the release table, the private apt source
list, the wrapper) are pinned here; the real proof is the last tests: the
provisioned QEMU reports >= 10.1, knows vfio-user-pci, and boots the guest
harness with caching-mode, shared memfd RAM and a QMP socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pyvfio.errors import UsageError
from pyvfio.testing import guest, qemu

DISTRO_CSV = (
    "version,codename,series,created,release,eol\n"
    "11,Bullseye,bullseye,2019-07-06,2021-08-14,2024-08-14\n"
    "12,Bookworm,bookworm,2021-08-14,2023-06-10,2026-06-10\n"
    "13,Trixie,trixie,2023-06-10,2025-08-09,2028-08-09\n"
)


def test_parse_version_from_qemu_and_from_debian() -> None:
    assert qemu.parse_version("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)\n"
                              "Copyright") == (11, 1, 3)
    assert qemu.parse_version("1:11.1.3+ds-1~bpo13+1") == (11, 1, 3)
    assert qemu.parse_version("1:7.2+dfsg-7+deb12u18+b3") == (7, 2)
    assert qemu.parse_version("10.0.13+ds-0+deb13u1") == (10, 0, 13)
    assert qemu.parse_version("garbage") is None
    assert (qemu.parse_version("1:10.0.13+ds-0") or ()) < qemu.MIN_VERSION
    assert (qemu.parse_version("1:10.1.0+ds-1") or ()) >= qemu.MIN_VERSION


def test_releases_to_try_are_this_one_then_the_next(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "debian.csv"
    table.write_text(DISTRO_CSV)
    monkeypatch.delenv("PYVFIO_QEMU_RELEASE", raising=False)
    today = "2026-01-01"
    assert qemu.releases_to_try("bookworm", table, today) == ["bookworm", "trixie"]
    assert qemu.releases_to_try("trixie", table, today) == ["trixie"]  # nothing after it
    # A release not out yet (its date in the future) has no archive to take from.
    assert qemu.releases_to_try("bookworm", table, "2025-01-01") == ["bookworm"]
    with pytest.raises(qemu.QemuProvisionError, match=r"does not list .*'sid'"):
        qemu.releases_to_try("sid", table, today)
    with pytest.raises(qemu.QemuProvisionError, match="install distro-info-data"):
        qemu.releases_to_try("bookworm", tmp_path / "missing.csv")
    monkeypatch.setenv("PYVFIO_QEMU_RELEASE", "forky")
    assert qemu.releases_to_try("bookworm", table) == ["forky"]
    monkeypatch.setenv("PYVFIO_QEMU_RELEASE", "forky; rm -rf /")
    with pytest.raises(qemu.QemuProvisionError, match="give a Debian codename"):
        qemu.releases_to_try("bookworm", table)


def test_private_sources_name_the_given_archive_and_both_suites() -> None:
    text = qemu.private_sources_text("http://archive.invalid/debian", "trixie", "/k.gpg")
    lines = text.splitlines()
    assert [line.split()[-2] for line in lines] == ["trixie", "trixie-backports"]
    assert all(line.startswith("deb [signed-by=/k.gpg] http://archive.invalid/debian ")
               for line in lines)


def test_wrapper_runs_its_argv_with_its_env(tmp_path: Path) -> None:
    script = tmp_path / "w"
    script.write_text(qemu.wrapper_text(["/bin/sh", "-c", 'echo "$QEMU_MODULE_DIR|$0|$1"'],
                                        {"QEMU_MODULE_DIR": "/x y"}, "test"))
    script.chmod(0o755)
    out = subprocess.run([str(script), "a b"], capture_output=True, text=True, check=True)
    assert out.stdout == "/x y|a b|\n"  # "$@" passed through, spaces kept


def test_incomplete_or_stale_cache_folders_are_not_used(tmp_path: Path) -> None:
    folder = tmp_path / "qemu" / "11.1.3+ds-1"
    (folder / "tree").mkdir(parents=True)
    assert qemu.load_cached(folder) is None  # no manifest: an interrupted provisioning
    (folder / qemu.WRAPPER).write_text("#!/bin/sh\n")
    manifest = {"recipe": qemu.RECIPE_VERSION, "version": "11.1.3",
                "package_version": "1:11.1.3+ds-1", "suite": "trixie-backports"}
    (folder / qemu.MANIFEST).write_text(json.dumps({**manifest, "recipe": -1}))
    assert qemu.load_cached(folder) is None  # another recipe
    (folder / qemu.MANIFEST).write_text(json.dumps(manifest))
    found = qemu.load_cached(folder)
    assert found is not None and found.command == str(folder / qemu.WRAPPER)
    assert qemu.cached_qemus(tmp_path) == [found]
    old = tmp_path / "qemu" / "10.0.13"
    (old / "tree").mkdir(parents=True)
    (old / qemu.WRAPPER).write_text("")
    (old / qemu.MANIFEST).write_text(json.dumps({**manifest, "version": "10.0.13"}))
    assert qemu.cached_qemus(tmp_path) == [found]  # below 10.1: never offered


def test_guest_qemu_options_reach_the_command_line(tmp_path: Path) -> None:
    kernel = guest.Kernel("k", tmp_path / "bzImage")
    vm = guest.Guest(kernel, ["-device", "edu"], qemu=["/q/ld.so", "/q/qemu"],
                     iommu_caching_mode=True, memory_backend="memfd", memory_mib=512,
                     qmp=tmp_path / "qmp.sock")
    argv = vm.qemu_argv(tmp_path / "initrd", tmp_path, "tcg", pycache=tmp_path)
    assert argv[:2] == ["/q/ld.so", "/q/qemu"]
    assert "intel-iommu,intremap=on,caching-mode=on" in argv
    obj = argv[argv.index("-object") + 1]
    assert obj == "memory-backend-memfd,id=pyvfio-ram,size=512M,share=on"
    assert "memory-backend=pyvfio-ram" in argv
    assert argv[argv.index("-qmp") + 1] == f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off"
    assert argv[-2:] == ["-device", "edu"]
    plain = guest.Guest(kernel).qemu_argv(tmp_path / "initrd", tmp_path, "tcg", pycache=tmp_path)
    assert "-object" not in plain and "-qmp" not in plain
    assert "intel-iommu,intremap=on" in plain
    with pytest.raises(UsageError, match="memory_backend 'file'"):
        guest.Guest(kernel, memory_backend="file")
    with pytest.raises(UsageError, match="empty command"):
        guest.Guest(kernel, qemu=[])


# --- the real thing --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provisioned() -> qemu.Qemu:
    return qemu.ensure_qemu(log=False)


def test_provisioned_qemu_is_new_enough_and_has_vfio_user_pci(provisioned: qemu.Qemu) -> None:
    assert qemu.reported_version([provisioned.command]) == qemu.parse_version(provisioned.version)
    assert (qemu.parse_version(provisioned.version) or ()) >= qemu.MIN_VERSION
    assert qemu.has_vfio_user_pci([provisioned.command])
    # The argv form without the wrapper is the same QEMU.
    assert qemu.reported_version(provisioned.argv, provisioned.env) == qemu.parse_version(
        provisioned.version)
    # Cached: a second call answers from the cache, without apt.
    assert qemu.ensure_qemu(log=False) == provisioned


def test_cli_prints_the_same_qemu(provisioned: qemu.Qemu) -> None:
    out = subprocess.run([sys.executable, "-m", "pyvfio", "guest-qemu", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    data = json.loads(out.stdout)
    assert data["command"] == provisioned.command and data["version"] == provisioned.version


def test_guest_boots_on_it_with_memfd_ram_caching_mode_and_qmp(provisioned: qemu.Qemu,
                                                               tmp_path: Path) -> None:
    from qemu.qmp import QMPClient  # the test extra

    sock = tmp_path / "qmp.sock"
    vm = guest.Guest(guest.kernel_by_name("debian"), qemu=provisioned.command,
                     iommu_caching_mode=True, memory_backend="memfd", qmp=sock, smp=1)
    answers: dict[str, object] = {}

    def ask_qmp() -> None:
        import asyncio

        async def talk() -> None:
            client = QMPClient("test")
            for _ in range(600):
                if sock.exists():
                    break
                await asyncio.sleep(0.05)
            await client.connect(str(sock))
            answers["version"] = await client.execute("query-version")
            answers["memdev"] = await client.execute("query-memdev")
            await client.disconnect()

        asyncio.run(talk())

    # The command waits until QMP has answered, so QEMU is surely still up.
    talker = threading.Thread(target=ask_qmp)
    talker.start()
    result = vm.run(["sh", "-c", "sleep 3; cat /proc/cmdline"], timeout=300)
    talker.join(timeout=60)
    try:
        assert result.returncode == 0, result.console[-2000:]
        assert "intel_iommu=on" in result.output
        assert "caching-mode=on" in " ".join(result.qemu_argv)
        version = answers["version"]
        assert isinstance(version, dict)
        assert (version["qemu"]["major"], version["qemu"]["minor"]) >= qemu.MIN_VERSION
        memdev = answers["memdev"]
        assert isinstance(memdev, list) and memdev[0]["share"] is True
    finally:
        result.cleanup()
