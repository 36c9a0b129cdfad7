"""Host-side tests of the guest harness: the initramfs, module ordering, the
KVM verdict cache, the QEMU command line and the run script.

The harness's real proof is the guest suite (tests/guest), which boots it;
these pin the pieces that a boot would only show indirectly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvfio.errors import UsageError
from pyvfio.testing import debian, guest, initramfs, kernel, pytest_guest, topology


def _debian_module_tree() -> Path | None:
    """The module tree of Debian's kernel here (6.1 on Debian 12, 6.12 on 13), or None.
    ``depends=""``: found by looking, without asking dpkg or installing anything."""
    try:
        return guest.debian_kernel(depends="").modules_dir
    except guest.GuestError:
        return None


DEBIAN_MODULE_TREE = _debian_module_tree()
NO_DEBIAN_MODULES = "Debian's kernel and its module tree are not installed"


def builtin_modules(tree: Path) -> set[str]:
    """Module names the kernel has built in (``modules.builtin``): nothing to load."""
    path = tree / "modules.builtin"
    lines = path.read_text().split() if path.is_file() else []
    return {initramfs.module_name(line) for line in lines}


# --- cpio ----------------------------------------------------------------------------------


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """A reader written from the format description, independent of the writer."""
    members: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        assert data_start % 4 == 0
        body = data[data_start:data_start + size]
        pos = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            assert pos == len(data)
            return members
        members.append((name, mode, body, rdev))


def test_cpio_newc_round_trip() -> None:
    entries = [
        initramfs.CpioEntry("dev", 0o040755),
        initramfs.CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        initramfs.CpioEntry("init", 0o100755, b"#!/bin/sh\n"),
        initramfs.CpioEntry("odd", 0o100644, b"x" * 5),  # forces padding
    ]
    archive = initramfs.cpio_newc(entries)
    assert parse_newc(archive) == [(e.name, e.mode, e.data, e.rdev) for e in entries]
    assert initramfs.cpio_newc(entries) == archive  # deterministic


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is not installed")
def test_cpio_tool_reads_our_archive(tmp_path: Path) -> None:
    archive = initramfs.cpio_newc([
        initramfs.CpioEntry("bin", 0o040755),
        initramfs.CpioEntry("bin/hello", 0o100755, b"hello world\n"),
        initramfs.CpioEntry("dev", 0o040755),
        initramfs.CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
    ])
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=archive, capture_output=True,
                             check=True).stdout.decode()
    lines = listing.splitlines()
    assert [line.split()[-1] for line in lines] == ["bin", "bin/hello", "dev", "dev/console"]
    assert lines[1].startswith("-rwxr-xr-x") and lines[3].startswith("crw-------")
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames", "bin/hello"],
                   input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "bin/hello").read_bytes() == b"hello world\n"


# --- modules -------------------------------------------------------------------------------


def test_module_name_uses_the_kernels_spelling() -> None:
    assert initramfs.module_name("kernel/drivers/vfio/pci/vfio-pci.ko") == "vfio_pci"
    assert initramfs.module_name("kernel/net/9p/9pnet_virtio.ko.xz") == "9pnet_virtio"


def test_resolve_modules_puts_dependencies_first_and_skips_unknown() -> None:
    table = initramfs.parse_modules_dep(
        "k/a.ko: k/b.ko k/c.ko\n"
        "k/b.ko: k/c.ko\n"
        "k/c.ko:\n"
        "k/d-e.ko: k/c.ko\n"
    )
    order = initramfs.resolve_modules(table, ["a", "not_there", "d-e", "c"])
    assert order == ["k/c.ko", "k/b.ko", "k/a.ko", "k/d-e.ko"]


@pytest.mark.skipif(DEBIAN_MODULE_TREE is None, reason=NO_DEBIAN_MODULES)
def test_resolve_modules_on_debians_tree() -> None:
    assert DEBIAN_MODULE_TREE is not None
    table = initramfs.parse_modules_dep((DEBIAN_MODULE_TREE / "modules.dep").read_text())
    builtin = builtin_modules(DEBIAN_MODULE_TREE)
    names = [initramfs.module_name(p) for p in
             initramfs.resolve_modules(table, initramfs.GUEST_MODULES)]
    # Dependencies first, for the pairs this kernel builds as modules (trixie builds
    # virtio_pci and virtio_ring in; bookworm has them as modules).
    for before, after in [("irqbypass", "vfio_pci_core"), ("vfio", "vfio_iommu_type1"),
                          ("vfio_pci_core", "vfio_pci"), ("9pnet", "9pnet_virtio"),
                          ("netfs", "9p"), ("virtio_ring", "virtio_pci")]:
        if after in builtin:
            assert after not in names, f"{after} is built in: nothing to insmod"
        elif before in builtin or before not in table:
            assert after in names, after  # its dependency is built in, or gone in this release
        else:
            assert names.index(before) < names.index(after), (before, after)
    assert len(names) == len(set(names))
    # Every module the guest needs is loaded or built in.
    for needed in ("e1000", "e1000e", "9p", "9pnet_virtio", "virtio_pci", "vfio", "vfio_pci",
                   "vfio_iommu_type1", "virtio_rng", "virtio_blk", "ext4"):
        assert needed in names or needed in builtin, needed


# --- the image and its cache ---------------------------------------------------------------


def test_initramfs_is_cached_by_content(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF not really busybox")
    first = initramfs.build_initramfs(None, busybox=busybox, cache=tmp_path / "cache")
    mtime = first.stat().st_mtime_ns
    again = initramfs.build_initramfs(None, busybox=busybox, cache=tmp_path / "cache")
    assert again == first and again.stat().st_mtime_ns == mtime  # not rewritten
    busybox.write_bytes(b"\x7fELF another busybox")
    changed = initramfs.build_initramfs(None, busybox=busybox, cache=tmp_path / "cache")
    assert changed != first
    members = {m[0]: m for m in parse_newc(changed.read_bytes())}
    assert members["bin/busybox"][2] == b"\x7fELF another busybox"
    assert members["init"][2].decode() == initramfs.INIT_SCRIPT
    assert members["etc/pyvfio-modules"][2] == b""  # all built in: nothing to insmod
    assert members["dev/console"][1:] == (0o020600, b"", (5, 1))


@pytest.mark.skipif(DEBIAN_MODULE_TREE is None, reason=NO_DEBIAN_MODULES)
def test_initramfs_carries_modules_in_load_order(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"bb")
    image = initramfs.build_initramfs(DEBIAN_MODULE_TREE, busybox=busybox,
                                      cache=tmp_path)
    members = {m[0]: m for m in parse_newc(image.read_bytes())}
    load = [line.split() for line in members["etc/pyvfio-modules"][2].decode().splitlines()]
    for file, name in load:
        assert members[f"lib/modules/{file}"][2][:4] == b"\x7fELF", file
        assert file == name + ".ko"
    names = [name for _, name in load]
    assert names.index("vfio") < names.index("vfio_pci")


def test_initramfs_without_busybox_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(initramfs.InitramfsError, match="busybox-static"):
        initramfs.build_initramfs(None, busybox=tmp_path / "nope", cache=tmp_path)


# --- the accelerator verdict ---------------------------------------------------------------


@pytest.fixture
def fresh_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "_accel_verdict", None)
    monkeypatch.delenv("PYVFIO_GUEST_ACCEL", raising=False)
    # /dev/kvm accessibility is the host's; pretend it is there so the cache is consulted.
    real_access = os.access
    monkeypatch.setattr(guest.os, "access",
                        lambda p, m: True if p == "/dev/kvm" else real_access(p, m))
    monkeypatch.setattr(guest, "kvm_is_pvm", lambda: False)


def test_kvm_verdict_is_probed_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_verdict: None
) -> None:
    probes = []

    def probe(qemu: str, *, timeout: float) -> tuple[str, str]:
        probes.append(qemu)
        return "tcg", "KVM boot failed: hung"

    monkeypatch.setattr(guest, "probe_kvm", probe)
    assert guest.choose_accel(cache=tmp_path) == "tcg"
    saved = json.loads((tmp_path / "accel.json").read_text())
    assert saved["accel"] == "tcg" and saved["key"] == guest.kvm_probe_key()
    assert saved["detail"] == "KVM boot failed: hung"
    monkeypatch.setattr(guest, "_accel_verdict", None)  # a new process
    assert guest.choose_accel(cache=tmp_path) == "tcg"
    assert len(probes) == 1


def test_kvm_verdict_is_reprobed_when_the_host_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_verdict: None
) -> None:
    (tmp_path / "accel.json").write_text(json.dumps({"key": "old kernel | old qemu",
                                                     "accel": "tcg"}))
    monkeypatch.setattr(guest, "probe_kvm", lambda qemu, *, timeout: ("kvm", "ran"))
    assert guest.choose_accel(cache=tmp_path) == "kvm"
    assert json.loads((tmp_path / "accel.json").read_text())["accel"] == "kvm"


def test_pvm_is_told_from_hardware_kvm(tmp_path: Path) -> None:
    (tmp_path / "kvm").mkdir()
    assert not guest.kvm_is_pvm(tmp_path)
    (tmp_path / "kvm_pvm").mkdir()
    assert guest.kvm_is_pvm(tmp_path)
    (tmp_path / "kvm_amd").mkdir()  # hardware KVM loaded too: a stock guest may run
    assert not guest.kvm_is_pvm(tmp_path)


def test_pvm_means_tcg_without_a_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_verdict: None
) -> None:
    monkeypatch.setattr(guest, "kvm_is_pvm", lambda: True)
    monkeypatch.setattr(guest, "probe_kvm", lambda *a, **k: pytest.fail("probed"))
    assert guest.choose_accel(cache=tmp_path) == "tcg"


def test_accel_can_be_forced_and_is_validated(
    monkeypatch: pytest.MonkeyPatch, fresh_verdict: None
) -> None:
    monkeypatch.setattr(guest, "probe_kvm", lambda *a, **k: pytest.fail("probed"))
    monkeypatch.setenv("PYVFIO_GUEST_ACCEL", "tcg")
    assert guest.choose_accel() == "tcg"
    monkeypatch.setenv("PYVFIO_GUEST_ACCEL", "hvf")
    with pytest.raises(UsageError, match="hvf"):
        guest.choose_accel()


# --- the QEMU command line -----------------------------------------------------------------

KERNEL = guest.Kernel("test", Path("/boot/vmlinuz-test"))


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_qemu_argv_with_iommu_and_standard_topology(tmp_path: Path) -> None:
    vm = guest.Guest(KERNEL, topology.standard(), cmdline_extra=["foo=1"], memory_mib=1536)
    argv = vm.qemu_argv(tmp_path / "initrd", tmp_path / "run", "tcg", pycache=tmp_path / "pyc")
    assert option_values(argv, "-machine") == ["q35,kernel-irqchip=split"]
    assert option_values(argv, "-accel") == ["tcg,thread=single"] and option_values(argv, "-cpu") == ["max"]
    assert option_values(argv, "-m") == ["1536"]
    append = option_values(argv, "-append")[0].split()
    assert "intel_iommu=on" in append and append[-1] == "foo=1" and "console=ttyS0" in append
    devices = option_values(argv, "-device")
    assert devices[0] == "intel-iommu,intremap=on"  # before every PCI device
    assert "edu,id=edu,bus=pcie.0,addr=0x3" in devices
    fsdevs = option_values(argv, "-fsdev")
    assert any(f.startswith("local,") and "path=/," in f and "readonly=on" in f for f in fsdevs)
    assert any(f"path={tmp_path / 'run'}," in f and "readonly" not in f for f in fsdevs)
    assert any(f"path={tmp_path / 'pyc'}," in f for f in fsdevs)
    tags = [d.split("mount_tag=")[1].split(",")[0] for d in devices if "mount_tag=" in d]
    assert tags == [initramfs.HOSTROOT_TAG, initramfs.RUN_TAG, initramfs.PYCACHE_TAG]


def test_qemu_argv_without_iommu(tmp_path: Path) -> None:
    vm = guest.Guest(KERNEL, iommu=False, cmdline_extra=["vfio.enable_unsafe_noiommu_mode=1"])
    argv = vm.qemu_argv(tmp_path, tmp_path, "kvm", pycache=tmp_path)
    assert option_values(argv, "-machine") == ["q35"]
    assert option_values(argv, "-cpu") == ["host"]
    assert not any("intel-iommu" in d for d in option_values(argv, "-device"))
    assert "intel_iommu=on" not in vm.cmdline()


def test_topology_addresses_leave_the_harness_slots_free() -> None:
    args = topology.standard()
    root_bus_slots = {int(a.split("addr=")[1].split(",")[0], 16) for a in args
                      if "bus=pcie.0" in a and "addr=" in a}
    assert root_bus_slots == {0x3, 0x4, 0x5}
    assert not root_bus_slots & set(guest.HARNESS_SLOTS)
    assert topology.by_name("none") == []
    with pytest.raises(UsageError, match="standard"):
        topology.by_name("huge")


def test_guest_rejects_bad_parameters() -> None:
    with pytest.raises(UsageError, match="256 MiB"):
        guest.Guest(KERNEL, memory_mib=64)
    with pytest.raises(UsageError, match="accel"):
        guest.Guest(KERNEL, accel="xen")
    with pytest.raises(UsageError, match="no command"):
        guest.Guest(KERNEL).run([])
    with pytest.raises(UsageError, match="mounts its own /proc"):
        guest.Guest(KERNEL).run(["true"], cwd="/proc/somewhere")


def test_run_script_passes_argv_and_env_exactly(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import os, sys; print(repr(sys.argv[1:]), os.getcwd(), "
            "os.environ['ODD'])", "two words", "it's", '"q"', "$HOME", ""]
    script = guest.Guest(KERNEL).run_script(argv, tmp_path, {"ODD": "a 'b' $c"})
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                         check=True).stdout
    expected_args = ["two words", "it's", '"q"', "$HOME", ""]
    assert out == f"{expected_args!r} {tmp_path} a 'b' $c\n"


def test_run_script_reports_a_missing_directory() -> None:
    script = guest.Guest(KERNEL).run_script(["true"], Path("/nonexistent/dir"), {})
    assert subprocess.run(["/bin/sh", "-c", script], capture_output=True).returncode == 125


# --- failing runs (real QEMU, no boot needed) ----------------------------------------------


@pytest.mark.skipif(shutil.which(guest.QEMU) is None, reason="QEMU is not installed")
def test_a_kernel_qemu_cannot_load_is_a_guest_error(tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinuz-bogus"
    bogus.write_bytes(b"not a kernel")
    vm = guest.Guest(guest.Kernel("bogus", bogus), accel="tcg")
    with pytest.raises(guest.GuestError, match="did not get to run the command") as info:
        vm.run(["true"], timeout=60, run_dir=tmp_path / "run")
    assert "QEMU exited 1" in str(info.value)


@pytest.mark.skipif(shutil.which(guest.QEMU) is None, reason="QEMU is not installed")
def test_a_working_directory_under_tmp_is_visible_in_the_guest(tmp_path: Path) -> None:
    # CI clones the checkout under /tmp, which the guest covers with its own tmpfs.
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "marker").write_text("from the host\n")
    vm = guest.Guest(guest.debian_kernel(), iommu=False)
    result = vm.run(["sh", "-c", "pwd; cat marker; touch x || echo read-only"], cwd=work,
                    timeout=240)
    result.cleanup()
    assert result.returncode == 0, result.output
    assert f"{work}\nfrom the host\n" in result.output
    assert "read-only" in result.output  # the host root stays read-only in the guest


# --- pytest integration pieces -------------------------------------------------------------


def test_read_results_ignores_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"nodeid": "t.py::a[debian]", "outcome": "passed"}) + "\n"
                    + '{"nodeid": "t.py::b[deb')
    assert list(pytest_guest.read_results(path)) == ["t.py::a[debian]"]
    assert pytest_guest.read_results(tmp_path / "missing.jsonl") == {}


def test_guest_configs() -> None:
    noiommu = pytest_guest.GUEST_CONFIGS["noiommu"]
    assert not noiommu.iommu and "vfio.enable_unsafe_noiommu_mode=1" in noiommu.cmdline_extra
    assert pytest_guest.GUEST_CONFIGS["default"].iommu


# --- apt configuration ---------------------------------------------------------------------


def test_archive_uri_from_deb822_skips_security(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    uri = debian.debian_archive_uri(tmp_path, tmp_path / "sources.list", codename="bookworm")
    assert uri == "http://mirror.example/debian"


def test_archive_uri_from_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "deb [signed-by=/k.gpg] http://m.example/debian bookworm main\n")
    assert debian.debian_archive_uri(tmp_path, tmp_path / "sources.list",
                                     codename="bookworm") == "http://m.example/debian"
    with pytest.raises(debian.PackageError, match="no apt source carries the bookworm suite"):
        debian.debian_archive_uri(tmp_path / "empty", tmp_path / "none.list", codename="bookworm")


def test_backports_stanza_names_no_host_of_its_own() -> None:
    text = debian.backports_sources_text("http://m.example/debian", "bookworm")
    assert "URIs: http://m.example/debian\n" in text
    assert "Suites: bookworm-backports\n" in text


# --- the pyvfio-6.12 kernel's configuration checks -----------------------------------------


def test_fragment_options_are_parsed() -> None:
    options = kernel.requested_options(
        "# comment\nCONFIG_VFIO=y\n\n# CONFIG_MODULES is not set\nCONFIG_NR_CPUS=4\n")
    assert options == {"CONFIG_VFIO": "y", "CONFIG_MODULES": "n", "CONFIG_NR_CPUS": "4"}


def test_the_shipped_fragment_asks_for_what_issue_6_lists() -> None:
    options = kernel.requested_options(kernel.CONFIG_FRAGMENT.read_text())
    for name in ("IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_TEST", "VFIO_NOIOMMU", "VFIO_CONTAINER",
                 "VFIO_PCI", "SAMPLE_VFIO_MDEV_MTTY", "INTEL_IOMMU", "IRQ_REMAP", "9P_FS",
                 "NET_9P_VIRTIO", "E1000", "E1000E", "DEVTMPFS", "TMPFS", "EVENTFD", "UNIX"):
        assert options[f"CONFIG_{name}"] == "y", name
    assert all(v == "y" for v in options.values())


def test_options_that_did_not_stick_are_named() -> None:
    requested = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "n", "CONFIG_D": "y"}
    final = kernel.config_values("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_D is not set\n")
    assert kernel.options_that_did_not_stick(requested, final) == [
        "CONFIG_B=y requested, .config has CONFIG_B=m",
        "CONFIG_D=y requested, .config has CONFIG_D=n",
    ]
    final["CONFIG_B"] = final["CONFIG_D"] = "y"
    assert kernel.options_that_did_not_stick(requested, final) == []


def test_kernel_cache_key_follows_version_and_options() -> None:
    key = kernel.cache_key("6.12.95-1~bpo12+1", "CONFIG_VFIO=y\n")
    assert key == kernel.cache_key("6.12.95-1~bpo12+1", "CONFIG_VFIO=y\n")
    assert key != kernel.cache_key("6.12.96-1~bpo12+1", "CONFIG_VFIO=y\n")
    assert key != kernel.cache_key("6.12.95-1~bpo12+1", "CONFIG_VFIO=y\nCONFIG_E1000=y\n")


# --- finding Debian's kernel (Debian 12's 6.1, Debian 13's 6.12) ---------------------------


def fake_kernel_tree(root: Path, releases: list[str], *, modules: list[str] | None = None,
                     usr: bool = False) -> tuple[Path, Path]:
    """``root/boot/vmlinuz-R`` (+ config-R) for each release, module trees for
    ``modules`` (default: all) under ``root/lib/modules`` or ``root/usr/lib/modules``."""
    boot = root / "boot"
    mods = root / ("usr/lib/modules" if usr else "lib/modules")
    boot.mkdir(parents=True)
    for release in releases:
        (boot / f"vmlinuz-{release}").write_bytes(b"kernel")
        (boot / f"config-{release}").write_text("CONFIG_VFIO=m\n")
    for release in releases if modules is None else modules:
        (mods / release).mkdir(parents=True)
        (mods / release / "modules.dep").write_text("")
    return boot, mods


BOOKWORM = "linux-image-6.1.0-57-amd64 (= 6.1.192-3)"
TRIXIE = "linux-image-6.12.48+deb13-amd64 (= 6.12.48-1)"


def test_releases_from_the_metapackages_depends() -> None:
    assert debian.releases_from_depends(BOOKWORM) == ["6.1.0-57-amd64"]
    assert debian.releases_from_depends(TRIXIE) == ["6.12.48+deb13-amd64"]
    assert debian.releases_from_depends(
        "linux-image-6.12.48+deb13-amd64 (= 6.12.48-1) | linux-image-6.12.48+deb13-amd64-unsigned"
        " (= 6.12.48-1), initramfs-tools") == ["6.12.48+deb13-amd64"]
    assert debian.releases_from_depends("") == []


@pytest.mark.parametrize("depends, newest", [(BOOKWORM, "6.1.0-57-amd64"),
                                              (TRIXIE, "6.12.48+deb13-amd64")])
def test_debian_kernel_is_what_linux_image_amd64_depends_on(
        tmp_path: Path, depends: str, newest: str) -> None:
    # An older and a newer kernel beside the one the metapackage names.
    boot, mods = fake_kernel_tree(tmp_path, [newest, "6.1.0-9-amd64", "6.19.1-custom"])
    k = guest.debian_kernel(boot, mods, depends=depends)
    assert (k.name, k.image, k.modules_dir, k.config) == (
        "debian", boot / f"vmlinuz-{newest}", mods / newest, boot / f"config-{newest}")


def test_debian_kernel_falls_back_to_the_newest_with_a_module_tree(tmp_path: Path) -> None:
    boot, mods = fake_kernel_tree(
        tmp_path, ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.12.48+deb13-amd64", "6.19.1-nomods"],
        modules=["6.1.0-9-amd64", "6.1.0-57-amd64", "6.12.48+deb13-amd64"])
    # The metapackage names a kernel that is not there (removed by hand): newest with modules.
    k = guest.debian_kernel(boot, mods, depends="linux-image-6.1.0-99-amd64")
    assert k.image == boot / "vmlinuz-6.12.48+deb13-amd64" and k.modules_dir is not None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(guest.GuestError, match=r"no Debian kernel.*install linux-image-amd64"):
        guest.debian_kernel(empty, empty, depends="")


def test_this_machines_debian_kernel_has_a_module_tree_and_config() -> None:
    try:
        k = guest.debian_kernel()
    except (guest.GuestError, debian.PackageError) as exc:
        pytest.skip(f"no Debian kernel here: {exc}")
    assert k.image.is_file() and k.modules_dir is not None
    assert (k.modules_dir / "modules.dep").is_file()
    assert k.config is not None and "CONFIG_VFIO=" in k.config.read_text()


def test_a_kernel_unpacked_with_dpkg_x_finds_its_own_modules_and_config(tmp_path: Path) -> None:
    release = "6.12.48+deb13-amd64"
    boot, mods = fake_kernel_tree(tmp_path / "tree", [release], usr=True)
    k = guest.kernel_by_name(str(boot / f"vmlinuz-{release}"))
    assert k.name == f"vmlinuz-{release}"
    assert k.modules_dir == mods / release and k.config == boot / f"config-{release}"
    bare = tmp_path / "bzImage"
    bare.write_bytes(b"k")
    assert guest.kernel_by_name(str(bare)) == guest.Kernel("bzImage", bare, None, None)
    with pytest.raises(UsageError, match="unknown kernel"):
        guest.kernel_by_name(str(tmp_path / "missing"))


def test_the_guests_python_is_the_venvs_not_its_base_interpreter() -> None:
    # A venv's bin/python links to the base interpreter; the guest must run the
    # venv (its packages, its pyvenv.cfg), so PATH starts with the venv's bin.
    first = guest._BASE_ENV["PATH"].split(":")[0]
    assert first == os.path.dirname(os.path.abspath(sys.executable))
    if sys.prefix != sys.base_prefix:
        assert Path(first, "python").exists() and Path(first).parent == Path(sys.prefix)


def test_the_kernel_config_travels_to_the_guest(tmp_path: Path) -> None:
    config = tmp_path / "config-x"
    config.write_text("CONFIG_IOMMUFD=y\n")
    bogus = tmp_path / "vmlinuz-x"
    bogus.write_bytes(b"not a kernel")
    vm = guest.Guest(guest.Kernel("bogus", bogus, None, config), accel="tcg")
    with pytest.raises(guest.GuestError):
        vm.run(["true"], timeout=60, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "kernel.config").read_text() == "CONFIG_IOMMUFD=y\n"
    assert Path(guest.GUEST_KERNEL_CONFIG).name == "kernel.config"


# --- --guest-kernel PATH: the same test IDs on the host and in the guest --------------------


def test_kernel_ids_are_the_same_on_host_and_guest() -> None:
    assert pytest_guest.kernel_id("debian") == "debian"
    assert pytest_guest.kernel_id("pyvfio-6.12") == "pyvfio-6.12"
    host = pytest_guest.kernel_id("/x/tree/boot/vmlinuz-6.12.48+deb13-amd64")
    name = guest.kernel_from_path(Path("/x/tree/boot/vmlinuz-6.12.48+deb13-amd64")).name
    assert host == pytest_guest.kernel_id(name) == "vmlinuz-6.12.48+deb13-amd64"
    assert pytest_guest.kernel_id("/k/my kernel") == "my_kernel"


def test_a_module_tree_without_modules_dep_says_to_run_depmod(tmp_path: Path) -> None:
    release = "6.12.48+deb13-amd64"
    boot = tmp_path / "tree/boot"
    boot.mkdir(parents=True)
    (boot / f"vmlinuz-{release}").write_bytes(b"k")
    mods = tmp_path / "tree/usr/lib/modules" / release
    mods.mkdir(parents=True)
    (mods / "modules.order").write_text("kernel/drivers/vfio/vfio.ko\n")
    with pytest.raises(guest.GuestError,
                       match=f"has no modules.dep .*run depmod -b {tmp_path}/tree/usr"):
        guest.kernel_by_name(str(boot / f"vmlinuz-{release}"))
