"""`quantbench export`: every format written for a tiny Llama run, reloaded through the runtime's own
loader (transformers + compressed-tensors, transformers' GGUF loader) with weights equal to the
simulated ones bit for bit; the stored codes are what compressed-tensors itself computes from our
weights and scales; the gguf backend is the gguf package's quantize/dequantize with llama.cpp's
storage sizes; what a format cannot express is refused in one line."""
from __future__ import annotations

import json
import sys

import compressed_tensors  # noqa: E402,F401  (dependencies: a missing one fails, never skips)
import gguf  # noqa: E402
import numpy as np
import pytest
import torch
from conftest import tiny_model

from quantbench.core.errors import QuantbenchError  # noqa: E402
from quantbench.export.context import load_run_context  # noqa: E402
from quantbench.export.job import export_recipe  # noqa: E402
from quantbench.export.refuse import ExportRefused  # noqa: E402
from quantbench.quant.apply import apply_recipe  # noqa: E402
from quantbench.quant.qlinear import QuantLinear  # noqa: E402
from quantbench.quant.recipes import resolve_recipe  # noqa: E402

WORDS = "the model reads a sentence . then another one , and a number 42 follows ; outliers are rare !".split()
W4_G32 = {"bits": 4, "granularity": "group", "group_size": 32}
RECIPES = [
    "fp", "w8a8-token", "w8a8-tensor-static", "w8a8-tensor-static-sq", "w4a16-g64-gptq", "w4a16-channel", "w8a16",
    "w8a8-fp8", {"preset": "w4a16-g64", "name": "w8g32", "weights": {"bits": 8, "granularity": "group", "group_size": 32}},
    {"preset": "w4a16-g64", "name": "w4g32-asym", "weights": {**W4_G32, "symmetric": False}},
    {"preset": "w8a8-token", "name": "mixed", "overrides": [
        {"match": "*.mlp.down_proj", "weights": W4_G32, "activations": None},
        {"match": "model.layers.1.self_attn.o_proj", "weights": None, "activations": None}]},
    "gguf-q8_0", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1",
    "w8a8-tensor-static-rot", {"preset": "w8a8-tensor-static-rot", "name": "rot-nodown",
                               "mitigations": [{"name": "rotate", "options": {"down": False}}]},
    "w8a8-tensor-static-ot", {"preset": "w4a4-token", "name": "w4a4-kv", "kv": {"bits": 4, "granularity": "group",
                                                                                 "group_size": 16}},
]


def _tokenizer():
    """A small byte-level BPE (what GGUF's gpt2 vocabulary kind holds) trained on the test text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_sweep(base, recipes, hidden: int = 64, intermediate: int = 128):
    """A finished sweep of `recipes` on a tiny tied Llama saved under `base` (with its BPE tokenizer):
    the run directory."""
    import transformers as tf

    from quantbench.run import pipeline
    from quantbench.run.config import parse_config

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(base / "model")
    tok.save_pretrained(base / "model")
    corpus = base / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(50)) for i in range(40)))
    run_cfg = parse_config({"model": str(base / "model"), "output_dir": str(base), "run_id": "r", "threads": 1,
                            "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
                            "eval": {"seq_len": 32, "max_windows": 2, "batch_size": 2, "probe_windows": 0},
                            "census": {"enabled": False}, "recipes": list(recipes)})
    return pipeline.run(run_cfg)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished sweep of RECIPES on a tiny tied Llama, and its rebuilt context."""
    base = tmp_path_factory.mktemp("export")
    return load_run_context(tiny_sweep(base, RECIPES)), base


def _qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _export(run, name, fmt=None):
    rc, base = run
    cols = export_recipe(rc, name, base / "out" / name, fmt)
    return rc, cols


def _export_sim(run, name, monkeypatch, fmt=None):
    """Export and also keep the simulated model the export was verified against."""
    from quantbench.export import job

    kept, real = {}, job._build
    monkeypatch.setattr(job, "_build", lambda *a: kept.setdefault(a[1].name, real(*a)))
    rc, cols = _export(run, name, fmt)
    return rc, cols, kept[name][0]


def _reloaded_equal(sim, reloaded) -> None:
    """Every tensor the simulated model holds equals the reloaded model's, bit for bit."""
    got = dict(reloaded.named_parameters(remove_duplicate=False))
    for name, p in sim.named_parameters(remove_duplicate=False):
        assert torch.equal(p.detach(), got[name].detach()), name


CT_CASES = {  # recipe -> compressed-tensors format the library infers
    "fp": "dense", "w8a8-token": "int-quantized", "w8a8-tensor-static": "int-quantized",
    "w8a8-tensor-static-sq": "int-quantized", "w4a16-g64-gptq": "pack-quantized", "w4a16-channel": "pack-quantized",
    "w8a16": "pack-quantized", "w8g32": "pack-quantized", "w4g32-asym": "pack-quantized",
    "w8a8-fp8": "float-quantized", "mixed": "mixed-precision", "rot-nodown": "int-quantized",
}


@pytest.mark.parametrize("name", list(CT_CASES))
def test_compressed_tensors_reload_is_the_simulated_model(run, name, monkeypatch):
    """transformers' own loader gives back our weights exactly and the same logits (activations
    included: compressed-tensors' forward quantizes them with the stored scales / dynamic ranges)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    rc, cols, sim = _export_sim(run, name, monkeypatch)
    assert cols["export_verified"] is True and cols["export_logit_maxdiff"] == 0.0
    folder = cols["export_path"]
    cfg = json.loads(open(f"{folder}/config.json").read())
    assert cfg.get("quantization_config", {}).get("format", "dense") == CT_CASES[name]
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if name == "w4g32-asym" else {}
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa", **kw).eval()
    ids = rc.windows.input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, sim(input_ids=ids).logits)  # decompresses on first call
    _reloaded_equal(sim, reloaded)
    assert cols["export_ppl"] == pytest.approx(cols["export_sim_ppl"], rel=0, abs=0)
    assert cols["export_reproduces_row"] is True  # the re-applied recipe is the measured one


_W8, _A8_STATIC = {"num_bits": 8, "strategy": "channel"}, {"num_bits": 8, "strategy": "tensor", "dynamic": False}
CT_SCHEMES = {  # recipe -> compressed-tensors (weights, input activations) args, written from the recipe's spec
    "w4g32-asym": ({"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}, None),
    "w4a16-g64-gptq": ({"num_bits": 4, "strategy": "group", "group_size": 64}, None),
    "w4a16-channel": ({"num_bits": 4, "strategy": "channel"}, None),
    "w8a16": (_W8, None),
    "w8g32": ({"num_bits": 8, "strategy": "group", "group_size": 32}, None),
    "w8a8-token": (_W8, {"num_bits": 8, "strategy": "token", "dynamic": True}),
    "w8a8-tensor-static": (_W8, _A8_STATIC),
    "w8a8-tensor-static-sq": (_W8, _A8_STATIC),
    "w8a8-fp8": ({"num_bits": 8, "type": "float", "strategy": "channel"},
                 {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}),
}


@pytest.mark.parametrize("name", list(CT_SCHEMES))
def test_stored_tensors_are_compressed_tensors_own_compression_of_our_quantized_weights(run, name, monkeypatch):
    """Independent reference: compressed-tensors' own compressor (the one its format inference picks for
    the scheme written above) is given what the simulated model computes with (each QuantLinear's
    quantized weight) and our scales / zero points; it quantizes and packs them itself (codes, int32
    packing, packed asymmetric zero points, fp8 casts), and every tensor it writes equals ours bit for bit."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    w_args, a_args = CT_SCHEMES[name]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**w_args),
                                input_activations=QuantizationArgs(**a_args) if a_args else None)
    fmt = infer_module_format(torch.nn.Linear, scheme).value
    compressor = BaseCompressor.get_value_from_registry(fmt)
    rc, cols, sim = _export_sim(run, name, monkeypatch)
    folder = cols["export_path"]
    assert json.loads(open(f"{folder}/config.json").read())["quantization_config"]["format"] == fmt
    stored = load_file(f"{folder}/model.safetensors")
    qlinears = {n: q for n, q in _qlinears(sim).items() if q.qweight is not None}
    assert len(qlinears) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for mod, q in qlinears.items():
        given = {"weight": q.weight.detach(), "weight_scale": q.qweight.scale}
        if not scheme.weights.symmetric:
            given["weight_zero_point"] = q.qweight.zero_point
        lib = compressor.compress(given, scheme)
        ours = {k.removeprefix(mod + "."): v for k, v in stored.items() if k.startswith(mod + ".")}
        assert set(lib) == set(ours) - {"input_scale", "input_zero_point", "bias"}, (name, mod)
        for key, value in lib.items():
            assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), (name, mod, key)


def test_gguf_backend_is_the_package_and_its_sizes():
    """Untied tiny Llama: linears Q4_1, lm_head Q8_0, embedding Q4_1 (llama-quantize's choice), each equal
    to gguf.quants.dequantize(quantize(w)); sizes are the package's block sizes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    model = tiny_model("llama")
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    q, applied = apply_recipe(model, resolve_recipe("gguf-q4_1"), torch.randint(3, 128, (2, 16)))
    expect = {"lm_head.weight": "Q8_0", "model.embed_tokens.weight": "Q4_1"}
    bits = 0.0
    for name, w in orig.items():
        if w.ndim < 2:
            bits += 16 * w.numel()  # norms: stored at 16 bits by the size convention
            continue
        t = GGMLQuantizationType[expect.get(name, "Q4_1")]
        ref = quants.dequantize(quants.quantize(w.numpy(), t), t)
        got = q.get_submodule(name.removesuffix(".weight")).weight
        assert torch.equal(got, torch.from_numpy(ref)), name
        block, size = GGML_QUANT_SIZES[t]
        bits += 8 * w.numel() // block * size
    assert applied.size.total_bits == bits


def test_gguf_files_reload_with_the_simulated_weights(run, monkeypatch):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    for name in ("gguf-q8_0", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1"):
        rc, cols, sim = _export_sim(run, name, monkeypatch)
        assert cols["export_verified"] is True, (name, cols["export_weights_mismatch"])
        assert cols["export_logit_maxdiff"] == 0.0 and cols["export_tokenizer_match"] is True
        path = cols["export_path"]
        reloaded = AutoModelForCausalLM.from_pretrained(path.rpartition("/")[0], gguf_file=path.rpartition("/")[2],
                                                        dtype=torch.float32)
        _reloaded_equal(sim, reloaded)
        reader = GGUFReader(path)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == name.split("-")[1].upper() and types["token_embd.weight"] == "Q8_0"
        assert "output.weight" not in types  # tied: llama.cpp reuses token_embd


def test_fp_exports_as_f16_gguf(run):
    rc, cols = _export(run, "fp", "gguf")
    assert cols["export_verified"] is True and json.loads(cols["export_gguf_types"]).keys() == {"F16", "F32"}


@pytest.mark.parametrize("name,fmt,words", [
    ("w8a8-tensor-static-rot", None, ["rotate", "online", "down: false"]),
    ("w8a8-tensor-static-ot", None, ["outlier_tokens", "tokens", "preset 'w8a8-tensor-static'"]),
    ("w4a4-kv", None, ["KV-cache", "preset 'w4a4-token'"]),
    ("gguf-q4_0", "compressed-tensors", ["--format gguf"]),
    ("w8a8-token", "gguf", ["--format compressed-tensors", "gguf-q8_0"]),
])
def test_refusals_are_one_line_naming_the_closest_exportable_recipe(run, name, fmt, words):
    with pytest.raises(ExportRefused) as err:
        _export(run, name, fmt)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_gguf_backend_rejects_what_it_cannot_run():
    from quantbench.quant.apply import prepare

    with pytest.raises(QuantbenchError, match="activations"):
        prepare(tiny_model("llama"), resolve_recipe({"preset": "gguf-q4_0", "activations": {"bits": 8, "granularity": "token"}}))
    with pytest.raises(QuantbenchError, match="group_size: 32"):
        prepare(tiny_model("llama"), resolve_recipe({"preset": "gguf-q4_0", "weights": {"bits": 4, "granularity": "channel"}}))
    with pytest.raises(QuantbenchError, match="Llama-family"):
        prepare(tiny_model("gpt2"), resolve_recipe("gguf-q8_0"))


def test_cli_export_records_the_row_and_refuses_in_one_line(run, tmp_path, monkeypatch, capsys):
    """Through the CLI's main(): the row gets the export columns; a refusal is one `error:` line, exit 2."""
    from quantbench import cli
    from quantbench.run.pipeline import load_rows

    rc, base = run
    argv = ["quantbench", "export", str(rc.run_dir), "--recipe"]
    monkeypatch.setattr(sys, "argv", argv + ["w8a8-token", "--out", str(tmp_path / "w8")])
    cli.main()
    assert "export_verified true" in capsys.readouterr().out
    row = load_rows(rc.run_dir / "rows.jsonl")["w8a8-token"]
    assert row["export_verified"] is True and row["ppl"] == row["export_sim_ppl"]
    assert "export_verified" in (rc.run_dir / "results.md").read_text() and (rc.run_dir / "exports.md").exists()
    monkeypatch.setattr(sys, "argv", argv + ["w8a8-tensor-static-ot", "--out", str(tmp_path / "ot")])
    with pytest.raises(SystemExit) as code:
        cli.main()
    err = [ln for ln in capsys.readouterr().err.splitlines()  # minus progress bars and progress lines
           if "it/s]" not in ln and ln.strip() and not ln.startswith("[quantbench]")]
    assert code.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "outlier_tokens" in err[0], err


def test_logits_of_static_w8a8_come_from_the_stored_activation_scale(run):
    """The stored input_scale is the calibrated one: perturbing it in the file changes the reloaded logits."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    rc, cols = _export(run, "w8a8-tensor-static")
    path = f"{cols['export_path']}/model.safetensors"
    sd = load_file(path)
    key = "model.layers.0.self_attn.q_proj.input_scale"
    assert sd[key].shape == (1,) and np.isfinite(sd[key].item())
    before = AutoModelForCausalLM.from_pretrained(cols["export_path"], dtype=torch.float32)
    sd[key] = sd[key] * 4
    save_file(sd, path, metadata={"format": "pt"})
    after = AutoModelForCausalLM.from_pretrained(cols["export_path"], dtype=torch.float32)
    ids = rc.windows.input_ids
    with torch.no_grad():
        assert not torch.equal(before(input_ids=ids).logits, after(input_ids=ids).logits)


def test_config_export_list_runs_after_the_sweep_and_is_kept_on_resume(run, monkeypatch):
    """`export:` in a run config: exported into <run>/export/<name> after the sweep (a refusal does not
    stop the others); rerunning the same config keeps the verified export instead of redoing it."""
    import yaml

    from quantbench.export import job
    from quantbench.run import pipeline
    from quantbench.run.config import parse_config

    rc, _ = run
    data = yaml.safe_load((rc.run_dir / "config.yaml").read_text())
    cfg = parse_config({**data, "export": ["w8a8-tensor-static-ot", "w8a16"]})
    calls, real = [], job.export_recipe
    monkeypatch.setattr(job, "export_recipe", lambda rc_, name, *a: calls.append(name) or real(rc_, name, *a))
    pipeline.run(cfg)
    assert calls == ["w8a8-tensor-static-ot", "w8a16"]
    assert (rc.run_dir / "export" / "w8a16" / "model.safetensors").exists()
    assert not (rc.run_dir / "export" / "w8a8-tensor-static-ot" / "model.safetensors").exists()
    assert pipeline.load_rows(rc.run_dir / "rows.jsonl")["w8a16"]["export_verified"] is True
    calls.clear()
    pipeline.run(cfg)
    assert calls == ["w8a8-tensor-static-ot"]  # the refused one is tried again, the verified one kept
    with pytest.raises(QuantbenchError, match="export: 'w8a8-tokn' is not one of the recipes"):
        parse_config({**data, "export": ["w8a8-tokn"]})


def test_export_folder_rules_are_checked_before_any_work_and_leave_nothing_half_written(run, tmp_path, capsys,
                                                                                        monkeypatch):
    """Issue 21: '--out q4.gguf' made a folder of that name; an export of another recipe was replaced
    silently while rows.jsonl still called it verified; a refusal left a folder marked 'writing'."""
    from reliability_common import assert_error, cli

    from quantbench.export import context

    rc, _ = run
    first = tmp_path / "w8"
    assert cli(capsys, "export", rc.run_dir, "--recipe", "w8a8-token", "--out", first).rc == 0
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(context, "load_model", no_model)
    assert_error(cli(capsys, "export", rc.run_dir, "--recipe", "w8a8-token", "--out", tmp_path / "q8.gguf"),
                 "looks like a file name", "--out")
    assert not (tmp_path / "q8.gguf").exists()
    assert_error(cli(capsys, "export", rc.run_dir, "--recipe", "w8a8-tensor-static", "--out", first),
                 "holds the export of recipe 'w8a8-token'", "choose another folder")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # the earlier export is untouched
    monkeypatch.undo()
    res = cli(capsys, "export", rc.run_dir, "--recipe", "w8a8-tensor-static-ot", "--out", tmp_path / "ot")
    assert res.rc == 2 and "outlier_tokens" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8"]  # no folder, no hidden stage left behind
