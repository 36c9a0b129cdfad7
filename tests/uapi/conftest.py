"""Shared by the uapi layout tests: compile a C probe against kernel headers
and read back ``sizeof``/``offsetof``/macro values, to compare with the ctypes
definitions in :mod:`pyvfio.uapi`.

Use the ``c_layout`` fixture::

    layout = c_layout(includes=["linux/vfio.h"], structs={name: [field, ...]},
                      macros=[...], extra_source="...")
    layout.sizes[name], layout.offsets[name][field], layout.macros[macro]
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Layout:
    sizes: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    macros: dict[str, int] = field(default_factory=dict)


def c_fields(struct: type[ctypes.Structure], prefix: str = "") -> list[tuple[str, int]]:
    """``(C field path, ctypes offset)`` for every field, flattening anonymous
    unions/structs the way C names their members."""
    out: list[tuple[str, int]] = []
    anonymous = set(getattr(struct, "_anonymous_", ()))
    for name, *_ in struct._fields_:
        off = getattr(struct, name).offset
        if name in anonymous:
            inner = dict(struct._fields_)[name]
            for sub, suboff in c_fields(inner):
                out.append((prefix + sub, off + suboff))
        else:
            out.append((prefix + name, off))
    return out


def header_text(include: str) -> str | None:
    path = Path("/usr/include") / include
    return path.read_text() if path.exists() else None


def header_has_struct(text: str, name: str) -> bool:
    return re.search(rf"\bstruct\s+{re.escape(name)}\s*\{{", text) is not None


def _compile_probe(includes: Iterable[str], structs: dict[str, list[str]], macros: Iterable[str],
                   extra_source: str, workdir: Path) -> Layout:
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += [f"#include <{inc}>" for inc in includes]
    lines += [extra_source, "int main(void) {"]
    for name, fields in structs.items():
        lines.append(f'  printf("size {name} %zu\\n", sizeof(struct {name}));')
        for f in fields:
            lines.append(f'  printf("off {name} {f} %zu\\n", offsetof(struct {name}, {f}));')
    for m in macros:
        lines += [f"#ifdef {m}", f'  printf("macro {m} %lld\\n", (long long)({m}));', "#endif"]
    lines += ["  return 0;", "}"]
    src = workdir / "probe.c"
    src.write_text("\n".join(lines) + "\n")
    exe = workdir / "probe"
    res = subprocess.run(["gcc", "-Wall", "-o", str(exe), str(src)], capture_output=True,
                         text=True)
    if res.returncode:
        raise AssertionError(f"C probe failed to compile:\n{res.stderr}\n--- source ---\n"
                             + src.read_text())
    layout = Layout()
    for line in subprocess.run([str(exe)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            layout.sizes[rest[0]] = int(rest[1])
        elif kind == "off":
            layout.offsets.setdefault(rest[0], {})[rest[1]] = int(rest[2])
        elif kind == "macro":
            layout.macros[rest[0]] = int(rest[1])
    return layout


@pytest.fixture
def c_layout(tmp_path: Path) -> Callable[..., Layout]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (scripts/setup installs it)")

    def probe(includes: Iterable[str], structs: dict[str, list[str]],
              macros: Iterable[str] = (), extra_source: str = "") -> Layout:
        return _compile_probe(includes, structs, macros, extra_source, tmp_path)

    return probe
