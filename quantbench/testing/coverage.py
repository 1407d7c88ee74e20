"""The architecture coverage matrix: every family of quantbench.testing.families x the census, the W8A8 /
W4A16 recipes and every mitigation, each cell run on a tiny random model of that family.

A cell is "✓" when it ran and held its promise, "refused: <reason>" when quantbench refuses it in
one line before any work (the reason names the family), and "FAIL: ..." otherwise (the tests
require no FAIL). Promises checked:
- census: one row per decoder layer, a site per linear input; MoE: routing counts that add up to
  tokens x experts per token, one entry per expert.
- recipes: every planned linear (every expert's included) is quantized; routers stay in high
  precision; the logits are finite.
- smoothquant, awq, rotate (function-preserving): the mitigation alone leaves the logits unchanged
  to float tolerance (relative max error <= 1e-4); int8_decomp and outlier_tokens alone change no
  weight, so the logits are unchanged too; then a quantized recipe with the mitigation runs.
- clip, gptq (they change weights by design): a W4A16 recipe with them runs; GPTQ hands over final
  weights for every planned linear that saw calibration tokens.
docs/architectures.md is written from this module by tools/architectures.py, and a test fails
when the committed file differs from a fresh run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.errors import QuantbenchError
from ..modeling.arch import arch_of
from .families import FAMILIES, tiny_family

RECIPES = ("w8a8-token", "w8a8-tensor-static", "w4a16-g64")
MITIGATIONS = ("smoothquant", "rotate", "clip", "gptq", "awq", "int8_decomp", "outlier_tokens")
COLUMNS = ("census", *RECIPES, *MITIGATIONS)
PRESERVES = {"smoothquant", "awq", "rotate", "int8_decomp", "outlier_tokens"}
# the quantized recipe each mitigation is run with (its preset's spirit, on the tiny dims)
WITH = {"smoothquant": "w8a8-tensor-static", "rotate": "w8a8-token", "clip": "w4a16-g64", "gptq": "w4a16-g64",
        "awq": "w4a16-g64", "int8_decomp": "w8a8-tensor-dynamic", "outlier_tokens": "w8a8-tensor-static"}
TOL = 1e-4


@dataclass(frozen=True)
class Cell:
    status: str  # "ok", "refused" or "fail"
    text: str = ""

    def mark(self) -> str:
        return "✓" if self.status == "ok" else ("refused" if self.status == "refused" else "FAIL")


def tokens(n: int = 4, t: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _recipe(name: str, mitigation: str | None = None):
    from ..quant.recipes import PRESETS
    from ..quant.spec import MitigationSpec

    r = PRESETS.get(name)
    if mitigation is None:
        return r
    opts = {"search_tokens": 64} if mitigation in ("awq", "clip") else {}
    return r.model_copy(update={"name": f"{name}+{mitigation}",
                                "mitigations": (MitigationSpec(name=mitigation, options=opts),)})


def _run_recipe(model: nn.Module, recipe, ids: torch.Tensor):
    from ..quant.apply import apply_recipe

    return apply_recipe(model, recipe, ids, torch.device("cpu"), batch_size=4)


def _check_quantized(q: nn.Module, applied, ids: torch.Tensor) -> str | None:
    from ..quant.qlinear import QuantLinear

    missing = [n for n, lp in applied.plan.linears.items() if lp.quantized and not isinstance(q.get_submodule(n), QuantLinear)]
    routers = [n for n in arch_of(q).names("routers") if isinstance(q.get_submodule(n), QuantLinear)]
    with torch.no_grad():
        finite = bool(torch.isfinite(q(input_ids=ids).logits).all())
    if missing:
        return f"not quantized: {missing[0]}"
    if routers:
        return f"router quantized: {routers[0]}"
    return None if finite else "non-finite logits"


def _mitigate_alone(model: nn.Module, name: str, ids: torch.Tensor) -> float:
    """Relative max logit change of the mitigation alone (the quantized recipe's specs steer its search)."""
    from ..quant.apply import mitigate, prepare
    from ..quant.calibration import Calibration
    from ..quant.plugin import QuantContext

    with torch.no_grad():
        ref = model(input_ids=ids).logits
    plan = prepare(model, _recipe(WITH[name], name))
    ctx = QuantContext(plan=plan, calib=Calibration(ids, 4, torch.device("cpu")), arch=arch_of(model))
    eff = mitigate(model, ctx)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    eff.remove_hooks()
    return _rel(out, ref)


def _census_cell(model: nn.Module, ids: torch.Tensor) -> Cell:
    from ..census import run_census
    from ..run.config import CensusConfig

    c = run_census(model, ids, None, CensusConfig(plots=False, top_k=2))
    arch = arch_of(model)
    if len(c["layers"]) != arch.n_layers or any(not L for L in c["linear_inputs"]):
        return Cell("fail", "census rows missing")
    if arch.is_moe:
        k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
        per_layer: dict[int, int] = {}
        for e in c["experts"]:
            per_layer[e["layer"]] = per_layer.get(e["layer"], 0) + e["tokens"]
        if not per_layer or any(v != ids.numel() * k for v in per_layer.values()):
            return Cell("fail", f"routing counts {per_layer} != {ids.numel()} tokens x {k}")
        n = sum(len(t.experts) for t in arch.layer_topos)
        return Cell("ok", f"{n} experts profiled")
    return Cell("ok")


def run_cell(base: nn.Module, column: str, ids: torch.Tensor) -> Cell:
    model = copy.deepcopy(base)
    try:
        if column == "census":
            return _census_cell(model, ids)
        if column in RECIPES:
            q, applied = _run_recipe(model, _recipe(column), ids)
            bad = _check_quantized(q, applied, ids)
            return Cell("fail", bad) if bad else Cell("ok")
        if column in PRESERVES:
            err = _mitigate_alone(model, column, ids)
            if err > TOL:
                return Cell("fail", f"{column} alone changes the logits by {err:.2e} (relative)")
            model = copy.deepcopy(base)
        q, applied = _run_recipe(model, _recipe(WITH[column], column), ids)
        bad = _check_quantized(q, applied, ids)
        if bad is None and column == "gptq" and not applied.effects.final_weights:
            bad = "GPTQ handed over no weights"
        return Cell("fail", bad) if bad else Cell("ok")
    except QuantbenchError as e:
        msg = str(e).split(": ", 1)[1] if str(e).startswith("recipe '") else str(e)
        return Cell("refused", msg.removeprefix(f"{column}: "))
    except Exception as e:  # noqa: BLE001 - a cell that crashes is a FAIL in the matrix
        return Cell("fail", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")


@dataclass
class Matrix:
    cells: dict[str, dict[str, Cell]]  # family -> column -> cell
    archs: dict[str, object]  # family -> ArchSpec (or the one-line reason it could not be traced)

    def supported(self) -> list[str]:
        """Families whose census and every recipe run (mitigations may refuse, with the reason)."""
        return [f for f, row in self.cells.items()
                if all(c.status != "fail" for c in row.values()) and all(row[c].status == "ok" for c in ("census", *RECIPES))]

    def failures(self) -> list[str]:
        return [f"{f} x {c}: {cell.text}" for f, row in self.cells.items() for c, cell in row.items()
                if cell.status == "fail"]


def run_matrix(families: tuple[str, ...] = FAMILIES, columns: tuple[str, ...] = COLUMNS) -> Matrix:
    ids = tokens()
    cells: dict[str, dict[str, Cell]] = {}
    archs: dict[str, object] = {}
    for fam in families:
        base = tiny_family(fam)
        try:
            archs[fam] = arch_of(base)
        except QuantbenchError as e:  # every cell then says what quantbench does with it (refuses, in one line)
            archs[fam] = str(e)
        cells[fam] = {c: run_cell(base, c, ids) for c in columns}
    return Matrix(cells, archs)
