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
from conftest import save_tiny_llama, tiny_model
from reliability_common import env  # noqa: F401  (fixture)

from quantbench.core.errors import ConfigError, QuantbenchError
from quantbench.mixed.explain import census_reasons
from quantbench.mixed.recipe import recipe_yaml, to_recipe
from quantbench.mixed.search import by_budget, by_count, mckp
from quantbench.mixed.sensitivity import measure_sensitivity
from quantbench.mixed.stage import explain_plan, recommend_mixed, sensitivity_path
from quantbench.quant.apply import apply_recipe
from quantbench.quant.calibration import Calibration
from quantbench.quant.recipes import PRESETS, resolve_recipe
from quantbench.run.config import parse_config

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
    # the ladder: base, one group size finer and one coarser, W8 per channel, FP16
    assert s.options == ["base int4/g64/sym | a16", "int4/g32/sym | a16", "int4/g128/sym | a16",
                         "int8/channel/sym | a16", "w16 | a16"]
    for n in s.linears:
        v, fan_in = s.score[n], m.get_submodule(n).in_features
        assert v[0] >= v[3] >= v[4] == 0.0  # W8 never estimates more damage than W4; FP16 is none
        assert v[1] <= v[0] * 1.05  # a finer group (smaller scales) does not estimate more damage
        if fan_in % 128:  # g128 cannot split this input: unavailable (inf score, inf bits)
            assert v[2] == float("inf") and s.bits[n][2] == float("inf")
        else:
            assert s.bits[n][2] < s.bits[n][0] < s.bits[n][1]


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


def test_a_coarser_group_pays_for_a_finer_one_and_unavailable_options_are_never_picked():
    """At the base's own size, the search gives an insensitive linear the coarser group (fewer bits) so that
    a sensitive one of the same size can take the finer group; an unavailable option (inf) is never picked
    even when it would be free. Expected plan worked out by hand from the numbers below."""
    from quantbench.mixed.sensitivity import UNAVAILABLE, Sensitivity

    opts = ["base int4/g64/sym | a16", "int4/g32/sym | a16", "int4/g128/sym | a16"]
    n = 1000
    bits = [4.25 * n, 4.5 * n, 4.125 * n]  # codes + one 16-bit scale per group
    s = Sensitivity("w", opts, score={"calm": [1.0, 0.99, 1.01], "hot": [5.0, 2.0, 9.0], "odd": [3.0, 1.0, UNAVAILABLE]},
                    bits={"calm": bits, "hot": bits, "odd": [4.25 * n, 4.5 * n, UNAVAILABLE]},
                    rest_bits=0.0, n_params=3 * n)
    c = by_budget(s, 4.25 + 0.125 / 3 + 1e-9)  # the base's size + what one coarser group frees
    assert c.picks == {"calm": 2, "hot": 1, "odd": 0}
    assert c.bits_per_weight <= 4.25 + 0.125 / 3 + 1e-9
    smallest = (4.125 * 2 + 4.25) / 3  # 'odd' cannot take g128, so the smallest plan keeps it at g64
    assert by_budget(s, smallest + 1e-9).picks == {"calm": 2, "hot": 2, "odd": 0}
    with pytest.raises(ConfigError, match="below the smallest plan"):
        by_budget(s, 4.125)  # the all-g128 size: not reachable


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
    c = by_count(s, 3, fused=False)
    gain = sorted(s.linears, key=lambda n: s.score[n][0] - s.score[n][1], reverse=True)
    assert set(c.kept()) == set(gain[:3])
    r = to_recipe(base, c, "mixed-a16")
    assert {o.match for o in r.overrides} == set(gain[:3])
    assert all(o.activations is None and o.replaces() == {"activations"} for o in r.overrides)


def test_fused_sets_share_one_format_so_the_plan_loads_in_vllm(planted):
    from quantbench.export.compressed import _fused_warnings
    from quantbench.quant.plan import fused_sets, resolve_plan

    names = ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.v_proj",
             "m.layers.0.self_attn.o_proj", "m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj",
             "m.layers.0.mlp.down_proj", "m.layers.1.self_attn.q_proj"]
    assert fused_sets(names) == [names[0:3], [names[3]], names[4:6], [names[6]], [names[7]]]
    m, ids = planted
    base = PRESETS.get("w4a16-g64")
    s = measure_sensitivity(m, base, Calibration(ids, 2), samples=2)
    for budget in (6.6, 7.0, 8.0):
        fused, free = by_budget(s, budget), by_budget(s, budget, fused=False)
        for group in fused_sets(s.linears):
            assert len({fused.picks[n] for n in group}) == 1
        assert free.est_damage <= fused.est_damage + 1e-12  # more freedom never estimates more damage
        plan = resolve_plan(m, to_recipe(base, fused, "mixed"))
        assert _fused_warnings(plan, s.linears) == []
        split = [g for g in fused_sets(s.linears) if len({free.picks[n] for n in g}) > 1]
        warned = _fused_warnings(resolve_plan(m, to_recipe(base, free, "mixed-unfused")), s.linears)
        assert len(warned) == len(split)
    # a count limit counts linears, so a fused set of three moves only when three fit
    c = by_count(s, 2)
    assert all(c.picks[n] == 0 for g in fused_sets(s.linears) if len(g) == 3 for n in g)
    assert len(c.kept()) <= 2


def test_a_finer_group_that_would_reproduce_the_checkpoints_grid_is_left_out(planted):
    """The default model went through GGUF Q4_1 (4 bits in blocks of 32): a g32 option would measure that
    grid, not the format. With the census's grid block, g32 is unavailable for every linear, g128 is not,
    and the plan says why."""
    from quantbench.mixed.sensitivity import UNAVAILABLE

    m, ids = planted
    base = PRESETS.get("w4a16-g64")
    s = measure_sensitivity(m, base, Calibration(ids, 2), samples=1, grid_block=32)
    g32, g128 = s.options.index("int4/g32/sym | a16"), s.options.index("int4/g128/sym | a16")
    assert all(s.score[n][g32] == UNAVAILABLE and s.bits[n][g32] == UNAVAILABLE for n in s.linears)
    assert any(s.score[n][g128] < UNAVAILABLE for n in s.linears)  # down_proj (128 inputs) may go coarser
    c = by_budget(s, 8.0)
    assert g32 not in c.picks.values()
    census = {"prequantized": {"detected": True, "block": 32}}
    text = explain_plan(c, to_recipe(base, c, "mixed"), census)
    assert "left out: int4/g32/sym | a16" in text and "blocks of 32" in text


def _ct_w4_g64(w: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' symmetric int4 grid, group 64, written out: scale = max|w| / 7.5, codes clamp(round(w/s), -8, 7)."""
    g = w.reshape(w.shape[0], -1, 64)
    s = g.abs().amax(-1, keepdim=True) / 7.5
    return (torch.clamp(torch.round(g / s), -8, 7) * s).reshape(w.shape)


def test_refined_sensitivity_is_the_fisher_score_on_the_quantized_model(planted):
    """Around the all-W4 plan, a linear's score is 1/(2N) sum g^2 (y_W4 - y_fp)^2 with x and g taken on the
    model whose every linear runs W4: computed here by hand on a copy quantized with the grid written out."""
    m, ids = planted
    base = PRESETS.get("w4a16-g64")
    calib = Calibration(ids, 2)
    plain = measure_sensitivity(m, base, calib, samples=2)
    s = measure_sensitivity(m, base, calib, samples=2, around={n: 0 for n in plain.linears})
    q = copy.deepcopy(m)
    with torch.no_grad():
        for n in plain.linears:
            q.get_submodule(n).weight.copy_(_ct_w4_g64(m.get_submodule(n).weight))
    target = "model.layers.1.self_attn.q_proj"  # upstream and downstream linears all quantized
    w_fp, w_q = m.get_submodule(target).weight, q.get_submodule(target).weight
    rec, total, n_tok = {}, 0.0, 0
    def record(_m, a, o):
        rec["x"] = a[0].detach()
        o.register_hook(lambda g: rec.__setitem__("g", g))

    hook = q.get_submodule(target).register_forward_hook(record)
    for p in q.parameters():
        p.requires_grad_(False)
    q.get_input_embeddings().register_forward_hook(lambda _m, _a, o: o.requires_grad_(True))
    for i in range(2):
        seq = ids[i: i + 1]
        out = q(input_ids=seq, labels=seq)
        (out.loss * (seq.shape[1] - 1)).backward()
        e = rec["x"] @ w_q.T - rec["x"] @ w_fp.T
        total += 0.5 * float((rec["g"].detach() ** 2 * e.detach() ** 2).sum())
        n_tok += seq.shape[1] - 1
    hook.remove()
    assert s.score[target][0] == pytest.approx(total / n_tok, rel=1e-3)
    assert s.score[target][0] != pytest.approx(plain.score[target][0], rel=1e-3)  # the operating point matters
    assert all(v[-1] == 0.0 for v in s.score.values())  # FP16 is no damage at any operating point
    with pytest.raises(QuantbenchError, match="weight-only"):
        w8a8 = PRESETS.get("w8a8-tensor-static")
        measure_sensitivity(m, w8a8, calib, samples=1, around={n: 0 for n in plain.linears})


def test_entries_over_one_base_measure_it_once_and_a_rerun_measures_nothing(planted, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from quantbench.mixed import stage
    from quantbench.run.config import MixedConfig

    m, ids = planted
    calls = []
    real = stage.measure_sensitivity
    monkeypatch.setattr(stage, "measure_sensitivity", lambda *a, **k: calls.append(k.get("around")) or real(*a, **k))
    cfg = SimpleNamespace(recipes=(), mixed=[MixedConfig(base="w4a16-g64", budget_over_base=0.3, samples=1, validate_layers=2),
                                             MixedConfig(base="w4a16-g64", budget_over_base=0.3, samples=1, fused=False)])
    calib = Calibration(ids, 2)
    first = stage.build_mixed(m, cfg, calib, ids[:2, :16], None, {}, tmp_path)
    assert calls == [None]  # one sensitivity pass for both entries
    calls.clear()
    again = stage.build_mixed(m, cfg, calib, ids[:2, :16], None, {}, tmp_path)
    assert calls == [] and again == first  # the cached sensitivities serve the rerun; same recipes


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



def test_recommend_mixed_refuses_min_task_retention(planted, tmp_path, capsys):
    """The mixed plan is chosen from perplexity sensitivities and scores no task: a task tolerance with
    --mixed is refused before any work (it was silently ignored and a plan printed)."""
    from reliability_common import assert_error, cli

    m, ids = planted
    base = PRESETS.get("w4a16-g64")
    s = measure_sensitivity(m, base, Calibration(ids, 2), samples=1)
    sensitivity_path(tmp_path, base.name).parent.mkdir()
    sensitivity_path(tmp_path, base.name).write_text(json.dumps({"key": {}, "sensitivity": s.to_json()}))
    argv = ["recommend", tmp_path, "--mixed", "--base", "w4a16-g64", "--budget", "9"]
    assert cli(capsys, *argv).rc == 0  # the same run answers without the task tolerance
    res = cli(capsys, *argv, "--min-task-retention", "99%")
    assert_error(res, "--min-task-retention does not apply with --mixed")
    assert res.out == ""
    assert_error(cli(capsys, "recommend", tmp_path / "nope", "--mixed", "--budget", "5", "--min-task-retention", "99%"),
                 "--min-task-retention does not apply with --mixed")

def test_pipeline_evaluates_the_mixed_recipe_as_a_row(tmp_path):
    """A `mixed:` entry becomes a row after the uniform ones, within its budget, with its plan explained."""
    from quantbench.run import pipeline

    d = save_tiny_llama(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the model reads sentence {i} . then another one , and {i * 7} follows"
                                  for i in range(400)))
    run = parse_config({"model": str(d), "output_dir": str(tmp_path / "out"), "run_id": "t",
                        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
                        "eval": {"seq_len": 64, "max_windows": 2, "batch_size": 2},
                        "census": {"samples": 1, "seq_len": 32}, "recipes": ["fp", "w4a16-g64"],
                        "mixed": [{"base": "w4a16-g64", "budget_over_base": 0.05, "samples": 1, "refine": 1},
                                  {"base": "w4a16-g64-awq", "budget_over_base": 0.05, "samples": 1},
                                  {"base": "w4a16-g64-gptq", "budget_over_base": 0.05, "samples": 1}]})
    out = pipeline.run(run)
    rows = pipeline.load_rows(out / "rows.jsonl")
    mixed = rows["mixed-w4a16-g64-b+0.05-r1"]
    assert mixed["status"] == "ok" and mixed["ppl"] > 1
    assert rows["w4a16-g64"]["bits_per_weight"] < mixed["bits_per_weight"] <= rows["w4a16-g64"]["bits_per_weight"] + 0.05
    assert "mixed-w4a16-g64-b+0.05-r1" in (out / "results.csv").read_text()
    plan = (out / "mixed" / "mixed-w4a16-g64-b+0.05-r1.txt").read_text()
    assert "kept at" in plan and "re-measured around the plan (1 pass)" in plan
    assert (out / "mixed" / "sensitivity-mixed-w4a16-g64-b+0.05-r1-refine1.json").exists()
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
    from quantbench.run import pipeline

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


def test_every_mixed_recipe_a_run_reports_can_be_exported(tmp_path, capsys, monkeypatch):
    """A searched mixed recipe is kept with its plan in <run>/mixed/ and exported from the run directory
    alone (export read only the config's recipes); so is one `recommend --mixed` writes. The recipe and
    format are checked before any model is loaded."""
    from reliability_common import assert_error, cli

    from quantbench.modeling import load as models
    from quantbench.run import pipeline

    d = save_tiny_llama(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the model reads sentence {i} . then another one , and {i * 7} follows"
                                  for i in range(400)))
    out = pipeline.run(parse_config({
        "model": str(d), "output_dir": str(tmp_path / "out"), "run_id": "t",
        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
        "eval": {"seq_len": 64, "max_windows": 2, "batch_size": 2}, "census": {"enabled": False},
        "recipes": ["fp", "w4a16-g64"], "mixed": [{"base": "w4a16-g64", "budget_over_base": 0.5, "samples": 1}]}))
    name = "mixed-w4a16-g64-b+0.5"
    kept = json.loads((out / "mixed" / f"{name}.recipe.json").read_text())
    assert kept["name"] == name and kept["overrides"]  # the per-linear plan travels with the recipe
    res = cli(capsys, "export", out, "--recipe", name, "--out", tmp_path / "exp")
    assert res.rc == 0, res.err[-2000:]
    row = pipeline.load_rows(out / "rows.jsonl")[name]
    assert row["export_verified"] is True and row["export_weights_equal"].split("/")[0] == row["export_weights_equal"].split("/")[1]
    res = cli(capsys, "recommend", out, "--mixed", "--budget", "16")
    assert res.rc == 0, res.err[-1000:]
    text = res.out
    assert "saved: " in text and (out / "mixed" / "mixed-w4a16-g64-b16.recipe.json").exists(), text[-500:]

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr("quantbench.export.context.load_model", no_model)
    assert_error(cli(capsys, "export", out, "--recipe", "mixed-w4a16-g64-b+0.6", "--out", tmp_path / "x"),
                 "has no recipe 'mixed-w4a16-g64-b+0.6'", "did you mean", name)
    res = cli(capsys, "export", out, "--recipe", "mixed-w4a16-g64-b16", "--out", tmp_path / "y", "--format", "nope")
    assert res.rc == 2 and "Traceback" not in res.err


@pytest.mark.parametrize("option, value, words", [
    ("--budget", "nan", "--budget: "), ("--budget", "inf", "--budget: "), ("--budget", "1e9", "less than or equal to 16"),
    ("--max-kept", "nan", "--max-kept: "), ("--max-kept", "-1", "greater than 0"), ("--max-kept", "0", "greater than 0"),
    ("--max-kept", "inf", "--max-kept: "), ("--max-ppl-increase", "nan", "--max-ppl-increase: ")])
def test_recommend_mixed_numbers_get_the_config_files_checks(planted, tmp_path, capsys, option, value, words):
    """Every numeric option of recommend --mixed goes through the config's own bounds (nan was a
    traceback; -1, inf, 1e9 and 0 were accepted)."""
    from reliability_common import assert_error, cli

    m, ids = planted
    s = measure_sensitivity(m, PRESETS.get("w4a16-g64"), Calibration(ids, 2), samples=1)
    sensitivity_path(tmp_path, "w4a16-g64").parent.mkdir()
    sensitivity_path(tmp_path, "w4a16-g64").write_text(json.dumps({"key": {}, "sensitivity": s.to_json()}))
    res = cli(capsys, "recommend", tmp_path, "--mixed", "--base", "w4a16-g64", option, value)
    assert_error(res, words)
    with pytest.raises(ConfigError):  # the config file refuses the same number
        parse_config({"recipes": ["fp"], "mixed": [{"base": "w4a16-g64",
                                                    option.lstrip("-").replace("-", "_"): float(value)}]})


@pytest.mark.parametrize("damage", ["{", '{"key": {}, "sensitivity": {"base": 1}}', ""])
def test_damaged_sensitivity_file_is_named_with_its_repair(planted, tmp_path, capsys, damage):
    """It said "no sensitivities for base 'w4a16-g64' (have: w4a16-g64)" (issue 21)."""
    from reliability_common import assert_error, cli

    path = sensitivity_path(tmp_path, "w4a16-g64")
    path.parent.mkdir()
    path.write_text(damage)
    assert_error(cli(capsys, "recommend", tmp_path, "--mixed", "--base", "w4a16-g64", "--budget", "9"),
                 str(path), "is damaged", "rerun the same `quantbench run`")


@pytest.mark.parametrize("entry, words", [
    ({"base": "fp", "budget": 5}, ("mixed[0] (mixed-fp-b5): base recipe 'fp' quantizes no weights",)),
    ({"base": "w8a8-tensor-static", "max_kept": 2, "refine": 1},
     ("mixed[0] (mixed-w8a8-tensor-static-k2-r1): refine needs a weight-only base", "quantizes activations")),
    ({"base": "w4a4-kv4", "budget": 5}, ("mixed[0] (mixed-w4a4-kv4-b5)", "quantizes the KV cache")),
    ({"base": "quanto-w4-g64", "budget": 5}, ("mixed[0] (mixed-quanto-w4-g64-b5): backend quanto", "the same way")),
])
def test_a_mixed_entry_the_search_cannot_take_is_refused_before_any_work(capsys, env, entry, words):
    """(issue 21) it failed only after the whole sweep had run and written its rows."""
    from reliability_common import assert_error, cli, write_config

    root, model, corpus = env
    assert_error(cli(capsys, "run", "-c", write_config(root, model, corpus, mixed=[entry])), "config: ", *words)
    assert not (root / "out").exists()  # no row, no run directory


def test_validate_layers_in_a_run_leaves_the_model_whole(capsys, env):
    """validate_layers swapped each sampled linear with surgery.replace_module, whose callback in a run
    (quantbench/modeling/pristine.py) freed the FP linear's weights: the next forward failed on an empty tensor."""
    from reliability_common import cli, rows_by_recipe, write_config

    root, model, corpus = env
    res = cli(capsys, "run", "-c", write_config(root, model, corpus, recipes=["fp", "w4a16-channel"], mixed=[
        {"base": "w4a16-channel", "max_kept": 2, "samples": 1, "validate_layers": 2}]))
    assert res.rc == 0, res.err[-2000:]
    rows = rows_by_recipe(root / "out" / "r")
    assert rows["mixed-w4a16-channel-k2"]["status"] == "ok"
    assert rows["w4a16-channel"]["ppl"] > 1 and "Spearman" in res.err
