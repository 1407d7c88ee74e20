"""Compositions of mitigations (issue 13: QuaRot = rotate + gptq, PrefixQuant = rotate + outlier_tokens)
are applied in a sensible order: what a later stage calibrates is measured on the model as the earlier
stages left it. Reference: the rotated FP model's own linear inputs, collected here with a plain hook."""
from __future__ import annotations

import copy

import torch
from conftest import tiny_model

from quantbench.quant.apply import apply_recipe
from quantbench.quant.spec import MitigationSpec, QuantSpec, Recipe

CPU = torch.device("cpu")
A8_STATIC = QuantSpec(bits=8, granularity="tensor", dynamic=False)


def _planted(tokens):
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.embed_tokens.weight[9, 3] = 500.0  # token 9 carries a massive residual value
    ids = tokens.clone()
    ids[:, 3::5] = 9
    return m, ids


def _inputs(model, name, ids):
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return seen[0]  # [B, T, D]


def test_prefixquant_finds_tokens_and_calibrates_static_ranges_on_the_rotated_model(tokens):
    m, ids = _planted(tokens)
    rot = [MitigationSpec(name="rotate")]
    # static ranges are observed with the weights already quantized and activations not: the reference
    # is the rotated W8 model
    rotated, _ = apply_recipe(copy.deepcopy(m), Recipe(name="rot-w8", weights=QuantSpec(bits=8),
                                                       mitigations=tuple(rot)), ids, CPU)
    r = Recipe(name="rot-ot", weights=QuantSpec(bits=8), activations=A8_STATIC,
               mitigations=(*rot, MitigationSpec(name="outlier_tokens")))
    q, applied = apply_recipe(copy.deepcopy(m), r, ids, CPU)
    assert applied.notes["outlier_token_ids"] == [9]  # still an outlier token after rotation
    kept = (ids == 9)
    kept[:, 0] = True
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        x = _inputs(rotated, name, ids)  # down_proj: after the online Hadamard, as the quantizer sees it
        x = x.masked_fill(kept[..., None], 0.0)
        ql = q.get_submodule(name)
        assert torch.allclose(ql.a_hi.reshape(()), x.max().clamp_min(0), rtol=1e-5)
        assert torch.allclose(ql.a_lo.reshape(()), x.min().clamp_max(0), rtol=1e-5)
    # the rotated ranges are far below the unrotated, unkept ones
    naive, _ = apply_recipe(copy.deepcopy(m), Recipe(name="n", weights=QuantSpec(bits=8), activations=A8_STATIC), ids, CPU)
    qn = "model.layers.1.self_attn.q_proj"
    assert q.get_submodule(qn).a_hi.max() < 0.5 * naive.get_submodule(qn).a_hi.max()


def test_quarot_gptq_hessians_see_the_rotated_inputs(tokens):
    """rotate + gptq: GPTQ's result beats RTN on the rotated weights for the rotated inputs (it would not,
    in general, if its Hessian came from the unrotated model)."""
    m, ids = _planted(tokens)
    w4 = QuantSpec(bits=4, granularity="group", group_size=32)
    rot = MitigationSpec(name="rotate")
    rotated, _ = apply_recipe(copy.deepcopy(m), Recipe(name="rot-only", mitigations=(rot,)), ids, CPU)
    qr, _ = apply_recipe(copy.deepcopy(m), Recipe(name="rtn", weights=w4, mitigations=(rot,)), ids, CPU)
    qg, applied = apply_recipe(copy.deepcopy(m), Recipe(name="g", weights=w4, mitigations=(
        rot, MitigationSpec(name="gptq", options={"sequential": False}))), ids, CPU)
    assert applied.effects.final_weights
    name = "model.layers.0.mlp.down_proj"
    x = _inputs(rotated, name, ids).reshape(-1, rotated.get_submodule(name).weight.shape[1])
    w = rotated.get_submodule(name).weight.detach()
    e = [float((x @ (q.get_submodule(name).weight.detach() - w).T).pow(2).sum()) for q in (qr, qg)]
    assert e[1] < e[0]


def test_rotate_o_online_keeps_the_function_and_rotates_o_inputs(tokens):
    m = tiny_model("llama")
    with torch.no_grad():
        ref = m(input_ids=tokens).logits
    r = Recipe(name="rot-o", mitigations=(MitigationSpec(name="rotate", options={"o_online": True}),))
    q, applied = apply_recipe(copy.deepcopy(m), r, tokens, CPU)
    with torch.no_grad():
        out = q(input_ids=tokens).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    names = set(applied.effects.online)
    assert {"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"} <= names and len(names) == 4
    # o_proj now reads x H: what its input quantizer sees is the attention output times an orthogonal H
    o = q.model.layers[0].self_attn.o_proj
    h = o.input_transform.matrix().float()
    assert torch.allclose(h @ h.T, torch.eye(h.shape[0]), atol=1e-5)
