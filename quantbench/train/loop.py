"""Train one variant: AdamW, warmup + cosine, periodic held-out loss and resumable checkpoints.

Layout under <run>/<variant>/:
  checkpoint/   resumable state: model/ (HF folder), trainer.pt (optimizer, step), log.json
  final/        HF checkpoint + tokenizer (loads with AutoModelForCausalLM / quantbench run)
  log.json      {"train": [[step, tokens, loss]...], "heldout": [[step, tokens, loss]...], ...}
A rerun finds final/ (skips) or checkpoint/ (resumes at its step). Batches are a function of
(seed, step), so a resumed run reproduces the uninterrupted one.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import QuantbenchError
from ..core.log import log
from .config import TrainConfig
from .data import TokenData
from .modeling import QuantbenchLMConfig, QuantbenchLMForCausalLM


@dataclass
class TrainLog:
    train: list[list[float]] = field(default_factory=list)  # [step, tokens, loss]
    heldout: list[list[float]] = field(default_factory=list)  # [step, tokens, loss]
    seconds: float = 0.0
    n_params: int = 0

    def to_json(self) -> dict:
        return {"train": self.train, "heldout": self.heldout, "seconds": self.seconds, "n_params": self.n_params}

    @classmethod
    def from_json(cls, d: dict) -> "TrainLog":
        return cls(d["train"], d["heldout"], d.get("seconds", 0.0), d.get("n_params", 0))


def build_model(cfg: TrainConfig, variant: str, tokenizer) -> QuantbenchLMForCausalLM:
    """A fresh model for `variant`, vocabulary and special tokens from `tokenizer`."""
    m = cfg.model
    torch.manual_seed(cfg.seed)  # same seed: the shared q/k/v/o/MLP weights start identical across variants
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    hf = QuantbenchLMConfig(vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=tokenizer.eos_token_id,
                            hidden_size=m.hidden, intermediate_size=m.intermediate,
                            num_hidden_layers=m.layers, num_attention_heads=m.heads, max_position_embeddings=m.context,
                            attention=variant, clip_gamma=m.clip_gamma, clip_zeta=m.clip_zeta,
                            initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings)
    hf._attn_implementation = "sdpa"
    return QuantbenchLMForCausalLM(hf)


def lr_at(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    frac = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases, gates' biases or the learned key/value bias."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.95))


def _autocast(cfg: TrainConfig, device: torch.device):
    enabled = cfg.precision == "bf16-autocast"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits  # [B, T, V]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, cfg: TrainConfig, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), cfg.optim.batch_size):
        ids = windows[i: i + cfg.optim.batch_size].to(device)
        with _autocast(cfg, device):
            total += _loss(model, ids).item() * len(ids)
    model.train()
    return total / len(windows)


def _save_checkpoint(vdir: Path, model, opt, step: int, tlog: TrainLog) -> None:
    tmp = vdir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "trainer.pt")
    (tmp / "log.json").write_text(json.dumps(tlog.to_json()))
    old = vdir / "checkpoint"
    shutil.rmtree(old, ignore_errors=True)
    tmp.rename(old)  # the previous checkpoint is replaced only once the new one is complete


def _resume(vdir: Path, model, opt, device: torch.device) -> tuple[int, TrainLog]:
    ck = vdir / "checkpoint"
    if not (ck / "trainer.pt").exists():
        return 0, TrainLog()
    from safetensors.torch import load_file

    state = load_file(str(ck / "model" / "model.safetensors"), device=str(device))
    res = model.load_state_dict(state, strict=False)  # the tied lm_head.weight is not stored
    if res.unexpected_keys or set(res.missing_keys) - {"lm_head.weight"}:
        raise QuantbenchError(f"checkpoint {ck} does not match the configured model "
                              f"(missing {res.missing_keys[:3]}, unexpected {res.unexpected_keys[:3]}); delete it to restart")
    model.tie_weights()
    st = torch.load(ck / "trainer.pt", map_location=device)
    opt.load_state_dict(st["optimizer"])
    return int(st["step"]), TrainLog.from_json(json.loads((ck / "log.json").read_text()))


@dataclass
class Trainer:
    cfg: TrainConfig
    variant: str
    data: TokenData
    tokenizer: object
    vdir: Path
    device: torch.device
    on_step: Callable[[int], None] | None = None  # called after each finished step (tests interrupt here)

    def run(self) -> TrainLog:
        final = self.vdir / "final"
        if (final / "done.json").exists():
            return TrainLog.from_json(json.loads((self.vdir / "log.json").read_text()))
        self.vdir.mkdir(parents=True, exist_ok=True)
        model = build_model(self.cfg, self.variant, self.tokenizer).to(self.device)
        opt = make_optimizer(model, self.cfg)
        start, tlog = _resume(self.vdir, model, opt, self.device)
        tlog.n_params = sum(p.numel() for p in model.parameters())
        if start:
            log(f"{self.variant}: resuming at step {start}/{self.cfg.optim.steps}")
        self._loop(model, opt, start, tlog)
        self._finish(model, tlog)
        return tlog

    def _loop(self, model, opt, start: int, tlog: TrainLog) -> None:
        c, o = self.cfg, self.cfg.optim
        step_model = _compiled(model) if c.compile else model
        windows = self.data.heldout_windows(c.data.heldout_windows, c.model.context)
        tok_per_step = o.batch_size * c.model.context
        model.train()
        t0 = time.perf_counter() - tlog.seconds
        for step in range(start, o.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, c)
            ids = self.data.batch(step, o.batch_size, c.model.context, c.seed).to(self.device)
            try:
                with _autocast(c, self.device):
                    loss = _loss(step_model, ids)
            except Exception as e:  # noqa: BLE001 - torch.compile fails lazily, at the first call
                if step_model is model:
                    raise
                log(f"torch.compile failed ({type(e).__name__}: {str(e)[:120]}); training uncompiled")
                step_model = model
                with _autocast(c, self.device):
                    loss = _loss(model, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            done = step + 1
            tlog.train.append([done, done * tok_per_step, float(loss.item())])
            if done % o.eval_every == 0 or done == o.steps:
                tlog.heldout.append([done, done * tok_per_step, heldout_loss(model, windows, c, self.device)])
                log(f"{self.variant}: step {done}/{o.steps} train {loss.item():.3f} held-out {tlog.heldout[-1][2]:.3f}")
            tlog.seconds = time.perf_counter() - t0
            if done % o.ckpt_every == 0 and done < o.steps:
                _save_checkpoint(self.vdir, model, opt, done, tlog)
            if self.on_step is not None:
                self.on_step(done)

    def _finish(self, model, tlog: TrainLog) -> None:
        final = self.vdir / "final"
        shutil.rmtree(final, ignore_errors=True)
        model.eval()
        model.save_pretrained(final)
        self.tokenizer.save_pretrained(final)
        (self.vdir / "log.json").write_text(json.dumps(tlog.to_json()))
        (final / "done.json").write_text(json.dumps({"steps": self.cfg.optim.steps, "variant": self.variant}))
        shutil.rmtree(self.vdir / "checkpoint", ignore_errors=True)


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile where it exists; failures at the first call fall back to eager (see _loop)."""
    try:
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001 - compile is an optimisation; fall back to eager
        log(f"torch.compile unavailable ({type(e).__name__}); training uncompiled")
        return model
