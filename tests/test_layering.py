"""The package's layering (docs/architecture.md): no import cycles between modules, counting imports
inside functions too, and no module importing a layer above its own."""
from __future__ import annotations

import ast
from pathlib import Path

import quantbench

ROOT = Path(quantbench.__file__).parent

# layer of each module or subpackage, by longest dotted prefix under quantbench (lower = lower layer)
LAYERS = {
    "errors": 0, "log": 0, "registry": 0, "surgery": 0, "hooks": 0, "__init__": 0,
    "pristine": 0, "offload": 0, "memory": 0,
    "fileio": 0, "stats": 0,
    "arch": 1, "models": 1, "assets": 1, "taskpack": 1, "offline": 1, "data": 1, "config": 1, "manifest": 1,
    "topology": 1, "prequant": 1, "archspec": 1, "trace": 1, "pairs": 1, "moe": 1, "families": 1,
    "train.modeling": 1, "train.attention": 1,  # model definitions (loadable checkpoints), not orchestration
    "quant": 2,
    "census": 3, "eval": 3,
    "report": 4, "export": 4, "coverage": 4, "coverage_doc": 4, "mixed": 4,
    "rundir": 5, "pipeline": 5, "executor": 5, "train": 5, "cli": 6,
}
# a lower layer may still reach these (data classes every layer shares)
ALLOWED_UP = {("config", "quant"), ("config", "census"), ("config", "mixed")}  # the run config holds recipes and census settings, and checks mixed entries by the search's own rule


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
                bad.append(f"{m} -> {d}: layer of {a if a not in LAYERS else b} unknown (add it to LAYERS)")
            elif LAYERS[b] > LAYERS[a] and (a, b) not in ALLOWED_UP:
                bad.append(f"{m} -> {d}")
    assert not bad, bad
