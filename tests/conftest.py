"""Options and markers of the whole suite (the guest harness's live in tests/guest/conftest.py)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvfio guest", "guest tests (tests/guest, run in QEMU guests)")
    group.addoption(
        "--guest-kernel", action="append", default=[], metavar="NAME",
        help="run guest tests on this kernel only (repeatable: debian, pyvfio-6.12, or a "
        "bzImage path; default: $PYVFIO_GUEST_KERNELS or both)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "guest_config(name): boot this guest test's guest with configuration NAME "
        "(see pyvfio.testing.pytest_guest.GUEST_CONFIGS, e.g. noiommu)",
    )
    config.addinivalue_line(
        "markers",
        "guest_timeout(seconds): per-phase deadline of this guest test inside the guest "
        "(default 180 s, or $PYVFIO_GUEST_TEST_TIMEOUT)",
    )
