"""Everything measured on one model variant, prepared once per run.

`EvalSuite.reference(model)` scores the FP model and keeps what the variants are compared
with (its log-probs, its per-layer probe outputs, its task accuracies); `score(model)` scores a
variant. Both return an LMEval and a dict of extra row columns (word perplexity, per-layer
error, attention drift, task accuracy, peak memory).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..data import Windows
from ..log import log
from .cost import peak_memory
from .downstream import LoadedTasks, TaskSettings, evaluate_tasks, load_tasks, task_columns
from .fidelity import LayerProbe, capture_probe, compare_to_probe
from .lm import LMEval, RefBatch, count_words, evaluate_lm


@dataclass
class EvalSuite:
    windows: Windows
    batch_size: int
    device: torch.device
    tokenizer: object
    n_words: int | None = None
    probe_windows: int = 1
    tasks: LoadedTasks | None = None
    probe: LayerProbe | None = None
    reference_logp: list[RefBatch] | None = None  # FP reference per batch (quantbench.eval.lm)
    task_metric: str = "acc"

    @classmethod
    def prepare(cls, cfg, tokenizer, windows: Windows, device: torch.device) -> "EvalSuite":
        e, t = cfg.eval, cfg.tasks
        tasks = None
        if t.names:
            tasks = load_tasks(TaskSettings(tuple(t.names), t.limit, t.num_fewshot, t.batch_size, cfg.seed, t.include_path))
            log(f"tasks: {', '.join(t.names)} (lm-eval {tasks.lm_eval_version}, limit {t.limit}, "
                 f"{t.num_fewshot}-shot)")
        n_words = count_words(tokenizer, windows) if e.word_ppl else None
        return cls(windows, e.batch_size, device, tokenizer, n_words, e.probe_windows, tasks, task_metric=t.metric)

    def protocol(self) -> dict:
        p: dict = {"word_perplexity": "exp(total NLL / whitespace words of the scored text)",
                   "scored_words": self.n_words,
                   "layer_error": f"per-token relative squared error of each decoder layer output vs FP, "
                                  f"first {self.probe_windows} window(s)" if self.probe_windows else None,
                   "attention_drift": "mean over layers of the change in attention mass on the first key"}
        if self.tasks is not None:
            s = self.tasks.settings
            p["tasks"] = {"names": list(s.names), "limit": s.limit, "num_fewshot": s.num_fewshot,
                          "fewshot_seed": s.seed, "lm_eval": self.tasks.lm_eval_version,
                          "adapter": "lm_eval HFLM(pretrained=<model in memory>, tokenizer=<tokenizer>)"}
        return p

    def _tasks(self, model: torch.nn.Module) -> dict:
        t0 = time.perf_counter()
        cols = task_columns(evaluate_tasks(model, self.tokenizer, self.tasks, self.device), self.task_metric)
        accs = ", ".join(f"{k[4:]} {v:.3f}" for k, v in cols.items() if k.startswith("acc:") and v is not None)
        log(f"  tasks ({time.perf_counter() - t0:.1f}s): {accs}")
        return {**cols, "tasks_s": round(time.perf_counter() - t0, 2)}

    def _extras(self, model: torch.nn.Module, res: LMEval, basis: torch.Tensor | None) -> dict:
        row: dict = {"word_ppl": res.word_ppl}
        if self.probe is not None:
            drift = compare_to_probe(model, self.probe, self.device, basis)
            row.update(drift.summary(), layer_rel_error=drift.rel_error, layer_sink=drift.sink)
        if self.tasks is not None:
            row.update(self._tasks(model))
        return row

    def reference(self, model: torch.nn.Module) -> tuple[LMEval, dict]:
        with peak_memory(self.device) as mem:
            res, self.reference_logp = evaluate_lm(model, self.windows, self.batch_size, self.device,
                                                   keep_reference=True, n_words=self.n_words)
        if self.probe_windows:
            self.probe = capture_probe(model, self.windows.input_ids[: self.probe_windows], self.device)
        row: dict = {"word_ppl": res.word_ppl, "peak_mem_mb": mem["peak_mem_mb"]}
        if self.probe is not None:
            n = len(self.probe.outputs)
            row.update(layer_err_max=0.0, layer_err_worst=None, layer_err_last=0.0, sink_drift=0.0,
                       layer_rel_error=[0.0] * n, layer_sink=self.probe.sink)
        if self.tasks is not None:
            row.update(self._tasks(model))
        return res, row

    def score(self, model: torch.nn.Module, effects=None) -> tuple[LMEval, dict]:
        """Score a variant; `effects` (quant.effects.Effects) tells in which basis its residual lives."""
        with peak_memory(self.device) as mem:
            res, _ = evaluate_lm(model, self.windows, self.batch_size, self.device,
                                 reference=self.reference_logp, n_words=self.n_words)
        basis = getattr(effects, "residual_basis", None)
        return res, {**self._extras(model, res, basis), "peak_mem_mb": mem["peak_mem_mb"]}
