"""`quantbench export` of the float formats of issue 23 (fp8 128x128 blocks, NVFP4, MXFP4, MXFP8, W4AFP8) on a
tiny tied Llama whose linears are multiples of 128: written with compressed-tensors' own config classes, formats
and compressors, reloaded through transformers, and verified. Where transformers cannot run a format on CPU in
float32 (compressed-tensors 0.20.1 decompresses NVFP4/MX to bfloat16) the stored tensors are verified instead:
the library's decompression equals the simulated weights bit for bit."""
from __future__ import annotations

import json

import compressed_tensors  # noqa: F401  (a dependency: a missing one fails, never skips)
import pytest
import torch
from conftest import tiny_model
from test_export import tiny_sweep

from quantbench.core.errors import QuantbenchError
from quantbench.export.context import load_run_context
from quantbench.export.job import export_recipe
from quantbench.export.refuse import ExportRefused
from quantbench.quant.qlinear import QuantLinear

# recipe -> (compressed-tensors preset of the same arguments, format the library infers, how it is verified)
CASES = {
    "fp8-block": ("FP8_BLOCK", "float-quantized", "reload"),
    "w4afp8": ("W4AFP8", "int-quantized", "reload"),
    "mxfp4a16": ("MXFP4A16", "mxfp4-pack-quantized", "reload"),  # dense reload: e8m0 x e2m1 is exact in bf16
    "mxfp8a16": ("MXFP8A16", "mxfp8-quantized", "reload"),
    "nvfp4a16": ("NVFP4A16", "nvfp4-pack-quantized", "stored"),  # the library decompresses through bf16
    "nvfp4": ("NVFP4", "nvfp4-pack-quantized", "stored"),  # a dense reload runs activations in full precision
    "mxfp4": ("MXFP4", "mxfp4-pack-quantized", "stored"),
    "mxfp8": ("MXFP8", "mxfp8-quantized", "stored"),
}
INT8_BLOCK = {"preset": "fp8-block", "name": "int8-block", "weights": {"bits": 8, "granularity": "block",
                                                                      "group_size": 128}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished sweep of CASES on a tiny tied Llama (hidden 128, intermediate 256) and its context."""
    base = tmp_path_factory.mktemp("export_fp")
    return load_run_context(tiny_sweep(base, [*CASES, INT8_BLOCK], hidden=128, intermediate=256)), base


def _export_sim(run, name, monkeypatch):
    """Export `name` and keep the simulated model the export was verified against."""
    from quantbench.export import job

    kept, real = {}, job._build
    monkeypatch.setattr(job, "_build", lambda *a: kept.setdefault(a[1].name, real(*a)))
    rc, base = run
    cols = export_recipe(rc, name, base / "out" / name)
    return rc, cols, kept[name][0]


@pytest.mark.parametrize("name", list(CASES))
def test_each_format_exports_reloads_and_verifies(run, name, monkeypatch):
    """The library's format; export_verified by the reload (weights bit for bit, same logits) where transformers
    runs the format as measured, else by the stored tensors (said in export_reload)."""
    preset, fmt, how = CASES[name]
    rc, cols, sim = _export_sim(run, name, monkeypatch)
    qc = json.loads(open(f"{cols['export_path']}/config.json").read())["quantization_config"]
    assert qc["format"] == fmt and cols["export_ct_format"] == fmt
    assert cols["export_verified"] is True, cols.get("export_weights_mismatch")
    if how == "reload":
        assert cols["export_verified_by"] == "reload" and cols["export_logit_maxdiff"] == 0.0
        assert cols["export_ppl"] == cols["export_sim_ppl"] and cols["export_reproduces_row"] is True
    else:
        assert cols["export_verified_by"].startswith("stored tensors") and "\n" not in cols["export_reload"]
        assert "cannot run" in cols["export_reload"] and "stored tensors" in cols["export_reload"]
        n = cols["export_stored_equal"].split("/")
        assert n[0] == n[1] and int(n[1]) >= 14


@pytest.mark.parametrize("name", list(CASES))
def test_config_groups_carry_the_library_preset_arguments(run, name, monkeypatch):
    """config.json's scheme is compressed-tensors' own preset (quant_scheme.PRESET_SCHEMES), argument for argument."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    rc, cols, sim = _export_sim(run, name, monkeypatch)
    qc = QuantizationConfig.model_validate(json.loads(open(f"{cols['export_path']}/config.json").read())
                                           ["quantization_config"])
    (scheme,) = qc.config_groups.values()
    ref = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[CASES[name][0]])
    for ours, lib in ((scheme.weights, ref.weights), (scheme.input_activations, ref.input_activations)):
        # model_dump: the library's serializer leaves the MX zp_dtype out of config.json (re-inferred on reading)
        assert (ours is None and lib is None) or ours.model_dump() == lib.model_dump(), (ours, lib)


@pytest.mark.parametrize("name", list(CASES))
def test_stored_tensors_are_the_library_compression_of_our_weights(run, name, monkeypatch):
    """compressed-tensors' own compressor (the one its format inference picks for the preset), given the run's
    weights (these presets are round-to-nearest: what llm-compressor would compress) and our scales (and NVFP4's
    global scale), quantizes, packs and encodes the scales itself; every tensor it writes equals ours bit for bit
    (e2m1 codes included: a small negative weight that rounds to zero is -0, sign nibble set, on both sides)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from safetensors.torch import load_file

    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[CASES[name][0]])
    compressor = BaseCompressor.get_value_from_registry(infer_module_format(torch.nn.Linear, scheme).value)
    rc, cols, sim = _export_sim(run, name, monkeypatch)
    stored = load_file(f"{cols['export_path']}/model.safetensors")
    qlinears = {n: q for n, q in sim.named_modules() if isinstance(q, QuantLinear) and q.qweight is not None}
    assert len(qlinears) == 14
    for mod, q in qlinears.items():
        given = {"weight": rc.lm.model.get_submodule(mod).weight.detach(), "weight_scale": q.qweight.scale}
        if q.qweight.global_scale is not None:
            given["weight_global_scale"] = q.qweight.global_scale
        lib = compressor.compress(given, scheme)
        ours = {k.removeprefix(mod + "."): v for k, v in stored.items() if k.startswith(mod + ".")}
        assert set(ours) - set(lib) == ({"input_global_scale"} if name == "nvfp4" else set()), (mod, set(ours))
        for key, value in lib.items():
            assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), (name, mod, key)
        if name == "nvfp4":  # the calibrated activation global scale the simulated model ran with
            assert torch.equal(ours["input_global_scale"], q.a_global) and q.a_global.dtype == torch.float32


def test_stored_check_sees_one_changed_code(run, monkeypatch):
    """The stored-tensor proof is not vacuous: one flipped fp4 code in the file is a mismatch."""
    from safetensors.torch import load_file, save_file

    from quantbench.export.verify import compare_stored

    rc, cols, sim = _export_sim(run, "nvfp4", monkeypatch)
    path = f"{cols['export_path']}/model.safetensors"
    assert compare_stored(cols["export_path"], sim).ok
    sd = load_file(path)
    key = "model.layers.1.mlp.down_proj.weight_packed"
    sd[key] = sd[key].clone()
    sd[key][0, 0] ^= 0x01
    save_file(sd, path, metadata={"format": "pt"})
    check = compare_stored(cols["export_path"], sim)
    assert not check.ok and check.mismatched == ["model.layers.1.mlp.down_proj.weight"]


def test_refusals_are_one_line(run):
    """int block weights have no compressed-tensors format vLLM runs; fp8-block on an input that is not a
    multiple of 128 is refused by the plan check (compressed-tensors and vLLM cannot run partial 1x128 groups)."""
    from quantbench.quant.apply import prepare
    from quantbench.quant.recipes import resolve_recipe

    rc, base = run
    with pytest.raises(ExportRefused) as err:
        export_recipe(rc, "int8-block", base / "out" / "int8-block")
    assert "\n" not in str(err.value) and "fp8-block" in str(err.value)
    assert not (base / "out" / "int8-block").exists()
    with pytest.raises(QuantbenchError) as err:
        prepare(tiny_model("llama", hidden=64), resolve_recipe("fp8-block"))
    assert "\n" not in str(err.value) and "128" in str(err.value)


def test_hardware_column_is_computed_from_the_recipe():
    """The table's `hardware` column comes from quantbench/report/hardware.py, from the recipe, not from rows."""
    from quantbench.report.hardware import hardware_by_name
    from quantbench.report.tables import to_frame

    df = to_frame([{"recipe": r, "status": "ok"} for r in ("fp8-block", "nvfp4", "mxfp4a16", "w4a16-g64",
                                                            "w8a8-token", "gguf-q4_0", "my-custom")])
    assert list(df["hardware"][:6]) == ["vLLM: SM89+ (Ada+)", "vLLM: SM100/SM120", "vLLM: SM80+ (Ampere+)",
                                        "vLLM: SM80+ (Ampere+)", "vLLM: SM75+ (Turing+), x86 CPU",
                                        "llama.cpp: SM70+ (Volta+), x86 CPU, Apple"]
    assert df["hardware"].isna().iloc[6]  # not a preset and no spec given: unknown here
    assert hardware_by_name("w4afp8") == "vLLM: SM90"  # CUTLASS W4A8 (int4 x fp8) is Hopper-only
