"""The layer-by-layer runner (quant/sequential.py) and sequential GPTQ.

References: the model's own forward (the runner must reproduce every layer's inputs bit for bit
when nothing is changed), and a brute-force sequential GPTQ written here (quantize layer 0 from FP
inputs, recompute layer 1's inputs by running the whole partially quantized model, and so on)."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import tiny_model

from quantbench.core.errors import QuantbenchError
from quantbench.modeling.surgery import get_weight, set_weight
from quantbench.quant.apply import apply_recipe, prepare
from quantbench.quant.calibration import StatsRequest, collect_input_stats
from quantbench.quant.mitigations.gptq import gptq_quantize
from quantbench.quant.sequential import run_sequential
from quantbench.quant.spec import MitigationSpec, QuantSpec, Recipe

CPU = torch.device("cpu")


def _tokens(n: int = 6, t: int = 24, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _layer_io(model, ids: torch.Tensor, batch_size: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The model's own forward: per layer, per batch, the hidden states each decoder layer receives;
    and the last layer's outputs per batch."""
    from quantbench.modeling.arch import decoder_layers

    layers = decoder_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    last: list[torch.Tensor] = []
    hs = [layer.register_forward_pre_hook(lambda _m, a, k, i=i: seen[i].append(a[0] if a else k["hidden_states"]),
                                          with_kwargs=True) for i, layer in enumerate(layers)]
    hs.append(layers[-1].register_forward_hook(lambda _m, _a, out: last.append(out[0] if isinstance(out, tuple)
                                                                                else out)))
    with torch.no_grad():
        for b in range(0, len(ids), batch_size):
            model(input_ids=ids[b: b + batch_size])
    for h in hs:
        h.remove()
    return seen, last


def _qwen2_mixed_attention():
    """Qwen2 with sliding-window layers after the first: layers get different masks by kind."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=6, max_window_layers=1)
    cfg._attn_implementation = "eager"
    return tf.Qwen2ForCausalLM(cfg).eval()


def _quantbench_lm():
    """Our own trainable family (quantbench.train.modeling): layers called as layer(x, cos, sin)."""
    from quantbench.train.modeling import QuantbenchLMConfig, QuantbenchLMForCausalLM

    torch.manual_seed(0)
    cfg = QuantbenchLMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    return QuantbenchLMForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "llama-sdpa", "gpt2", "opt", "qwen2-sliding", "quantbench_lm"])
def test_runner_reproduces_the_fp_model_layer_inputs_exactly(kind):
    if kind == "qwen2-sliding":
        model = _qwen2_mixed_attention()
        assert len(set(model.config.layer_types)) == 2
    elif kind == "quantbench_lm":
        model = _quantbench_lm()
    else:
        model = tiny_model(kind.split("-")[0], layers=3, attn_implementation="sdpa" if "sdpa" in kind else "eager")
    ids = _tokens()
    seen, last = _layer_io(model, ids, batch_size=4)
    got: list[list[torch.Tensor]] = []
    out = run_sequential(model, ids, 4, CPU, lambda step: got.append(list(step.inputs.hidden)), keep_last=True)
    assert len(got) == len(seen)
    for i, (a, b) in enumerate(zip(got, seen)):
        assert len(a) == len(b) == 2  # batches of 4 and 2
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"layer {i} inputs differ"
    assert all(torch.equal(x, y) for x, y in zip(out, last))


def test_runner_holds_one_layer_of_inputs():
    model = tiny_model("llama", layers=4)
    ids = _tokens(n=8)
    refs: list[list[weakref.ref]] = []
    alive_before: list[int] = []

    def on_layer(step):
        gc.collect()
        alive_before.append(sum(r() is not None for prev in refs for r in prev))  # earlier layers' inputs
        assert step.inputs.n_tensors() == 4  # 8 sequences in batches of 2
        refs.append([weakref.ref(h) for h in step.inputs.hidden])

    run_sequential(model, ids, 2, CPU, on_layer)
    assert alive_before == [0, 0, 0, 0]


def _brute_force_sequential(model, ids, spec, batch_size, token_norm):
    """Layer i's Hessians from a full forward of the model whose layers < i are already quantized."""
    req = StatsRequest(samples=len(ids), gram=True, token_norm=token_norm)
    for i, layer in enumerate(model.model.layers):
        mods = {f"model.layers.{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        grams = collect_input_stats(model, mods, ids, batch_size, CPU, req)
        for name, mod in mods.items():
            qt = gptq_quantize(get_weight(mod), grams[name].gram, spec)
            set_weight(mod, qt.dequantize())
    return model


@pytest.mark.parametrize("spec,token_norm", [(QuantSpec(bits=4, granularity="group", group_size=16), True),
                                             (QuantSpec(bits=3, granularity="channel", symmetric=False), False)])
def test_sequential_gptq_equals_brute_force(spec, token_norm):
    model = tiny_model("llama", layers=3)
    ids = _tokens(n=6)
    expected = _brute_force_sequential(copy.deepcopy(model), ids, spec, 4, token_norm)

    def recipe(sequential: bool) -> Recipe:
        opts = {"sequential": sequential, "token_norm": token_norm, "calib_samples": 6}
        return Recipe(name="g", weights=spec, mitigations=(MitigationSpec(name="gptq", options=opts),))

    seq, applied = apply_recipe(copy.deepcopy(model), recipe(True), ids, CPU, batch_size=4)
    par, _ = apply_recipe(copy.deepcopy(model), recipe(False), ids, CPU, batch_size=4)
    assert len(applied.effects.final_weights) == 21  # 7 linears x 3 layers
    for name, qt in applied.effects.final_weights.items():
        assert torch.equal(qt.dequantize(), expected.get_submodule(name).weight), name
    # not trivially equal: from layer 1 on, parallel GPTQ (FP inputs) gives other weights
    w = "model.layers.2.mlp.down_proj"
    assert not torch.equal(seq.get_submodule(w).weight, par.get_submodule(w).weight)
    assert torch.equal(seq.get_submodule("model.layers.0.mlp.down_proj").weight,
                       par.get_submodule("model.layers.0.mlp.down_proj").weight)


def test_sequential_needs_known_decoder_layers():
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, do_layer_norm_before=False)  # post-norm blocks: the tracer cannot map
    model = tf.OPTForCausalLM(cfg).eval()
    gptq = MitigationSpec(name="gptq", options={"sequential": True})
    r = Recipe(name="g", weights=QuantSpec(bits=4), mitigations=(gptq,))
    with pytest.raises(QuantbenchError, match="recipe 'g': gptq: sequential calibration .*'opt'.*false") as e:
        prepare(model, r)
    assert "\n" not in str(e.value)
    prepare(model, r.model_copy(update={"mitigations": (MitigationSpec(name="gptq", options={"sequential": False}),)}))
