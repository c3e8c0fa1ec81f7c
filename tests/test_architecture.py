"""The code's shape (issue 18): no import cycle among ptrain's modules, the planner below the trainer, short
functions, and a README layout section that names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "ptrain"

#: Functions allowed over MAX_LINES: declarative tables (one entry per line), with the reason.
LONG_OK: dict[str, str] = {}
MAX_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every ptrain module `path` imports, at module level or inside functions (lazy imports count too: a
    cycle hidden in a function is still a cycle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `from ptrain.x import name` -> module ptrain.x
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("ptrain"):
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its submodules is not a dependency of those submodules on it.
    return {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_planner_is_below_the_trainer():
    graph = _graph()
    seen, todo = set(), ["ptrain.planner"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    assert "ptrain.trainer" not in seen, "ptrain.planner must not import ptrain.trainer (directly or not)"
    assert {"ptrain.parallelize", "ptrain.step"} <= graph["ptrain.planner"]


def _long_functions() -> list[str]:
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                key = f"{name}.{node.name}"
                if n > MAX_LINES and key not in LONG_OK:
                    out.append(f"{key}: {n} lines")
    return out


def test_no_function_over_80_lines():
    assert _long_functions() == []


def test_train_loop_is_short():
    tree = ast.parse((PKG / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    loop = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert loop.end_lineno - loop.lineno + 1 <= 60


def test_readme_layout_names_every_module():
    """Every module file appears in the README's layout section, and every .py name there exists."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Repository layout") :]
    section = section[: section.index("```", section.index("```") + 3)]
    named = set(re.findall(r"([A-Za-z_]\w*\.py)", section))
    files = {p.name for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    assert files - named == set(), f"modules missing from README's layout: {sorted(files - named)}"
    existing = {p.name for p in REPO.rglob("*.py") if ".venv" not in p.parts}
    assert named - existing == set(), f"README's layout names files that do not exist: {sorted(named - existing)}"
