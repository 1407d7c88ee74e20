"""Simulated quantization of whole tiny models of every family (Linear and GPT-2 Conv1D)."""
import copy

import pytest
import torch

from quantbench.modeling.surgery import linear_modules
from quantbench.quant.apply import apply_recipe
from quantbench.quant.qlinear import QuantLinear
from quantbench.quant.recipes import PRESETS


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("name, max_rel", [("w8a8-token", 0.05), ("w8a16", 0.02), ("w8a8-tensor-static", 0.1)])
def test_every_linear_is_swapped_and_error_is_bounded(tiny, tokens, name, max_rel):
    recipe = PRESETS[name]
    n_targets = len(linear_modules(tiny, recipe.exclude))
    q, _ = apply_recipe(copy.deepcopy(tiny), recipe, tokens, torch.device("cpu"))
    swapped = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(swapped) == n_targets > 0
    assert not any(n.endswith("lm_head") for n, m in q.named_modules() if isinstance(m, QuantLinear))
    ref, out = _logits(tiny, tokens), _logits(q, tokens)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < max_rel, rel


def test_fewer_bits_means_more_error(tiny, tokens):
    ref = _logits(tiny, tokens)
    errs = []
    for bits in (8, 6, 4, 3):
        r = PRESETS["w8a16"].model_copy(update={"name": f"w{bits}", "weights": PRESETS["w8a16"].weights.model_copy(
            update={"bits": bits})})
        q, _ = apply_recipe(copy.deepcopy(tiny), r, tokens, torch.device("cpu"))
        errs.append(((_logits(q, tokens) - ref).norm() / ref.norm()).item())
    assert errs == sorted(errs), errs
