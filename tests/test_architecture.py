"""The structure stays as docs/architecture.md draws it: no import cycle among didi's modules, and the lower
layers never import the upper ones. The graph is built from the installed packages' source (AST), so an
import inside a function counts as much as one at the top of a file."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGES = ("didi", "didi.methods", "didi.backbones", "didi.datamodules")


def package_dirs(packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Where each installed package's source lives (backbones/ and datamodules/ install under didi.)."""
    out = {}
    for name in packages:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, f"{name} is not an installed package"
        out[name] = Path(list(spec.submodule_search_locations)[0])
    return out


def module_files(dirs: dict[str, Path]) -> dict[str, Path]:
    mods = {}
    for pkg, d in dirs.items():
        for f in sorted(d.glob("*.py")):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def import_graph(dirs: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules of these packages it imports (a `from pkg import name` counts as pkg.name when
    that is a module, else as pkg; importing a submodule does not count as importing its package)."""
    mods = module_files(dirs)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.stem == "__init__"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in mods:
                        deps.add(full)
                    elif base in mods:
                        deps.add(base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    found = cycles(import_graph(package_dirs()))
    assert not found, "import cycles among didi's modules: " + "; ".join(" ↔ ".join(c) for c in found)


def test_cycle_detector_finds_an_added_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")  # an import inside a function counts
    (pkg / "c.py").write_text("from . import a\n")  # and a relative one
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    (pkg / "c.py").write_text("")
    assert cycles(import_graph({"pkg": pkg})) == []


# Layers, from the bottom up: a module may import its own layer's modules and those below, never above.
GROUND = {
    "didi.errors",
    "didi.registry",
    "didi.options",
    "didi.jsonio",
    "didi.accounting",
    "didi.quantize",
    "didi.closed_form",
    "didi.linalg",
    "didi.streamed",
    "didi.sources",
    "didi.tensorfile",
    "didi.merges",
    "didi.trainer",
    "didi.progress",
    "didi.artifact",
    "didi.task_vectors",
    "didi.synthetic",
    "didi.budget",
    "didi.methods.published",
}
WORKFLOWS = {
    "didi.cli",
    "didi.__main__",
    "didi.compare",
    "didi.demo",
    "didi.demo_real",
    "didi.inspect",
    "didi.finetune",
    "didi.export",
}


def _layer(mod: str) -> int:
    if mod.startswith(("didi.backbones", "didi.datamodules")) or mod in GROUND or mod == "didi":
        return 0
    if mod in WORKFLOWS:
        return 3
    if mod.startswith("didi.methods"):
        return 2
    return 1  # stages: decompose, allocation, search, refine, routing, evaluation, pipeline


@pytest.mark.parametrize(
    "rule", ["layers point down", "backbones import only the ground", "datamodules hold data"]
)
def test_layers(rule: str) -> None:
    graph = import_graph(package_dirs())
    bad = []
    for mod, deps in graph.items():
        for d in deps:
            if rule == "layers point down" and _layer(d) > _layer(mod):
                bad.append(f"{mod} → {d}")
            if (
                rule == "backbones import only the ground"
                and mod.startswith("didi.backbones")
                and not (
                    d.startswith("didi.backbones") or d in {"didi.errors", "didi.sources", "didi.registry"}
                )
            ):
                bad.append(f"{mod} → {d}")
            if (
                rule == "datamodules hold data"
                and mod.startswith("didi.datamodules")
                and not (d.startswith(("didi.datamodules", "didi.backbones")) or d == "didi.errors")
            ):
                bad.append(f"{mod} → {d}")
    assert not bad, f"{rule}: " + ", ".join(sorted(bad))
