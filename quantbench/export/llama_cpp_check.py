"""llama.cpp's own verdict on a llamacpp-backend row: the quantized GGUF the backend wrote (kept in
Effects.gguf_file, no second file) is scored by llama.cpp itself on the row's evaluation windows (the same
token ids), through the export's probe (runtime.llama_cpp_probe). Row columns:

- llama_cpp_ppl: llama.cpp's perplexity over the windows, beside our `ppl`.
- llama_cpp_logit_maxdiff: max |llama.cpp's logit - ours| over every position and token of the first window.
- llama_cpp_agrees: both within tolerance (below). Without the wheel, one log line and no columns.

Tolerance. Our forward dequantizes the file's weights and multiplies in f32; llama.cpp multiplies quantized
weights by activations it first rounds to 8-bit blocks (Q8_0 / Q8_K: error up to 1/254 of the block's
absmax, ~0.4%) and keeps K and V in an f16 cache (2^-11). These are independent relative rounding errors
of at most ~0.4% per quantized matmul, so they shift logits by a few tenths of a percent of the logit
scale per layer and accumulate roughly as a random walk; they cannot change the model. A wrong file (a
tensor's layout, type or rope order misread) moves logits by the order of the logits themselves. So:
max |Δlogit| <= LOGIT_RTOL (5%) of max |our logit| on that window, and perplexities within PPL_RTOL
(1%: 8-bit activation rounding is what llama.cpp's own Q8_0 tables show costing well under 0.1%).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.log import log
from ..data.corpus import Windows
from .runtime import llama_cpp_probe

LOGIT_RTOL = 0.05  # of max |our logit| on the first window
PPL_RTOL = 0.01


@torch.no_grad()
def first_window_logits(model: nn.Module, windows: Windows, device: torch.device) -> torch.Tensor:
    """Our logits [T, V] (float32, CPU) on the first evaluation window."""
    ids = windows.input_ids[:1].to(device)  # [1, T]
    return model(input_ids=ids).logits[0].float().cpu()


def agrees(ppl_theirs: float, ppl_ours: float, maxdiff: float, scale: float) -> bool:
    return abs(ppl_theirs / ppl_ours - 1) <= PPL_RTOL and maxdiff <= LOGIT_RTOL * scale


def llama_cpp_columns(model: nn.Module, path: Path, windows: Windows, device: torch.device, ppl: float) -> dict:
    """llama_cpp_ppl / llama_cpp_logit_maxdiff / llama_cpp_agrees for the row whose file is `path`, or {}."""
    with tempfile.TemporaryDirectory(prefix="quantbench-llamacpp-check-") as tmp:
        out = Path(tmp) / "logits.npy"
        r = llama_cpp_probe(path, windows, out)
        if isinstance(r, str):
            log(f"llama.cpp check not run: {r}")
            return {}
        theirs = torch.from_numpy(np.load(out))  # [T, V]
    ours = first_window_logits(model, windows, device)
    maxdiff = float((theirs - ours).abs().max())
    ppl_llama = math.exp(r["nll_sum"] / max(r["n_tokens"], 1))
    return {"llama_cpp_ppl": ppl_llama, "llama_cpp_logit_maxdiff": round(maxdiff, 6),
            "llama_cpp_agrees": agrees(ppl_llama, ppl, maxdiff, float(ours.abs().max()))}
