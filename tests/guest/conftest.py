"""Guest tests: collected on the host, run inside QEMU guests on real kernels.

On the host every test here becomes a stand-in that boots (once per kernel and
guest configuration) a guest running this directory's tests and replays each
test's outcome; inside the guest (``PYVFIO_GUEST=1``) tests simply run.  See
``pyvfio.testing.pytest_guest`` and docs/testing.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pyvfio.testing import pytest_guest


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    pytest_guest.generate_tests(metafunc)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    pytest_guest.modify_items(session, config, items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with pytest_guest.deadline(item, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with pytest_guest.deadline(item, "call"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    with pytest_guest.deadline(item, "teardown"):
        return (yield)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    pytest_guest.guest_logreport(_config, report)


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def pytest_sessionfinish(session: pytest.Session) -> None:
    suites = pytest_guest.GuestSuites.existing(session.config)
    if suites is not None:
        suites.finish()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    suites = pytest_guest.GuestSuites.existing(terminalreporter.config)
    if suites is None:
        return
    terminalreporter.section("pyvfio guests")
    for line in suites.summary_lines():
        terminalreporter.write_line(line)


_config: pytest.Config


@pytest.fixture(autouse=True)
def guest_kernel(request: pytest.FixtureRequest) -> str:
    """The kernel this test runs on (``debian``, ``pyvfio-6.12``); every guest test
    is parametrized over it."""
    return str(getattr(request, "param", ""))


@pytest.fixture
def vfio_bound() -> Iterator[Callable[[str], None]]:
    """``vfio_bound(bdf)`` binds the device to vfio-pci (driver_override +
    drivers_probe); every device goes back to its previous driver afterwards."""
    binding = pytest_guest.SysfsBinding()
    try:
        yield binding.bind
    finally:
        binding.restore()
