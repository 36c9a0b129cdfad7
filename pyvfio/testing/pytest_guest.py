"""pytest integration of the guest harness: guest tests collected on the host,
run inside QEMU guests, reported back one by one.

How a host run goes (``python -m pytest``):

1. The host collects ``tests/guest/test_*.py`` like any test module.  Every
   test there is parametrized over the guest kernels (``guest_kernel``:
   ``debian`` and ``pyvfio-6.12``; ``--guest-kernel`` or
   ``$PYVFIO_GUEST_KERNELS`` narrows the list), and each collected test is
   replaced by a :class:`GuestTestItem` that has the same node id and markers
   but sets up no fixture on the host.
2. When the first test of a *group* (kernel, guest configuration) runs, the
   group's guest boots once and runs ``python -m pytest`` on exactly the
   group's node ids (still selected after ``-k``/``-m``), with this module's
   reporter writing one JSON line per finished test to ``$PYVFIO_GUEST_OUT``.
3. Every host item then replays its guest outcome: passed, failed (with the
   guest's traceback and captured output), skipped (with the reason).  A test
   the guest never reported - the guest failed to boot, crashed, or its pytest
   could not collect - fails on the host with the reason and the console tail.

Inside a guest (``PYVFIO_GUEST=1``) the same conftest only parametrizes over
the running kernel, keeps the selected tests, and records results.

Guest configurations other than the default (Intel vIOMMU, standard topology)
are chosen per test with ``@pytest.mark.guest_config("noiommu")``; each
configuration gets its own boot.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyvfio.errors import PyvfioError, UsageError

KERNELS = ("debian", "pyvfio-6.12")
GUEST_TESTS_DIR = Path(__file__).resolve().parents[2] / "tests" / "guest"
DEFAULT_SUITE_TIMEOUT = 1200.0  # seconds per (kernel, configuration) boot

RESULTS_ENV = "PYVFIO_GUEST_RESULTS"  # guest: where the reporter appends JSON lines
SELECT_ENV = "PYVFIO_GUEST_SELECT"  # guest: file of node ids to keep
CONFIG_ENV = "PYVFIO_GUEST_CONFIG"  # guest: the configuration it was booted with


@dataclass(frozen=True)
class GuestConfig:
    """How a guest is booted for a group of tests."""

    name: str
    iommu: bool = True
    cmdline_extra: tuple[str, ...] = ()
    topology: str = "standard"
    description: str = ""


GUEST_CONFIGS = {
    "default": GuestConfig("default", description="Intel vIOMMU, standard topology"),
    "noiommu": GuestConfig(
        "noiommu", iommu=False, cmdline_extra=("vfio.enable_unsafe_noiommu_mode=1",),
        description="no IOMMU, vfio.enable_unsafe_noiommu_mode=1, standard topology",
    ),
    "storage": GuestConfig(
        "storage", topology="storage",
        description="Intel vIOMMU, standard topology plus an NVMe controller on a raw image",
    ),
}


def in_guest() -> bool:
    return os.environ.get("PYVFIO_GUEST") == "1"


def is_guest_test(path: Path) -> bool:
    return path == GUEST_TESTS_DIR or GUEST_TESTS_DIR in path.parents


def selected_kernels(config: pytest.Config) -> list[str]:
    """The kernels the host runs guest tests on: ``--guest-kernel`` options, else
    ``$PYVFIO_GUEST_KERNELS`` (comma-separated), else all of :data:`KERNELS`."""
    chosen: list[str] = list(config.getoption("guest_kernel", None) or [])
    if not chosen and os.environ.get("PYVFIO_GUEST_KERNELS"):
        chosen = [k for k in os.environ["PYVFIO_GUEST_KERNELS"].split(",") if k]
    return chosen or list(KERNELS)


def kernel_id(kernel: str) -> str:
    """The test-ID form of a kernel name: ``debian`` and ``pyvfio-6.12`` as they
    are, a kernel given by path as its file name (``/tmp/t/boot/vmlinuz-6.12.48+deb13-amd64``
    -> ``vmlinuz-6.12.48+deb13-amd64``).  The host and the guest both use it, so
    their node IDs agree; it is also safe as a directory name."""
    name = os.path.basename(kernel.rstrip("/")) if "/" in kernel else kernel
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in name) or "kernel"


def config_name_of(node: pytest.Item | Any) -> str:
    """The guest configuration a test asks for (``guest_config`` marker), default ``default``."""
    marker = node.get_closest_marker("guest_config")
    if marker is None:
        return "default"
    if len(marker.args) != 1 or marker.args[0] not in GUEST_CONFIGS:
        raise UsageError(
            f"{node.nodeid}: guest_config takes one of " + ", ".join(GUEST_CONFIGS)
            + f", not {marker.args!r}"
        )
    return str(marker.args[0])


# --- hooks shared by host and guest (called from tests/guest/conftest.py) ------------------


def generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every guest test over ``guest_kernel``."""
    if "guest_kernel" not in metafunc.fixturenames:
        return
    if in_guest():
        kernels = [os.environ.get("PYVFIO_GUEST_KERNEL", "unknown")]
    else:
        kernels = selected_kernels(metafunc.config)
    # A kernel given by path is the path on the host (to boot it) and its file name in
    # the guest (Kernel.name): the IDs are the file name on both sides.
    metafunc.parametrize("guest_kernel", kernels, ids=[kernel_id(k) for k in kernels],
                         scope="session")


def modify_items(session: pytest.Session, config: pytest.Config,
                 items: list[pytest.Item]) -> None:
    if in_guest():
        _keep_selected_in_guest(config, items)
    else:
        _replace_with_guest_items(items)


def _keep_selected_in_guest(config: pytest.Config, items: list[pytest.Item]) -> None:
    select_file = os.environ.get(SELECT_ENV)
    if select_file:
        wanted = set(Path(select_file).read_text().split("\n"))
        keep = [i for i in items if i.nodeid in wanted]
    else:  # run by hand: keep the tests of the configuration this guest was booted with
        booted = os.environ.get(CONFIG_ENV, "default")
        keep = [i for i in items
                if not is_guest_test(i.path) or config_name_of(i) == booted]
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _replace_with_guest_items(items: list[pytest.Item]) -> None:
    for index, item in enumerate(items):
        if not is_guest_test(item.path) or not isinstance(item, pytest.Function):
            continue
        kernel = item.callspec.params.get("guest_kernel") if hasattr(item, "callspec") else None
        if kernel is None or item.parent is None:
            continue
        replacement = GuestTestItem.from_parent(
            item.parent, name=item.name, kernel=str(kernel), config_name=config_name_of(item),
            original=item,
        )
        items[index] = replacement


# --- host side -----------------------------------------------------------------------------


class GuestTestFailure(Exception):
    """A guest test failed in the guest (or never ran); the message is the report."""


class GuestTestItem(pytest.Item):
    """The host's stand-in for one guest test: same node id and markers, no
    fixtures on the host; running it replays the guest's outcome."""

    def __init__(self, *, kernel: str, config_name: str, original: pytest.Function,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel = kernel
        self.config_name = config_name
        self.own_markers = [*original.own_markers, pytest.mark.guest.mark]
        self.keywords.update(original.keywords)
        self.keywords["guest"] = True
        self._location = original.location

    @property
    def location(self) -> tuple[str, int | None, str]:
        return self._location

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, self._location[1], self._location[2]

    def runtest(self) -> None:
        suite = GuestSuites.of(self.session)
        outcome = suite.outcome(self)
        status = outcome.get("outcome")
        if status == "passed":
            return
        if status == "skipped":
            reason = str(outcome.get("reason", "")).removeprefix("Skipped: ")
            # Reported at the test's own location (as a skip marker is), not this line.
            raise pytest.skip.Exception(
                f"[in guest {self.kernel}/{self.config_name}] {reason}", _use_item_location=True)
        if status == "xfailed":
            pytest.xfail(outcome.get("reason", ""))
        raise GuestTestFailure(outcome.get("text", "failed in the guest (no report)"))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, GuestTestFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style=style))


@dataclass
class GroupRun:
    """What one guest boot for a (kernel, configuration) group produced."""

    kernel: str
    config_name: str
    nodeids: list[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str = ""  # set when the guest or its pytest did not report some tests
    tail: str = ""
    boot_seconds: float | None = None
    wall_seconds: float = 0.0
    returncode: int | None = None
    kernel_seconds: float = 0.0  # time spent getting the kernel (a cold build)


class GuestSuites:
    """Boots one guest per (kernel, configuration) group, lazily, once per session."""

    _KEY = pytest.StashKey["GuestSuites"]()

    def __init__(self, session: pytest.Session) -> None:
        self.session = session
        self.groups: dict[tuple[str, str], GroupRun] = {}
        self.keep = os.environ.get("PYVFIO_GUEST_KEEP") == "1"
        self.timeout = float(os.environ.get("PYVFIO_GUEST_SUITE_TIMEOUT", DEFAULT_SUITE_TIMEOUT))
        self.base_dir = Path(tempfile.mkdtemp(prefix="pyvfio-guest-suites-"))
        # Getting a kernel may mean building it (minutes on a cold cache): start every
        # kernel the session needs now, in the background, so a build overlaps the
        # guest runs of the kernels already at hand instead of adding to them.
        from pyvfio.testing import guest

        needed = dict.fromkeys(i.kernel for i in session.items if isinstance(i, GuestTestItem))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyvfio-kernel")
        self.kernels: dict[str, Future[Any]] = {
            name: self._pool.submit(guest.kernel_by_name, name)
            for name in needed if name != "debian"
        }
        self._pool.shutdown(wait=False)

    @classmethod
    def of(cls, session: pytest.Session) -> GuestSuites:
        stash = session.config.stash
        if cls._KEY not in stash:
            stash[cls._KEY] = cls(session)
        return stash[cls._KEY]

    @classmethod
    def existing(cls, config: pytest.Config) -> GuestSuites | None:
        return config.stash.get(cls._KEY, None)

    def outcome(self, item: GuestTestItem) -> dict[str, Any]:
        key = (item.kernel, item.config_name)
        if key not in self.groups:
            members = [i.nodeid for i in self.session.items
                       if isinstance(i, GuestTestItem) and (i.kernel, i.config_name) == key]
            self.groups[key] = self._run_group(item.kernel, item.config_name, members)
        group = self.groups[key]
        if item.nodeid in group.results:
            return group.results[item.nodeid]
        why = group.error or (
            f"the guest's pytest did not report this test (exit {group.returncode})")
        text = f"[in guest {group.kernel}/{group.config_name}] {why}"
        if group.tail:
            text += "\n--- end of the guest's output ---\n" + group.tail
        return {"outcome": "failed", "text": text}

    def _run_group(self, kernel_name: str, config_name: str, nodeids: Sequence[str]) -> GroupRun:
        from pyvfio.testing import guest, topology

        group = GroupRun(kernel_name, config_name, list(nodeids))
        cfg = GUEST_CONFIGS[config_name]
        run_dir = self.base_dir / f"{kernel_id(kernel_name)}-{config_name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "select.txt").write_text("\n".join(nodeids) + "\n")
        files = sorted({n.split("::", 1)[0] for n in nodeids})
        rootdir = Path(self.session.config.rootpath)
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
                *guest_plugin_args(), f"--junitxml={guest.GUEST_OUT}/junit.xml", *files]
        started = time.monotonic()
        try:
            pending = self.kernels.get(kernel_name)
            kernel = pending.result() if pending else guest.kernel_by_name(kernel_name)
            group.kernel_seconds = time.monotonic() - started
            vm = guest.Guest(kernel, topology.by_name(cfg.topology), iommu=cfg.iommu,
                             cmdline_extra=cfg.cmdline_extra)
            result = vm.run(argv, timeout=self.timeout, cwd=rootdir, run_dir=run_dir, env={
                RESULTS_ENV: f"{guest.GUEST_OUT}/results.jsonl",
                SELECT_ENV: f"{guest.GUEST_RUN_DIR}/select.txt",
                CONFIG_ENV: config_name,
                "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            })
        except (PyvfioError, OSError) as exc:
            group.error = f"guest {kernel_name}/{config_name} did not run: {exc}"
            group.results = read_results(run_dir / "out" / "results.jsonl")
            return group
        finally:
            group.wall_seconds = time.monotonic() - started
        group.returncode = result.returncode
        group.boot_seconds = result.boot_seconds
        group.tail = "\n".join(result.output.rstrip().splitlines()[-60:])
        group.results = read_results(result.out_dir / "results.jsonl")
        return group

    def finish(self) -> None:
        failed = any(r.get("outcome") == "failed" for g in self.groups.values()
                     for r in g.results.values()) or any(g.error for g in self.groups.values())
        if self.keep or failed:
            return
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def summary_lines(self) -> Iterator[str]:
        for (kernel, cfg), g in sorted(self.groups.items()):
            boot = f"{g.boot_seconds:.1f} s" if g.boot_seconds is not None else "-"
            counts: dict[str, int] = {}
            for r in g.results.values():
                counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no results"
            built = f", kernel {g.kernel_seconds:.0f} s" if g.kernel_seconds > 5 else ""
            yield (f"guest {kernel}/{cfg}: {len(g.nodeids)} tests ({tally}); boot {boot}, "
                   f"whole run {g.wall_seconds:.1f} s{built}"
                   + (f"; {g.error.splitlines()[0]}" if g.error else ""))
        if self.groups and (self.keep or any(g.error for g in self.groups.values())):
            yield f"guest run directories kept in {self.base_dir}"


# Plugins guest tests may use.  Entry-point autoloading is off in the guest: it
# scans every installed distribution's metadata over 9p and imports plugins
# (pytest-benchmark...) that guest tests do not use, seconds under TCG.
GUEST_PLUGINS = ("_hypothesis_pytestplugin",)


def guest_plugin_args() -> list[str]:
    import importlib.util

    args = []
    for name in GUEST_PLUGINS:
        if importlib.util.find_spec(name) is not None:
            args += ["-p", name]
    return args


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The reporter's JSON lines, by node id (a torn last line is ignored)."""
    results: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return results
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        results[entry["nodeid"]] = entry
    return results


# --- guest side: the reporter --------------------------------------------------------------


class GuestReporter:
    """Folds setup/call/teardown reports into one outcome per test and appends
    it as a JSON line to ``$PYVFIO_GUEST_RESULTS`` as soon as the test ends,
    so a guest that dies mid-suite still reports what finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: dict[str, dict[str, Any]] = {}

    def logreport(self, report: pytest.TestReport) -> None:
        entry = self.pending.setdefault(report.nodeid, {
            "nodeid": report.nodeid, "outcome": "passed", "text": "", "reason": "",
            "duration": 0.0,
        })
        entry["duration"] += report.duration
        if report.failed and entry["outcome"] != "failed":
            entry["outcome"] = "failed"
            entry["text"] = self._failure_text(report)
        elif report.skipped and entry["outcome"] == "passed":
            if hasattr(report, "wasxfail"):
                entry["outcome"] = "xfailed"
                entry["reason"] = report.wasxfail
            else:
                entry["outcome"] = "skipped"
                longrepr = report.longrepr
                entry["reason"] = (longrepr[2] if isinstance(longrepr, tuple)
                                   else str(longrepr))
        if report.when == "teardown":
            with self.path.open("a") as f:
                f.write(json.dumps(self.pending.pop(report.nodeid)) + "\n")

    @staticmethod
    def _failure_text(report: pytest.TestReport) -> str:
        kernel = os.environ.get("PYVFIO_GUEST_KERNEL", "?")
        cfg = os.environ.get(CONFIG_ENV, "default")
        head = f"[in guest {kernel}/{cfg}, failed during {report.when}]"
        parts = [head, report.longreprtext]
        for title, content in report.sections:
            parts.append(f"--- {title} ---\n{content.rstrip()}")
        return "\n".join(parts)


_REPORTER_KEY = pytest.StashKey[GuestReporter]()


def guest_logreport(config: pytest.Config, report: pytest.TestReport) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not (in_guest() and path):
        return
    if _REPORTER_KEY not in config.stash:
        config.stash[_REPORTER_KEY] = GuestReporter(Path(path))
    config.stash[_REPORTER_KEY].logreport(report)


# --- guest side: a deadline per test phase -------------------------------------------------

DEFAULT_TEST_TIMEOUT = 180.0  # seconds per setup/call/teardown; guest_timeout(s) overrides


class GuestTestTimeout(BaseException):
    """Raised in a guest test that outlived its deadline.  A BaseException so that
    ``except Exception`` in the code under test does not swallow it."""


def test_timeout(item: pytest.Item) -> float:
    marker = item.get_closest_marker("guest_timeout")
    if marker is not None:
        return float(marker.args[0])
    return float(os.environ.get("PYVFIO_GUEST_TEST_TIMEOUT", DEFAULT_TEST_TIMEOUT))


@contextlib.contextmanager
def deadline(item: pytest.Item, when: str) -> Iterator[None]:
    """In the guest, fail a test phase that runs longer than its deadline, with
    every thread's stack dumped to the captured stderr, instead of letting one
    hung test eat the whole guest run (whose tests would then all fail)."""
    if not in_guest() or threading.current_thread() is not threading.main_thread():
        yield
        return
    seconds = test_timeout(item)

    def expired(signum: int, frame: Any) -> None:
        faulthandler.dump_traceback(all_threads=True)
        raise GuestTestTimeout(f"{when} of {item.nodeid} still running after {seconds:.0f} s "
                               "(guest per-test deadline; @pytest.mark.guest_timeout(s) "
                               "raises it)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- fixtures' helpers ---------------------------------------------------------------------


class SysfsBinding:
    """Binds PCI devices to vfio-pci through sysfs (driver_override + drivers_probe)
    and puts every device back on its previous driver (or none) on :meth:`restore`.

    Deliberately minimal: :mod:`pyvfio.host` is the real binding code; this is
    what guest tests of other areas use to get a device onto vfio-pci.
    """

    def __init__(self, sysfs: Path = Path("/sys")) -> None:
        self.sysfs = sysfs
        self.saved: list[tuple[str, str | None]] = []

    def device_dir(self, bdf: str) -> Path:
        path = self.sysfs / "bus/pci/devices" / bdf
        if not path.is_dir():
            raise UsageError(f"no PCI device {bdf} in {self.sysfs}")
        return path

    def driver_of(self, bdf: str) -> str | None:
        link = self.device_dir(bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def _write(self, path: Path, value: str) -> None:
        with open(path, "w") as f:
            f.write(value)

    def bind(self, bdf: str, driver: str = "vfio-pci") -> None:
        previous = self.driver_of(bdf)
        if previous == driver:
            return
        self.saved.append((bdf, previous))
        dev = self.device_dir(bdf)
        self._write(dev / "driver_override", driver)
        if previous is not None:
            self._write(dev / "driver" / "unbind", bdf)
        self._write(self.sysfs / "bus/pci/drivers_probe", bdf)
        now = self.driver_of(bdf)
        if now != driver:
            raise PyvfioError(f"binding {bdf} to {driver} failed: its driver is {now}")

    def restore(self) -> None:
        while self.saved:
            bdf, previous = self.saved.pop()
            dev = self.device_dir(bdf)
            if (dev / "driver").is_symlink():
                self._write(dev / "driver" / "unbind", bdf)
            self._write(dev / "driver_override", "\n")
            self._write(self.sysfs / "bus/pci/drivers_probe", bdf)
            now = self.driver_of(bdf)
            if now != previous:
                raise PyvfioError(f"restoring {bdf}: expected driver {previous}, got {now}")
