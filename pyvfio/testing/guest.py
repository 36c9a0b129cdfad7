"""Boot a real Linux kernel under QEMU and run a command in it.

The guest is a q35 machine with an Intel vIOMMU (interrupt remapping on,
``intel_iommu=on``), so it has real IOMMU groups, vfio-pci and ``/dev/vfio``.
It sees the host's ``/`` read-only over virtio 9p and ``chroot``s into it, so
the command runs this machine's Python on this checkout, unchanged.  Writable
in the guest: tmpfs on ``/tmp``, ``/run``, ``/var/tmp`` and ``/dev/shm``, and
the run share: a host directory mounted at ``/run/pyvfio`` whose ``out/``
subdirectory the command finds in ``$PYVFIO_GUEST_OUT`` and the host finds in
:attr:`GuestResult.out_dir` afterwards.

Example::

    from pyvfio.testing import guest, topology

    g = guest.Guest(guest.debian_kernel(), devices=topology.standard())
    result = g.run(["python3", "-c", "import os; print(os.listdir('/dev/vfio'))"])
    print(result.returncode, result.output)

The accelerator is KVM when a tiny timed boot under KVM works on this machine
(the verdict is cached), TCG otherwise; ``PYVFIO_GUEST_ACCEL=kvm|tcg`` forces one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pyvfio.errors import PyvfioError, UsageError
from pyvfio.testing import debian
from pyvfio.testing.initramfs import (
    EXIT_MARKER,
    GUEST_PYCACHE_DIR,
    GUEST_RUN_DIR,
    HOSTROOT_TAG,
    PYCACHE_TAG,
    RUN_TAG,
    START_MARKER,
    build_initramfs,
    cache_dir,
)
from pyvfio.testing.kernel_image import Kernel

QEMU = "qemu-system-x86_64"
HOST_PACKAGES = ("qemu-system-x86", "busybox-static")
CHECKOUT = Path(__file__).resolve().parents[2]

GUEST_OUT = f"{GUEST_RUN_DIR}/out"  # $PYVFIO_GUEST_OUT inside the guest
# The booted kernel's .config (a copy of Kernel.config) inside the guest, when known.
GUEST_KERNEL_CONFIG = f"{GUEST_RUN_DIR}/kernel.config"

# PCI slots on the root bus the harness itself uses (the 9p shares); topologies
# must leave them free.
HARNESS_SLOTS = (0x1C, 0x1D, 0x1E)

# Host paths the guest replaces with its own: a command cannot run there.
_GUEST_MOUNTS = ("/proc", "/sys", "/dev")
# Host paths the guest covers with tmpfs: a working directory below one of them
# (a checkout cloned under /tmp, as CI does) is bound back into the guest.
_GUEST_TMPFS = ("/tmp", "/run", "/var/tmp")

# The guest's environment: nothing leaks in from the host except what run(env=) adds.
# PATH starts with the directory of the Python running the harness, so that
# ``python3`` in the guest is this interpreter, with its pytest and its
# (editable) pyvfio, whether it is a venv, pyenv or Debian's.  Not resolved
# through symlinks: a venv's bin/python3 links to its base interpreter, whose
# directory has neither the venv's packages nor its pyvenv.cfg.
_BASE_ENV = {
    "PATH": os.path.dirname(os.path.abspath(sys.executable))
    + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    # The host's tree is read-only in the guest, and Python compiling its modules
    # under TCG costs seconds per boot: bytecode lives in a shared, persistent
    # cache the host pre-fills (warm_pycache) and the guest tops up.
    "PYTHONPYCACHEPREFIX": GUEST_PYCACHE_DIR,
    "PYTHONUNBUFFERED": "1",
    "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/.hypothesis",
    "PYVFIO_GUEST": "1",
    "PYVFIO_GUEST_OUT": GUEST_OUT,
}


class GuestError(PyvfioError):
    """Raised when the guest did not run the command to completion: QEMU failed
    to start, the kernel or init failed, or the guest died before reporting an
    exit status.  ``console`` holds what the serial console showed."""

    def __init__(self, message: str, console: str = "", run_dir: Path | None = None) -> None:
        tail = "\n".join(console.rstrip().splitlines()[-30:])
        super().__init__(message + (f"\n--- last console lines ---\n{tail}" if tail else ""))
        self.console = console
        self.run_dir = run_dir


class GuestTimeout(GuestError):
    """Raised when the guest was still running at the deadline (it was killed)."""


# --- kernels -------------------------------------------------------------------------------


def _version_key(text: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


DEBIAN_KERNEL_PACKAGE = "linux-image-amd64"


def _metapackage_depends(package: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", package],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _kernel_at(boot: Path, modules: Path, release: str) -> Kernel | None:
    image = boot / f"vmlinuz-{release}"
    modules_dir = modules / release
    if not image.is_file() or not (modules_dir / "modules.dep").is_file():
        return None
    config = boot / f"config-{release}"
    return Kernel("debian", image, modules_dir, config if config.is_file() else None)


def debian_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules"), *,
                  depends: str | None = None) -> Kernel:
    """Debian's own kernel: 6.1 on bookworm, 6.12 on trixie.

    The release ``linux-image-amd64`` depends on (dpkg; ``depends`` gives the
    field instead) when its ``vmlinuz-<release>`` and module tree are there,
    otherwise the newest ``vmlinuz-*`` in ``boot`` that has a module tree in
    ``modules``.  On the real ``/boot`` a missing ``linux-image-amd64`` is
    installed first.  Raises :class:`GuestError` naming both places when no
    kernel qualifies.
    """
    real = boot == Path("/boot")
    if depends is None and real:
        depends = _metapackage_depends(DEBIAN_KERNEL_PACKAGE)
        if depends is None:
            debian.ensure_packages([DEBIAN_KERNEL_PACKAGE])
            depends = _metapackage_depends(DEBIAN_KERNEL_PACKAGE)
    for release in debian.releases_from_depends(depends or ""):
        found = _kernel_at(boot, modules, release)
        if found is not None:
            return found
    images = sorted(boot.glob("vmlinuz-*"), key=lambda p: _version_key(p.name), reverse=True)
    for image in images:
        found = _kernel_at(boot, modules, image.name.removeprefix("vmlinuz-"))
        if found is not None:
            return found
    raise GuestError(f"no Debian kernel: no {boot}/vmlinuz-<release> with a module tree "
                     f"{modules}/<release>/modules.dep (install {DEBIAN_KERNEL_PACKAGE})")


def kernel_from_path(path: Path) -> Kernel:
    """A kernel image given by path.  For ``vmlinuz-<release>`` the module tree
    and ``config-<release>`` are looked up beside it first (a package unpacked
    with ``dpkg -x`` into TREE has ``TREE/boot/vmlinuz-<release>`` and
    ``TREE/lib/modules/<release>`` or ``TREE/usr/lib/modules/<release>``),
    then in ``/lib/modules``; a bzImage without them is all-built-in."""
    image = path.resolve()
    release = image.name.removeprefix("vmlinuz-") if image.name.startswith("vmlinuz-") else ""
    modules_dir = None
    config = None
    if release:
        tree = image.parent.parent
        for candidate in (tree / "lib/modules" / release, tree / "usr/lib/modules" / release,
                          Path("/lib/modules") / release):
            if (candidate / "modules.dep").is_file():
                modules_dir = candidate
                break
            if (candidate / "modules.order").is_file():  # unpacked, never depmod'ed
                raise GuestError(
                    f"{candidate} has no modules.dep (a package unpacked with dpkg -x): "
                    f"run depmod -b {candidate.parent.parent.parent} {release}")
        if (image.parent / f"config-{release}").is_file():
            config = image.parent / f"config-{release}"
    if config is None and (image.parent / "config").is_file():
        config = image.parent / "config"  # pyvfio-6.12's cache directory keeps it there
    # Named as given (not resolved), so that the guest's test IDs (kernel_id of
    # this name) match the host's (kernel_id of the path it was given).
    return Kernel(path.name, image, modules_dir, config)


def kernel_by_name(name: str) -> Kernel:
    """``debian``, ``pyvfio-6.12`` (built on first use, see :mod:`pyvfio.testing.kernel`),
    or the path of a kernel image (see :func:`kernel_from_path`)."""
    if name == "debian":
        return debian_kernel()
    if name == "pyvfio-6.12":
        from pyvfio.testing import kernel as kernel_build  # builds it: slow imports

        return kernel_build.pyvfio_kernel()
    path = Path(name)
    if path.is_file():
        return kernel_from_path(path)
    raise UsageError(f"unknown kernel {name!r}: use debian, pyvfio-6.12 or a kernel image path")


# --- the accelerator -----------------------------------------------------------------------

_accel_verdict: str | None = None


def _qemu_version(qemu: str | Sequence[str]) -> str:
    argv = [qemu] if isinstance(qemu, str) else list(qemu)
    try:
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def kvm_probe_key(qemu: str | Sequence[str] = QEMU) -> str:
    """What the KVM verdict depends on: the host kernel and the QEMU build."""
    return f"{os.uname().release} | {_qemu_version(qemu)}"


def choose_accel(qemu: str | Sequence[str] = QEMU, *, cache: Path | None = None,
                 probe_timeout: float = 30.0) -> str:
    """``kvm`` or ``tcg`` for this machine.

    ``/dev/kvm`` existing is not enough.  When it is PVM (:func:`kvm_is_pvm`)
    a stock kernel cannot boot on it, so the answer is TCG at once.  Otherwise
    nested virtualisation may still hang a guest, so a tiny guest is booted
    once under KVM with a deadline; the verdict is cached in
    ``~/.cache/pyvfio/accel.json`` keyed by host kernel and QEMU version.
    """
    global _accel_verdict
    forced = os.environ.get("PYVFIO_GUEST_ACCEL", "auto")
    if forced in ("kvm", "tcg"):
        return forced
    if forced != "auto":
        raise UsageError(f"PYVFIO_GUEST_ACCEL={forced!r}: use kvm, tcg or auto")
    if _accel_verdict is not None:
        return _accel_verdict
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or kvm_is_pvm():
        _accel_verdict = "tcg"
        return "tcg"
    cache_file = (cache or cache_dir()) / "accel.json"
    key = kvm_probe_key(qemu)
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
            _accel_verdict = str(cached["accel"])
            return _accel_verdict
    except (OSError, ValueError):
        pass
    verdict, detail = probe_kvm(qemu, timeout=probe_timeout)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".accel.{os.getpid()}.json")
    tmp.write_text(json.dumps({"key": key, "accel": verdict, "detail": detail,
                               "probed": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    os.replace(tmp, cache_file)
    _accel_verdict = verdict
    return verdict


def kvm_is_pvm(sys_module: Path = Path("/sys/module")) -> bool:
    """Whether ``/dev/kvm`` is PVM (``kvm_pvm``, pagetable-based virtual
    machines) rather than hardware virtualisation (``kvm_intel``/``kvm_amd``).

    Cloud sandboxes offer PVM for nested guests without VMX/SVM.  PVM runs
    only guest kernels built for it (its guest side is out of tree), so
    Debian's kernel and ours hang in early boot there: no probe is needed.
    """
    return (sys_module / "kvm_pvm").is_dir() and not any(
        (sys_module / hw).is_dir() for hw in ("kvm_intel", "kvm_amd"))


def probe_kvm(qemu: str | Sequence[str] = QEMU, *, timeout: float = 30.0) -> tuple[str, str]:
    """Boot Debian's kernel under KVM running ``true``; ``("kvm", why)`` if it
    reported success before ``timeout``, else ``("tcg", why)``."""
    try:
        probe = Guest(debian_kernel(), accel="kvm", iommu=False, qemu=qemu)
        started = time.monotonic()
        result = probe.run(["true"], timeout=timeout, cwd=Path("/"))
        result.cleanup()
    except GuestError as exc:
        return "tcg", f"KVM boot failed: {str(exc).splitlines()[0]}"
    if result.returncode != 0:
        return "tcg", f"KVM probe command exited {result.returncode}"
    return "kvm", f"KVM guest ran a command in {time.monotonic() - started:.1f} s"


# --- bytecode -------------------------------------------------------------------------------

# Packages every guest test run imports; their bytecode is compiled on the host
# (fast) rather than in the guest (seconds per module under TCG).
_HOT_PACKAGES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments",
                 "hypothesis", "_hypothesis_pytestplugin", "sortedcontainers", "attr", "attrs",
                 "certifi", "_distutils_hack", "pyvfio")
_STDLIB_SKIP = (r"/python3\.\d+/(test|idlelib|tkinter|lib2to3|turtledemo|ensurepip|pydoc_data"
                r"|site-packages|dist-packages)/")
_pycache_warmed = False


def pycache_dir() -> Path:
    path = cache_dir() / "pycache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def warm_pycache() -> None:
    """Compile the standard library, the test tools and the checkout into the
    shared bytecode cache, once per process (a warm cache costs a second of stat calls)."""
    global _pycache_warmed
    if _pycache_warmed:
        return
    import importlib.util
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    paths = [str(CHECKOUT / "pyvfio"), str(CHECKOUT / "tests")]
    for name in _HOT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            paths.extend(spec.submodule_search_locations)
        elif spec is not None and spec.origin and spec.origin.endswith(".py"):
            paths.append(spec.origin)
    # The .pth files run at every interpreter start (the editable install's finder...).
    for site_dir in {os.path.dirname(p) for p in paths if p.endswith("site-packages/pytest")}:
        paths.extend(str(p) for p in Path(site_dir).glob("__editable__*.py"))
    cold = not any(pycache_dir().iterdir())
    # Worker processes pay off only when there is compiling to do.
    compileall = [sys.executable, "-X", f"pycache_prefix={pycache_dir()}", "-m", "compileall",
                  "-q", *(["-j0"] if cold else [])]
    for argv in (
        [*compileall, "-x", _STDLIB_SKIP, stdlib],
        [*compileall, *dict.fromkeys(p for p in paths if os.path.exists(p))],
    ):
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    _pycache_warmed = True


# --- running -------------------------------------------------------------------------------


@dataclass
class GuestResult:
    """What one guest run left behind."""

    returncode: int
    output: str  # the command's console output (between the start and exit markers)
    console: str  # the whole serial console, boot messages included
    run_dir: Path  # the host side of the run share (run.sh, status, out/)
    boot_seconds: float | None = None  # guest uptime when the command started
    wall_seconds: float = 0.0
    accel: str = ""
    qemu_stderr: str = ""  # QEMU's own warnings
    qemu_argv: list[str] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        """Files the command wrote to ``$PYVFIO_GUEST_OUT`` in the guest."""
        return self.run_dir / "out"

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


class Guest:
    """A QEMU guest description; :meth:`run` boots it once per command.

    ``devices`` are extra QEMU arguments, appended last: ``-device``,
    ``-object``, ``-chardev``... (see :mod:`pyvfio.testing.topology`);
    ``iommu=False`` leaves out the Intel vIOMMU and ``intel_iommu=on`` (for
    vfio's no-IOMMU mode add ``vfio.enable_unsafe_noiommu_mode=1`` to
    ``cmdline_extra``).

    ``qemu`` is the QEMU to run: a command name or path (the wrapper of
    :mod:`pyvfio.testing.qemu` for QEMU >= 10.1), or an argv prefix.
    ``iommu_caching_mode`` adds ``caching-mode=on`` to the vIOMMU, which QEMU
    requires with a ``vfio-user-pci`` device.  ``memory_backend="memfd"``
    puts guest RAM in ``memory-backend-memfd,share=on`` (a vfio-user server
    then maps it from the fds QEMU sends); the default is plain RAM.  ``qmp``
    is a UNIX socket path where QEMU listens for QMP while the guest runs.
    """

    def __init__(
        self,
        kernel: Kernel,
        devices: Sequence[str] = (),
        *,
        iommu: bool = True,
        cmdline_extra: Sequence[str] = (),
        memory_mib: int = 1024,
        smp: int = 2,
        accel: str | None = None,
        qemu: str | Sequence[str] = QEMU,
        iommu_caching_mode: bool = False,
        memory_backend: str | None = None,
        qmp: Path | str | None = None,
    ) -> None:
        if memory_mib < 256:
            raise UsageError(f"guest memory {memory_mib} MiB: at least 256 MiB is needed")
        if smp < 1:
            raise UsageError(f"guest smp {smp}: at least 1 CPU")
        if accel not in (None, "kvm", "tcg"):
            raise UsageError(f"accel {accel!r}: use kvm, tcg or None (probe)")
        if memory_backend not in (None, "memfd"):
            raise UsageError(f"memory_backend {memory_backend!r}: use None (plain RAM) or memfd")
        if isinstance(qemu, str):
            qemu = [qemu]
        if not qemu:
            raise UsageError("qemu: an empty command")
        self.kernel = kernel
        self.devices = list(devices)
        self.iommu = iommu
        self.cmdline_extra = list(cmdline_extra)
        self.memory_mib = memory_mib
        self.smp = smp
        self.accel = accel
        self.qemu_command = list(qemu)
        self.qemu = self.qemu_command[0] if len(self.qemu_command) == 1 else shlex.join(qemu)
        self.iommu_caching_mode = iommu_caching_mode
        self.memory_backend = memory_backend
        self.qmp = Path(qmp) if qmp is not None else None

    def cmdline(self) -> str:
        # no_timer_check: under TCG the small 6.12 kernel panics in check_timer
        # ("timer doesn't work through Interrupt-remapped IO-APIC"): the timer
        # is fine, the emulated CPU is just slow for the check's time window.
        words = ["console=ttyS0", "quiet", "loglevel=4", "panic=-1", "rdinit=/init",
                 "8250.nr_uarts=1", "no_timer_check"]
        if self.iommu:
            words.append("intel_iommu=on")
        return " ".join(words + self.cmdline_extra)

    def qemu_argv(self, initramfs: Path, run_dir: Path, accel: str,
                  pycache: Path | None = None) -> list[str]:
        """The full QEMU command line for one run."""
        pycache = pycache or pycache_dir()
        machine = "q35,kernel-irqchip=split" if self.iommu else "q35"
        argv = [
            *self.qemu_command, "-nodefaults", "-no-user-config", "-display", "none",
            # TCG runs one vCPU per host thread by default, and a kernel that
            # patches its own code (static keys, text_poke_bp) while another
            # vCPU runs stale translated code takes a stray int3 there and
            # panics (6.12 at boot, under load).  One thread for all vCPUs
            # sees each code write before any other vCPU runs.
            "-machine", machine, "-accel", "tcg,thread=single" if accel == "tcg" else accel,
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(self.smp), "-m", str(self.memory_mib),
            "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", str(self.kernel.image), "-initrd", str(initramfs),
            "-append", self.cmdline(),
        ]
        devices = list(self.devices)
        if self.iommu:
            # Must come before the PCI devices it translates for.  An
            # intel-iommu among ``devices`` (pyvfio qemu-args --iommu) takes
            # the place of the harness's own.
            iommu = "intel-iommu,intremap=on" + (
                ",caching-mode=on" if self.iommu_caching_mode else "")
            for n in range(len(devices) - 1):
                if devices[n] == "-device" and devices[n + 1].startswith("intel-iommu,"):
                    iommu = devices[n + 1]
                    del devices[n:n + 2]
                    break
            argv += ["-device", iommu]
        if self.memory_backend == "memfd":
            # share=on: with share=off QEMU passes the fd of its private copy
            # and a vfio-user server's DMA silently misses the guest's memory.
            argv += ["-object", f"memory-backend-memfd,id=pyvfio-ram,size={self.memory_mib}M,"
                                "share=on", "-machine", "memory-backend=pyvfio-ram"]
        if self.qmp is not None:
            argv += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        argv += [
            "-fsdev", f"local,id=fs-{HOSTROOT_TAG},path=/,security_model=none,readonly=on,"
                      "multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=fs-{HOSTROOT_TAG},mount_tag={HOSTROOT_TAG},"
                       f"bus=pcie.0,addr={HARNESS_SLOTS[0]:#x}",
            "-fsdev", f"local,id=fs-{RUN_TAG},path={run_dir},security_model=none,"
                      "multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=fs-{RUN_TAG},mount_tag={RUN_TAG},"
                       f"bus=pcie.0,addr={HARNESS_SLOTS[1]:#x}",
            "-fsdev", f"local,id=fs-{PYCACHE_TAG},path={pycache},security_model=none,"
                      "multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=fs-{PYCACHE_TAG},mount_tag={PYCACHE_TAG},"
                       f"bus=pcie.0,addr={HARNESS_SLOTS[2]:#x}",
        ]
        return argv + devices

    def run_script(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
        """The shell script the guest runs in the host root (``/run/pyvfio/run.sh``)."""
        lines = ["# written by pyvfio.testing.guest for one run"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
        lines.append("exec " + shlex.join(argv))
        return "\n".join(lines) + "\n"

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 300.0,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        run_dir: Path | None = None,
        echo: IO[str] | None = None,
    ) -> GuestResult:
        """Boot, run ``argv`` in ``cwd`` (default: the checkout) and power off.

        Returns the command's exit status and output; raises :class:`GuestError`
        (or :class:`GuestTimeout`) if the guest never reported one.  ``echo``
        receives the console as it arrives.  The run directory is left for the
        caller (``result.cleanup()``).
        """
        if not argv:
            raise UsageError("no command to run in the guest")
        cwd = Path(cwd) if cwd is not None else CHECKOUT
        if not cwd.is_absolute():
            cwd = cwd.resolve()
        for hidden in _GUEST_MOUNTS:
            if cwd == Path(hidden) or Path(hidden) in cwd.parents:
                raise UsageError(f"cannot run in {cwd}: the guest mounts its own {hidden}")
        expose = [str(cwd) for tmpfs in _GUEST_TMPFS if Path(tmpfs) in cwd.parents]
        debian.ensure_packages(HOST_PACKAGES)
        initramfs = build_initramfs(self.kernel.modules_dir)
        accel = self.accel or choose_accel(self.qemu_command)
        warm_pycache()
        if run_dir is None:
            run_dir = Path(tempfile.mkdtemp(prefix="pyvfio-guest-"))
        (run_dir / "out").mkdir(parents=True, exist_ok=True)
        (run_dir / "status").unlink(missing_ok=True)
        full_env = {**_BASE_ENV, "PYVFIO_GUEST_KERNEL": self.kernel.name, **(env or {})}
        (run_dir / "run.sh").write_text(self.run_script(argv, cwd, full_env))
        config_copy = run_dir / Path(GUEST_KERNEL_CONFIG).name
        if self.kernel.config is not None and self.kernel.config.is_file():
            shutil.copyfile(self.kernel.config, config_copy)
        else:
            config_copy.unlink(missing_ok=True)
        (run_dir / "expose").write_text("".join(f"{p}\n" for p in expose))
        qemu_argv = self.qemu_argv(initramfs, run_dir, accel)

        started = time.monotonic()
        try:
            proc = subprocess.Popen(qemu_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except OSError as exc:
            raise GuestError(f"cannot start {self.qemu}: {exc}", run_dir=run_dir) from exc
        console_parts: list[str] = []
        stderr_parts: list[bytes] = []
        assert proc.stdout is not None and proc.stderr is not None

        def pump_console(stream: IO[bytes]) -> None:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
                console_parts.append(line)
                if echo is not None:
                    echo.write(line)
                    echo.flush()

        readers = [
            threading.Thread(target=pump_console, args=(proc.stdout,), daemon=True),
            threading.Thread(target=lambda: stderr_parts.append(proc.stderr.read()),  # type: ignore[union-attr]
                             daemon=True),
        ]
        for t in readers:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        for t in readers:
            t.join(timeout=5)
        wall = time.monotonic() - started
        console = "".join(console_parts)
        qemu_stderr = b"".join(stderr_parts).decode("utf-8", "replace").strip()
        (run_dir / "console.log").write_text(console)  # kept with the run, for post-mortems
        if timed_out:
            raise GuestTimeout(f"guest ({self.kernel.name}, {accel}) still running after "
                               f"{timeout:.0f} s; killed", console, run_dir)
        return self._result(console, qemu_stderr, proc.returncode, run_dir, wall, accel,
                            qemu_argv)

    def _result(self, console: str, qemu_stderr: str, qemu_rc: int, run_dir: Path,
                wall: float, accel: str, qemu_argv: list[str]) -> GuestResult:
        start = re.search(rf"^{START_MARKER} uptime=([\d.]+)", console, re.M)
        exit_match = re.search(rf"^{EXIT_MARKER}(\S+)", console, re.M)
        status_file = run_dir / "status"
        status = status_file.read_text().strip() if status_file.is_file() else None
        if status is None and exit_match:
            status = exit_match.group(1)
        if status is None or not status.isdigit():
            why = f"QEMU exited {qemu_rc}" + (f": {qemu_stderr}" if qemu_stderr else "")
            if status == "init-failed":
                why = "the guest's init failed"
            elif start:
                why = "the guest died while running the command (" + why + ")"
            else:
                why = "the guest did not get to run the command (" + why + ")"
            raise GuestError(f"guest ({self.kernel.name}, {accel}): {why}", console, run_dir)
        if start:
            body = console[start.end():].split("\n", 1)[1] if "\n" in console[start.end():] else ""
            output = body[:body.find(EXIT_MARKER)] if EXIT_MARKER in body else body
        else:
            output = ""
        return GuestResult(
            returncode=int(status), output=output, console=console, run_dir=run_dir,
            boot_seconds=float(start.group(1)) if start else None, wall_seconds=wall,
            accel=accel, qemu_stderr=qemu_stderr, qemu_argv=qemu_argv,
        )


def run_script_in_guest(script: Path | str, args: Sequence[str], kernel: str, *,
                        quiet: bool = False, timeout: float = 600, smp: int = 2) -> int:
    """Boot ``kernel`` with the standard topology, run the Python ``script``
    with ``args`` inside, echo its output and return its exit status.  For
    scripts (benchmarks) that measure in the guest what they cannot on the host;
    ``quiet`` leaves out the closing line about the run (for JSON output)."""
    from pyvfio.testing import topology

    vm = Guest(kernel_by_name(kernel), topology.standard(), smp=smp)
    result = vm.run([sys.executable, str(Path(script).resolve()), *args], timeout=timeout)
    try:
        sys.stdout.write(result.output)
        if not quiet:
            print(f"(guest {kernel}, {result.accel}; whole run {result.wall_seconds:.0f} s)")
        return result.returncode
    finally:
        result.cleanup()
