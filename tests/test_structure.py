"""The package's structure rules, checked from the source (imports inside functions count).

- no import cycle; a module imports only from its own layer or below
  (base <- store <- extraction, analysis <- topomap <- viz <- registry, pipeline, cli, demo);
- only the store package spells store paths, opens Zarr nodes or builds root attributes;
- no name imported from another module starts with ``_``;
- no module is named like a name its package exports.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "inntrospect"

#: layer of each module, by longest matching prefix: a module imports only from layers <= its own
LAYERS = {
    "inntrospect.errors": 0, "inntrospect.version": 0, "inntrospect.scheduler": 0, "inntrospect.checks": 0,
    "inntrospect.store": 1,
    "inntrospect.extraction": 2, "inntrospect.analysis": 2, "inntrospect.config": 2,
    "inntrospect.topomap": 3,
    "inntrospect.viz": 4,
    "inntrospect.registry": 5, "inntrospect.pipeline": 5, "inntrospect.cli": 5, "inntrospect.demo": 5,
    "inntrospect.testing": 5, "inntrospect.__main__": 5, "inntrospect": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (before its imported names)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str) -> list[tuple[str, str | None, int]]:
    """``(module imported, name taken from it or None, line)`` for every import of inntrospect code."""
    out = []
    for node in ast.walk(parse(MODULES[name])):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("inntrospect")]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, node)
            if not base.startswith("inntrospect"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports_of(m) if target in MODULES and target != m}
            for m in MODULES}


def layer(name: str) -> int:
    key = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[key]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_imports():
    """The checks below would pass on an empty graph: make sure it holds what we know is there."""
    edges = graph()
    assert "inntrospect.store.steps" in edges["inntrospect.topomap.api"]
    assert "inntrospect.extraction.distributed" in edges["inntrospect.extraction.local"]  # in a function
    assert "inntrospect.store" in edges["inntrospect.analysis.profiles"]  # from .. import store as st
    assert len(MODULES) > 40


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_import_only_their_own_layer_or_below():
    wrong = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
             for m, targets in graph().items() for t in targets if layer(t) > layer(m)]
    assert wrong == []


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


#: calls that open or write Zarr nodes, and text that spells the store's layout
ZARR_CALLS = {"open_group", "open_array", "open", "create_array", "create_group", "to_zarr",
              "consolidate_metadata"}
FORMAT_WORDS = ("layers/", "format_version", "block_done")


def format_leaks(path: Path) -> list[str]:
    tree = parse(path)
    docs = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ZARR_CALLS and (
                node.attr in ("to_zarr", "create_array", "create_group")
                or isinstance(node.value, ast.Name) and node.value.id == "zarr"):
            out.append(f"{path.name}:{node.lineno} {node.attr}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if any(node.value.startswith(w) or w == node.value for w in FORMAT_WORDS):
                out.append(f"{path.name}:{node.lineno} {node.value!r}")
    return out


def test_only_the_store_package_knows_the_format():
    leaks = {m: format_leaks(p) for m, p in MODULES.items() if not m.startswith("inntrospect.store")}
    assert {m: v for m, v in leaks.items() if v} == {}
    assert format_leaks(MODULES["inntrospect.store.nodes"])  # the check finds what is there


def private_uses(path: Path, importer: str | None) -> list[str]:
    """Names starting with ``_`` taken from inntrospect modules: imported, or read as attributes."""
    tree = parse(path)
    out, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = resolve(importer, node) if importer else node.module or ""
            if node.level == 0 and not base.startswith("inntrospect"):
                continue
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    aliases.add(a.asname or a.name)
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{path.name}:{node.lineno} from {base} import {a.name}")
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("inntrospect") and a.asname}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            out.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return out


def test_no_private_name_crosses_modules():
    found = [u for m, p in MODULES.items() for u in private_uses(p, m)]
    for folder in ("tests", "benchmarks", "examples"):
        found += [u for p in sorted((ROOT / folder).rglob("*.py")) for u in private_uses(p, None)]
    assert found == []


def test_private_uses_are_found(tmp_path):
    f = tmp_path / "t.py"
    f.write_text("from inntrospect.store import _x\nfrom inntrospect.store import steps\nsteps._y\n")
    assert len(private_uses(f, None)) == 2


@pytest.mark.parametrize("package", sorted(m for m in MODULES if is_package(m)))
def test_no_module_is_named_like_an_exported_name(package):
    mod = importlib.import_module(package)
    exported = set(getattr(mod, "__all__", []))
    submodules = {m.rsplit(".", 1)[1] for m in MODULES if m.startswith(package + ".")
                  and m.count(".") == package.count(".") + 1}
    assert exported & submodules == set()
    if package == "inntrospect":  # nor anywhere below it: `import inntrospect.x.naps` would mislead
        leaves = {m.rsplit(".", 1)[1] for m in MODULES if "." in m}
        assert exported & leaves == set()
