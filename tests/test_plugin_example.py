"""The worked example of docs/architecture.md ("Adding a mitigation") is real: its code block, run as
a module of quantbench.quant.mitigations, registers a mitigation that works in a recipe, has typed
options, keeps its channels out of the quantizer and is counted in the size."""
from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from quantbench.core.errors import ConfigError
from quantbench.quant.apply import apply_recipe
from quantbench.quant.spec import MITIGATIONS, MitigationSpec, QuantSpec, Recipe
from quantbench.run.config import parse_config

DOC = Path(__file__).parents[1] / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def example():
    code = re.search(r"```python\n(# quantbench/quant/mitigations/keep_hot_channels\.py.*?)```", DOC.read_text(), re.S)
    assert code, "the worked example is missing from docs/architecture.md"
    name = "quantbench.quant.mitigations._doc_example"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "quantbench.quant.mitigations"
    sys.modules[name] = mod
    exec(compile(code.group(1), str(DOC), "exec"), mod.__dict__)
    yield mod
    MITIGATIONS._items.pop("keep_hot_channels", None)
    sys.modules.pop(name, None)


def test_the_documented_mitigation_works_end_to_end(example, tokens):
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].post_attention_layernorm.weight[5] = 300.0  # a hot MLP input channel
    a8 = QuantSpec(bits=8, granularity="tensor", dynamic=False)
    plain = Recipe(name="p", weights=QuantSpec(bits=8), activations=a8)
    hot = plain.model_copy(update={"name": "h", "mitigations": (MitigationSpec(name="keep_hot_channels",
                                                                              options={"limit": 50}),)})
    ref = m(input_ids=tokens).logits
    qp, ap = apply_recipe(copy.deepcopy(m), plain, tokens)
    qh, ah = apply_recipe(copy.deepcopy(m), hot, tokens)
    up = "model.layers.0.mlp.up_proj"
    kept = ah.effects.keep[up][0].cols
    assert kept[5] and kept.sum() == 1  # exactly the planted channel
    x = torch.randn(2, 4, kept.numel())
    x[..., 5] = 1000.0
    assert torch.equal(qh.get_submodule(up).quant_input(x)[..., 5], x[..., 5])  # kept out of the quantizer
    with torch.no_grad():
        err = [(q(input_ids=tokens).logits - ref).pow(2).mean() for q in (qp, qh)]
    assert err[1] < err[0]
    assert ah.size.per_linear[up] == ap.size.per_linear[up] + kept.numel()  # the bitmask is paid for


def test_the_documented_mitigation_has_typed_options(example):
    with pytest.raises(ConfigError, match="did you mean 'limit'"):
        parse_config({"recipes": [{"name": "x", "weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "token"},
                                   "mitigations": [{"name": "keep_hot_channels", "options": {"limt": 3}}]}]})
