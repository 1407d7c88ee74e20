"""The llamacpp backend scores the file llama.cpp's own quantizer writes, bit for bit.

Reference: the F32 GGUF quantized here by the cyllama wheel directly (llama_model_quantize, in this
process), read with the gguf package's GGUFReader and dequantizers, q/k rows put back in Hugging
Face's order with the converter's permutation written out below. A tiny Llama with 256-multiple widths
(hidden 256, intermediate 512) gets real k-quants and i-quants.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
import transformers as tf

from quantbench.quant.apply import apply_recipe
from quantbench.quant.backends import llamacpp
from quantbench.quant.gguf_file import write_weights_gguf
from quantbench.quant.plugin import BackendUnavailable
from quantbench.quant.recipes import resolve_recipe


def _tiny(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    return tf.LlamaForCausalLM(cfg).eval()


def _hf_order(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute undone: [heads, dim/2, 2, in] -> [heads, 2, dim/2, in]."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _reference(model: torch.nn.Module, ftype: str, tmp_path) -> dict[str, tuple[str, np.ndarray]]:
    """gguf tensor name -> (type, fp32 values in HF order) of the file cyllama writes from our F32 GGUF."""
    cyllama = pytest.importorskip("cyllama.llama.llama_cpp")
    from gguf import GGUFReader, LlamaFileType, quants

    src, dst = tmp_path / "f32.gguf", tmp_path / f"{ftype}.gguf"
    write_weights_gguf(model, src, "F32")
    params = cyllama.LlamaModelQuantizeParams()
    params.ftype = int(LlamaFileType[f"MOSTLY_{ftype}"])
    cyllama.model_quantize(str(src), str(dst), params)
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    out = {}
    for t in GGUFReader(dst).tensors:
        v = quants.dequantize(np.array(t.data), t.tensor_type)
        kind = t.name.split(".")[-2]
        out[t.name] = (t.tensor_type.name, _hf_order(v, heads[kind]) if kind in heads else v)
    return out


_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        i, rest = hf.removeprefix("model.layers.").split(".", 1)
        return f"blk.{i}.{_GGUF[rest.removesuffix('.weight')]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _effective(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight the quantized model's forward uses (QuantLinear.weight is its dequantized weight)."""
    out = {name: p.detach() for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        if name.endswith("embed_tokens.weight"):  # a GgufEmbedding's dequantized table
            out[name] = b
    return out


@pytest.mark.parametrize("ftype,tied", [("Q4_K_M", True), ("IQ4_XS", False), ("Q6_K", True)])
def test_the_rows_weights_are_the_files_bit_for_bit(ftype, tied, tmp_path):
    model = _tiny(tied)
    ref = _reference(_tiny(tied), ftype, tmp_path)
    recipe = resolve_recipe(f"gguf-{ftype.lower()}")
    q, applied = apply_recipe(model, recipe, torch.randint(0, 256, (2, 16)))
    got = _effective(q)
    seen = set()
    for hf, w in got.items():
        if tied and hf == "lm_head.weight":
            hf = "model.embed_tokens.weight"  # one tensor in the file (token_embd) serves both
        qtype, values = ref[_gguf_name(hf)]
        assert torch.equal(w.float(), torch.from_numpy(values).reshape(w.shape)), (hf, qtype)
        seen.add(_gguf_name(hf))
    assert seen == set(ref)
    types = [t.split("=")[1] for t in applied.notes["gguf_types"]]
    assert types == [ref[t.split("=")[0]][0] for t in applied.notes["gguf_types"]]
    want = {"Q4_K_M": {"Q4_K", "Q6_K"}, "IQ4_XS": {"IQ4_XS", "Q6_K"}, "Q6_K": {"Q6_K"}}[ftype]
    assert set(types) == want  # llama.cpp's mixture: Q4_K_M raises attn_v/ffn_down (and the output) to Q6_K


def test_true_bits_per_weight_is_what_llama_cpp_reports(tmp_path):
    """llama_model_quantize logs "quant size = X MiB (Y BPW)": its tensor bytes * 8 / its elements."""
    pytest.importorskip("cyllama")
    from gguf import LlamaFileType

    src = tmp_path / "f32.gguf"
    write_weights_gguf(_tiny(True), src, "F32")
    code = ("import sys; from cyllama.llama import llama_cpp as L; p = L.LlamaModelQuantizeParams(); "
            "p.ftype = int(sys.argv[3]); L.model_quantize(sys.argv[1], sys.argv[2], p)")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "q.gguf"),
                           str(int(LlamaFileType.MOSTLY_Q4_K_M))], capture_output=True, text=True, timeout=300)
    logged = float(re.search(r"quant size\s*=\s*[\d.]+ MiB \(([\d.]+) BPW\)", proc.stdout + proc.stderr)[1])
    _, applied = apply_recipe(_tiny(True), resolve_recipe("gguf-q4_k_m"), torch.randint(0, 256, (2, 16)))
    assert applied.notes["gguf_file_bpw"] == pytest.approx(logged, abs=0.005)  # it prints two decimals
    assert applied.notes["gguf_tensor_types"] == "Q4_K:12 Q6_K:3"  # Q6_K: layer 1 attn_v and ffn_down, token_embd


def test_a_missing_wheel_skips_the_row_in_one_line(monkeypatch):
    monkeypatch.delenv(llamacpp.LLAMA_CPP_ENV, raising=False)
    monkeypatch.setattr(llamacpp, "find_spec", lambda name: None)  # as if cyllama were not installed
    model = _tiny(True)
    with pytest.raises(BackendUnavailable) as e:
        apply_recipe(model, resolve_recipe("gguf-q4_k_m"), torch.randint(0, 256, (2, 16)))
    assert "\n" not in str(e.value) and "cyllama" in str(e.value)


def test_imatrix_rows_say_why_they_cannot_run():
    with pytest.raises(BackendUnavailable) as e:
        apply_recipe(_tiny(True), resolve_recipe("gguf-q4_k_m-imatrix"), torch.randint(0, 256, (2, 16)))
    assert "\n" not in str(e.value) and "imatrix" in str(e.value)


def test_every_ftype_is_a_llama_cpp_file_type():
    from gguf import LlamaFileType

    for name in typing.get_args(llamacpp.FType):
        assert f"MOSTLY_{name}" in LlamaFileType.__members__, name


def test_a_run_records_llama_cpps_fallbacks_and_skips_imatrix_rows(tmp_path):
    """64-wide rows (the default model's are 576): llama.cpp falls back from the k-quants, and says so."""
    pytest.importorskip("cyllama")
    from conftest import save_tiny_llama

    from quantbench.run import pipeline
    from quantbench.run.config import parse_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"line {i} of the text , with words and a number {i * 7} ." * 6 for i in range(60)))
    cfg = parse_config({"model": str(save_tiny_llama(tmp_path / "m")), "output_dir": str(tmp_path), "run_id": "t",
                        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
                        "eval": {"seq_len": 64, "max_windows": 2, "batch_size": 2}, "census": {"enabled": False},
                        "recipes": ["fp", "gguf-q4_k_m", "gguf-q4_k_m-imatrix"]})
    rows = pipeline.load_rows(pipeline.run(cfg) / "rows.jsonl")
    q = rows["gguf-q4_k_m"]
    assert q["status"] == "ok" and q["mode"] == "llamacpp" and q["kl"] > 0 and q["kld_p99"] >= q["kld_median"]
    # llama.cpp's fallbacks for rows that are not a multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0
    assert q["gguf_tensor_types"] == "Q5_0:13 Q8_0:3" and len(q["gguf_types"]) == 16  # 14 linears, embedding, output
    assert rows["gguf-q4_k_m-imatrix"]["status"].startswith("skipped: llamacpp: cyllama 0.2.18")


def test_export_writes_llama_cpps_file_and_proves_it(tmp_path):
    """`quantbench export` of a llamacpp recipe: F32 GGUF with the tokenizer -> llama_model_quantize -> the file;
    transformers' GGUF loader reads it back with the row's weights bit for bit, llama.cpp itself scores it."""
    pytest.importorskip("cyllama")
    from test_export import WORDS, _tokenizer

    from quantbench.export.context import load_run_context
    from quantbench.export.job import export_recipe
    from quantbench.run import pipeline
    from quantbench.run.config import parse_config

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(50)) for i in range(40)))
    run = pipeline.run(parse_config({
        "model": str(tmp_path / "model"), "output_dir": str(tmp_path), "run_id": "r", "threads": 1,
        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
        "eval": {"seq_len": 32, "max_windows": 2, "batch_size": 2, "probe_windows": 0},
        "census": {"enabled": False}, "recipes": ["fp", "gguf-q4_k_m"]}))
    cols = export_recipe(load_run_context(run), "gguf-q4_k_m", tmp_path / "ship")
    assert cols["export_format"] == "gguf" and cols["export_verified"] is True
    n = cols["export_weights_equal"].split("/")
    assert n[0] == n[1]
    assert json.loads(cols["export_gguf_types"]) == {"F32": 5, "Q4_K": 12, "Q6_K": 3}
    # llama.cpp's forward (its kernels round activations to 8 bits for k-quant dot products): observed -0.03%
    assert cols["export_llama_cpp_ppl"] == pytest.approx(cols["export_sim_ppl"], rel=0.01)


_Q8_0 = {"preset": "gguf-q4_k_m", "name": "llamacpp-q8_0", "backend_options": {"ftype": "Q8_0"},
         "weights": {"bits": 8, "symmetric": True, "granularity": "group", "group_size": 32}}


def test_llama_cpp_scores_the_rows_file_beside_us(tmp_path):
    """llamacpp rows (256-multiple widths: real Q8_0 and Q4_K_M) carry llama.cpp's own perplexity of the
    quantized file on the same windows, its max |Δlogit| from ours and the verdict; other rows do not."""
    pytest.importorskip("cyllama")
    from quantbench.export.llama_cpp_check import PPL_RTOL
    from quantbench.run import pipeline
    from quantbench.run.config import parse_config

    from test_export import WORDS, _tokenizer

    tok = _tokenizer()
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(50)) for i in range(40)))
    cfg = parse_config({"model": str(tmp_path / "m"), "output_dir": str(tmp_path), "run_id": "t", "threads": 1,
                        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
                        "eval": {"seq_len": 32, "max_windows": 2, "batch_size": 2, "probe_windows": 0},
                        "census": {"enabled": False}, "recipes": ["fp", "gguf-q4_k_m", "gguf-q8_0", _Q8_0]})
    rows = pipeline.load_rows(pipeline.run(cfg) / "rows.jsonl")
    for name in ("gguf-q4_k_m", "llamacpp-q8_0"):
        r = rows[name]
        assert r["status"] == "ok" and r["llama_cpp_agrees"] is True, (name, r)
        assert r["llama_cpp_ppl"] == pytest.approx(r["ppl"], rel=PPL_RTOL)
        assert 0 < r["llama_cpp_logit_maxdiff"] < 0.1  # llama.cpp rounds activations to 8 bits: not identical
    assert not any(k.startswith("llama_cpp") for k in rows["fp"]) and "llama_cpp_ppl" not in rows["gguf-q8_0"]


def test_without_the_wheel_the_check_is_one_line_and_no_column(monkeypatch, capsys):
    pytest.importorskip("cyllama")
    from quantbench.data.corpus import Windows
    from quantbench.export import llama_cpp_check, runtime

    q, applied = apply_recipe(_tiny(True), resolve_recipe("gguf-q4_k_m"), torch.randint(0, 256, (2, 16)))
    assert applied.effects.gguf_file.exists()  # the backend's own file, kept for llama.cpp
    monkeypatch.delenv(llamacpp.LLAMA_CPP_ENV, raising=False)
    monkeypatch.setattr(runtime, "child_python", lambda: None)  # as if the wheel could not run here
    w = Windows(torch.randint(0, 256, (1, 16)), torch.zeros(1, dtype=torch.long), {})
    capsys.readouterr()
    assert llama_cpp_check.llama_cpp_columns(q, applied.effects.gguf_file, w, torch.device("cpu"), 1.0) == {}
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.strip()]
    assert len(lines) == 1 and "cyllama" in lines[0]
    applied.effects.cleanup()
    assert applied.effects.gguf_file is None
