"""`quantbench_retrofit`: a LlamaForCausalLM whose attention layers carry one graft
(quantbench.train.retrofit.grafts). Registered with AutoConfig / AutoModelForCausalLM on import, so a
saved variant loads with `from_pretrained(folder)` and runs through `quantbench run` like any Llama
(module names are Llama's; the graft adds parameters inside `self_attn`).
`graft(base, name)` builds it from a loaded pretrained Llama with the step-0 graft."""
from __future__ import annotations

import torch.nn as nn
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ...core.errors import QuantbenchError
from .grafts import GRAFTS, GraftedAttention, graft_class

MODEL_TYPE = "quantbench_retrofit"
CONTROL = "control"  # the unchanged pretrained model, trained the same way
_PRETRAINED = ("q_proj", "k_proj", "v_proj", "o_proj")  # the pretrained attention's own children
_NOT_CONFIG = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "dtype",
               "torch_dtype", "quantization_config")


@strict
class RetrofitLMConfig(LlamaConfig):
    model_type = MODEL_TYPE
    graft: str = "kv_bias"
    sink_logit_init: float = -10.0  # kv_bias: the slot's logit bias at step 0 (its mass ≈ e^b / Σ e^s)
    gate_bias_init: float = 0.0  # gated: gate = sigmoid(b0) at step 0, compensated in o_proj


class RetrofitForCausalLM(LlamaForCausalLM):
    config_class = RetrofitLMConfig
    config: RetrofitLMConfig

    def __init__(self, config: RetrofitLMConfig) -> None:
        super().__init__(config)
        cls = graft_class(config.graft)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = cls(config, i)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GraftedAttention):
            module.reset_graft_parameters()


def graft_parameter_names(model: nn.Module) -> list[str]:
    """Parameters and buffers a graft adds (names in the model's state dict)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, GraftedAttention):
            out += [f"{name}.{k}" for k in mod.state_dict() if k.split(".")[0] not in _PRETRAINED]
    return out


def graft(base: nn.Module, name: str, **options) -> nn.Module:
    """A grafted copy of a pretrained LlamaForCausalLM (`name` = control returns `base` itself).
    options: RetrofitLMConfig fields (sink_logit_init, gate_bias_init)."""
    if name == CONTROL:
        return base
    if not isinstance(base, LlamaForCausalLM) or isinstance(base, RetrofitForCausalLM):
        raise QuantbenchError(f"retrofit grafts need a pretrained Llama model (LlamaForCausalLM), got "
                              f"{type(base).__name__} (model_type {getattr(base.config, 'model_type', '?')})")
    d = {k: v for k, v in base.config.to_dict().items() if k not in _NOT_CONFIG}
    cfg = RetrofitLMConfig(**{**d, "graft": name, **options})
    cfg._attn_implementation = base.config._attn_implementation
    p = next(base.parameters())
    model = RetrofitForCausalLM(cfg).to(device=p.device, dtype=p.dtype)
    res = model.load_state_dict(base.state_dict(), strict=False)
    added = set(graft_parameter_names(model))
    if res.unexpected_keys or set(res.missing_keys) - added:
        raise QuantbenchError(f"graft {name}: the grafted model does not match the pretrained one "
                              f"(missing {sorted(set(res.missing_keys) - added)[:3]}, unexpected {res.unexpected_keys[:3]})")
    for mod in model.modules():
        if isinstance(mod, GraftedAttention):
            mod.reset_graft_parameters()
            mod.compensate()
    return model.train(base.training)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type 'quantbench_retrofit' (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, RetrofitLMConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(RetrofitLMConfig, RetrofitForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["RetrofitLMConfig", "RetrofitForCausalLM", "GRAFTS", "CONTROL", "MODEL_TYPE", "graft",
           "graft_parameter_names", "register"]
