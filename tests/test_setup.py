"""scripts/setup end to end, as a user of Debian's own Python runs it.

Debian's /usr/bin/python3 is externally managed (PEP 668): pip refuses to
install into it.  On the development machines another Python (pyenv) comes
first on PATH, which once hid that setup only worked there.  This test runs
setup on a copy of the checkout with PATH reduced to the system directories,
so that the only python3 it can find is Debian's, and checks that it made a
virtual environment in the checkout with pyvfio (editable, from the copy)
and the test tools, and that a second run has nothing to do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
STOCK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def stock_env() -> dict[str, str]:
    """A login-like environment: system PATH, HOME (pip's cache and config), and
    whatever tells pip or apt how to reach their archives (proxies, PIP_*)."""
    env = {"PATH": STOCK_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items()
                if k.startswith("PIP_") or k.lower().endswith("_proxy")})
    return env


def copy_checkout(dest: Path) -> Path:
    """The checkout's files without its venv, caches, build metadata or git."""
    shutil.copytree(CHECKOUT, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", ".cache", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache",
        ".pytest_cache", ".hypothesis", "build", "dist"))
    return dest


@pytest.mark.skipif(not SYSTEM_PYTHON.is_file() or shutil.which("dpkg-query") is None,
                    reason="not a Debian machine (no /usr/bin/python3 or dpkg)")
def test_setup_with_debians_python_makes_and_uses_a_venv(tmp_path: Path) -> None:
    work = copy_checkout(tmp_path / "checkout")
    env = stock_env()
    first = subprocess.run(["scripts/setup"], cwd=work, env=env, capture_output=True, text=True,
                           timeout=1200)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installing pyvfio (editable)" in first.stdout

    venv_python = work / ".venv" / "bin" / "python"
    probe = subprocess.run(
        [str(venv_python), "-c",
         "import importlib.util, sys, pyvfio; print(pyvfio.__file__); print(sys.base_prefix); "
         "print(all(importlib.util.find_spec(m) for m in ('pytest', 'hypothesis', 'mypy', "
         "'ruff')))"],
        cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module, base, tools = probe.stdout.split()
    assert Path(module) == work / "pyvfio" / "__init__.py"  # editable, from this copy
    assert Path(base).resolve() == Path(
        subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.base_prefix)"],
                       capture_output=True, text=True, check=True).stdout.strip()).resolve()
    assert tools == "True"
    assert (work / ".venv" / "bin" / "pyvfio").is_file()

    # Debian's interpreter itself got nothing (PEP 668 is respected, not bypassed).
    system = subprocess.run([str(SYSTEM_PYTHON), "-c", "import pyvfio"], cwd="/", env=env,
                            capture_output=True, text=True, timeout=60)
    assert system.returncode != 0 and "No module named 'pyvfio'" in system.stderr

    # Idempotent: the second run finds everything in place and installs nothing.
    again = subprocess.run(["scripts/setup"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout == "", again.stdout


def test_scripts_run_the_venvs_python() -> None:
    """scripts/test, scripts/demo and .ci/run never run a bare python3 (it may be
    Debian's externally managed one, without pytest or pyvfio)."""
    for name in ("scripts/test", "scripts/demo"):
        text = (CHECKOUT / name).read_text()
        assert ".venv/bin/python" in text, name
        code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not any("python3 " in line for line in code), name
    assert "scripts/test" in (CHECKOUT / ".ci/run").read_text()
    assert "-m venv" in (CHECKOUT / "scripts/setup").read_text()


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian machine (no dpkg)")
def test_setups_package_check_survives_an_unknown_package() -> None:
    """One dpkg-query for all packages; dpkg-query exits 1 when one is unknown,
    which under ``set -euo pipefail`` must not end the check early (it once
    reported nothing missing)."""
    script = (CHECKOUT / "scripts/setup").read_text()
    function = script[script.index("missing_packages() {"):]
    function = function[:function.index("\n}\n") + 3]
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + function
         + "missing_packages dpkg pyvfio-no-such-package; echo done"],
        capture_output=True, text=True, timeout=60)
    assert proc.stdout == "pyvfio-no-such-package\ndone\n", proc.stdout + proc.stderr
