"""The import rules of the architecture (../shared/DESIGN.md, "Boundaries"), read from the source.

Every `import` in engine/ is parsed with `ast` (function-level imports included). A unit is a
sub-package of engine (engine.graph, engine.models, ...) or a module at engine's top level; the
unit graph must have no cycle, the graph machinery and the models must not import each other
(models implement engine/graph/protocol.py structurally), engine never imports the verifier, and
Paddle internals and process-wide flags appear only in engine/graph/paddle_compat.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"
COMPAT = ENGINE / "graph" / "paddle_compat.py"
INTERNALS = ("dy2static", "set_flags", "extract_stack", "get_concrete_program")


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (`from a import b` counts as a.b and a)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def unit(module: str) -> str:
    """engine.graph.runner -> engine.graph; engine.runner -> engine.runner (top-level modules stand alone)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def engine_imports() -> dict[str, set[str]]:
    """Module of engine -> the engine modules (or packages) it imports."""
    modules = {module_name(p): p for p in ENGINE.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m.split(".")[0] == "engine" and m in modules}
            for name, path in modules.items()}


def unit_edges(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, targets in imports.items():
        edges.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def crossing(imports: dict[str, set[str]], source: str, target: str) -> list[str]:
    return sorted(f"{m} imports {t}" for m, ts in imports.items() if unit(m) == source
                  for t in ts if unit(t) == target)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_the_parser_sees_function_level_and_from_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\ndef f():\n    from engine.graph import protocol\n")
    assert imported_modules(source) == {"os", "engine.graph", "engine.graph.protocol"}


def test_no_import_cycle_between_engine_units():
    assert find_cycle(unit_edges(engine_imports())) is None


def test_config_imports_nothing_from_graph():
    assert crossing(engine_imports(), "engine.config", "engine.graph") == []


def test_graph_and_models_do_not_import_each_other():
    imports = engine_imports()
    assert crossing(imports, "engine.graph", "engine.models") == []
    assert crossing(imports, "engine.models", "engine.graph") == []


def test_engine_never_imports_the_verifier():
    leaks = [f"{module_name(p)} imports {m}" for p in ENGINE.rglob("*.py") for m in imported_modules(p)
             if m.split(".")[0] == "verifier"]
    assert leaks == []


def test_paddle_internals_only_in_paddle_compat():
    uses = [f"{p.relative_to(ENGINE.parent)}: {word}" for p in ENGINE.rglob("*.py") if p != COMPAT
            for word in INTERNALS if word in p.read_text()]
    assert uses == []
