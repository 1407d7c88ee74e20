"""Transforms that must not change the FP function (SmoothQuant scaling, AWQ scaling, norm fusing,
rotations) leave logits unchanged within float tolerance; Hadamard construction is exact."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from quantbench.core.errors import QuantbenchError
from quantbench.modeling.arch import arch_of
from quantbench.quant.apply import apply_recipe
from quantbench.quant.mitigations._hadamard import hadamard, hadamard_factors
from quantbench.quant.mitigations.rotate import fuse_norms, make_rotation
from quantbench.quant.spec import MitigationSpec, QuantSpec, Recipe

CPU = torch.device("cpu")


def _mitigated(model, tokens, *mits, weights=None, activations=None):
    """Run the mitigations only (no quantization); weights/activations just steer their searches."""
    from quantbench.quant.apply import mitigate, prepare
    from quantbench.quant.calibration import Calibration
    from quantbench.quant.plugin import QuantContext

    r = Recipe(name="t", mitigations=tuple(MitigationSpec(name=n, options=o) for n, o in mits),
               weights=weights, activations=activations)
    ctx = QuantContext(plan=prepare(model, r), calib=Calibration(tokens, 4, CPU), arch=arch_of(model))
    effects = mitigate(model, ctx)
    return model, effects


def _close(a, b, rel=1e-4):
    assert (a - b).abs().max() <= rel * b.abs().max() + 1e-5, float((a - b).abs().max())


@pytest.mark.parametrize("alpha", [0.5, "search"])
def test_smoothquant_keeps_logits(tiny, tokens, alpha):
    ref = tiny(input_ids=tokens).logits
    m, ctx = _mitigated(copy.deepcopy(tiny), tokens, ("smoothquant", {"alpha": alpha}),
                           weights=QuantSpec(bits=8), activations=QuantSpec(bits=8, granularity="tensor"))
    _close(m(input_ids=tokens).logits, ref)
    # per layer: qkv, up, down (llama: act(gate) * up; opt: ReLU(fc1) is positively homogeneous), o (gpt2: the
    # v rows of the fused c_attn); gpt2's GELU between c_fc and c_proj has no exact pair
    expected = {"llama": 8, "gpt2": 6, "opt": 8}[tiny.config.model_type]
    assert ctx.notes["smoothquant_pairs"] == expected


def test_smoothquant_moves_the_outlier_into_the_weights(tokens):
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight[5] = 200.0  # a planted outlier channel on q/k/v inputs
    seen = {}
    h = m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    m(input_ids=tokens)
    before = seen["x"].abs().amax((0, 1))
    _mitigated(m, tokens, ("smoothquant", {"alpha": 0.5, "pairs": ["qkv"]}))
    m(input_ids=tokens)
    h.remove()
    after = seen["x"].abs().amax((0, 1))
    assert after[5] / after.median() < 0.2 * before[5] / before.median()


def test_awq_scaling_keeps_logits(tiny, tokens):
    ref = tiny(input_ids=tokens).logits
    m, _ = _mitigated(copy.deepcopy(tiny), tokens, ("awq", {"search_tokens": 64}),
                         weights=QuantSpec(bits=4, granularity="group", group_size=16))
    _close(m(input_ids=tokens).logits, ref)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_keeps_logits_llama(tokens, kind):
    m = tiny_model("llama")
    ref = m(input_ids=tokens).logits
    r = Recipe(name="rot", mitigations=(MitigationSpec(name="rotate", options={"kind": kind}),))
    q, applied = apply_recipe(m, r, tokens, CPU)
    _close(q(input_ids=tokens).logits, ref)
    assert applied.notes["rotate_kind"] == kind
    assert applied.effects.residual_basis is not None and len(applied.effects.online) == 2  # down_proj x 2 layers


def test_rotation_unties_tied_embeddings(tokens):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = tf.LlamaForCausalLM(cfg).eval()  # hidden 48 = 12 x 4 (Paley x Sylvester), head_dim 12
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ref = m(input_ids=tokens).logits
    n_fp = sum(p.numel() for p in m.parameters())  # tied: the embedding counted once
    q, applied = apply_recipe(m, Recipe(name="r", mitigations=(MitigationSpec(name="rotate"),)), tokens, CPU)
    assert applied.notes["rotate_untied"] and q.lm_head.weight is not q.model.embed_tokens.weight
    assert applied.effects.added_params == ["lm_head.weight"]
    v, d = m.model.embed_tokens.weight.shape
    assert applied.size.total_bits == 16 * (n_fp + v * d) + _rotation_bits(q)  # the untied head is paid for
    assert applied.size.n_params_fp == n_fp
    _close(q(input_ids=tokens).logits, ref)


def _rotation_bits(model) -> int:
    """16 bits per element of the (shared) online rotation factors, counted once."""
    seen, n = set(), 0
    for mod in model.modules():
        t = getattr(mod, "input_transform", None)
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            n += sum(b.numel() for b in t.buffers())
    return 16 * n


def test_norm_fusing_keeps_logits_and_rejects_layernorm(tokens):
    m = tiny_model("llama")
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 2.0)  # non-trivial norm weights
    ref = m(input_ids=tokens).logits
    fuse_norms(m, arch_of(m))
    assert torch.all(m.model.layers[0].input_layernorm.weight == 1)
    _close(m(input_ids=tokens).logits, ref)
    for kind in ("gpt2", "opt"):
        g = tiny_model(kind)
        with pytest.raises(QuantbenchError, match="LayerNorm"):
            apply_recipe(g, Recipe(name="r", mitigations=(MitigationSpec(name="rotate"),)), tokens, CPU)


def _sylvester_closed_form(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n = 2^k without the recursion: H[i, j] = (-1)^popcount(i & j)."""
    i = torch.arange(n)
    both = i[:, None] & i[None, :]  # [n, n]
    parity = torch.zeros(n, n, dtype=torch.long)
    for bit in range(max(n.bit_length() - 1, 0)):
        parity ^= (both >> bit) & 1
    return (1 - 2 * parity).double()


def _assert_hadamard(h: torch.Tensor) -> None:
    """The definition: entries +-1 and H H^T = n I (exactly, in float64); powers of 2 are Sylvester's."""
    n = h.shape[0]
    assert h.shape == (n, n) and ((h == 1) | (h == -1)).all()
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))
    if n & (n - 1) == 0:
        assert torch.equal(h, _sylvester_closed_form(n))


@pytest.mark.parametrize("n", [4, 12, 20, 48, 64, 576, 1536])
def test_hadamard_orders_are_exact(n):
    """hadamard(n) is a Hadamard matrix; the rotation is Q = diag(signs) (F_1 kron F_2 ...) / sqrt(n),
    built here with torch.kron from its (each checked) Hadamard factors, and both its dense matrix()
    and its Kronecker-factored online op equal x @ Q."""
    h = hadamard(n)
    assert h is not None
    _assert_hadamard(h)
    rot, kind = make_rotation(n, "hadamard", torch.Generator().manual_seed(0))
    assert kind == "hadamard"
    kron = torch.ones(1, 1, dtype=torch.float64)
    for i in range(len(rot.dims)):
        f = getattr(rot, f"f{i}")
        _assert_hadamard(f)
        kron = torch.kron(kron, f)
    assert torch.equal(kron, h)
    assert ((rot.signs == 1) | (rot.signs == -1)).all()
    q = rot.signs[:, None] * kron / n**0.5  # [n, n]
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-12)
    assert torch.allclose(rot.matrix(), q, rtol=0, atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(rot(x), x @ q, rtol=0, atol=1e-10)


def test_no_hadamard_falls_back_to_random_orthogonal():
    assert hadamard_factors(100) is None
    rot, kind = make_rotation(100, "hadamard", torch.Generator().manual_seed(0))
    q = rot.matrix()
    assert kind == "random" and torch.allclose(q @ q.T, torch.eye(100, dtype=q.dtype), atol=1e-10)


@pytest.mark.integration
def test_default_model_transforms_keep_logits_and_rotation_removes_outliers(default_lm, wiki):
    from quantbench.data.corpus import calibration_batches

    model, tok = default_lm.model, default_lm.tokenizer
    calib = calibration_batches(tok, wiki.calib_text, 4, 64, 0)
    with torch.no_grad():
        ref = model(input_ids=calib).logits
        for name, opts in (("smoothquant", {"alpha": 0.5}), ("rotate", {})):
            r = Recipe(name=name, mitigations=(MitigationSpec(name=name, options=opts),))
            q, _ = apply_recipe(copy.deepcopy(model), r, calib, CPU)
            _close(q(input_ids=calib).logits, ref, rel=2e-3)
            if name == "rotate":
                from quantbench.census.quick import outlier_note

                before, after = outlier_note(model, calib[:2], {}), outlier_note(q, calib[:2], {})
                assert after["census_max_abs"] < 0.25 * before["census_max_abs"]
