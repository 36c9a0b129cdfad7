"""The package's structure, checked from the source (docs/architecture.md).

Every module under ``pyvfio/`` is parsed with :mod:`ast` and every import is
counted: top-level, inside functions and methods, under ``if TYPE_CHECKING:``,
and ``importlib.import_module("pyvfio....")`` with a literal name.  The test
fails on any import cycle between modules, and on any import that breaks the
layer rules below.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyvfio"

# Which areas (``pyvfio.<area>``) an area may import, besides itself.  The CLI
# glue (``pyvfio.cli``, ``pyvfio.__main__`` and every ``pyvfio.<area>.commands``)
# sits on top and may import anything; so may ``pyvfio.testing``.
LOW = {"errors"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "uapi": LOW,
    "pci": LOW,
    "migration": LOW,
    "sockets": LOW,                               # UNIX socket paths, signal stops: daemons, clients
    "core": LOW | {"pci"},
    "device": LOW | {"core", "pci"},              # the public face of core
    "host": LOW | {"pci", "uapi"},
    "kernel": LOW | {"pci", "uapi", "core", "device", "migration", "host"},
    "devices": LOW | {"pci", "core", "device", "migration"},  # models: never user/
    "user": LOW | {"pci", "core", "device", "migration", "devices", "sockets"},
    # A driver's ``python -m`` entry point opens devices the way the CLI does.
    "drivers": LOW | {"pci", "core", "device", "kernel", "user", "broker", "cli"},
    "broker": LOW | {"pci", "uapi", "core", "device", "migration", "host", "kernel", "sockets"},
    # The kubelet device plugin: host facts and the kernel's backend choice.
    "k8s": LOW | {"pci", "uapi", "host", "kernel", "sockets"},
    "pyvfio": LOW | {"device", "pci"},            # the package's lazy top-level names
}
TOP = {"cli", "__main__", "testing"}
# Finer rules inside the layers: (importer prefix, imported prefix, why).
FORBIDDEN = [
    ("pyvfio.kernel", "pyvfio.host.diagnosis", "the kernel reads sysfs through host.sysfs"),
    ("pyvfio.kernel", "pyvfio.host.model", "the kernel reads sysfs through host.sysfs"),
    ("pyvfio.kernel", "pyvfio.host.binding", "the kernel does not bind drivers"),
    ("pyvfio.host.model", "pyvfio.host.diagnosis", "the model is below the diagnosis"),
    ("pyvfio.core", "pyvfio.device", "the core must not import its own public face"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The module an imported name lives in (``pyvfio.a.b.Name`` -> ``pyvfio.a.b``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            names = [node.args[0].value]
        found.update(_resolve(n) for n in names if n.split(".")[0] == "pyvfio")
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def area(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "pyvfio"
    if parts[-1] == "commands" or parts[1] in TOP:
        return "cli"
    return parts[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_every_kind_of_import() -> None:
    """The checker itself: function-level, TYPE_CHECKING, relative and
    import_module imports all count (a graph that missed them would pass
    anything)."""
    assert "pyvfio.pci.config" in GRAPH["pyvfio.core.device"]        # inside a property
    assert "pyvfio.kernel.iommufd" in GRAPH["pyvfio.kernel"]          # import_module("...")
    assert "pyvfio.user.server.connection" in GRAPH["pyvfio.user.server.listener"]
    assert len(MODULES) > 80 and all(isinstance(v, set) for v in GRAPH.values())
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    found = cycles(GRAPH)
    detail = "\n".join(
        " <-> ".join(c) + "\n    " + "\n    ".join(
            f"{m} imports {sorted(GRAPH[m] & set(c))}" for m in c) for c in found)
    assert not found, f"import cycles inside pyvfio:\n{detail}"


def test_layers() -> None:
    bad = []
    for module, targets in sorted(GRAPH.items()):
        mine = area(module)
        if mine == "cli":
            continue
        assert mine in ALLOWED, f"{module}: area {mine!r} has no layer rule; add it"
        for target in sorted(targets):
            theirs = area(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{module} imports {target} ({mine} may not import {theirs})")
    assert not bad, "layer rules broken (docs/architecture.md):\n" + "\n".join(bad)


def test_the_kernel_reads_the_host_only_through_the_shared_sysfs_reader() -> None:
    into_host = sorted(f"{m} imports {t}" for m, ts in GRAPH.items()
                       if area(m) == "kernel" for t in ts
                       if area(t) == "host" and t != "pyvfio.host.sysfs")
    assert not into_host, "\n".join(into_host)


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN)
def test_forbidden_imports(importer: str, imported: str, why: str) -> None:
    offenders = sorted(f"{m} imports {t}" for m, ts in GRAPH.items()
                       if (m == importer or m.startswith(importer + "."))
                       and area(m) != "cli"
                       for t in ts if t == imported or t.startswith(imported + "."))
    assert not offenders, f"{why}:\n" + "\n".join(offenders)


def test_device_models_do_not_know_the_transport() -> None:
    """devices/ is below user/: the vfio-user package uses the models, never
    the reverse (the model talks to devices.transport's protocols)."""
    into_user = defaultdict(list)
    for m, ts in GRAPH.items():
        if m.startswith("pyvfio.devices"):
            for t in ts:
                if t.startswith("pyvfio.user"):
                    into_user[m].append(t)
    assert not into_user
    assert "pyvfio.devices.transport" in GRAPH["pyvfio.user.server.connection"] | \
        GRAPH["pyvfio.user.dma"]
