"""Mitigations against their own objectives: GPTQ beats RTN, AWQ/clipping never lose to RTN,
outlier tokens and LLM.int8 decomposition keep what they promise, composition works end to end."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from quantbench.quant.apply import apply_recipe
from quantbench.quant.mitigations._util import Pair
from quantbench.quant.mitigations.awq import search_pair
from quantbench.quant.mitigations.clip import search_clip
from quantbench.quant.mitigations.gptq import gptq_quantize
from quantbench.quant.mitigations.outlier_tokens import find_outlier_ids
from quantbench.quant.primitives import blocks, fake_quant
from quantbench.quant.qlinear import QuantLinear
from quantbench.quant.recipes import PRESETS
from quantbench.quant.spec import MITIGATIONS, MitigationSpec, QuantSpec, Recipe

CPU = torch.device("cpu")
SPECS = [QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=4, granularity="group", group_size=32),
         QuantSpec(bits=3, granularity="group", group_size=32, symmetric=False)]


def _layer_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g) * torch.rand(128, generator=g) * 3  # [N, in], uneven channels
    x[:, 7] *= 30  # an outlier channel
    return x, torch.randn(64, 128, generator=g)  # W [out, in]


def test_every_mitigation_is_registered():
    assert {"smoothquant", "rotate", "clip", "gptq", "awq", "int8_decomp", "outlier_tokens"} <= set(MITIGATIONS.names())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_and_on_grid(spec, act_order):
    x, w = _layer_data()
    err = lambda q: (x @ (q - w).T).pow(2).sum()  # noqa: E731
    qt = gptq_quantize(w, (x.T @ x).double(), spec, act_order=act_order)
    wq = qt.dequantize()
    assert err(wq) < 0.9 * err(fake_quant(w, spec))
    b = blocks(wq, spec.granularity, spec.group_size)  # [R, G, B]: each block uses at most 2^bits levels
    assert max(len(torch.unique(blk)) for blk in b.reshape(-1, b.shape[-1])) <= 2 ** spec.bits


def test_gptq_declares_final_weights_and_quantlinear_keeps_them(tokens):
    m = tiny_model("llama")
    r = Recipe(name="g", weights=SPECS[1], mitigations=(MitigationSpec(name="gptq"),))
    q, applied = apply_recipe(m, r, tokens, CPU)
    assert len(applied.effects.final_weights) == 14  # 7 linears x 2 layers
    ql = q.model.layers[0].mlp.down_proj
    qt = applied.effects.final_weights["model.layers.0.mlp.down_proj"]
    assert isinstance(ql, QuantLinear) and ql.qweight is qt  # GPTQ's codes and scales, not re-rounded
    assert torch.equal(ql.weight, qt.dequantize())
    codes = blocks(qt.codes.float(), "group", 32)  # [out, G, 32]: at most 16 levels per group
    assert codes.min() >= -8 and codes.max() <= 7


def _clip_brute_force(w, x, spec, ratios):
    """The clip search written out block by block: for every (row, group) block and every ratio
    (largest first), clamp the block to ratio * (its min, its max), round it on the spec's grid, and
    score sum_tokens (x_block . (Q(w_clamped) - w)_block)^2; keep the first strict minimum."""
    out = w.shape[0]
    g = spec.group_size if spec.granularity == "group" else w.shape[1]  # channel: the whole row is one block
    if spec.granularity == "tensor":
        best, best_e = None, float("inf")
        for r in sorted(ratios, reverse=True):
            wc = w.clamp(w.min() * r, w.max() * r)
            e = (x @ (fake_quant(wc, spec) - w).T).pow(2).sum().item()
            if e < best_e:
                best, best_e = r, e
        return torch.tensor([[best]])
    n_groups = w.shape[1] // g
    chosen = torch.zeros(out, n_groups)
    for i in range(out):
        for j in range(n_groups):
            blk, xs = w[i, j * g:(j + 1) * g], x[:, j * g:(j + 1) * g]
            best, best_e = None, float("inf")
            for r in sorted(ratios, reverse=True):
                wc = blk.clamp(blk.min() * r, blk.max() * r)
                q = fake_quant(wc[None, :], spec.model_copy(update={"granularity": "channel", "group_size": None}))[0]
                e = (xs @ (q - blk)).pow(2).sum().item()
                if e < best_e:
                    best, best_e = r, e
            chosen[i, j] = best
    return chosen


@pytest.mark.parametrize("spec", SPECS + [QuantSpec(bits=4, granularity="tensor")], ids=lambda s: s.granularity)
def test_clip_search_equals_a_brute_force_search_and_requantizes_to_it(spec):
    from quantbench.quant.mitigations.clip import block_errors, clamp_blocks

    x, w = _layer_data(1)
    x, w = x[:, :64], w[:16, :64]  # small enough for the block-by-block reference
    ratios = (1.0, 0.9, 0.8, 0.7, 0.6)
    r, e, e0 = search_clip(w, x, spec, ratios)
    assert torch.equal(r, _clip_brute_force(w, x, spec, ratios))
    assert (r < 1).any()  # the case exercises clipping, not only the RTN ratio
    wc = clamp_blocks(w, spec, r)
    again = block_errors(x, fake_quant(wc, spec) - w, spec)  # what the backend's RTN will give
    assert torch.allclose(again, e, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}")
def test_awq_never_worse_than_rtn_on_its_objective(spec):
    x, w = _layer_data(2)
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data.copy_(w)
    pair = Pair("p", "qkv", torch.nn.Identity(), [("l", lin)])
    alpha, e, e0 = search_pair(pair, x, x.abs().mean(0), spec, tuple(i / 10 for i in range(10)))
    assert e <= e0 and alpha > 0 and e < 0.95 * e0  # the outlier channel makes scaling pay off


def test_outlier_tokens_found_and_kept_out_of_static_ranges(tokens):
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.embed_tokens.weight[9, 3] = 500.0  # token 9 carries a massive residual value
    ids = tokens.clone()
    ids[:, ::5] = 9
    r0 = Recipe(name="s", weights=QuantSpec(bits=8), activations=QuantSpec(bits=8, granularity="tensor", dynamic=False))
    from quantbench.modeling.arch import arch_of

    assert find_outlier_ids(m, ids, arch_of(m), 64.0, 0.5) == [9]
    ref = m(input_ids=ids).logits
    naive, _ = apply_recipe(copy.deepcopy(m), r0, ids, CPU)
    kept, applied = apply_recipe(copy.deepcopy(m), r0.model_copy(update={"mitigations": (MitigationSpec(name="outlier_tokens"),)}),
                                 ids, CPU)
    assert applied.notes["outlier_token_ids"] == [9]
    q = kept.model.layers[0].self_attn.q_proj
    assert q.a_hi.max() < 0.5 * naive.model.layers[0].self_attn.q_proj.a_hi.max()  # post-norm: capped at sqrt(D)
    err = lambda mod: (mod(input_ids=ids).logits - ref).pow(2).mean()  # noqa: E731
    assert err(kept) < 0.75 * err(naive)


def test_int8_decomp_keeps_outlier_channels(tokens):
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].post_attention_layernorm.weight[11] = 300.0
    ref = m(input_ids=tokens).logits
    base = Recipe(name="i", weights=QuantSpec(bits=8), activations=QuantSpec(bits=8, granularity="tensor"))
    naive, _ = apply_recipe(copy.deepcopy(m), base, tokens, CPU)
    err = lambda mod: (mod(input_ids=tokens).logits - ref).pow(2).mean()  # noqa: E731
    for mode in ("dynamic", "static"):
        r = base.model_copy(update={"mitigations": (MitigationSpec(name="int8_decomp", options={"mode": mode, "threshold": 6.0}),)})
        q, _ = apply_recipe(copy.deepcopy(m), r, tokens, CPU)
        assert err(q) < 0.5 * err(naive)


@pytest.mark.parametrize("name, naive", [("w8a8-tensor-static-sq-ot", "w8a8-tensor-static"),
                                         ("w4a16-g64-awq", "w4a16-g64"),
                                         ("w4a4-kv4-rot-gptq", "w4a4-kv4"),
                                         ("w8a8-tensor-static-rot", "w8a8-tensor-static")])
def test_composed_presets_beat_their_unmitigated_recipe_on_a_model_with_outliers(tokens, name, naive):
    """A planted massive channel (norm weight 50x) makes the naive recipe lose accuracy; the
    mitigated preset must lose clearly less (mean squared logit error vs FP)."""
    m = tiny_model("llama", hidden=128)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[7] = 50.0
            layer.post_attention_layernorm.weight[19] = 50.0
    ref = m(input_ids=tokens).logits
    err = {}
    for r in (name, naive):
        q, applied = apply_recipe(copy.deepcopy(m), PRESETS[r], tokens, CPU)
        with torch.no_grad():
            err[r] = (q(input_ids=tokens).logits - ref).pow(2).mean().item()
    assert err[name] < 0.7 * err[naive], err


def test_recipes_a_mitigation_cannot_serve_are_rejected_before_any_work():
    from quantbench.core.errors import QuantbenchError
    from quantbench.quant.apply import prepare

    m = tiny_model("llama")
    for mit, field in (("gptq", "weights"), ("awq", "weights"), ("clip", "weights"),
                       ("int8_decomp", "activations"), ("outlier_tokens", "activations")):
        with pytest.raises(QuantbenchError, match=f"{mit} needs {field}"):
            prepare(m, Recipe(name="r", mitigations=(MitigationSpec(name=mit),)))


def test_gptq_token_norm_keeps_one_massive_token_from_dominating_the_hessian():
    """With token_norm the Hessian is the Gram matrix of unit-RMS token rows."""
    import torch.nn as nn

    from quantbench.quant.calibration import StatsRequest, collect_input_stats

    torch.manual_seed(0)

    class Wrap(nn.Module):  # takes the activations themselves as "input_ids"
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, input_ids):
            return self.lin(input_ids)

    model = Wrap()
    x = torch.randn(1, 6, 8)
    x[0, 0] *= 1000.0  # one massive token
    plain = collect_input_stats(model, {"lin": model.lin}, x, 1, CPU, StatsRequest(gram=True))["lin"].gram
    normed = collect_input_stats(model, {"lin": model.lin}, x, 1, CPU,
                                 StatsRequest(gram=True, token_norm=True))["lin"].gram
    rows = x.reshape(-1, 8)
    unit = rows / rows.pow(2).mean(1, keepdim=True).sqrt()
    assert torch.allclose(normed.float(), unit.T @ unit, rtol=1e-4)
    share_plain = (rows[0].pow(2).sum() / rows.pow(2).sum()).item()
    assert share_plain > 0.99 and torch.allclose(plain.float(), rows.T @ rows, rtol=1e-4)
