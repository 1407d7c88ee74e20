"""AWQ on block outputs (awq option `block: true`, llm-awq's module2inspect=mlp): the norm -> gate/up
scales are chosen on the MLP's output error, written out here for the Llama MLP
(down(silu(x Wg^T) * (x Wu^T))) and llm-awq's scale formula, independently of awq.py."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import tiny_model

from quantbench.modeling.arch import arch_of
from quantbench.quant.apply import apply_recipe
from quantbench.quant.mitigations._util import find_pairs
from quantbench.quant.mitigations.awq import block_of, search_pair
from quantbench.quant.primitives import fake_quant
from quantbench.quant.spec import MitigationSpec, QuantSpec, Recipe

W4 = QuantSpec(bits=4, granularity="group", group_size=32)
GRID = tuple(i / 10 for i in range(10))


def _model():
    m = tiny_model("llama", hidden=128)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.post_attention_layernorm.weight[19] = 30.0  # a hot MLP input channel
    return m


def _mlp_inputs(m, tokens):
    seen = []
    h = m.model.layers[0].mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        m(input_ids=tokens)
    h.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_block_search_picks_the_alpha_of_the_written_out_mlp_error(tokens):
    m = _model()
    x = _mlp_inputs(m, tokens)
    mlp = m.model.layers[0].mlp
    wg, wu, wd = (lin.weight.detach().clone() for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    ref = F.linear(F.silu(x @ wg.T) * (x @ wu.T), wd)
    mean = x.abs().mean(0)

    def err(alpha: float) -> float:
        s = mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # llm-awq's normalisation
        g, u = (fake_quant(w * s, W4) / s for w in (wg, wu))
        return float((F.linear(F.silu(x @ g.T) * (x @ u.T), wd) - ref).pow(2).sum())

    expected = min(GRID, key=err)
    pair = next(p for p in find_pairs(m, arch_of(m), ("up",)) if p.key.startswith("layers.0."))
    blk = block_of(pair, m)
    assert blk is mlp
    a, e, e0 = search_pair(pair, x, mean, W4, GRID, blk)
    assert a == expected and abs(e - err(a)) <= 1e-4 * err(a) and abs(e0 - err(0.0)) <= 1e-4 * err(0.0)
    assert torch.equal(mlp.gate_proj.weight, wg)  # the search leaves the weights as they were
    a_lin, _, _ = search_pair(pair, x, mean, W4, GRID)
    assert err(a) <= err(a_lin)  # per-linear choice is never better on the block's own error


def test_awq_block_option_in_a_recipe(tokens):
    m = _model()
    r = Recipe(name="awq-block", weights=W4, mitigations=(MitigationSpec(name="awq", options={"block": True}),))
    _, applied = apply_recipe(copy.deepcopy(m), r, tokens)
    assert applied.notes["awq_block_pairs"] == len(m.model.layers)
