"""The attention variants and the HF-compatible model: shapes, causality, equivalences, round trip,
census and quantization compatibility. Tiny random models (vocab 97), CPU."""
from __future__ import annotations

import pytest
import torch

from quantbench.train.attention import VARIANTS
from quantbench.train.modeling import QuantbenchLMConfig, QuantbenchLMForCausalLM

V = 97


def tiny(variant: str, seed: int = 0, **kw) -> QuantbenchLMForCausalLM:
    torch.manual_seed(seed)
    cfg = QuantbenchLMConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64, attention=variant, **kw)
    cfg._attn_implementation = "sdpa"
    return QuantbenchLMForCausalLM(cfg).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shape_and_causality(variant, impl, ids):
    m = tiny(variant)
    m.set_attn_implementation(impl)
    with torch.no_grad():
        out = m(input_ids=ids).logits
        changed = ids.clone()
        changed[:, 7] = (changed[:, 7] + 5) % V
        out2 = m(input_ids=changed).logits
    assert out.shape == (2, 12, V)
    assert torch.equal(out[:, :7], out2[:, :7])  # earlier positions never see the future token
    assert (out[:, 7:] - out2[:, 7:]).abs().max() > 1e-4  # ... and later ones do


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eager_returns_weights_like_sdpa_outputs(variant, ids):
    m = tiny(variant)
    with torch.no_grad():
        sdpa = m(input_ids=ids).logits
        m.set_attn_implementation("eager")
        attn = m.model.layers[0].self_attn
        x = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids))
        from quantbench.train.attention.base import rope_tables

        cos, sin = rope_tables(12, attn.head_dim, 10000.0, x.device, x.dtype)
        _, w = attn(x, cos, sin)
        eager = m(input_ids=ids).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
    assert w.shape == (2, 4, 12, 12)  # [B, H, Tq, Tk]; kv_bias drops its bias column
    assert torch.all(w.triu(1) == 0)  # no weight on future keys
    assert torch.all(w >= 0) and torch.all(w <= 1 + 1e-6)


def test_ca_scale_with_unit_factor_equals_softmax(ids):
    soft, ca = tiny("softmax"), tiny("ca_scale")
    missing = ca.load_state_dict(soft.state_dict(), strict=False).missing_keys
    assert all("scale_" in k for k in missing)
    assert torch.all(ca.model.layers[0].self_attn.scale(torch.randn(2, 5, 32)) == 1)  # S_c ≡ 1 at init
    with torch.no_grad():
        torch.testing.assert_close(ca(input_ids=ids).logits, soft(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
        torch.nn.init.normal_(ca.model.layers[0].self_attn.scale_proj.weight, std=1.0)  # S_c ≠ 1 changes outputs
        assert (ca(input_ids=ids).logits - soft(input_ids=ids).logits).abs().max() > 1e-3


def test_clipped_softmax_without_clipping_equals_softmax(ids):
    soft, clipped = tiny("softmax"), tiny("clipped_softmax", clip_gamma=0.0, clip_zeta=1.0)
    clipped.load_state_dict(soft.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clipped(input_ids=ids).logits, soft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_sigmoid_weights_are_unnormalised_and_scaled_by_visible_keys():
    m = tiny("sigmoid")
    attn = m.model.layers[0].self_attn
    q = k = torch.zeros(1, 4, 6, 8)  # zero scores: w_ij = sigmoid(-log(i+1)) = 1 / (i + 2)
    _, w = attn.attend(q, k, torch.randn(1, 4, 6, 8))
    expect = torch.tensor([1 / (i + 2) for i in range(6)])
    torch.testing.assert_close(w[0, 0].sum(-1), expect * torch.arange(1, 7))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_and_auto_load_round_trip(variant, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from quantbench.modeling.arch import arch_of

    m = tiny(variant)
    with torch.no_grad():
        for p in m.parameters():  # move every parameter off its init (S_c, gates, biases included)
            p.add_(0.05 * torch.randn_like(p))
        ref = m(input_ids=ids).logits
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is QuantbenchLMForCausalLM and loaded.config.attention == variant
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    assert arch_of(loaded).layers == "model.layers"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_census_and_quantization_run_on_every_variant(variant):
    from quantbench.census import run_census
    from quantbench.quant.apply import apply_recipe
    from quantbench.quant.recipes import resolve_recipe
    from quantbench.run.config import CensusConfig

    m = tiny(variant)
    batches = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    census = run_census(m, batches, cfg=CensusConfig(samples=2, seq_len=16), batch_size=2)
    first = [r["first_token_attn"] for r in census["layers"]]
    assert len(first) == 2 and all(f is not None and 0 <= f <= 1 for f in first)
    assert census["summary"]["max_abs"] > 0
    assert m.config._attn_implementation == "sdpa"  # the census switched to eager and back
    q, _ = apply_recipe(m, resolve_recipe("w8a8-tensor-static"), batches, torch.device("cpu"), 2)
    with torch.no_grad():
        assert torch.isfinite(q(input_ids=batches).logits).all()


def test_padding_is_rejected(ids):
    with pytest.raises(ValueError, match="padded"):
        tiny("softmax")(input_ids=ids, attention_mask=torch.zeros_like(ids))


def test_kv_bias_slot_mass_is_reported_and_excluded_from_weights(ids):
    from quantbench.train.compare import bias_slot_mass

    m = tiny("kv_bias")
    with torch.no_grad():
        m.model.layers[0].self_attn.k_bias.fill_(0.0)
        m.model.layers[0].self_attn.q_proj.weight.fill_(0.0)  # all scores equal: the bias slot gets 1/(i+2)
    mass = bias_slot_mass(m, ids)
    expect = sum(1 / (i + 2) for i in range(12)) / 12
    assert len(mass) == 2 and mass[0] == pytest.approx(expect, rel=1e-5)
    assert m.config._attn_implementation == "sdpa"
