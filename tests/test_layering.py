"""The package's layering (docs/architecture.md): no import cycles between modules, counting imports
inside functions too, and no module importing a layer above its own. The layers are read from the
table in docs/architecture.md, so documentation and test cannot disagree."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import quantbench

ROOT = Path(quantbench.__file__).parent

DOC = ROOT.parent / "docs" / "architecture.md"


def _doc_table(marker: str) -> list[list[str]]:
    """The rows of the table between <!-- MARKER --> and <!-- MARKER: end --> in docs/architecture.md:
    per row, its cells' backticked names (the layering is written once, there)."""
    text = DOC.read_text()
    body = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- {marker}: end -->", 1)[0]
    rows = [ln.split("|")[1:-1] for ln in body.splitlines() if ln.startswith("|") and "---" not in ln]
    return rows[1:]  # the header row dropped


def _layers() -> dict[str, int]:
    """{package or module under quantbench: layer}, from the layering table."""
    out = {}
    for cells in _doc_table("layering"):
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            out[name] = int(cells[0].strip())
    return out


def _allowed_up() -> set[tuple[str, str]]:
    return {(re.findall(r"`([\w.]+)`", cells[0])[0], b) for cells in _doc_table("layering exceptions")
            for b in re.findall(r"`([\w.]+)`", cells[1])}


LAYERS = _layers()
ALLOWED_UP = _allowed_up()


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t.startswith("quantbench") and t != name:
                found.add(t)
                break
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _top(mod: str) -> str:
    """The LAYERS key of a module: its longest dotted prefix (without 'quantbench.') that has one."""
    parts = mod.split(".")[1:] or ["__init__"]
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in LAYERS:
            return ".".join(parts[:k])
    return parts[0]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n == m.rpartition(".")[0] or m.startswith(n + "."):
                continue  # a module importing its own package's __init__ is not a cycle
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for m, deps in _graph().items():
        for d in deps:
            a, b = _top(m), _top(d)
            if a not in LAYERS or b not in LAYERS:
                bad.append(f"{m} -> {d}: layer of {a if a not in LAYERS else b} unknown (add it to the layering table in docs/architecture.md)")
            elif LAYERS[b] > LAYERS[a] and (a, b) not in ALLOWED_UP:
                bad.append(f"{m} -> {d}")
    assert not bad, bad
