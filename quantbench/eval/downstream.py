"""Downstream accuracy through lm-eval: `HFLM(pretrained=<model in memory>, tokenizer=<tok>)`.

Tasks are loaded once per run (the offline task pack is on lm-eval's include path; any other
name is an lm-eval task, which needs the hub) and evaluated on each model variant with the
same documents (`limit` takes the first N of the fixed, pre-shuffled order) and few-shot seed.
lm-eval's per-sample log (`log_samples=True`) gives each document's correctness, ordered by
doc_id, so two variants can be compared document by document (paired intervals, quantbench.eval.intervals).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..core.errors import QuantbenchError
from ..core.log import log
from ..data.taskpack import PACK_TASKS, ensure_task_pack, unavailable_tasks


@dataclass(frozen=True)
class TaskSettings:
    names: tuple[str, ...]
    limit: int | None = 100
    num_fewshot: int = 0
    batch_size: int = 16
    seed: int = 1234
    include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs


@dataclass
class LoadedTasks:
    settings: TaskSettings
    task_dict: Any  # lm-eval's {"tasks": ..., "groups": ...}
    lm_eval_version: str


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _local(folder: str | None, name: str) -> bool:
    if not folder:
        return False
    from pathlib import Path

    return any(f"task: {name}" in p.read_text() for p in Path(folder).glob("*.yaml"))


def _available(settings: TaskSettings) -> TaskSettings:
    """Drop the pack's optional tasks that could not be built (one line says which and why)."""
    if not any(n in PACK_TASKS for n in settings.names):
        return settings
    gone = unavailable_tasks(ensure_task_pack())
    left = [n for n in settings.names if n not in gone]
    for name in settings.names:
        if name in gone:
            log(f"task {name} left out: its optional source could not be fetched ({gone[name]}); "
                f"`quantbench assets fetch --force` tries again")
    return replace(settings, names=tuple(left))


def load_tasks(settings: TaskSettings) -> LoadedTasks | None:
    """Resolve task names once (pack tasks offline; others through lm-eval, which may need the hub).
    None when every task named was an optional pack task that could not be built."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    settings = _available(settings)
    if not settings.names:
        return None
    hub = [n for n in settings.names if n not in PACK_TASKS and not _local(settings.include_path, n)]
    include = [str(ensure_task_pack())] if any(n in PACK_TASKS for n in settings.names) else []
    if settings.include_path:
        include.append(settings.include_path)
    try:
        tm = TaskManager(include_path=include or None, include_defaults=bool(hub))
        loaded = tm.load(list(settings.names))
    except Exception as e:  # noqa: BLE001 - unknown task / unreachable hub dataset -> one line
        where = f"lm-eval task(s) {', '.join(hub)} need the Hugging Face hub or are unknown; " if hub else ""
        raise QuantbenchError(f"cannot load tasks {', '.join(settings.names)}: {where}{_one_line(e)} "
                              f"(offline task pack: {', '.join(PACK_TASKS)})") from None
    missing = [n for n in settings.names if n not in loaded["tasks"] and n not in loaded.get("groups", {})]
    if missing:
        raise QuantbenchError(f"unknown task(s): {', '.join(missing)} (offline task pack: {', '.join(PACK_TASKS)})")
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=settings.num_fewshot)
        task.set_fewshot_seed(seed=settings.seed)
    return LoadedTasks(settings, loaded, lm_eval.__version__)


def _metrics(res: dict, n_samples: dict, task: str) -> dict[str, float | int | None]:
    r = res.get(task, {})

    def num(key: str) -> float | None:
        v = r.get(key)
        return float(v) if isinstance(v, (int, float)) else None

    n = n_samples.get(task, {})
    return {"acc": num("acc,none"), "acc_stderr": num("acc_stderr,none"), "acc_norm": num("acc_norm,none"),
            "acc_norm_stderr": num("acc_norm_stderr,none"),
            "n": int(n.get("effective", 0)) if isinstance(n, dict) else None}


@torch.no_grad()
def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: LoadedTasks, device: torch.device) -> dict[str, dict]:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, seconds}} for one model variant."""
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    s = tasks.settings
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=s.batch_size, device=str(device))
    lm._device = input_device(model, device)  # HFLM takes model.device: meta for an offloaded model
    return score_lm(lm, tasks)


def score_lm(lm, tasks: LoadedTasks) -> dict[str, dict]:
    """Evaluate an lm-eval LM (HFLM, VLLM, ...) on the loaded tasks: {task: metrics + per-document}."""
    from lm_eval.evaluator import evaluate

    s = tasks.settings
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    out = evaluate(lm=lm, task_dict=tasks.task_dict, limit=s.limit, bootstrap_iters=100, log_samples=True)
    secs = time.perf_counter() - t0
    res, n_samples, samples = out["results"], out.get("n-samples", {}), out.get("samples") or {}
    return {t: {**_metrics(res, n_samples, t), **per_document(samples.get(t, [])), "seconds": round(secs / len(res), 2)}
            for t in tasks.task_dict["tasks"]}


def input_device(model: torch.nn.Module, default: torch.device) -> torch.device:
    """Where input ids go for a model placed with an accelerate device map (several GPUs, CPU or disk
    offload): the input embedding's execution device; else its weight's device; else `default`."""
    emb = model.get_input_embeddings()
    dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    w = getattr(emb, "weight", None)
    return w.device if w is not None and w.device.type != "meta" else default


def per_document(samples: list[dict]) -> dict[str, list[int]]:
    """lm-eval's logged samples of one task -> {"docs_acc": [0/1 per document], "docs_acc_norm": [...]},
    ordered by doc_id (the first filter's result when a task has several)."""
    by_doc: dict = {}
    for smp in samples:
        by_doc.setdefault(smp.get("doc_id"), smp)
    out: dict[str, list[int]] = {}
    for metric in ("acc", "acc_norm"):
        vals = [by_doc[k].get(metric) for k in sorted(by_doc)]
        if vals and all(isinstance(v, (int, float)) for v in vals):
            out[f"docs_{metric}"] = [int(round(float(v))) for v in vals]
    return out


def task_columns(results: dict[str, dict], metric: str = "acc") -> dict[str, float | int | None]:
    """Flatten per-task results into row columns: acc:<task>, acc_norm:<task>, acc_se:<task> (stderr of
    acc), n:<task> (documents scored), task_acc_mean (mean of `metric` over tasks), and the per-document
    lists doc_acc:<task> / doc_acc_norm:<task> (0/1 by doc_id, for paired intervals; kept out of CSV)."""
    row: dict[str, float | int | None] = {}
    vals = []
    for task, m in results.items():
        row[f"acc:{task}"] = m["acc"]
        row[f"acc_norm:{task}"] = m["acc_norm"]
        row[f"acc_se:{task}"] = m["acc_stderr"]
        row[f"n:{task}"] = m["n"]
        for name in ("acc", "acc_norm"):
            if m.get(f"docs_{name}") is not None:
                row[f"doc_{name}:{task}"] = m[f"docs_{name}"]
        if m.get(metric) is not None:
            vals.append(m[metric])
    row["task_acc_mean"] = sum(vals) / len(vals) if vals else None
    return row
