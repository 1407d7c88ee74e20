"""Perplexity, word perplexity and fidelity against independent computations on tiny models."""
from __future__ import annotations

import math

import torch
from conftest import tiny_model

from quantbench.data.corpus import Windows
from quantbench.eval.fidelity import capture_probe, compare_to_probe
from quantbench.eval.lm import count_words, evaluate_lm

CPU = torch.device("cpu")


def _ids(b: int = 3, t: int = 32) -> torch.Tensor:
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(1))


def test_perplexity_equals_hf_labels_loss():
    model = tiny_model("llama")
    ids = _ids()
    res, _ = evaluate_lm(model, Windows(ids, torch.zeros(3, dtype=torch.long), {}), batch_size=2, device=CPU)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean NLL over all B*(T-1) targets
    assert res.n_tokens == 3 * 31
    assert math.isclose(res.nll, loss, rel_tol=1e-5)
    assert math.isclose(res.ppl, math.exp(loss), rel_tol=1e-5)


def test_strided_windows_score_only_the_last_targets_like_masked_labels():
    model = tiny_model("gpt2")
    ids = _ids()
    starts = torch.tensor([0, 10, 20])
    res, _ = evaluate_lm(model, Windows(ids, starts, {}), batch_size=3, device=CPU)
    labels = ids.clone()
    for i, s in enumerate(starts.tolist()):
        labels[i, : s + 1] = -100  # target j (= position j-1's prediction) is scored iff j - 1 >= s
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
    assert res.n_tokens == int((labels != -100).sum())
    assert math.isclose(res.nll, loss, rel_tol=1e-5)


def test_fidelity_to_itself_is_perfect_and_to_another_model_is_not():
    ids = _ids()
    w = Windows(ids, torch.zeros(3, dtype=torch.long), {})
    model = tiny_model("llama")
    _, ref = evaluate_lm(model, w, batch_size=3, device=CPU, keep_reference=True)
    same, _ = evaluate_lm(model, w, batch_size=3, device=CPU, reference=ref)
    other_model = tiny_model("llama", seed=1)
    other, _ = evaluate_lm(other_model, w, batch_size=3, device=CPU, reference=ref)
    assert same.kl == 0.0 and same.top1 == 1.0  # the fp32 reference reproduces itself exactly
    with torch.no_grad():  # KL(P_fp || P_other) over all B*(T-1) positions, in float64
        lp = model(input_ids=ids).logits[:, :-1].double().log_softmax(-1)
        lo = other_model(input_ids=ids).logits[:, :-1].double().log_softmax(-1)
    want = (lp.exp() * (lp - lo)).sum(-1).mean().item()
    assert want > 0.01 and other.top1 < 1.0
    assert math.isclose(other.kl, want, rel_tol=1e-6)  # observed relative error 5.7e-10


class _WordTok:
    """A tokenizer whose tokens are words: decode joins them with spaces."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_word_perplexity_uses_the_scored_word_count():
    ids = _ids(2, 16)
    w = Windows(ids, torch.tensor([0, 5]), {})
    n_words = count_words(_WordTok(), w)
    assert n_words == 15 + 10  # one word per scored target
    res, _ = evaluate_lm(tiny_model("opt"), w, batch_size=2, device=CPU, n_words=n_words)
    assert math.isclose(res.word_ppl, math.exp(res.nll * res.n_tokens / n_words), rel_tol=1e-9)


def test_layer_probe_is_zero_for_the_same_model_and_locates_a_perturbed_layer():
    model = tiny_model("llama", layers=3)
    ids = _ids(1, 24)
    probe = capture_probe(model, ids, CPU)
    same = compare_to_probe(model, probe, CPU)
    assert max(same.rel_error) < 1e-10 and abs(same.sink_drift) < 1e-6
    assert all(0.0 < s < 1.0 for s in probe.sink)  # eager attention gave probabilities
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    drift = compare_to_probe(model, probe, CPU)
    assert drift.rel_error[0] < 1e-10  # layers before the change are untouched
    assert drift.rel_error[1] > 1e-3 and drift.summary()["layer_err_worst"] in (1, 2)


def test_hub_corpora_fail_offline_with_one_clear_line():
    import pytest

    from quantbench.core.errors import QuantbenchError
    from quantbench.data.corpus import load_corpus

    for name in ("wikitext2", "c4"):
        with pytest.raises(QuantbenchError) as e:
            load_corpus(name)
        msg = str(e.value)
        assert "\n" not in msg and f"cannot load corpus '{name}' from the Hugging Face hub" in msg


def test_layer_error_of_a_rotated_model_is_measured_in_the_fp_basis():
    """Rotation (no quantization) keeps the function: per-layer error must be ~0, not the basis change."""
    import copy

    from conftest import tiny_model

    from quantbench.eval.fidelity import capture_probe, compare_to_probe
    from quantbench.quant.apply import apply_recipe
    from quantbench.quant.spec import MitigationSpec, Recipe

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    probe = capture_probe(model, ids, torch.device("cpu"))
    rotated, applied = apply_recipe(copy.deepcopy(model), Recipe(name="rot", mitigations=(MitigationSpec(name="rotate"),)),
                                    ids, torch.device("cpu"))
    drift = compare_to_probe(rotated, probe, torch.device("cpu"), applied.effects.residual_basis)
    assert max(drift.rel_error) < 1e-6
