"""Census-guided mixed precision (quantbench/mixed): the sensitivity finds a planted outlier layer like a
brute-force single-layer measurement does, the knapsack is optimal against enumeration, the budget holds
on the measured size, and user mistakes are one line."""
from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantbench.config import parse_config
from quantbench.errors import ConfigError, QuantbenchError
from quantbench.mixed.explain import census_reasons
from quantbench.mixed.recipe import recipe_yaml, to_recipe
from quantbench.mixed.search import by_budget, by_count, mckp
from quantbench.mixed.sensitivity import measure_sensitivity
from quantbench.mixed.stage import explain_plan, recommend_mixed, sensitivity_path
from quantbench.quant.apply import apply_recipe
from quantbench.quant.calibration import Calibration
from quantbench.quant.recipes import PRESETS, resolve_recipe

from conftest import tiny_model, save_tiny_llama

PLANTED = "model.layers.0.mlp.down_proj"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama whose layer-0 down_proj has one huge input column (a weight outlier that wrecks
    its 4-bit groups), and calibration tokens."""
    m = tiny_model("llama", layers=2, hidden=64)
    with torch.no_grad():
        m.get_submodule(PLANTED).weight[:, 3] *= 60.0
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    return m, ids


def _rtn_w4_g64(w: torch.Tensor) -> torch.Tensor:
    """Symmetric round-to-nearest, 4 bits, one scale max|w|/7 per 64 inputs (written out, not our primitives)."""
    g = w.reshape(w.shape[0], -1, 64)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7.0
    return (torch.clamp(torch.round(g / s), -8, 7) * s).reshape(w.shape)


@torch.no_grad()
def _brute_force_kl(m, ids) -> dict[str, float]:
    """Each linear alone quantized (W4 g64 RTN): mean KL(P_fp || P_q) over all positions."""
    ref = F.log_softmax(m(input_ids=ids).logits, -1)
    out = {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            q = copy.deepcopy(m)
            q.get_submodule(name).weight.copy_(_rtn_w4_g64(mod.weight))
            lq = F.log_softmax(q(input_ids=ids).logits, -1)
            out[name] = float((ref.exp() * (ref - lq)).sum(-1).mean())
    return out


def test_sensitivity_ranks_planted_outlier_first_like_brute_force(planted):
    m, ids = planted
    s = measure_sensitivity(m, PRESETS.get("w4a16-g64"), Calibration(ids, 2), samples=4)
    kl = _brute_force_kl(m, ids)
    assert set(kl) == set(s.linears)
    est = {n: s.score[n][0] for n in s.linears}
    assert max(kl, key=kl.get) == PLANTED
    assert max(est, key=est.get) == PLANTED
    from scipy.stats import spearmanr

    names = sorted(kl)
    assert spearmanr([est[n] for n in names], [kl[n] for n in names]).statistic > 0.5
    # more bits never estimate more damage; full precision is no damage
    assert all(v[0] >= v[1] >= v[2] == 0.0 for v in s.score.values())


def test_knapsack_equals_enumeration():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n, k = 6, 3
        costs = [torch.randint(0, 9, (k,), generator=g).tolist() for _ in range(n)]
        values = [torch.rand(k, generator=g).tolist() for _ in range(n)]
        cap = int(torch.randint(0, 30, (1,), generator=g))
        feasible = [(sum(values[i][c] for i, c in enumerate(pick)), pick)
                    for pick in itertools.product(range(k), repeat=n)
                    if sum(costs[i][c] for i, c in enumerate(pick)) <= cap]
        if not feasible:
            with pytest.raises(ValueError):
                mckp(costs, values, cap)
            continue
        chosen, _ = mckp(costs, values, cap)
        assert sum(costs[i][c] for i, c in enumerate(chosen)) <= cap
        assert sum(values[i][c] for i, c in enumerate(chosen)) == pytest.approx(min(feasible)[0], abs=1e-12)


@pytest.mark.parametrize("budget", [6.6, 7.5, 9.0])
def test_budget_holds_on_the_measured_size(planted, budget):
    m, ids = planted
    base = PRESETS.get("w4a16-g64")
    s = measure_sensitivity(m, base, Calibration(ids, 2), samples=2)
    c = by_budget(s, budget)
    r = to_recipe(base, c, "mixed")
    _, applied = apply_recipe(copy.deepcopy(m), r, ids)
    assert applied.size.bits_per_weight <= budget
    assert applied.size.bits_per_weight == pytest.approx(c.bits_per_weight, rel=1e-9)
    assert c.kept()
    if budget >= 7.5:  # enough room to lift the (large) outlier layer out of 4 bits: it is lifted
        assert PLANTED in c.kept()
    # the YAML reproduces the recipe
    import yaml

    again = resolve_recipe(yaml.safe_load(recipe_yaml(r))["recipes"][0])
    assert again == r


def test_max_kept_keeps_the_largest_reductions(planted):
    m, ids = planted
    base = PRESETS.get("w8a8-tensor-static")
    s = measure_sensitivity(m, base, Calibration(ids, 2), samples=2)
    c = by_count(s, 3)
    gain = sorted(s.linears, key=lambda n: s.score[n][0] - s.score[n][1], reverse=True)
    assert set(c.kept()) == set(gain[:3])
    r = to_recipe(base, c, "mixed-a16")
    assert {o.match for o in r.overrides} == set(gain[:3])
    assert all(o.activations is None and o.replaces() == {"activations"} for o in r.overrides)


def test_census_words():
    census = {"lifecycle": [{"dim": 507, "emerges": 3, "disappears": 28, "absmax_by_layer": [1.0, 2500.0],
                             "writer": {"path": "mlp.down_proj", "module": "mlp"},
                             "canceller": {"path": "mlp.down_proj", "cancels": True}}],
              "linear_inputs": [], "weights": {"layers": []}}
    assert census_reasons("model.layers.3.mlp.down_proj", census) == [
        "it writes the massive activation of dimension 507 (|x| up to 2500)"]
    assert "cancels the massive activation of dimension 507" in census_reasons("model.layers.28.mlp.down_proj", census)[0]
    assert census_reasons("model.layers.4.mlp.down_proj", census) == []


def test_impossible_budget_and_bad_config_are_one_line(planted):
    m, ids = planted
    s = measure_sensitivity(m, PRESETS.get("w4a16-g64"), Calibration(ids, 2), samples=1)
    with pytest.raises(ConfigError, match="below the smallest plan"):
        by_budget(s, 2.0)
    for bad, words in [({"base": "w4a16-g64", "budget": 5, "max_kept": 3}, "exactly one of"),
                       ({"base": "w4a16-g46", "budget": 5}, "did you mean"),
                       ({"base": "w4a16-g64", "budjet": 5}, "unknown key")]:
        with pytest.raises(ConfigError) as e:
            parse_config({"recipes": ["fp"], "mixed": [bad]})
        assert words in str(e.value) and "\n" not in str(e.value)


def test_recommend_mixed_from_a_run_dir(planted, tmp_path):
    m, ids = planted
    base = PRESETS.get("w4a16-g64")
    s = measure_sensitivity(m, base, Calibration(ids, 2), samples=1)
    sensitivity_path(tmp_path, base.name).parent.mkdir()
    sensitivity_path(tmp_path, base.name).write_text(json.dumps({"key": {}, "sensitivity": s.to_json()}))
    text = recommend_mixed(tmp_path, "w4a16-g64", 9.0, None, None)
    assert "layer 0 mlp.down_proj kept at" in text and "recipes:" in text
    with pytest.raises(QuantbenchError, match="no sensitivities for base 'w8a8-tensor-static'"):
        recommend_mixed(tmp_path, "w8a8-tensor-static", 7.0, None, None)
    proc = subprocess.run([sys.executable, "-m", "quantbench.cli", "recommend", str(tmp_path / "nope"), "--mixed",
                           "--budget", "5"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[0].startswith("error: ") and "no such run directory" in proc.stderr


def test_pipeline_evaluates_the_mixed_recipe_as_a_row(tmp_path):
    """A `mixed:` entry becomes a row after the uniform ones, within its budget, with its plan explained."""
    from quantbench import pipeline

    d = save_tiny_llama(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the model reads sentence {i} . then another one , and {i * 7} follows"
                                  for i in range(400)))
    run = parse_config({"model": str(d), "output_dir": str(tmp_path / "out"), "run_id": "t",
                        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
                        "eval": {"seq_len": 64, "max_windows": 2, "batch_size": 2},
                        "census": {"samples": 1, "seq_len": 32}, "recipes": ["fp", "w4a16-g64"],
                        "mixed": [{"base": "w4a16-g64", "budget_over_base": 0.05, "samples": 1},
                                  {"base": "w4a16-g64-awq", "budget_over_base": 0.05, "samples": 1},
                                  {"base": "w4a16-g64-gptq", "budget_over_base": 0.05, "samples": 1}]})
    out = pipeline.run(run)
    rows = pipeline.load_rows(out / "rows.jsonl")
    mixed = rows["mixed-w4a16-g64-b+0.05"]
    assert mixed["status"] == "ok" and mixed["ppl"] > 1
    assert rows["w4a16-g64"]["bits_per_weight"] < mixed["bits_per_weight"] <= rows["w4a16-g64"]["bits_per_weight"] + 0.05
    assert "mixed-w4a16-g64-b+0.05" in (out / "results.csv").read_text()
    assert "kept at" in (out / "mixed" / "mixed-w4a16-g64-b+0.05.txt").read_text()
    assert rows["mixed-w4a16-g64-awq-b+0.05"]["status"] == "ok" and rows["mixed-w4a16-g64-awq-b+0.05"]["bits_per_weight"] <= rows["w4a16-g64"]["bits_per_weight"] + 0.05
    # awq changes the model before quantization, so its sensitivities are its own, not w4a16-g64's
    a = json.loads((out / "mixed" / "sensitivity-w4a16-g64-awq.json").read_text())["sensitivity"]
    b = json.loads((out / "mixed" / "sensitivity-w4a16-g64.json").read_text())["sensitivity"]
    assert a["score"] != b["score"]
    # gptq finalizes weights and changes nothing before: the sensitivities of w4a16-g64 are reused
    g = json.loads((out / "mixed" / "sensitivity-w4a16-g64-gptq.json").read_text())["sensitivity"]
    assert g["score"] == b["score"] and g["base"] == "w4a16-g64-gptq"
    assert rows["mixed-w4a16-g64-gptq-b+0.05"]["status"] == "ok"


def test_adding_a_mixed_entry_keeps_the_uniform_rows(tmp_path):
    """The `mixed:` list is not an input of the uniform rows: adding an entry to a finished run resumes
    it (uniform and earlier mixed rows kept as they were, nothing moved to rows.stale.jsonl)."""
    from quantbench import pipeline

    d = save_tiny_llama(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"one more line {i} , with words and {i * 3} numbers ." for i in range(400)))
    base = {"model": str(d), "output_dir": str(tmp_path / "out"), "run_id": "t",
            "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
            "eval": {"seq_len": 64, "max_windows": 2, "batch_size": 2}, "census": {"enabled": False},
            "recipes": ["fp", "w4a16-g64"],
            "mixed": [{"base": "w4a16-g64", "budget_over_base": 0.05, "samples": 1}]}
    out = pipeline.run(parse_config(base))
    first = (out / "rows.jsonl").read_text().splitlines()
    more = {**base, "mixed": [*base["mixed"], {"base": "w4a16-g64", "budget_over_base": 0.1, "samples": 1}]}
    assert pipeline.run(parse_config(more)) == out
    lines = (out / "rows.jsonl").read_text().splitlines()
    assert lines[:len(first)] == first  # the earlier rows were kept, not rewritten
    assert [json.loads(x)["recipe"] for x in lines[len(first):]] == ["mixed-w4a16-g64-b+0.1"]
    assert not (out / "rows.stale.jsonl").exists()
