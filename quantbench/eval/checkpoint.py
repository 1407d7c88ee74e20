"""Downstream tasks on a checkpoint folder (an exported recipe, or any HF model folder), at scale:

- backend `vllm`: lm-eval's vLLM backend (`lm_eval.models.vllm_causallms.VLLM`), which loads the
  folder with vLLM's own loader, so a compressed-tensors export is scored by the runtime users ship
  (tensor parallel over `tensor_parallel_size` GPUs);
- backend `hf`: lm-eval's HFLM loading the folder with `parallelize=True` (an accelerate device map
  over every visible GPU, offloading what does not fit).

Same tasks, limit, few-shot and seed as a run (quantbench.eval.downstream), so the scores are
comparable with the run's rows.
"""
from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from ..errors import QuantbenchError
from .downstream import LoadedTasks, _quiet_lm_eval, score_lm

BACKENDS = ("vllm", "hf")


class BackendMissing(QuantbenchError):
    """The scoring backend's package is not installed here."""


def vllm_available() -> bool:
    return find_spec("vllm") is not None


def _folder(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise QuantbenchError(f"{p} is not a checkpoint folder (no config.json); give an export folder "
                              "(results/<run>/export/<recipe>) or an HF model folder")
    return p


def check_backend(backend: str) -> None:
    """One line when `backend` is unknown or its package is missing (before any work)."""
    if backend not in BACKENDS:
        raise QuantbenchError(f"unknown scoring backend '{backend}' (choose: {', '.join(BACKENDS)})")
    if backend == "vllm" and not vllm_available():
        raise BackendMissing("vllm not installed: `pip install vllm` on a CUDA machine to score checkpoints with "
                             "lm-eval's vLLM backend, or use --backend hf")


def score_checkpoint(path: str | Path, tasks: LoadedTasks, backend: str = "vllm", dtype: str = "auto",
                     tensor_parallel_size: int = 1, max_model_len: int | None = None) -> dict[str, dict]:
    """{task: metrics} of the checkpoint folder `path` through lm-eval's `backend`."""
    check_backend(backend)
    folder = _folder(path)
    _quiet_lm_eval()
    s = tasks.settings
    if backend == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        lm = VLLM(pretrained=str(folder), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                  batch_size="auto", max_model_len=max_model_len, seed=s.seed)
    else:
        import torch
        from lm_eval.models.huggingface import HFLM

        gpu = torch.cuda.is_available()  # parallelize: accelerate's device map over the GPUs, offload beyond
        lm = HFLM(pretrained=str(folder), dtype=dtype, batch_size=s.batch_size, parallelize=gpu,
                  device="cuda" if gpu else "cpu")
    return score_lm(lm, tasks)
