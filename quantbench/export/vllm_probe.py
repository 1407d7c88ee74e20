"""Perplexity and prefill speed of an exported checkpoint folder through vLLM itself, on given token windows.

quantbench.export.runtime runs it in a child process of the same Python (vLLM claims a share of the
GPU's memory and starts its own engine processes; a failure there is one 'not measured' line, not a
failed export):

    python -m quantbench.export.vllm_probe DIR WINDOWS.npz GPU_MEMORY_UTILIZATION OUT.json

WINDOWS.npz holds `ids` [N, T] and `score_from` [N] (quantbench.data.corpus.Windows). Each window is one
prompt of its token ids as given (no BOS added). vLLM loads DIR with its own loader and kernels
(compressed-tensors int8 / int4 / fp8; dtype "auto": vLLM runs fp32 checkpoints in fp16) and returns
the log-probability of every prompt token given the tokens before it (`prompt_logprobs`, from the raw
logits, as lm-eval's vLLM backend requests them); the targets j >= score_from + 1 are summed, as
quantbench.eval.lm scores them.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def window_nll(prompt_logprobs, tokens: list[int], start: int) -> tuple[float, int]:
    """(-sum log p(tokens[j] | tokens[:j]) over j > start, count) from one request's `prompt_logprobs`
    (entry j: {token id: Logprob or float}, entry 0 is None)."""
    nll = 0.0
    for j in range(start + 1, len(tokens)):
        lp = prompt_logprobs[j][tokens[j]]
        nll -= float(getattr(lp, "logprob", lp))
    return nll, len(tokens) - start - 1


def main(path: str, windows: str, gpu_memory_utilization: float) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    data = np.load(windows)
    ids, starts = data["ids"], data["score_from"]
    n = int(ids.shape[1])
    cfg = json.loads(open(f"{path}/config.json", encoding="utf-8").read())
    max_len = min(n + 1, int(cfg.get("max_position_embeddings") or n + 1))  # the prompt plus the one sampled token
    llm = LLM(model=path, dtype="auto", max_model_len=max_len, gpu_memory_utilization=gpu_memory_utilization,
              enforce_eager=True, enable_prefix_caching=False, seed=0)
    params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
    rows = [[int(t) for t in row] for row in ids]
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)  # prompt order
    secs = time.perf_counter() - t0
    nll, count = 0.0, 0
    for row, start, out in zip(rows, starts, outs):
        w_nll, w_count = window_nll(out.prompt_logprobs, row, int(start))
        nll, count = nll + w_nll, count + w_count
    dtype = str(getattr(getattr(llm.llm_engine, "model_config", None), "dtype", "auto")).removeprefix("torch.")
    return {"nll_sum": nll, "n_tokens": count, "seconds": secs, "tokens": int(ids.size),
            "version": vllm.__version__, "dtype": dtype}


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
    with open(sys.argv[4], "w", encoding="utf-8") as f:
        json.dump(result, f)
