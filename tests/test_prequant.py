"""Already-quantized checkpoints (issue 15): detected at load in one line; the census's grid detector
sees them; kept-quantized models are evaluated as loaded and refuse re-quantization. References: a
real compressed-tensors checkpoint written and decompressed by the compressed-tensors library, real
bitsandbytes modules, a GGUF file written by the gguf package."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

from quantbench.census import run_census
from quantbench.core.errors import QuantbenchError
from quantbench.modeling import prequant
from quantbench.modeling.load import load_model
from quantbench.quant.apply import apply_recipe, prepare
from quantbench.quant.recipes import PRESETS
from quantbench.run.config import CensusConfig

CPU = torch.device("cpu")


def _save_with_tokenizer(model, folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3", eos_token="w2", pad_token="w0").save_pretrained(folder)
    model.save_pretrained(folder)


def _compressed_tensors_w4_g32(model):
    """Quantize every linear but lm_head to int4 groups of 32 with compressed-tensors and pack it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    cfg = QuantizationConfig(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
                             ignore=["lm_head"], quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, cfg)
    for mod in model.modules():
        if hasattr(mod, "weight_scale"):
            g = mod.weight.data.reshape(mod.weight.shape[0], -1, 32)  # [out, groups, 32]
            s, z = calculate_qparams(g.amin(-1), g.amax(-1), args)
            mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape))
            mod.weight_zero_point.data.copy_(z.reshape(mod.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    return comp


def test_compressed_tensors_checkpoint_is_detected_decompressed_and_seen_on_its_grid(tmp_path):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    m = tiny_model("llama")
    comp = _compressed_tensors_w4_g32(m)
    q = m.model.layers[0].self_attn.q_proj
    want = fake_quantize(q.weight.data.clone(), q.weight_scale.data, q.weight_zero_point.data,
                         q.quantization_scheme.weights)  # the library's own grid for these weights
    comp.compress_model(m)
    _save_with_tokenizer(m, tmp_path)
    comp.update_config(str(tmp_path))
    lm = load_model(str(tmp_path), device="cpu")
    pq = lm.info["prequant"]
    assert pq["method"] == "compressed-tensors" and "4-bit" in pq["detail"] and not pq["kept"]
    assert "already quantized" in lm.info["caveat"] and "\n" not in lm.info["caveat"]
    got = lm.model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    census = run_census(lm.model, torch.randint(3, 128, (2, 16)), None, CensusConfig(plots=False))
    assert census["prequantized"]["detected"] and census["prequantized"]["grid_bits"] == 4
    prepare(lm.model, PRESETS.get("w8a16"))  # dequantized at load: allowed, with the caveat


def test_bitsandbytes_modules_are_kept_evaluated_as_loaded_and_not_quantized_again():
    m = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 16))
    q, _ = apply_recipe(m, PRESETS.get("bnb-nf4"), ids, CPU)  # real bitsandbytes Linear4bit modules
    info: dict = {}
    pq = prequant.after_load(q, None, info)
    assert pq is not None and pq.kept and pq.method == "bnb-4bit" and "already quantized" in info["caveat"]
    with pytest.raises(QuantbenchError, match="w8a8-token.*already quantized.*as-loaded") as e:
        prepare(q, PRESETS.get("w8a8-token"))
    assert "\n" not in str(e.value)
    assert PRESETS.get("as-loaded").is_fp
    prepare(q, PRESETS.get("as-loaded"))
    census = run_census(q, ids, None, CensusConfig(plots=False))
    assert census["prequantized"]["detected"]  # NF4: at most 16 levels per block, seen through the dequantized weights


@pytest.mark.parametrize("qc, method, kept, detail", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq", True, "4-bit, group 128"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}, "awq", True, "4-bit, group 64"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes", True,
     "4-bit nf4"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes", True, "8-bit (LLM.int8)"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8", False, ""),
])
def test_quantization_configs_are_named_in_one_line(qc, method, kept, detail):
    pq = prequant.from_config(qc)
    assert (pq.method, pq.kept, pq.detail) == (method, kept, detail)
    assert pq.line().startswith(f"already quantized: {method}") and "\n" not in pq.line()


def test_a_checkpoint_this_environment_cannot_load_is_refused_in_one_line(tmp_path):
    m = tiny_model("llama")
    _save_with_tokenizer(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantbenchError, match="already quantized: gptq \\(4-bit, group 128\\).*needs") as e:
        load_model(str(tmp_path), device="cpu")
    assert "\n" not in str(e.value)


def test_gguf_tensor_types_are_read(tmp_path):
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_k.weight", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    pq = prequant.from_gguf(path)
    assert (pq.method, pq.detail, pq.kept) == ("gguf", "Q8_0 x 2 tensors", False)


def test_the_default_model_path_is_untouched():
    m = tiny_model("llama")
    info: dict = {}
    assert prequant.after_load(copy.deepcopy(m), None, info) is None and info == {}
