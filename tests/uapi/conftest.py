"""Shared by the uapi layout tests: compile a C probe against kernel headers
and read back ``sizeof``/``offsetof``/macro values, to compare with the ctypes
definitions in :mod:`pyvfio.uapi`.

Use the ``c_layout`` fixture::

    layout = c_layout(includes=["linux/vfio.h"], structs={name: [field, ...]},
                      macros=[...], extra_source="...")
    layout.sizes[name], layout.offsets[name][field], layout.macros[macro]

Macros are probed with ``#ifdef`` (a name the header lacks is simply absent
from ``layout.macros``); enum members are not macros, so they go through
:func:`enum_probe` in ``extra_source`` and must exist.  :func:`header_enum_members`
says which names a header declares in enums.  ``headers_612`` puts the 6.12
kernel's ``linux/vfio.h`` and ``linux/iommufd.h`` (from Debian's
``linux-source-6.12``) ahead of the installed ones.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
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


def header_enum_members(text: str) -> set[str]:
    """Names declared as enum members anywhere in a header's text."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    names: set[str] = set()
    for body in re.findall(r"\benum\b[^{;]*\{(.*?)\}", text, flags=re.S):
        for item in body.split(","):
            m = re.match(r"\s*([A-Za-z_]\w*)", item)
            if m:
                names.add(m.group(1))
    return names


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


def enum_probe(names: list[str]) -> str:
    """C source that prints enum constants as ``macro NAME value`` lines from a
    constructor, so the shared probe's parser reads them with the macros.
    Every name must exist in the included headers (a macro or an enum member)."""
    if not names:
        return ""
    rows = "\n".join(f'    {{"{n}", (long long)({n})}},' for n in names)
    return ("struct pyvfio_enum { const char *name; long long value; };\n"
            "__attribute__((constructor)) static void pyvfio_print_enums(void) {\n"
            "  static const struct pyvfio_enum e[] = {\n" + rows + "\n  };\n"
            "  for (size_t i = 0; i < sizeof(e) / sizeof(e[0]); i++)\n"
            '    printf("macro %s %lld\\n", e[i].name, e[i].value);\n}\n')


# --- the 6.12 headers, from the kernel source tarball -----------------------------------------

SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
WANTED = {  # path in the source tree -> path under the include dir
    "include/uapi/linux/iommufd.h": "linux/iommufd.h",
    "include/uapi/linux/vfio.h": "linux/vfio.h",
    "drivers/iommu/iommufd/iommufd_test.h": "iommufd_test.h",
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyvfio" / "uapi-6.12"


def _headers_612() -> Path | None:
    """An include dir holding the 6.12 headers (extracted once, then cached)."""
    root = _cache_dir()
    done = root / ".complete"
    if done.exists():
        return root
    if not SOURCE_TARBALL.exists():
        return None
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        # One pass of tar(1) over the 150 MB .xz (about 9 s here); Python's
        # tarfile would decompress the whole archive as well, only slower.
        members = [f"linux-source-6.12/{m}" for m in WANTED]
        subprocess.run(["tar", "-xJf", str(SOURCE_TARBALL), "-C", tmp, *members],
                       check=True, capture_output=True, timeout=600)
        for src, dst in WANTED.items():
            text = (Path(tmp) / "linux-source-6.12" / src).read_text()
            # What scripts/headers_install.sh does that matters here.
            text = re.sub(r"\b__user\b\s*", "", text)
            out = root / dst
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
    done.write_text(f"from {SOURCE_TARBALL}\n")
    return root


@pytest.fixture
def headers_612(monkeypatch: pytest.MonkeyPatch) -> Path:
    root = _headers_612()
    if root is None:
        pytest.skip(f"{SOURCE_TARBALL} is not installed (the guest-kernel build installs "
                    "linux-source-6.12); the installed linux-libc-dev 6.1 has no iommufd.h")
    monkeypatch.setenv("CPATH", str(root))
    return root
