"""Continue-train one retrofit variant (or the control) from the pretrained model.

Layout under <run>/<variant>/:
  step0.json    the step-0 difference between the grafted and the pretrained model's logits
  checkpoint/   resumable state: trainable.pt (trainable parameters), trainer.pt (optimizer, step), log.json
  final/        HF checkpoint + tokenizer (`quantbench_retrofit`, or plain Llama for the control)
  log.json      train / held-out curves [step, tokens, loss] (cross-entropy only), the outlier penalty of
                each training batch [step, value] (every variant logs it; `+penalty` variants also train on
                it), probes, step-0 difference, trainable counts
A rerun skips a finished variant and resumes an interrupted one at its last checkpoint; batches are a
function of (seed, step) and the frozen weights come from the pretrained model, so a resumed run
reproduces the uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import QuantbenchError
from ...core.hooks import first_tensor, forward_hooks
from ...core.log import log
from ...modeling.arch import decoder_layers
from ..data import TokenData
from ..loop import TrainLog, _autocast, _loss, heldout_loss, lr_at
from .config import GraftOptions, PenaltyConfig, RetrofitConfig, RetrofitOptim, split_variant, variant_spec
from .grafts import ClippedSoftmaxAttention
from .model import CONTROL, graft, graft_parameter_names
from .probes import probe


@dataclass
class RetrofitLog(TrainLog):
    probes: list[dict] = field(default_factory=list)
    step0: dict = field(default_factory=dict)
    trainable: dict = field(default_factory=dict)
    penalty: list[list[float]] = field(default_factory=list)  # [step, outlier penalty of that step's batch]

    def to_json(self) -> dict:
        return {**super().to_json(), "probes": self.probes, "step0": self.step0, "trainable": self.trainable,
                "penalty": self.penalty}

    @classmethod
    def from_json(cls, d: dict) -> "RetrofitLog":
        return cls(d["train"], d["heldout"], d.get("seconds", 0.0), d.get("n_params", 0), d.get("probes", []),
                   d.get("step0", {}), d.get("trainable", {}), d.get("penalty", []))


def build_variant(cfg: RetrofitConfig, variant: str, base: nn.Module) -> nn.Module:
    """The step-0 model of `variant` (a `+penalty` suffix is ignored here: same graft as its base): a
    grafted copy of `base`, or (control) a plain copy."""
    name, _, _ = variant_spec(variant)
    if name == CONTROL:
        return copy.deepcopy(base)
    g = cfg.grafts_of(variant)
    return graft(base, name, sink_logit_init=g.sink_logit_init, gate_bias_init=g.gate_bias_init)


def penalty_layers(model: nn.Module, p: PenaltyConfig) -> list[int]:
    """The decoder layers `p.layers` names (0-based), checked against the model."""
    n = len(decoder_layers(model))
    if p.layers == "all":
        return list(range(n))
    if any(i >= n for i in p.layers):
        raise QuantbenchError(f"penalty.layers {list(p.layers)}: the model has decoder layers 0..{n - 1}")
    return list(p.layers)


def outlier_penalty(hidden: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The penalty of PenaltyConfig on decoder-layer outputs `hidden` (each [B, T, D]), in fp32:
    kurtosis: mean over layers of the mean over tokens of E_D[(h − μ)^4] / σ^4 (Pearson, biased σ²);
    max: mean over layers of max |h| / sqrt(mean h²), both over the layer's whole tensor."""
    vals = []
    for h in hidden:
        h = h.float()
        if kind == "kurtosis":
            c = h - h.mean(-1, keepdim=True)
            var = c.pow(2).mean(-1)
            vals.append((c.pow(4).mean(-1) / var.pow(2).clamp_min(1e-30)).mean())
        elif kind == "max":
            vals.append(h.abs().amax() / h.pow(2).mean().sqrt().clamp_min(1e-30))
        else:
            raise QuantbenchError(f"unknown penalty kind {kind!r} (kurtosis, max)")
    return torch.stack(vals).mean()


def loss_and_penalty(model: nn.Module, ids: torch.Tensor, p: PenaltyConfig, layers: list[int],
                     train_on_it: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, outlier penalty) of one batch in one forward. The cross-entropy is train.loop's
    `_loss`, unchanged; the penalty carries gradients only when `train_on_it` (a `+penalty` variant)."""
    mods = decoder_layers(model)
    hidden: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(_m, _inp, out):
            hidden[i] = first_tensor(out)
        return fn

    with forward_hooks([(mods[i], hook(i)) for i in layers]):
        ce = _loss(model, ids)
    hs = [hidden[i] for i in layers]
    if not train_on_it:
        hs = [h.detach() for h in hs]
    return ce, outlier_penalty(hs, p.kind)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


def set_trainable(model: nn.Module, o: RetrofitOptim) -> list[dict]:
    """requires_grad per the config; AdamW groups: pretrained matrices (decay), pretrained vectors, graft (graft_lr,
    graft_eps; the others keep AdamW's eps 1e-8)."""
    grafted = set(graft_parameter_names(model))
    n_layers = model.config.num_hidden_layers
    if o.train_layers != "all" and any(not 0 <= i < n_layers for i in o.train_layers):
        raise QuantbenchError(f"optim.train_layers {list(o.train_layers)}: the model has layers 0..{n_layers - 1}")
    groups = {"decay": [], "no_decay": [], "graft": []}
    for name, p in model.named_parameters():
        i = _layer_index(name)
        if name in grafted:
            on, kind = True, "graft"
        elif "embed_tokens" in name or name.startswith("lm_head"):
            on, kind = o.train_embeddings, "decay"
        else:
            on = o.train_layers == "all" or (i is not None and i in o.train_layers)
            kind = "decay" if p.dim() >= 2 else "no_decay"
        p.requires_grad_(on)
        if on:
            groups[kind].append(p)
    spec = {"decay": (o.lr, o.weight_decay, 1e-8), "no_decay": (o.lr, 0.0, 1e-8),
            "graft": (o.graft_lr, 0.0, o.graft_eps)}
    return [{"params": ps, "lr": spec[k][0], "base_lr": spec[k][0], "weight_decay": spec[k][1], "eps": spec[k][2],
             "name": k} for k, ps in groups.items() if ps]


def set_clip(model: nn.Module, g: GraftOptions, step: int) -> None:
    """clipped_softmax: (γ, ζ) at `step`, linear from (0, 1) (exactly softmax) to the targets."""
    r = 1.0 if g.clip_ramp_steps == 0 else min(1.0, step / g.clip_ramp_steps)
    for m in model.modules():
        if isinstance(m, ClippedSoftmaxAttention):
            m.clip.copy_(torch.tensor([g.clip_gamma * r, 1.0 + (g.clip_zeta - 1.0) * r]))


@torch.no_grad()
def step0_difference(base: nn.Module, model: nn.Module, ids: torch.Tensor) -> dict:
    """Logits of the step-0 model against the pretrained model's on the same windows."""
    device = next(model.parameters()).device
    a = base(input_ids=ids.to(device)).logits.float()  # [B, T, V]
    b = model(input_ids=ids.to(device)).logits.float()
    d = (a - b).abs()
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1)  # [B, T]
    return {"max_abs_logit_diff": float(d.max()), "mean_abs_logit_diff": float(d.mean()),
            "max_abs_logit": float(a.abs().max()), "max_kl": float(kl.max()), "mean_kl": float(kl.mean()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "tokens": int(ids.numel())}


def _save(vdir: Path, model: nn.Module, opt, step: int, rlog: RetrofitLog) -> None:
    tmp = vdir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, tmp / "trainable.pt")
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "trainer.pt")
    (tmp / "log.json").write_text(json.dumps(rlog.to_json()))
    shutil.rmtree(vdir / "checkpoint", ignore_errors=True)
    tmp.rename(vdir / "checkpoint")  # the previous checkpoint goes only once the new one is complete


def _resume(vdir: Path, model: nn.Module, opt, device: torch.device) -> tuple[int, RetrofitLog | None]:
    ck = vdir / "checkpoint"
    if not (ck / "trainer.pt").exists():
        return 0, None
    state = torch.load(ck / "trainable.pt", map_location=device)
    params = dict(model.named_parameters())
    wrong = [n for n in state if n not in params or params[n].shape != state[n].shape or not params[n].requires_grad]
    if wrong or len(state) != sum(p.requires_grad for p in params.values()):
        raise QuantbenchError(f"checkpoint {ck} does not match this config's model or trainable set "
                              f"(e.g. {wrong[:2]}); delete it to restart the variant")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    st = torch.load(ck / "trainer.pt", map_location=device)
    opt.load_state_dict(st["optimizer"])
    return int(st["step"]), RetrofitLog.from_json(json.loads((ck / "log.json").read_text()))


@dataclass
class RetrofitTrainer:
    cfg: RetrofitConfig
    variant: str
    base: nn.Module  # the pretrained model (never modified)
    tokenizer: object
    data: TokenData
    vdir: Path
    device: torch.device
    on_step: Callable[[int], None] | None = None  # called after each finished step (tests interrupt here)
    layers: list[int] = field(default_factory=list, init=False)  # decoder layers the outlier penalty reads

    @cached_property
    def grafts(self) -> GraftOptions:
        """The config's grafts.* with this variant's own overrides."""
        return self.cfg.grafts_of(self.variant)

    @property
    def penalized(self) -> bool:
        """A `+penalty` variant: trains on cross-entropy + penalty.weight × outlier penalty."""
        return split_variant(self.variant)[1]

    def run(self) -> RetrofitLog:
        if (self.vdir / "final" / "done.json").exists():
            return RetrofitLog.from_json(json.loads((self.vdir / "log.json").read_text()))
        self.vdir.mkdir(parents=True, exist_ok=True)
        model = build_variant(self.cfg, self.variant, self.base).to(self.device)
        self.layers = penalty_layers(model, self.cfg.penalty)
        groups = set_trainable(model, self.cfg.optim)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
        start, rlog = _resume(self.vdir, model, opt, self.device)
        if rlog is None:
            rlog = self._step0(model)
        else:
            log(f"{self.variant}: resuming at step {start}/{self.cfg.optim.steps}")
        rlog.n_params = sum(p.numel() for p in model.parameters())
        rlog.trainable = {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
        self._loop(model, opt, start, rlog)
        self._finish(model, rlog)
        return rlog

    def windows(self, n: int) -> torch.Tensor:
        return self.data.heldout_windows(n, self.cfg.optim.context)

    def _step0(self, model: nn.Module) -> RetrofitLog:
        """Step-0 difference to the pretrained model, held-out loss and probes before any update."""
        set_clip(model, self.grafts, 0)
        rlog = RetrofitLog(step0=step0_difference(self.base, model, self.windows(2)))
        (self.vdir / "step0.json").write_text(json.dumps(rlog.step0, indent=1))
        d = rlog.step0
        log(f"{self.variant}: step-0 max |Δlogit| {d['max_abs_logit_diff']:.3g} (max |logit| {d['max_abs_logit']:.3g}), "
            f"mean KL {d['mean_kl']:.3g}, top-1 agreement {d['top1_agreement']:.4f}")
        self._measure(model, rlog, 0)
        return rlog

    def _measure(self, model: nn.Module, rlog: RetrofitLog, done: int, loss: float | None = None) -> None:
        c, o = self.cfg, self.cfg.optim
        last = done == o.steps
        if done % o.eval_every == 0 or last:
            held = heldout_loss(model, self.windows(c.data.heldout_windows), c, self.device)
            rlog.heldout.append([done, done * o.batch_size * o.context, held])
            train = f"train {loss:.3f} " if loss is not None else ""
            log(f"{self.variant}: step {done}/{o.steps} {train}held-out {held:.3f} ({rlog.seconds:.0f}s)")
        if done % o.probe_every == 0 or last:
            p = probe(model, self.windows(c.probe.windows), self.tokenizer, c.probe.dims, c.probe.linear_inputs, done)
            rlog.probes.append(p)
            s = p["summary"]
            log(f"{self.variant}: probe at step {done}: max |x| {s['max_abs']:.4g} ({s['max_ratio']:.4g}x median), "
                f"first-token attention {s['mean_first_token_attn'] or 0:.3f}")

    def _loop(self, model: nn.Module, opt, start: int, rlog: RetrofitLog) -> None:
        c, o = self.cfg, self.cfg.optim
        params = [p for g in opt.param_groups for p in g["params"]]
        model.train()
        t0 = time.perf_counter() - rlog.seconds
        for step in range(start, o.steps):
            t_step = time.perf_counter()
            factor = lr_at(step, c) / o.lr  # warmup + cosine, the same shape for every group
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            set_clip(model, self.grafts, step)
            ids = self.data.batch(step, o.batch_size, o.context, c.seed).to(self.device)
            with _autocast(c, self.device):
                loss, pen = loss_and_penalty(model, ids, c.penalty, self.layers, self.penalized)
            opt.zero_grad(set_to_none=True)
            (loss + c.penalty.weight * pen if self.penalized else loss).backward()
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            done = step + 1
            rlog.train.append([done, done * o.batch_size * o.context, float(loss.item())])
            rlog.penalty.append([done, float(pen.item())])
            rlog.seconds = time.perf_counter() - t0
            if time.perf_counter() - t_step > 2.0 and done % o.eval_every:
                log(f"{self.variant}: step {done}/{o.steps} train {loss.item():.3f} "
                    f"({c.penalty.kind} penalty {pen.item():.4g}; {time.perf_counter() - t_step:.1f} s/step)")
            set_clip(model, self.grafts, done)
            self._measure(model, rlog, done, float(loss.item()))
            if done % o.ckpt_every == 0 and done < o.steps:
                _save(self.vdir, model, opt, done, rlog)
            if self.on_step is not None:
                self.on_step(done)

    def _finish(self, model: nn.Module, rlog: RetrofitLog) -> None:
        final = self.vdir / "final"
        shutil.rmtree(final, ignore_errors=True)
        model.eval()
        model.save_pretrained(final)
        self.tokenizer.save_pretrained(final)
        (self.vdir / "log.json").write_text(json.dumps(rlog.to_json()))
        (final / "done.json").write_text(json.dumps({"steps": self.cfg.optim.steps, "variant": self.variant}))
        shutil.rmtree(self.vdir / "checkpoint", ignore_errors=True)
