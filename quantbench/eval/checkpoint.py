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

from ..core.errors import QuantbenchError
from .downstream import LoadedTasks, _quiet_lm_eval, score_lm

BACKENDS = ("vllm", "hf")


class BackendMissing(QuantbenchError):
    """The scoring backend's package is not installed here."""


def vllm_available() -> bool:
    return find_spec("vllm") is not None


DTYPES = ("auto", "bfloat16", "float16", "float32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _folder(path: str | Path) -> Path:
    """A folder lm-eval can load: config.json that parses, and tokenizer files (one line otherwise)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise QuantbenchError(f"checkpoint folder not found: {p}")
    if not (p / "config.json").is_file():
        if any(p.glob("*.gguf")):
            raise QuantbenchError(f"{p} is a GGUF export: its perplexity is measured by llama.cpp at export "
                                  "(export_llama_cpp_* columns); score takes Hugging Face folders")
        what = "is empty" if not any(p.iterdir()) else "has no config.json"
        raise QuantbenchError(f"{p} {what}: not a checkpoint folder; give an export folder "
                              "(results/<run>/export/<recipe>) or an HF model folder")
    try:
        import json

        json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise QuantbenchError(f"{p / 'config.json'} is damaged ({type(e).__name__}); re-export or re-save the model") from None
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise QuantbenchError(f"{p} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
                              "beside the model (tokenizer.save_pretrained)")
    return p


def check_request(path: str | Path, backend: str, dtype: str, limit: int | None, tensor_parallel_size: int) -> None:
    """Every option of `quantbench score` checked before any work (one line each)."""
    if limit is not None and limit < 1:
        raise QuantbenchError(f"--limit: must be at least 1 document per task (or left out for all), got {limit}")
    if dtype not in DTYPES:
        raise QuantbenchError(f"--dtype: unknown dtype '{dtype}' (choose: {', '.join(DTYPES)})")
    if tensor_parallel_size < 1:
        raise QuantbenchError(f"--tensor-parallel-size: must be at least 1, got {tensor_parallel_size}")
    check_backend(backend)
    _folder(path)


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
        try:
            lm = HFLM(pretrained=str(folder), dtype=dtype, batch_size=s.batch_size, parallelize=gpu,
                      device="cuda" if gpu else "cpu")
        except (OSError, ValueError, KeyError) as e:  # files transformers cannot read
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise QuantbenchError(f"cannot load {folder} with transformers: {first}") from None
    return score_lm(lm, tasks)
