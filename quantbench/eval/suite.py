"""Everything measured on one model variant, prepared once per run.

`EvalSuite.reference(model)` scores the FP model and keeps what the variants are compared
with (its fp32 logits in a temporary file, its per-layer probe outputs, its task accuracies);
`score(model)` scores a variant. Both return an LMEval and a dict of extra row columns (word
perplexity, llama.cpp's KLD statistics (quantbench.eval.kld), per-layer error, attention drift, task
accuracy, peak memory, and the per-unit data that paired intervals need: unit_nll, unit_tokens,
unit_kl, unit_top1 per block of `ci_block` scored tokens, doc_acc:<task> / doc_acc_norm:<task> per
document).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core.log import log
from ..data.corpus import Windows
from .cost import peak_memory
from .downstream import LoadedTasks, TaskSettings, evaluate_tasks, load_tasks, task_columns
from .fidelity import LayerProbe, capture_probe, compare_to_probe
from .kld import fp_kld_columns, kld_columns
from .lm import DEFAULT_BLOCK, FPReference, LMEval, count_words, evaluate_lm


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
    reference_logp: FPReference | None = None  # FP logits on the scored positions (quantbench.eval.lm)
    task_metric: str = "acc"
    ci_block: int = DEFAULT_BLOCK  # scored tokens per bootstrap unit
    spill_dir: str | None = None  # where the FP reference file goes (None: $TMPDIR)
    kv_decode_chunk: int | None = None  # KV rows also scored with the cache filled this many tokens at a time

    @classmethod
    def prepare(cls, cfg, tokenizer, windows: Windows, device: torch.device) -> "EvalSuite":
        e, t = cfg.eval, cfg.tasks
        tasks = None
        if t.names:
            tasks = load_tasks(TaskSettings(tuple(t.names), t.limit, t.num_fewshot, t.batch_size, cfg.seed, t.include_path))
        if tasks is not None:
            log(f"tasks: {', '.join(tasks.settings.names)} (lm-eval {tasks.lm_eval_version}, limit {t.limit}, "
                f"{t.num_fewshot}-shot)")
        n_words = count_words(tokenizer, windows) if e.word_ppl else None
        block = e.ci_block
        return cls(windows, e.batch_size, device, tokenizer, n_words, e.probe_windows, tasks, task_metric=t.metric,
                   ci_block=block, kv_decode_chunk=e.kv_decode_chunk)

    def protocol(self) -> dict:
        p: dict = {"word_perplexity": "exp(total NLL / whitespace words of the scored text)",
                   "scored_words": self.n_words,
                   "layer_error": f"per-token relative squared error of each decoder layer output vs FP, "
                                  f"first {self.probe_windows} window(s)" if self.probe_windows else None,
                   "attention_drift": "mean over layers of the change in attention mass on the first key",
                   "kl_reference": "FP fp32 logits on every scored position (temporary file); "
                                   "KL = log1p(E_p[expm1(-u) + u]), u = centred logit difference",
                   "kld_report": "kld_median/p99/p999/max over per-token KL: sorted values, linear interpolation "
                                 "at q(N-1) as llama.cpp's perplexity --kl-divergence; dp_rms = sqrt(mean((p_q - "
                                 "p_fp)^2)) of the target token; same top p = top1",
                   "interval_units": f"blocks of {self.ci_block} consecutive scored tokens within a window; "
                                     "documents for tasks",
                   "intervals": "95%; paired percentile bootstrap over blocks (2000 resamples, seed 0) for "
                                "delta_ppl and kl; Jeffreys-Dirichlet over the paired 2x2 document table for "
                                "task accuracy deltas (quantbench.eval.intervals)"}
        if self.kv_decode_chunk is not None:
            p["kv_decode"] = (f"rows with KV quantization: kv_decode_ppl with the KV cache filled {self.kv_decode_chunk} "
                              "token(s) at a time (decode order); kv_decode_delta_pct vs the row's whole-prefill ppl")
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
        return {**cols, "task_metric": self.task_metric, "tasks_s": round(time.perf_counter() - t0, 2)}

    def _extras(self, model: torch.nn.Module, res: LMEval, basis: torch.Tensor | None) -> dict:
        row: dict = {"word_ppl": res.word_ppl, **(kld_columns(*res.tokens.arrays()) if res.tokens else {})}
        if self.probe is not None:
            drift = compare_to_probe(model, self.probe, self.device, basis)
            row.update(drift.summary(), layer_rel_error=drift.rel_error, layer_sink=drift.sink)
        if self.tasks is not None:
            row.update(self._tasks(model))
        return row

    @staticmethod
    def _units(res: LMEval, fp: bool) -> dict:
        """Per-unit sums for paired intervals; the FP row's KL is 0 and its top-1 agreement total."""
        u = res.units
        if u is None:
            return {}
        return {"ci_block": u.block, "unit_tokens": u.tokens, "unit_nll": u.nll,
                "unit_kl": [0.0] * len(u.tokens) if fp else u.kl, "unit_top1": list(u.tokens) if fp else u.top1}

    def close(self) -> None:
        """Delete the FP reference file (it is also removed when the process exits)."""
        if self.reference_logp is not None:
            self.reference_logp.close()
            self.reference_logp = None

    def reference(self, model: torch.nn.Module) -> tuple[LMEval, dict]:
        self.close()
        with peak_memory(self.device) as mem:
            res, self.reference_logp = evaluate_lm(model, self.windows, self.batch_size, self.device,
                                                   keep_reference=True, n_words=self.n_words,
                                                   block=self.ci_block, spill_dir=self.spill_dir)
        if self.probe_windows:
            self.probe = capture_probe(model, self.windows.input_ids[: self.probe_windows], self.device)
        row: dict = {"word_ppl": res.word_ppl, **fp_kld_columns(), "peak_mem_mb": mem["peak_mem_mb"],
                     **self._units(res, fp=True)}
        if self.probe is not None:
            n = len(self.probe.outputs)
            row.update(layer_err_max=0.0, layer_err_worst=None, layer_err_last=0.0, sink_drift=0.0,
                       layer_rel_error=[0.0] * n, layer_sink=self.probe.sink)
        if self.tasks is not None:
            row.update(self._tasks(model))
        return res, row

    def _kv_decode(self, model: torch.nn.Module, res: LMEval) -> dict:
        """Perplexity with the KV cache filled kv_decode_chunk tokens at a time, vs the whole prefill (res)."""
        t0 = time.perf_counter()
        dec, _ = evaluate_lm(model, self.windows, self.batch_size, self.device, block=self.ci_block,
                             kv_chunk=self.kv_decode_chunk)
        delta = 100 * (dec.ppl / res.ppl - 1)
        log(f"  decode order (chunk {self.kv_decode_chunk}, {time.perf_counter() - t0:.1f}s): ppl {dec.ppl:.4f} "
            f"({delta:+.3f}% vs whole prefill)")
        return {"kv_decode_ppl": dec.ppl, "kv_decode_delta_pct": delta}

    def score(self, model: torch.nn.Module, effects=None, kv: bool = False) -> tuple[LMEval, dict]:
        """Score a variant; `effects` (quant.effects.Effects) tells in which basis its residual lives; `kv`:
        the recipe quantizes the KV cache (scored in decode order too when kv_decode_chunk is set)."""
        with peak_memory(self.device) as mem:
            res, _ = evaluate_lm(model, self.windows, self.batch_size, self.device,
                                 reference=self.reference_logp, n_words=self.n_words, block=self.ci_block)
        basis = getattr(effects, "residual_basis", None)
        dec = self._kv_decode(model, res) if kv and self.kv_decode_chunk is not None else {}
        return res, {**self._extras(model, res, basis), "peak_mem_mb": mem["peak_mem_mb"],
                     **self._units(res, fp=False), **dec}
