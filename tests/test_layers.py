"""Imports point down the layers of docs/architecture.md, and no module imports itself round a circle.

The source is read with `ast`, nothing is imported. Every `import` counts: at the top of a module and inside
functions (lazy imports run too, only later). Imports under `if TYPE_CHECKING:` never run, but they count
for both checks: a module naming a type of a module that imports it is a circle to a reader and to a type
checker all the same (move the shared type down, or name a Protocol that lives below both).

The debt of today is listed in KNOWN_VIOLATIONS, each entry with the item of issue 20 that removes it. The
list is a ratchet: a new violation fails, and so does a listed one that is gone (delete it from the list).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "wanstream"

# Each unit of the code (a module, or a package with everything under it) and its layer, lowest first.
# A module may import its own unit and the units of lower layers; two units of one layer are independent
# peers (weights and engine meet only in the pipeline above them). The longest matching name wins.
LAYERS: dict[str, int] = {
    "wanstream.models": 0,  # pure torch modules
    "wanstream.weights": 1,  # files → tensors and modules
    "wanstream.engine": 1,  # the streaming algorithm and its state
    "wanstream.parallel": 2,  # one stream over several processes
    "wanstream.pipeline": 3,  # where weights, engine and the ring meet
    "wanstream": 4,  # the package's public names (`wanstream.Pipeline`, `__version__`)
    "wanstream.media": 4,  # video and images in and out
    "wanstream.timeline": 5,  # Scope timelines (their times compare with media's tolerance)
    # The benchmarks and the ring check: one process, the ring (parallel/), the sample clip (media/); their
    # random weights are engine/random_weights.py.
    "wanstream.bench": 5,
    "wanstream.prompting": 6,  # prompt extension (of timelines too)
    "wanstream.takes": 6,  # session logs: saved, loaded and replayed (a log exports as a timeline)
    "wanstream.jobs": 7,  # the offline jobs: jobs/generate
    "wanstream.conformance": 7,  # the golden-vector runner
    "wanstream.server": 8,
    "wanstream.cli": 9,
}

# (importer, imported) module pairs known to break the rules, each with what removes it. Cycles are listed
# as the imports that close them. When a change removes one, delete its line here.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: str  # for messages
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:`: never runs


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: str, source: str, modules: set[str]) -> list[Import]:
    """Every import of a wanstream module in this module's source, resolved to the module it loads."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # `from pkg.mod import function` loads pkg.mod
            name = name.rpartition(".")[0]
        return name or None

    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level-1 times
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # `from pkg import submodule` loads the submodule; `from mod import name` loads mod.
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else resolve(source)
                for alias in node.names
            ]
        for target in targets:
            if target is not None and target != module:
                found.append(Import(module, target, path, node.lineno, type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(ast.parse(source, path), False)
    return found


def _all_imports() -> list[Import]:
    modules = _modules()
    names = set(modules)
    return [
        imp
        for module, path in modules.items()
        for imp in _imports(module, str(path.relative_to(SRC.parent)), path.read_text(), names)
    ]


def _unit(module: str) -> str:
    matches = [u for u in LAYERS if module == u or module.startswith(u + ".")]
    assert matches, f"{module} has no layer: add its package to LAYERS in {__file__}"
    return max(matches, key=len)


Found = dict[tuple[str, str], tuple[Import, str]]  # (importer, imported) → the first such import, why


def _against_layers(imports: list[Import]) -> Found:
    """Imports of a higher layer's unit, or of another unit of the same layer."""
    found: Found = {}
    for imp in imports:
        mine, theirs = _unit(imp.importer), _unit(imp.imported)
        if mine != theirs and LAYERS[theirs] > LAYERS[mine]:
            found.setdefault(
                (imp.importer, imp.imported), (imp, f"points up (layer {LAYERS[mine]} → {LAYERS[theirs]})")
            )
        elif mine != theirs and LAYERS[theirs] == LAYERS[mine]:
            found.setdefault(
                (imp.importer, imp.imported), (imp, f"crosses to a peer of layer {LAYERS[mine]}")
            )
    return found


def _in_circles(imports: list[Import]) -> Found:
    """The imports that run inside an import circle (both ends in one strongly connected component)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        graph[imp.importer].add(imp.imported)
    component = _components(graph)
    found: Found = {}
    for imp in imports:
        if imp.importer not in component:
            continue
        if component[imp.importer] == component.get(imp.imported):
            why = "closes an import circle" + (
                " (a type-checking import: move the type down, or name a Protocol below both)"
                if imp.type_checking
                else ""
            )
            found.setdefault((imp.importer, imp.imported), (imp, why))
    return found


def _components(graph: dict[str, set[str]]) -> dict[str, int]:
    """Tarjan's strongly connected components of more than one module: module → component number."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: dict[str, int] = {}

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                for w in members:
                    result[w] = index[v]

    for v in list(graph):
        if v not in index:
            connect(v)
    return result


def _describe(found: Found, keys: set[tuple[str, str]]) -> str:
    lines = []
    for key in sorted(keys):
        imp, why = found[key]
        lines.append(f"  {imp.path}:{imp.line}: {imp.importer} imports {imp.imported}: {why}")
    return "\n".join(lines)


def test_every_import_points_down_the_layers_and_none_closes_a_circle() -> None:
    imports = _all_imports()
    found = {**_in_circles(imports), **_against_layers(imports)}
    new = set(found) - set(KNOWN_VIOLATIONS)
    gone = set(KNOWN_VIOLATIONS) - set(found)
    problems = []
    if new:
        problems.append(
            f"new imports against the layers (LAYERS in {Path(__file__).name}, docs/architecture.md) or "
            "round a circle; import downwards, or move the shared piece down a layer:\n"
            + _describe(found, new)
        )
    if gone:
        problems.append(
            "fixed, so delete them from KNOWN_VIOLATIONS:\n"
            + "\n".join(f"  {importer} imports {imported}" for importer, imported in sorted(gone))
        )
    assert not problems, "\n".join(problems)


def test_the_check_reads_lazy_relative_and_type_checking_imports() -> None:
    modules = {"wanstream.engine", "wanstream.engine.a", "wanstream.engine.b", "wanstream.server.x"}
    source = """
from typing import TYPE_CHECKING
import os
from . import b
from .b import thing
if TYPE_CHECKING:
    from wanstream.server.x import Server

def later():
    import wanstream.server.x.deeper
"""
    found = _imports("wanstream.engine.a", "src/wanstream/engine/a.py", source, modules)
    seen = [(i.imported, i.line, i.type_checking) for i in found]
    assert seen == [
        ("wanstream.engine.b", 4, False),
        ("wanstream.engine.b", 5, False),
        ("wanstream.server.x", 7, True),
        ("wanstream.server.x", 10, False),
    ]
    layered = _against_layers(found)
    assert set(layered) == {("wanstream.engine.a", "wanstream.server.x")}
    assert layered["wanstream.engine.a", "wanstream.server.x"][1] == "points up (layer 1 → 8)"


def test_a_circle_is_found_type_checking_imports_included() -> None:
    def imp(a: str, b: str, hint: bool = False) -> Import:
        return Import(f"wanstream.{a}", f"wanstream.{b}", "x.py", 1, hint)

    found = _in_circles([imp("media.a", "media.b"), imp("media.b", "media.c"), imp("media.c", "media.a")])
    assert len(found) == 3
    hinted = _in_circles([imp("media.a", "media.b"), imp("media.b", "media.a", hint=True)])
    assert set(hinted) == {
        ("wanstream.media.a", "wanstream.media.b"),
        ("wanstream.media.b", "wanstream.media.a"),
    }
    assert hinted["wanstream.media.a", "wanstream.media.b"][1] == "closes an import circle"
    assert "a type-checking import" in hinted["wanstream.media.b", "wanstream.media.a"][1]
    assert not _in_circles([imp("media.a", "media.b"), imp("media.b", "media.c", hint=True)])
