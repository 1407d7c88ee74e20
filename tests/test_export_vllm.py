"""`export_vllm`: vLLM scores the export's windows where vllm and a CUDA GPU are present, and says exactly
why not elsewhere (never a column that claims a measurement it did not make). vLLM cannot be installed on
CPU machines, so its call path runs here against a stand-in `vllm` package (below) that answers
`prompt_logprobs` from transformers; the perplexity is checked against transformers' own masked-label loss."""
from __future__ import annotations

import json
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from quantbench.data.corpus import Windows
from quantbench.export import runtime
from quantbench.export.vllm_probe import window_nll


def _windows() -> Windows:
    ids = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(4))
    return Windows(ids, torch.tensor([0, 5, 11]), {})


def _hf_nll(model, w: Windows) -> tuple[float, int]:
    """Summed NLL of the scored targets (target j iff j - 1 >= score_from), from transformers' loss."""
    total, count = 0.0, 0
    for row, s in zip(w.input_ids, w.score_from.tolist()):
        labels = row.clone()[None]
        labels[0, : s + 1] = -100
        n = int((labels != -100).sum())
        with torch.no_grad():
            total += model(input_ids=row[None], labels=labels).loss.item() * n
        count += n
    return total, count


def test_without_vllm_the_column_says_exactly_that(monkeypatch):
    monkeypatch.setattr(runtime, "find_spec", lambda name: None)
    assert runtime.vllm_eval("unused", _windows()) == {"export_vllm": "not measured: vllm not installed"}


def test_without_a_cuda_gpu_the_column_says_exactly_that(monkeypatch):
    monkeypatch.setattr(runtime, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.vllm_eval("unused", _windows()) == {
        "export_vllm": "not measured: no CUDA GPU visible (vLLM runs on CUDA)"}


def test_window_nll_of_prompt_logprobs_is_the_masked_label_loss():
    """Given vLLM-shaped prompt_logprobs (entry 0 None; entry j: {token: Logprob} holding the prompt
    token), the scored targets sum to transformers' loss over the same targets."""
    model, w = tiny_model("llama"), _windows()
    nll, count = 0.0, 0
    for row, s in zip(w.input_ids, w.score_from.tolist()):
        with torch.no_grad():
            lp = model(input_ids=row[None]).logits[0].double().log_softmax(-1)  # [T, V]
        toks = row.tolist()
        plp = [None] + [{toks[j]: SimpleNamespace(logprob=lp[j - 1, toks[j]].item()), -1: 0.0}
                        for j in range(1, len(toks))]
        a, b = window_nll(plp, toks, s)
        nll, count = nll + a, count + b
    want, want_count = _hf_nll(model, w)
    assert count == want_count == 23 + 18 + 12
    assert nll == pytest.approx(want, rel=1e-5)


FAKE_VLLM = '''
"""Stand-in for vLLM's offline API as quantbench.export.vllm_probe calls it (transformers underneath)."""
import json, os
import torch
from transformers import AutoModelForCausalLM

__version__ = "0.0-fake"


class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class _Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


class LLM:
    def __init__(self, model, **kw):
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.llm_engine = type("E", (), {"model_config": type("C", (), {"dtype": torch.float32})()})()
        with open(os.environ["FAKE_VLLM_LOG"], "w") as f:
            json.dump({"llm": {k: v for k, v in kw.items()}}, f)

    def generate(self, prompts, params, use_tqdm=True):
        assert params.kw["prompt_logprobs"] == 1 and params.kw["max_tokens"] == 1
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            with torch.no_grad():
                lp = self.model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            plp = [None] + [{ids[j]: _Logprob(lp[j - 1, ids[j]].item())} for j in range(1, len(ids))]
            outs.append(type("O", (), {"prompt_logprobs": plp})())
        return outs
'''


def test_vllm_scores_the_windows_in_a_child_process(tmp_path, monkeypatch):
    """The whole call path (windows file, child process, JSON, perplexity) with the stand-in vLLM and a
    pretend GPU: the perplexity is transformers' loss on the scored targets of the windows."""
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (pkg / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                   "    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "log.json"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (40 << 30, 80 << 30))
    model, w = tiny_model("llama"), _windows()
    model.save_pretrained(tmp_path / "ckpt")
    cols = runtime.vllm_eval(tmp_path / "ckpt", w)
    nll, count = _hf_nll(model, w)
    assert cols["export_vllm"] == "vLLM 0.0-fake (its loader and kernels, float32)"
    assert cols["export_vllm_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert cols["export_vllm_tok_s"] > 0
    llm_kw = json.loads((tmp_path / "log.json").read_text())["llm"]
    assert llm_kw["gpu_memory_utilization"] == 0.45 and llm_kw["max_model_len"] == 25  # 24 tokens + 1 sampled


def test_a_vllm_failure_is_one_not_measured_line(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (40 << 30, 80 << 30))
    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    cols = runtime.vllm_eval(tmp_path / "ckpt", _windows())
    assert cols == {"export_vllm": "not measured: vLLM failed here (ImportError: libcudart.so.12: cannot open "
                                   "shared object file)"}
