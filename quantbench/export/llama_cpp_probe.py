"""Perplexity and prefill speed of a GGUF file through llama.cpp itself, on given token windows.

Standalone (numpy + the `cyllama` wheel, which bundles a CPU llama.cpp): runs in ANOTHER Python
environment, so the project's environment needs neither. quantbench.export.runtime calls it as

    $QUANTBENCH_LLAMA_CPP_PYTHON llama_cpp_probe.py FILE.gguf WINDOWS.npz THREADS [LOGITS.npy]  -> one JSON line

WINDOWS.npz holds `ids` [N, T] and `score_from` [N] (quantbench.data.corpus.Windows). Each window is decoded
in one batch with logits for every position (KV cache cleared between windows); the NLL of the scored
next tokens is summed as quantbench.eval.lm does. With LOGITS.npy, the first window's logits [T, V] (float32)
are saved there too (quantbench.export.llama_cpp_check compares them with ours).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def _nll(logits: np.ndarray, target: int) -> float:
    x = logits.astype(np.float64)
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()) - x[target])


def main(path: str, windows: str, threads: int, logits_out: str | None = None) -> dict:
    from cyllama.llama import llama_cpp as L

    L.disable_logging()
    data = np.load(windows)
    ids, starts = data["ids"], data["score_from"]
    class Model(L.LlamaModel):  # cyllama 0.2.18's logits accessors read model.n_vocab, which it lacks
        @property
        def n_vocab(self) -> int:
            return self.get_vocab().n_vocab

    model = Model(path, L.LlamaModelParams())
    cp = L.LlamaContextParams()
    n = int(ids.shape[1])
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = n, n, n, threads, threads
    ctx = L.LlamaContext(model, cp)
    nll, count, secs = 0.0, 0, 0.0
    for k, (row, start) in enumerate(zip(ids, starts)):
        ctx.kv_cache_clear()
        batch = L.LlamaBatch(n_tokens=n, embd=0, n_seq_max=1)
        for pos, tok in enumerate(row):
            batch.add(int(tok), pos, [0], True)
        t0 = time.perf_counter()
        if ctx.decode(batch) != 0:
            raise RuntimeError("llama_decode failed")
        secs += time.perf_counter() - t0
        if k == 0 and logits_out:
            np.save(logits_out, np.stack([np.asarray(ctx.get_logits_ith(i), dtype=np.float32) for i in range(n)]))
        for i in range(int(start), n - 1):  # logits at position i predict token i + 1
            nll += _nll(np.asarray(ctx.get_logits_ith(i), dtype=np.float32), int(row[i + 1]))
            count += 1
    return {"nll_sum": nll, "n_tokens": count, "seconds": secs, "tokens": int(ids.size),
            "desc": str(getattr(model, "desc", ""))}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])))
