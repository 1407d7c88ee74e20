"""The KL-divergence report of llama.cpp (`llama-perplexity --kl-divergence`), per result row.

llama.cpp's tools/perplexity/perplexity.cpp prints, over every scored token of the run: mean KLD,
median, 99th / 99.9th percentile and maximum KLD, statistics of Δp = p_q(correct token) −
p_base(correct token) (RMS Δp among them) and "same top p" (share of tokens whose argmax is
unchanged). Our columns, from the per-token values the evaluation pass keeps (quantbench.eval.lm.TokenValues):

- `kld_median`, `kld_p99`, `kld_p999`, `kld_max`: of the per-token KL(P_fp || P_q), nats. Percentiles
  as llama.cpp's: sorted values, linear interpolation at fraction·(N − 1) (numpy's default "linear"
  method); its median is the mean of the two middle values for even N, which is the same number.
- `dp_rms`: sqrt(mean(Δp²)), a fraction (llama.cpp prints it in percent).
- "same top p" is our existing `top1` column (argmax of the quantized logits equal to the FP model's
  argmax, share of scored tokens): the same definition, so it is not duplicated.
- `kl` stays the mean KLD (with its bootstrap interval, `kl_lo`/`kl_hi`).
"""
from __future__ import annotations

import numpy as np

KLD_COLUMNS = ("kld_median", "kld_p99", "kld_p999", "kld_max", "dp_rms")
_QUANTILES = (0.5, 0.99, 0.999)


def kld_columns(kl: np.ndarray, dp: np.ndarray) -> dict[str, float]:
    """kl, dp: [N] per scored token (KL in nats, Δp as a probability) -> the KLD report's columns;
    {} when there are no tokens (a row scored without the FP reference)."""
    k, d = np.asarray(kl, dtype=np.float64), np.asarray(dp, dtype=np.float64)
    if k.size == 0:
        return {}
    med, p99, p999 = np.quantile(k, _QUANTILES, method="linear")
    return {"kld_median": float(med), "kld_p99": float(p99), "kld_p999": float(p999), "kld_max": float(k.max()),
            "dp_rms": float(np.sqrt(np.mean(d * d)))}


def fp_kld_columns() -> dict[str, float]:
    """The FP row against itself: every per-token KL and Δp is exactly 0."""
    return {c: 0.0 for c in KLD_COLUMNS}
