"""One prepared GPU check (issue 12): a randomly initialised Llama-style model of about 1B parameters
built on the machine (nothing to download), in bf16: census, a calibrated W8A8 static recipe,
sequential GPTQ W4A16 and evaluation; prints each step's seconds, evaluation throughput against a
bare forward over the same tokens, and peak GPU memory.

    python benchmarks/gpu_check.py                 # the ~1B model on cuda (bf16)
    python benchmarks/gpu_check.py --tiny          # a 2-layer model on CPU: checks the script itself
    python benchmarks/gpu_check.py --layers 8      # fewer layers of the same width

No tokenizer and no corpus are needed: the tokens are random ids (the weights are random too, so
perplexities mean nothing; the check is that every step runs in bf16 on the GPU, how fast, and in
how much memory). Results go into docs/gpu.md with the date and the GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import contextmanager

import torch


def build_model(tiny: bool, layers: int | None, device: torch.device, dtype: torch.dtype):
    """TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000),
    random weights made directly on `device`; --tiny: hidden 64, 2 layers, vocab 512."""
    import transformers as tf

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if tiny else \
        dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)
    if layers:
        shape["num_hidden_layers"] = layers
    cfg = tf.LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    return model


@contextmanager
def phase(name: str, device: torch.device, table: list):
    """Time a step and its peak GPU memory (allocated by torch; None on CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    extra: dict = {}
    yield extra
    if cuda:
        torch.cuda.synchronize()
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20) if cuda else None
    table.append({"step": name, "seconds": round(time.perf_counter() - t0, 2), "peak_gpu_mb": peak, **extra})
    print(f"[gpu_check] {table[-1]}", flush=True)


@torch.no_grad()
def bare_forward(model, ids: torch.Tensor, batch_size: int) -> float:
    """Tokens per second of a plain forward pass (logits only)."""
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        model(input_ids=ids[i: i + batch_size])
    if ids.is_cuda:
        torch.cuda.synchronize()
    return ids.numel() / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU (checks the script anywhere)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences (of --seq-len // 2 tokens)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()
    from quantbench.census import run_census
    from quantbench.data.corpus import Windows
    from quantbench.eval.lm import evaluate_lm
    from quantbench.quant.apply import apply_recipe
    from quantbench.quant.calibration import Calibration
    from quantbench.quant.recipes import resolve_recipe
    from quantbench.run.config import CensusConfig

    if args.tiny:
        args.windows, args.seq_len, args.calib = min(args.windows, 2), min(args.seq_len, 64), min(args.calib, 2)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype, table, bs = torch.bfloat16, [], args.batch_size
    with phase("build", device, table) as x:
        model = build_model(args.tiny, args.layers, device, dtype)
        x["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.windows, args.seq_len), generator=gen)
    windows = Windows(ids, torch.ones(args.windows, dtype=torch.long), {"seq_len": args.seq_len, "random_ids": True})
    calib = Calibration(torch.randint(3, vocab, (args.calib, args.seq_len // 2), generator=gen), bs, device)
    bare_forward(model, ids[:1].to(device), 1)  # warm-up (kernels, allocator)
    with phase("bare forward", device, table) as x:
        bare = bare_forward(model, ids.to(device), bs)
        x["tok_s"] = round(bare)
    with phase("census", device, table):
        run_census(model, calib.batches[:4], None, CensusConfig(plots=False, samples=4, seq_len=args.seq_len // 2), bs)
    with phase("evaluate fp", device, table) as x:
        fp, ref = evaluate_lm(model, windows, bs, device, keep_reference=True)
        x.update(tok_s=round(fp.tok_per_s), vs_bare=round(fp.tok_per_s / bare, 2))
    recipes = [resolve_recipe("w8a8-tensor-static"),
               resolve_recipe({"preset": "w4a16-g64-gptq", "name": "w4a16-g64-gptq-seq",
                               "mitigations": [{"name": "gptq", "options": {"sequential": True}}]})]
    for recipe in recipes:
        with phase(f"calibrate+quantize {recipe.name}", device, table):
            q, _ = apply_recipe(copy.deepcopy(model), recipe, calib, device, bs)
        with phase(f"evaluate {recipe.name}", device, table) as x:
            res, _ = evaluate_lm(q, windows, bs, device, reference=ref)
            x.update(tok_s=round(res.tok_per_s), vs_bare=round(res.tok_per_s / bare, 2), kl=float(f"{res.kl:.3g}"))
        del q
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    print(f"\ndevice {gpu}, torch {torch.__version__}, bf16, {args.windows}x{args.seq_len} eval tokens, "
          f"{args.calib}x{args.seq_len // 2} calibration tokens, batch {bs}")
    print("| step | seconds | tok/s | vs bare forward | peak GPU MB |\n| --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['step']} | {r['seconds']} | {r.get('tok_s', '')} | {r.get('vs_bare', '')} | {r['peak_gpu_mb']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": gpu, "torch": torch.__version__, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
