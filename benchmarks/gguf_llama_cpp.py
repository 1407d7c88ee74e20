"""Run GGUF files written by quantbench through llama.cpp itself (loader, tokenizer, CPU forward pass)
and compare with the simulated logits that benchmarks/gguf_roundtrip.py --keep DIR saved.

llama.cpp comes from the PyPI wheel `cyllama` (0.2.18 bundles llama.cpp b9190, CPU build, glibc 2.17),
installed in a throwaway venv so the project's environment is untouched:

    python3 -m venv /tmp/lcpenv && /tmp/lcpenv/bin/pip install cyllama==0.2.18 numpy
    /tmp/lcpenv/bin/python benchmarks/gguf_llama_cpp.py DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TEXT = "The capital of France is Paris.\nIt has 2,148,271 inhabitants!"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def run(path: Path, ids: np.ndarray) -> np.ndarray:
    from cyllama.llama import llama_cpp as L

    L.disable_logging()
    class Model(L.LlamaModel):  # cyllama 0.2.18's get_logits reads model.n_vocab, which it lacks
        @property
        def n_vocab(self) -> int:
            return self.get_vocab().n_vocab

    model = Model(str(path), L.LlamaModelParams())
    cp = L.LlamaContextParams()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = len(ids), len(ids), len(ids), 1, 1
    ctx = L.LlamaContext(model, cp)
    vocab = model.get_vocab()
    print(f"{path.name}: llama.cpp loaded {model.desc}, n_vocab {vocab.n_vocab}, "
          f"tokenizer ids {vocab.tokenize(TEXT, False, False)[:12]}...")
    rows = []
    for pos, tok in enumerate(ids):  # one token per decode (KV cache): get_logits returns the last row
        batch = L.LlamaBatch(n_tokens=1, embd=0, n_seq_max=1)
        batch.add(int(tok), pos, [0], True)
        assert ctx.decode(batch) == 0
        rows.append(np.asarray(ctx.get_logits(), dtype=np.float32))
    return np.stack(rows)


def main(folder: Path) -> None:
    ids = np.load(folder / "window_ids.npy")
    for sim_path in sorted(folder.glob("*.sim_logits.npy")):
        gguf_path = folder / sim_path.name.replace(".sim_logits.npy", ".gguf")
        sim = np.load(sim_path)
        got = run(gguf_path, ids)
        nll = lambda lg: -_log_softmax(lg[:-1])[np.arange(len(ids) - 1), ids[1:]].mean()  # noqa: E731
        print(f"{gguf_path.name}: max|Δlogit| llama.cpp vs simulated {np.abs(got - sim).max():.3g} "
              f"(mean {np.abs(got - sim).mean():.3g}); ppl llama.cpp {np.exp(nll(got)):.3f} "
              f"simulated {np.exp(nll(sim)):.3f}; top-1 agreement {(got.argmax(-1) == sim.argmax(-1)).mean():.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
