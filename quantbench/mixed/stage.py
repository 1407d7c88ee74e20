"""The pipeline's mixed stage: for each `mixed:` entry of the config, sensitivities of its base recipe
(computed once, cached in <run>/mixed/sensitivity-<base>.json), the search, the recipe, and the plan
explained in the census's words (<run>/mixed/<name>.txt). The recipes are then evaluated as rows."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from ..core.errors import ConfigError
from ..core.fileio import atomic_write_text, read_json_or_none
from ..core.log import log
from ..quant.calibration import Calibration
from ..quant.recipes import PRESETS
from ..quant.spec import Recipe
from .explain import census_linked, census_reasons
from .options import options_for
from .recipe import recipe_yaml, to_recipe
from .search import Choice, by_budget, by_count, by_damage
from .sensitivity import UNAVAILABLE, Sensitivity, measure_sensitivity
from .validate import validate


def base_recipe(base: str, recipes: tuple[Recipe, ...] = ()) -> Recipe:
    for r in recipes:
        if r.name == base:
            return r
    if base not in PRESETS:
        raise ConfigError(f"mixed: base '{base}' is neither a recipe of the run nor a preset")
    return PRESETS.get(base)


def recipe_path(out: Path, name: str) -> Path:
    """Where a searched mixed recipe is kept, resolved with its per-linear plan, so that export and a
    rerun can rebuild it from the run directory alone."""
    return out / "mixed" / f"{name}.recipe.json"


def save_recipe(out: Path, r: Recipe) -> Path:
    path = recipe_path(out, r.name)
    path.parent.mkdir(exist_ok=True)
    atomic_write_text(path, json.dumps(r.model_dump(mode="json"), indent=1) + "\n")
    return path


def saved_recipe(out: Path, name: str) -> Recipe | None:
    """A mixed recipe kept by save_recipe, None when there is none; a damaged file is one line."""
    path = recipe_path(out, name)
    if not path.exists():
        return None
    try:
        return Recipe.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is damaged ({type(e).__name__}); rerun `quantbench run` (or `recommend "
                          f"--mixed`) to write it again") from None


def saved_recipes(out: Path) -> list[str]:
    return sorted(p.name.removesuffix(".recipe.json") for p in (out / "mixed").glob("*.recipe.json"))


def sensitivity_path(out: Path, base: str) -> Path:
    return out / "mixed" / f"sensitivity-{base}.json"


def state_key(base: Recipe) -> dict:
    """What the sensitivities of a base depend on: its option ladder, the mitigations applied before the
    sensitivity pass (those before the first that finalizes weights), and which linears it quantizes."""
    from ..quant.spec import MITIGATIONS

    pre = []
    for mit in base.mitigations:
        if MITIGATIONS.get(mit.name).finalizes_weights:
            break
        pre.append(mit.model_dump(mode="json"))
    return {"options": [o.label for o in options_for(base)], "mitigations": pre, "exclude": list(base.exclude),
            "overrides": [o.model_dump(mode="json") for o in base.overrides]}


def load_sensitivity(out: Path, base: str, strict: bool = False) -> Sensitivity | None:
    """The cached sensitivities of `base`; None when absent or (strict=False: the run measures them
    again) damaged. strict: a damaged file is one line naming it and the repair."""
    path = sensitivity_path(out, base)
    d = read_json_or_none(path)
    try:
        if d is not None:
            return Sensitivity.from_json(d["sensitivity"])
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    if strict and path.exists():
        raise ConfigError(f"{path} is damaged; rerun the same `quantbench run` command to measure the "
                          f"sensitivities of '{base}' again")
    return None


def _scale(s: Sensitivity, base_row: dict | None) -> float:
    """Measured / estimated log-perplexity increase of the uniform base recipe (1 when not measured)."""
    est = sum(v[0] for v in s.score.values())
    if not base_row or base_row.get("status") != "ok" or est <= 0:
        return 1.0
    return max(math.log1p(base_row["delta_ppl_pct"] / 100), 1e-9) / est


def choose(s: Sensitivity, budget: float | None = None, budget_over_base: float | None = None,
           max_ppl_increase: float | None = None, max_kept: float | None = None,
           base_row: dict | None = None, fused: bool = True) -> Choice:
    if budget_over_base is not None:
        budget = (s.rest_bits + sum(v[0] for v in s.bits.values())) / s.n_params + budget_over_base
    if budget is not None:
        return by_budget(s, budget, fused)
    if max_ppl_increase is not None:
        return by_damage(s, max_ppl_increase, _scale(s, base_row), fused)
    if max_kept is not None:
        k = int(max_kept) if max_kept >= 1 else int(math.floor(max_kept * len(s.linears)))
        return by_count(s, k, fused)
    raise ConfigError("mixed: give one of --budget, --max-ppl-increase, --max-kept")


def explain_plan(c: Choice, recipe: Recipe, census: dict | None, base_row: dict | None = None) -> str:
    """The plan, why each kept linear was kept (census words, else its estimate), and the YAML."""
    s = c.sens
    ranked = sorted(s.linears, key=lambda l: s.score[l][0], reverse=True)
    rank = {l: i + 1 for i, l in enumerate(ranked)}
    kept = c.kept()
    scale = _scale(s, base_row)
    est = 100 * math.expm1(scale * c.est_damage)
    lines = [f"mixed recipe '{recipe.name}' (base {s.base}, {c.constraint}): {len(kept)} of {len(s.linears)} "
             f"linears off the base format; {c.bits_per_weight:.3f} bits/weight (measured per linear as quant/size.py "
             f"counts); estimated perplexity increase +{est:.1f}%"
             + (" (estimates scaled to the measured uniform base row)" if scale != 1.0 else " (unscaled estimate)")]
    block = grid_block(census)
    left_out = [o for o in range(1, len(s.options)) if all(s.score[l][o] == UNAVAILABLE for l in s.linears)]
    if block and left_out:
        lines.append(f"left out: {', '.join(s.options[o] for o in left_out)}: the census found the checkpoint's weights "
                     f"already on a low-bit grid in blocks of {block}, which groups dividing {block} would reproduce "
                     "(a gain the original model would not show)")
    linked = [l for l in s.linears if census_linked(l, census)]
    if census is None:
        lines.append("no census in this run: reasons below are the sensitivity estimates only")
    else:
        lines.append(f"census-linked linears: {len(linked)}; kept among them: {sum(1 for l in kept if l in linked)}")
    fewer = {l: k for l, k in kept.items() if s.bits[l][k] < s.bits[l][0]}
    if fewer:
        lines.append(f"{len(fewer)} linears take FEWER bits than the base (their estimated damage barely grows), "
                     "paying for the ones kept below")
    for l, k in sorted(kept.items(), key=lambda kv: rank[kv[0]]):
        m = l.rsplit(".", 3)
        where = f"layer {m[1]} {m[2]}.{m[3]}" if len(m) == 4 and m[1].isdigit() else l
        if l in fewer:
            lines.append(f"  {where} given fewer bits, {s.options[k]}: estimated damage {s.score[l][0]:.3g} -> "
                         f"{s.score[l][k]:.3g} nats (rank {rank[l]} of {len(ranked)})")
            continue
        why = census_reasons(l, census)
        est_txt = f"estimated damage at the base format {s.score[l][0]:.3g} nats (rank {rank[l]} of {len(ranked)})"
        lines.append(f"  {where} kept at {s.options[k]}: " + ("; ".join(why) + f" [{est_txt}]" if why else est_txt))
    lines.append("to reproduce, add to a config:")
    lines.append(recipe_yaml(recipe).rstrip())
    return "\n".join(lines)


def grid_block(census: dict | None) -> int | None:
    """The block of the low-bit grid the census found the checkpoint's weights on (None when not found)."""
    pq = (census or {}).get("prequantized") or {}
    return int(pq["block"]) if pq.get("detected") and pq.get("block") else None


def _refined(model: nn.Module, base: Recipe, calib: Calibration, m, c: Choice, i: int, block: int | None,
             base_row: dict | None, out: Path) -> Choice:
    """Pass i of m.refine: sensitivities re-measured with every linear quantized as plan `c` says (cached
    per plan in <run>/mixed/sensitivity-<name>-refine<i>.json), then the search again."""
    path = out / "mixed" / f"sensitivity-{m.label()}-refine{i}.json"
    key = {"samples": m.samples, "state": state_key(base), "grid_block": block, "around": c.picks}
    cached = read_json_or_none(path) or {}
    if cached.get("key") == key:
        s = Sensitivity.from_json(cached["sensitivity"])
    else:
        log(f"mixed: refine pass {i} of {m.label()}: sensitivities around the plan of {len(c.kept())} moved linears")
        s = measure_sensitivity(model, base, calib, m.samples, block, around=c.picks)
        log(f"mixed: refine pass {i} in {s.seconds:.1f}s")
        atomic_write_text(path, json.dumps({"key": key, "sensitivity": s.to_json()}))
    again = choose(s, m.budget, m.budget_over_base, m.max_ppl_increase, m.max_kept, base_row, m.fused)
    again.constraint += f"; sensitivities re-measured around the plan ({i} pass{'es' if i > 1 else ''})"
    return again


def build_mixed(model: nn.Module, cfg, calib: Calibration, probe_ids: torch.Tensor, census: dict | None,
                rows: dict[str, dict], out: Path) -> list[Recipe]:
    """The recipes of cfg.mixed (see module doc)."""
    recipes: list[Recipe] = []
    same_state: dict[str, Sensitivity] = {}
    block = grid_block(census)
    for m in cfg.mixed:
        base = base_recipe(m.base, cfg.recipes)
        s = load_sensitivity(out, base.name)
        key = {"samples": m.samples, "validate_layers": m.validate_layers, "state": state_key(base), "grid_block": block}
        cached = read_json_or_none(sensitivity_path(out, base.name)) or {}
        state = json.dumps({"samples": m.samples, "state": key["state"], "grid_block": block}, sort_keys=True)
        twin = same_state.get(state)
        if twin is not None and twin.base == base.name:  # a second entry over the same base: its sensitivities
            s = twin
        elif twin is not None and (s is None or cached.get("key") != key):  # e.g. w4a16-g64-gptq after w4a16-g64
            s = dataclasses.replace(twin, base=base.name)
            log(f"mixed: sensitivities of {base.name} are those of {twin.base} (same options, same model state)")
            sensitivity_path(out, base.name).parent.mkdir(exist_ok=True)
            atomic_write_text(sensitivity_path(out, base.name), json.dumps({"key": key, "sensitivity": s.to_json()}))
        elif s is None or cached.get("key") != key:
            log(f"mixed: sensitivity of every linear under the options of {base.name} ({m.samples} sequences)")
            s = measure_sensitivity(model, base, calib, m.samples, block)
            log(f"mixed: sensitivity in {s.seconds:.1f}s")
            if m.validate_layers:
                v = validate(model, base, s, probe_ids, calib, m.validate_layers)
                log(f"mixed: estimate vs measured single-linear KL on {len(v['linears'])} linears: "
                    f"Spearman {v['spearman']:.3f} ({v['seconds']:.0f}s)")
            sensitivity_path(out, base.name).parent.mkdir(exist_ok=True)
            atomic_write_text(sensitivity_path(out, base.name), json.dumps({"key": key, "sensitivity": s.to_json()}))
        same_state.setdefault(state, s)
        base_row = rows.get(base.name)
        c = choose(s, m.budget, m.budget_over_base, m.max_ppl_increase, m.max_kept, base_row, m.fused)
        for i in range(1, m.refine + 1):
            c = _refined(model, base, calib, m, c, i, block, base_row, out)
        r = to_recipe(base, c, m.label())
        text = explain_plan(c, r, census, base_row)
        atomic_write_text(out / "mixed" / f"{r.name}.txt", text + "\n")
        save_recipe(out, r)
        log(text.split("\n")[0])
        recipes.append(r)
    return recipes


def recommend_mixed(run_dir: Path, base: str | None, budget: float | None, max_ppl_increase: float | None,
                    max_kept: float | None, fused: bool = True) -> str:
    """`quantbench recommend RUN_DIR --mixed ...`: the plan from the run's cached sensitivities."""
    from ..core.fileio import latest_by_recipe, read_rows
    from ..run.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"no such run directory: {run_dir}")
    if sum(v is not None for v in (budget, max_ppl_increase, max_kept)) != 1:
        raise ConfigError("--mixed needs exactly one of --budget, --max-ppl-increase, --max-kept")
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    recipes = cfg.recipes if cfg else ()
    if base is None:
        if not cfg or not cfg.mixed:
            raise ConfigError(f"{run_dir}: the run has no `mixed:` section, so no sensitivities; add one "
                              "(e.g. mixed: [{base: w4a16-g64, budget_over_base: 0.5}]) and rerun")
        base = cfg.mixed[0].base
    s = load_sensitivity(run_dir, base, strict=True)
    if s is None:
        have = sorted(p.stem.removeprefix("sensitivity-") for p in (run_dir / "mixed").glob("sensitivity-*.json"))
        raise ConfigError(f"{run_dir}: no sensitivities for base '{base}'"
                          + (f" (have: {', '.join(have)})" if have else "; add it to the config's `mixed:` section and rerun"))
    rows = latest_by_recipe(read_rows(run_dir / "rows.jsonl")) if (run_dir / "rows.jsonl").exists() else {}
    base_row = rows.get(base)
    c = choose(s, budget, None, max_ppl_increase, max_kept, base_row, fused)
    label = (f"b{budget:g}" if budget is not None else f"p{max_ppl_increase:g}" if max_ppl_increase is not None
             else f"k{max_kept:g}") + ("" if fused else "-unfused")
    r = to_recipe(base_recipe(base, recipes), c, f"mixed-{base}-{label}")
    census = read_json_or_none(run_dir / "census.json")
    path = save_recipe(run_dir, r)
    return (explain_plan(c, r, census, base_row) + f"\nsaved: {path} (export it with `quantbench export "
            f"{run_dir} --recipe {r.name} --out DIR`)")
