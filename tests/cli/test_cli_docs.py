"""The code in docs/kernel.md and docs/vfio-user-client.md runs as written.

vfio-user examples run against the edu model; the kernel examples cannot run
on a host without an IOMMU, so the first one runs with the vfio-user client
in place of ``open_device`` (the same Device API: that is the point of it),
and every name and signature the kernel page documents is checked to exist.
(docs/vfio-user.md's model example is run by tests/user/test_docs_example.py.)
"""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import pytest

from pyvfio.cli import build_parser

DOCS = Path(__file__).resolve().parents[2] / "docs"


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), re.S)


def run_block(code: str, name: str) -> dict:
    namespace: dict = {"__name__": f"docs_{name}"}
    exec(compile(code, str(DOCS / name), "exec"), namespace)
    return namespace


def test_vfio_user_client_example_runs(edu_socket: str, capsys) -> None:
    (block,) = python_blocks("vfio-user-client.md")
    assert '"/run/edu.sock"' in block
    run_block(block.replace('"/run/edu.sock"', repr(edu_socket)), "vfio-user-client.md")
    out = capsys.readouterr().out.splitlines()
    assert "'backend': 'vfio-user'" in out[0]
    assert out[1] == "0x10000ed"  # edu's identification register, version 1.0


def test_kernel_example_runs_over_the_same_device_api(edu_socket: str, capsys) -> None:
    block = python_blocks("kernel.md")[0]
    assert "from pyvfio.kernel import open_device" in block
    code = (block.replace("from pyvfio.kernel import open_device",
                          "from pyvfio.user.client import connect as open_device")
            .replace('"0000:00:03.0"', repr(edu_socket)))
    run_block(code, "kernel.md")
    out = capsys.readouterr().out.splitlines()
    assert out == [f"vfio-user - vfio-user server at {edu_socket} (protocol 0.2)", "0x10000ed"]


def test_kernel_page_names_exist() -> None:
    from pyvfio import device as D
    from pyvfio import errors
    from pyvfio.drivers.edu import Edu
    from pyvfio.kernel import choose_backend, legacy, open_device
    from pyvfio.kernel.device import KernelDevice
    from pyvfio.pci.config import ConfigSpace
    from pyvfio.uapi import ioctl, vfio

    params = inspect.signature(open_device).parameters
    assert list(params)[:3] == ["bdf", "backend", "root"] and "container" in params
    assert list(inspect.signature(choose_backend).parameters)[:1] == ["bdf"]
    fds_params = inspect.signature(legacy.device_from_fds).parameters
    assert {"device_fd", "name", "group_fd", "container_fd"} <= set(fds_params)
    for name in ("info", "regions", "region_info", "bar", "region", "config", "irqs",
                 "irq_info", "enable_irq", "unmask_irq", "set_irqs", "disable_irq",
                 "dma_alloc", "reset", "describe", "close"):
        assert hasattr(D.Device, name), name
    assert list(inspect.signature(D.Device.dma_alloc).parameters) == ["self", "size", "iova",
                                                                      "below"]
    for name in ("fds", "from_fd", "hot_reset_info", "feature", "has_feature",
                 "migration_flags", "mig_state", "set_mig_state", "migration"):
        assert hasattr(KernelDevice, name), name
    for name in ("extensions", "page_sizes", "iova_ranges", "dma_avail", "info", "map",
                 "unmap", "unmap_all"):
        assert hasattr(legacy.Container, name), name
    for name in ("status", "viable", "require_viable", "attach", "detach", "get_device_fd"):
        assert hasattr(legacy.Group, name), name
    widths = ("read8", "read16", "read32", "read64", "write8", "write16", "write32", "write64")
    for name in (*widths, "read", "write", "mmap"):
        assert hasattr(D.Region, name), name
    for name in widths:
        assert hasattr(D.MappedRegion, name), name
    for name in ("vendor_id", "class_code", "enable_bus_master", "capabilities",
                 "find_capability"):
        assert hasattr(ConfigSpace, name), name
    for name in ("NotBoundToVfio", "NotViable", "DeviceInUse", "NoIommu", "IovaRangeError",
                 "MemlockLimitError", "KernelError"):
        assert issubclass(getattr(errors, name), errors.PyvfioError), name
    for name in ("_IO", "_IOR", "_IOW", "_IOWR", "ioctl", "call_with_argsz", "iter_caps"):
        assert hasattr(ioctl, name), name
    assert hasattr(vfio, "vfio_region_info") and hasattr(vfio, "VFIO_DEVICE_GET_REGION_INFO")
    for name in ("ident", "liveness", "factorial", "enable_interrupts", "raise_interrupt",
                 "wait_interrupt", "dma_to_device", "dma_from_device"):
        assert hasattr(Edu, name), name


def command_lines(name: str) -> list[str]:
    """The ``pyvfio ...`` lines of a page's plain (untagged) code blocks."""
    lines, fence = [], None
    for line in (DOCS / name).read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence == "":
            line = line.split("#")[0].strip().rstrip("&").strip()
            if line.startswith("pyvfio "):
                lines.append(line)
    return lines


@pytest.mark.parametrize("doc", ["vfio-user.md", "vfio-user-client.md"])
def test_documented_command_lines_parse(doc: str) -> None:
    lines = command_lines(doc)
    assert lines, f"{doc} shows no pyvfio command"
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert callable(args.func), line
