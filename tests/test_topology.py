"""The traced topology against independent references: the old hand table (kept here as a cross-check
only), the families' documented layouts (fused qkv rows, (1 + w) norms, routers, multipliers), and
transformers' own fused-expert modules for the unfused MoE blocks."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from quantbench.core.errors import QuantbenchError, UnsupportedArchitecture
from quantbench.modeling.arch import arch_of, arch_or_none
from quantbench.modeling.moe import ExpertList, unfuse_experts
from quantbench.quant.apply import apply_recipe, prepare
from quantbench.quant.recipes import PRESETS
from quantbench.quant.spec import MitigationSpec, Recipe

CPU = torch.device("cpu")
ATT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

# The hand table quantbench.modeling.arch held before tracing (cross-check only; orders compared as sets).
TABLE = {
    "llama": dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
                  attn="self_attn", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", qkv=ATT,
                  o="self_attn.o_proj", up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj",
                  norm_kind="rms", gated_mlp=True, fused_qkv=False),
    "gpt2": dict(layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
                 attn="attn", attn_norm="ln_1", mlp_norm="ln_2", qkv=("attn.c_attn",), o="attn.c_proj",
                 up=("mlp.c_fc",), down="mlp.c_proj", norm_kind="layer", gated_mlp=False, fused_qkv=True),
    "opt": dict(layers="model.decoder.layers", embed="model.decoder.embed_tokens",
                final_norm="model.decoder.final_layer_norm", lm_head="lm_head", attn="self_attn",
                attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", qkv=ATT, o="self_attn.out_proj",
                up=("fc1",), down="fc2", norm_kind="layer", gated_mlp=False, fused_qkv=False),
    # the old row said lm_head="embed_out" (older transformers); 5.24 names it lm_head, as the tracer found
    "gpt_neox": dict(layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
                     lm_head="lm_head", attn="attention", attn_norm="input_layernorm",
                     mlp_norm="post_attention_layernorm", qkv=("attention.query_key_value",), o="attention.dense",
                     up=("mlp.dense_h_to_4h",), down="mlp.dense_4h_to_h", norm_kind="layer", gated_mlp=False,
                     fused_qkv=True),
    "phi": dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.final_layernorm",
                lm_head="lm_head", attn="self_attn", attn_norm="input_layernorm", mlp_norm=None, qkv=ATT,
                o="self_attn.dense", up=("mlp.fc1",), down="mlp.fc2", norm_kind="layer", gated_mlp=False,
                fused_qkv=False),
}
TABLE["mistral"] = TABLE["qwen2"] = TABLE["qwen3"] = TABLE["quantbench_lm"] = TABLE["llama"]
TABLE_PAIRS = {  # the table's smooth_pairs (prev -> targets) the traced pairs must contain
    "llama": {("input_layernorm", ATT), ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
              ("mlp.up_proj", ("mlp.down_proj",)), ("self_attn.v_proj", ("self_attn.o_proj",))},
    "gpt2": {("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))},
    "opt": {("self_attn_layer_norm", ATT), ("final_layer_norm", ("fc1",)), ("self_attn.v_proj", ("self_attn.out_proj",))},
    "gpt_neox": {("input_layernorm", ("attention.query_key_value",)),
                 ("post_attention_layernorm", ("mlp.dense_h_to_4h",))},
    "phi": {("input_layernorm", (*ATT, "mlp.fc1")), ("self_attn.v_proj", ("self_attn.dense",))},
}


def _quantbench_lm(attention: str = "softmax"):
    from quantbench.train.modeling import QuantbenchLMConfig, QuantbenchLMForCausalLM

    torch.manual_seed(0)
    cfg = QuantbenchLMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, attention=attention)
    return QuantbenchLMForCausalLM(cfg).eval()


def _model(family: str):
    if family == "quantbench_lm":
        return _quantbench_lm()
    if family == "gpt_neox":
        return tiny_model("gpt_neox")
    return tiny_model(family)


@pytest.mark.parametrize("family", sorted(TABLE))
def test_traced_map_equals_the_old_hand_table(family):
    arch = arch_of(_model(family))
    row = TABLE["llama" if family in ("mistral", "qwen2", "qwen3", "quantbench_lm") else family]
    for key, want in row.items():
        got = getattr(arch, key)
        if key in ("qkv", "up"):
            assert set(got) == set(want), (key, got)
        else:
            assert got == want, (key, got, want)
    pairs = {(p.prev, tuple(sorted(p.targets))) for p in arch.layer(0).pairs}
    for prev, targets in TABLE_PAIRS["llama" if family in ("mistral", "qwen2", "qwen3", "quantbench_lm") else family]:
        assert (prev, tuple(sorted(targets))) in pairs, (prev, targets)


# Facts of each family, written from transformers' modeling code (not from the tracer).
FACTS = {
    "gemma": dict(norm_kind="rms+1", tied=True, embed_scale=8.0, post=()),  # (1 + w) RMSNorm, x * sqrt(64)
    "gemma2": dict(norm_kind="rms+1", tied=True, embed_scale=8.0,
                   post=("post_attention_layernorm", "post_feedforward_layernorm"), mlp_norm="pre_feedforward_layernorm"),
    "gemma3_text": dict(norm_kind="rms+1", tied=True, embed_scale=8.0,
                        post=("post_attention_layernorm", "post_feedforward_layernorm")),
    "olmo2": dict(norm_kind="rms", attn_norm=None, post=("post_attention_layernorm", "post_feedforward_layernorm")),
    "granite": dict(norm_kind="rms", embed_scale=12.0, post=()),  # embedding_multiplier
    "phi": dict(norm_kind="layer", parallel=True, mlp_norm=None),
    "falcon": dict(norm_kind="layer", parallel=True, mlp_norm=None, kv_heads=1),  # multi-query, parallel_attn
    "gpt_neox": dict(norm_kind="layer", parallel=True),  # use_parallel_residual
    "llama": dict(norm_kind="rms", parallel=False, tied=False),
    "mixtral": dict(norm_kind="rms", routers=("mlp.gate",), experts=4),
    "qwen2_moe": dict(norm_kind="rms", routers=("mlp.gate", "mlp.shared_expert_gate"), experts=4),
}


@pytest.mark.parametrize("family", sorted(FACTS))
def test_family_quirks_are_found(family):
    arch = arch_of(tiny_model(family))
    t, f = arch.layer(0), FACTS[family]
    assert arch.norm_kind == f["norm_kind"]
    for key, attr in (("tied", arch.tied), ("embed_scale", arch.embed_scale), ("parallel", t.parallel),
                      ("post", t.post_norms), ("routers", t.routers), ("experts", len(t.experts)),
                      ("kv_heads", arch.n_kv_heads), ("attn_norm", t.attn_norm), ("mlp_norm", t.mlp_norm)):
        if key in f:
            assert attr == f[key], (key, attr)


def test_fused_qkv_rows_follow_each_family_layout():
    """v rows of the fused projection: GPT-2 [q|k|v] (last 64), Phi-3 [q|k|v] under GQA (last 2 x 16),
    GPT-NeoX per head [q, k, v] (rows 48h + 32 .. 48h + 48), Falcon multi-query [q | k | v] (last 16)."""
    hd = 16
    expect = {
        "gpt2": list(range(128, 192)),
        "phi3": list(range(96, 128)),
        "gpt_neox": [h * 3 * hd + 2 * hd + d for h in range(4) for d in range(hd)],
        "falcon": list(range(80, 96)),
    }
    for fam, rows in expect.items():
        o = arch_of(tiny_model(fam)).layer(0).pairs_of(("o",))
        assert len(o) == 1 and list(o[0].rows) == rows, fam
    down = arch_of(tiny_model("phi3")).layer(0).pairs_of(("down",))
    assert down[0].prev == "mlp.gate_up_proj" and list(down[0].rows) == list(range(128, 256))  # chunk (gate, up)


def test_gqa_index_repeats_each_kv_head_for_its_query_heads():
    o = arch_of(tiny_model("llama")).layer(0).pairs_of(("o",))[0]
    # 4 query heads, 2 kv heads, head_dim 16: o's input head h reads v head h // 2
    assert list(o.index) == [(c // 16 // 2) * 16 + c % 16 for c in range(64)]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_unfused_experts_match_transformers_fused_module(family):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
        fused = tf.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
    else:  # [E, D, 2I] with interleaved gate/up, biases, clamped SwiGLU
        cfg = tf.GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
        fused = tf.models.gpt_oss.modeling_gpt_oss.GptOssExperts(cfg)
    torch.manual_seed(0)  # outputs of order 10 here: float32 summation order alone moves them ~1e-6
    for p in fused.parameters():
        torch.nn.init.normal_(p, std=0.5)
    holder = torch.nn.Module()
    holder.experts = fused
    ref_mod = copy.deepcopy(fused)
    assert unfuse_experts(holder) == 1 and isinstance(holder.experts, ExpertList)
    assert unfuse_experts(holder) == 0  # idempotent
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 64, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])  # [10, 2]
    w = torch.rand(10, 2, generator=g)
    torch.testing.assert_close(holder.experts(x, idx, w), ref_mod(x, idx, w), rtol=1e-5, atol=1e-5)
    assert all(isinstance(e.gate_proj, torch.nn.Linear) for e in holder.experts)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_every_expert_is_planned_and_the_router_is_not(family):
    m = tiny_model(family)
    with torch.no_grad():
        ids = torch.randint(3, 128, (2, 16))
        ref = m(input_ids=ids).logits
    plan = prepare(m, PRESETS.get("w4a16-g64"))  # traces, and unfuses the experts in place
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    arch = arch_of(m)
    experts = [n for n in plan.linears if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert set(arch.names("routers")).isdisjoint(plan.linears)
    assert all(r in plan.excluded for r in arch.names("routers") if isinstance(m.get_submodule(r), torch.nn.Linear))


def test_verification_drops_pairs_that_are_not_exact():
    """quantbench_lm variants: learned value biases break v -> o; a second norm reading the first
    norm's output breaks norm -> q/k/v; ReLU (OPT) keeps fc1 -> fc2 exact, GELU (GPT-2) does not."""
    kvb = _quantbench_lm("kv_bias")
    with torch.no_grad():
        for lay in kvb.model.layers:
            lay.self_attn.v_bias.normal_()
    t = arch_of(kvb).layer(0)
    assert not t.pairs_of(("o",)) and any("v -> o" in n for n in t.notes)
    assert arch_of(_quantbench_lm("kv_bias")).layer(0).pairs_of(("o",))  # zero value biases: exact
    ca = _quantbench_lm("ca_scale")
    t = arch_of(ca).layer(0)
    assert "input_layernorm" not in {p.prev for p in t.pairs} and any("scale_norm" in n for n in t.notes)
    assert arch_of(tiny_model("opt")).layer(0).pairs_of(("down",))
    assert not arch_of(tiny_model("gpt2")).layer(0).pairs_of(("down",))


def test_kv_projections_come_from_the_cache_or_the_attention_products():
    assert arch_of(tiny_model("llama")).layer(0).kv == ("self_attn.k_proj", "self_attn.v_proj")
    assert arch_of(_quantbench_lm()).layer(0).kv == ("self_attn.k_proj", "self_attn.v_proj")  # no cache
    g = tiny_model("gpt2")
    assert arch_of(g).layer(0).kv == ("attn.c_attn",)
    with pytest.raises(QuantbenchError, match="fuses q/k/v"):
        prepare(g, PRESETS.get("w4a4-kv4"))


def test_post_norm_block_is_one_line_and_plain_quantization_still_runs():
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, do_layer_norm_before=False)
    m = tf.OPTForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedArchitecture, match="opt.*not a residual sum") as e:
        arch_of(m)
    assert "\n" not in str(e.value) and arch_or_none(m) is None
    ids = torch.randint(3, 128, (2, 16))
    q, _ = apply_recipe(m, PRESETS.get("w8a16"), ids, CPU)
    with pytest.raises(QuantbenchError, match="smoothquant needs the model's topology"):
        prepare(copy.deepcopy(m), Recipe(name="sq", mitigations=(MitigationSpec(name="smoothquant"),)))


def test_the_traced_map_travels_with_deepcopy_and_is_traced_once(monkeypatch):
    import quantbench.modeling.arch.pairs as topo

    m = tiny_model("llama")
    arch = arch_of(m)
    monkeypatch.setattr(topo, "trace_architecture", lambda _m: (_ for _ in ()).throw(AssertionError("traced twice")))
    assert arch_of(copy.deepcopy(m)) is not None and arch_of(m) is arch


def test_an_expert_no_calibration_token_reaches_still_gets_static_ranges():
    import types

    def never_e3(self, h):  # Mixtral's router with expert 3 masked out
        logits = torch.nn.functional.linear(h.reshape(-1, self.hidden_dim), self.weight)
        probs = logits.masked_fill(torch.arange(4) == 3, -1e9).softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    m = tiny_model("mixtral")
    ids = torch.randint(3, 128, (2, 16))
    for lay in m.model.layers:
        lay.mlp.gate.forward = types.MethodType(never_e3, lay.mlp.gate)
    arch_of(m)
    hit = torch.zeros(4, dtype=torch.long)

    def count(_m, args, _out):
        hit.add_(torch.bincount(args[1].flatten(), minlength=4))

    hooks = [lay.mlp.experts.register_forward_hook(count) for lay in m.model.layers]
    with torch.no_grad():
        m(input_ids=ids)
    for h in hooks:
        h.remove()
    assert hit[3] == 0 and hit.sum() == 2 * 32 * 2  # ...on these tokens (layers x tokens x top-2)
    q, applied = apply_recipe(m, PRESETS.get("w8a8-tensor-static"), ids, CPU)
    e3 = q.model.layers[0].mlp.experts[3].gate_proj
    e0, e1 = q.model.layers[0].mlp.experts[0].gate_proj, q.model.layers[0].mlp.experts[1].gate_proj
    assert applied.notes["static_ranges_borrowed"] == 2 * 3  # layers x (gate, up, down) of expert 3
    assert torch.equal(e3.a_hi, torch.maximum(torch.maximum(e0.a_hi, e1.a_hi), q.model.layers[0].mlp.experts[2].gate_proj.a_hi))


@pytest.mark.parametrize("family", ["mixtral", "gpt_neox", "gemma"])
def test_half_precision_trace_finds_the_same_pairs(family):
    """bf16 rounding can flip MoE routing downstream; the half-precision check stays layer-local."""
    key = lambda a: sorted((p.kind, p.prev, p.targets, p.rows, p.index) for t in a.layer_topos for p in t.pairs)  # noqa: E731
    assert key(arch_of(tiny_model(family).to(torch.bfloat16))) == key(arch_of(tiny_model(family)))


@pytest.mark.parametrize("family", ["phi", "falcon", "cohere"])
def test_shared_norm_smoothing_compensates_attention_and_mlp(family):
    """Issue 9 §3: where one norm feeds attention and MLP, SmoothQuant must scale every reader's columns
    (before the fix only q/k/v were: logits moved by ~1.4x with one outlier channel)."""
    from quantbench.quant.apply import mitigate
    from quantbench.quant.calibration import Calibration
    from quantbench.quant.plugin import QuantContext
    from quantbench.testing.coverage import _recipe

    m = tiny_model(family)
    arch = arch_of(m)
    t = arch.layer(0)
    assert t.parallel and t.mlp_norm is None
    with torch.no_grad():
        for i in range(arch.n_layers):
            m.get_submodule(arch.layer_path(i, t.attn_norm)).weight[3] = 50.0  # an outlier channel into both branches
    ids = torch.randint(3, 128, (4, 32))
    mlp_in = m.get_submodule(arch.layer_path(0, t.up[0]))
    before = mlp_in.weight[:, 3].clone()
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    ctx = QuantContext(plan=prepare(m, _recipe("w8a8-tensor-static", "smoothquant")),
                       calib=Calibration(ids, 4, CPU), arch=arch)
    mitigate(m, ctx)
    with torch.no_grad():
        err = float((m(input_ids=ids).logits - ref).abs().max() / ref.abs().max())
    assert err < 1e-4
    assert float(mlp_in.weight[:, 3].abs().max()) > 5 * float(before.abs().max())  # the MLP took its share of s
