"""The kv_bias graft's slot-logit initialisation on the default model (issue 25): for each b, the step-0
difference to the pretrained model (held-out windows) and the size of the slot parameters' gradients
on one training batch (what AdamW's eps is compared with).

  python benchmarks/retrofit_kv_slot.py [-10 -20 -30]      (reads or builds the run's tokens.pt)
"""
from __future__ import annotations

import sys

import torch

from quantbench.modeling.load import load_model
from quantbench.run.config import read_yaml_mapping
from quantbench.train.retrofit.config import RetrofitConfig
from quantbench.train.retrofit.loop import step0_difference
from quantbench.train.retrofit.model import graft
from quantbench.train.retrofit.run import load_data


def main(bs: list[float]) -> None:
    torch.set_num_threads(2)
    cfg = RetrofitConfig(**read_yaml_mapping("configs/retrofit.yaml"))
    lm = load_model(cfg.model, "cpu", "float32")
    base = lm.model.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    out = cfg.run_dir("retrofit")
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg, lm.tokenizer, out / "tokens.pt")
    ctx = cfg.optim.context
    held = data.heldout_windows(2, ctx)  # what the run's step-0 difference reads
    train = data.batch(0, cfg.optim.batch_size, ctx, cfg.seed)  # the first training batch
    for b in bs:
        m = graft(base, "kv_bias", sink_logit_init=b, gate_bias_init=0.0)
        for mod in m.modules():
            if hasattr(mod, "config"):
                mod.config._attn_implementation = "eager"  # slot mass is recorded with weights
        m.eval()
        d = step0_difference(base, m, held)
        mass = [mod.last_slot_mass for mod in m.modules() if getattr(mod, "graft", "") == "kv_bias"]
        print(f"b {b:g}: step-0 max |dlogit| {d['max_abs_logit_diff']:.3g} (max |logit| {d['max_abs_logit']:.3g}), "
              f"max KL {d['max_kl']:.3g}, mean KL {d['mean_kl']:.3g}, top-1 {d['top1_agreement']:.4f}; "
              f"mean slot mass per layer: max {max(mass):.2e} (layer {mass.index(max(mass))}), "
              f"median {sorted(mass)[len(mass) // 2]:.2e}", flush=True)
        slots = [(n, p) for n, p in m.named_parameters() if "slot" in n]
        for _, p in slots:
            p.requires_grad_(True)
        m(input_ids=train, labels=train).loss.backward()
        for kind in ("k_slot", "v_slot", "slot_logit"):
            g = [p.grad.abs().max().item() for n, p in slots if n.endswith(kind)]
            print(f"  {kind}: max |grad| per layer: largest {max(g):.2e} (layer {g.index(max(g))}), "
                  f"median {sorted(g)[len(g) // 2]:.2e}", flush=True)
        del m


if __name__ == "__main__":
    main([float(x) for x in sys.argv[1:]] or [-10.0, -20.0, -30.0])
