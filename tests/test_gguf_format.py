"""GGUF export: the simulation is the gguf package's own quantize/dequantize AND matches llama.cpp's
documented block formulas; files written for tiny models reload through transformers' GGUF loader
with weights equal to the simulated ones, the same logits and the same tokenization."""
from __future__ import annotations

import gguf  # noqa: E402  (a dependency: a missing one fails, never skips)
import numpy as np
import pytest
import torch
from conftest import tiny_model
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

from quantbench.core.errors import QuantbenchError, UnsupportedArchitecture  # noqa: E402
from quantbench.export.gguf import load_gguf_back, write_gguf  # noqa: E402
from quantbench.quant.gguf_model import gguf_plan, llama_cpp_qtypes, plan_nbytes, simulate_gguf_  # noqa: E402
from quantbench.quant.gguf_quant import bits_per_weight, block_types, gguf_fake_quant, gguf_quantize, quantizable_types  # noqa: E402

SENTENCE = "The quick brown fox, 12345 times!\n<|im_start|>user naïve café 🦙"


def _weights(rows: int = 48, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, 7], w[5, 100], w[7, 300] = 2.0, -3.0, 0.5  # outliers in some blocks
    w[6, :32] = 0.0  # an all-zero block
    return w


# ---------------------------------------------------------------- (a) quantization
def test_types_include_the_ones_llama_cpp_users_pick():
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"} <= set(block_types())
    assert not {"Q4_K", "Q6_K", "IQ4_NL"} & set(quantizable_types())  # the package only dequantizes these


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "TQ1_0", "TQ2_0", "F16", "BF16"])
def test_fake_quant_is_the_packages_dequantize_of_quantize(qtype):
    w = _weights()
    ref = quants.dequantize(quants.quantize(w.numpy(), T[qtype]), T[qtype])
    assert torch.equal(gguf_fake_quant(w, qtype), torch.from_numpy(ref))
    assert np.array_equal(gguf_quantize(w, qtype), quants.quantize(w.numpy(), T[qtype]))


def _ref_q8_0(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp quantize_row_q8_0_ref: d = absmax/127, q = roundf(x * (1/d)), d stored as fp16."""
    b = x.reshape(-1, 32)
    d = b.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = b * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # roundf: half away from zero
    return (d.half().float() * q).reshape(x.shape)


def _ref_q4_0(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp quantize_row_q4_0_ref: d = max/-8 (max = signed value of largest magnitude),
    q = min(15, trunc(x * (1/d) + 8.5)), value = (q - 8) * fp16(d)."""
    b = x.reshape(-1, 32)
    mx = b.gather(1, b.abs().argmax(1, keepdim=True))
    d = mx / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.clamp(torch.trunc(b * inv + 8.5), 0, 15)
    return (d.half().float() * (q - 8)).reshape(x.shape)


@pytest.mark.parametrize("qtype,ref", [("Q8_0", _ref_q8_0), ("Q4_0", _ref_q4_0)])
def test_fake_quant_matches_llama_cpp_formula(qtype, ref):
    w = _weights()
    assert torch.equal(gguf_fake_quant(w, qtype), ref(w))


def test_low_precision_input_and_bits_per_weight():
    w = _weights().to(torch.bfloat16)
    out = gguf_fake_quant(w, "Q8_0")
    assert out.dtype == torch.bfloat16 and torch.equal(out, _ref_q8_0(w.float()).to(torch.bfloat16))
    # block struct sizes from ggml-common.h: fp16 scale(s) + packed codes, per 32 weights
    expected = {"Q8_0": (2 + 32) * 8 / 32, "Q4_0": (2 + 16) * 8 / 32, "Q4_1": (2 + 2 + 16) * 8 / 32,
                "Q5_0": (2 + 4 + 16) * 8 / 32, "Q5_1": (2 + 2 + 4 + 16) * 8 / 32, "MXFP4": (1 + 16) * 8 / 32}
    assert {t: bits_per_weight(t) for t in expected} == expected


def test_row_not_multiple_of_block_is_one_line_error():
    with pytest.raises(QuantbenchError) as e:
        gguf_fake_quant(torch.randn(4, 40), "Q4_0", name="model.layers.0.mlp.up_proj.weight")
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.0.mlp.up_proj.weight" in msg and "32" in msg
    with pytest.raises(QuantbenchError):
        gguf_fake_quant(torch.randn(4, 64), "Q6_K")  # the package cannot quantize k-quants


# ---------------------------------------------------------------- (b) write + reload
MIXED = {
    "model.layers.0.self_attn.q_proj": "Q4_0", "model.layers.0.self_attn.k_proj.weight": "Q8_0",
    "model.layers.0.self_attn.v_proj": "Q5_0", "model.layers.0.mlp.up_proj": "Q5_1",
    "model.layers.1.self_attn.k_proj": "Q4_1", "model.layers.1.mlp.down_proj": "MXFP4",
    "model.embed_tokens": "Q8_0",  # lm_head (untied) stays at the default, F16
}


@pytest.fixture(scope="module")
def llama_roundtrip(tmp_path_factory):
    from transformers import AutoTokenizer

    from quantbench.data.wheels import ensure_default_model

    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    model = tiny_model("llama", hidden=64, vocab=len(tok), attn_implementation="sdpa")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    info = write_gguf(model, tok, path, MIXED, default_qtype="F16")
    simulate_gguf_(model, MIXED, default_qtype="F16")
    reloaded, tok2 = load_gguf_back(path)
    return model, tok, reloaded, tok2, info


def test_reloaded_weights_equal_simulated(llama_roundtrip):
    model, _, reloaded, _, info = llama_roundtrip
    sim, back = model.state_dict(), reloaded.state_dict()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and set(sim) == set(back)
    for name, t in sim.items():
        assert torch.equal(t, back[name]), name
    # quantization really happened: q_proj differs from an un-quantized copy of the same seed
    fresh = tiny_model("llama", hidden=64, vocab=model.config.vocab_size)
    assert not torch.equal(fresh.model.layers[0].self_attn.q_proj.weight, sim["model.layers.0.self_attn.q_proj.weight"])
    assert info.tensor_types["Q4_0"] == 1 and info.tensor_types["MXFP4"] == 1 and info.tokenizer_pre == "smollm"


def test_reloaded_config_logits_and_tokenizer(llama_roundtrip):
    model, tok, reloaded, tok2, _ = llama_roundtrip
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(reloaded.config, key) == getattr(model.config, key), key
    assert reloaded.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps)
    assert reloaded.config.rope_parameters["rope_theta"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    ids = torch.tensor([tok.encode(SENTENCE)])
    assert tok2.encode(SENTENCE) == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_file_holds_llama_cpp_rope_layout_for_q(llama_roundtrip, tmp_path):
    """The file's attn_q rows are llama.cpp's permutation of HF's (convert_hf_to_gguf LlamaModel.permute)."""
    model = llama_roundtrip[0]
    q = model.model.layers[0].self_attn.q_proj.weight.detach()  # already Q4_0-simulated
    n = model.config.num_attention_heads
    ref = q.reshape(n, 2, q.shape[0] // n // 2, q.shape[1]).swapaxes(1, 2).reshape(q.shape)
    tok = _byte_level_tokenizer()  # small vocabulary: GGUFReader parses it quickly
    sub = tiny_model("llama", hidden=64, layers=1, vocab=len(tok))
    sub.model.layers[0].self_attn.q_proj.weight.data.copy_(q)
    path = tmp_path / "q.gguf"
    info = write_gguf(sub, tok, path, {"model.layers.0.self_attn.q_proj": "Q4_0"})
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    plan = gguf_plan(sub, {"model.layers.0.self_attn.q_proj": "Q4_0"})
    assert plan_nbytes(plan) == sum(int(t.n_bytes) for t in tensors.values()) <= info.nbytes
    stored = tensors["blk.0.attn_q.weight"]
    assert stored.tensor_type == T.Q4_0
    assert torch.equal(torch.from_numpy(quants.dequantize(stored.data, T.Q4_0)), ref)


# ---------------------------------------------------------------- other families, refusals
def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"bos_token": "<|s|>", "eos_token": "<|e|>"})
    return tok


def _sentencepiece_tokenizer():
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "t", "h", "e", "a", "c", "i", "n"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("▁", "c")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges)


def _tiny(kind: str, vocab: int):
    import transformers as tf

    torch.manual_seed(1)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True)).eval()
    return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("kind,make_tok", [("qwen2", _byte_level_tokenizer), ("mistral", _sentencepiece_tokenizer)])
def test_other_families_roundtrip(kind, make_tok, tmp_path):
    tok = make_tok()
    model = _tiny(kind, len(tok))
    qtypes = llama_cpp_qtypes(model, "Q4_0")
    info = write_gguf(model, tok, tmp_path / "m.gguf", qtypes)
    simulate_gguf_(model, qtypes)
    reloaded, tok2 = load_gguf_back(tmp_path / "m.gguf")
    sim, back = model.state_dict(), reloaded.state_dict()
    assert set(sim) == set(back) and all(torch.equal(sim[k], back[k]) for k in sim)
    text = "the cat in the hat is 42"
    assert tok2.encode(text) == tok.encode(text)
    assert info.file_type == "MOSTLY_Q4_0"


def test_non_llama_model_is_refused_in_one_line(tmp_path):
    with pytest.raises(UnsupportedArchitecture) as e:
        write_gguf(tiny_model("gpt2"), _byte_level_tokenizer(), tmp_path / "x.gguf", {})
    assert "\n" not in str(e.value) and "gpt2" in str(e.value)
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(QuantbenchError, match="unknown weights"):
        write_gguf(tiny_model("llama"), _byte_level_tokenizer(), tmp_path / "y.gguf", {"model.layers.9.mlp.up_proj": "Q4_0"})
    with pytest.raises(QuantbenchError) as e:  # hidden 48: rows of q_proj are not whole Q4_0 blocks
        write_gguf(tiny_model("llama", hidden=48), _byte_level_tokenizer(), tmp_path / "z.gguf", {}, "Q4_0")
    assert "\n" not in str(e.value) and "model.embed_tokens.weight" in str(e.value) and "32" in str(e.value)
    assert not (tmp_path / "z.gguf").exists()
