"""A small Llama-shaped decoder-only LM whose attention is one of quantbench.train.attention.VARIANTS.

Hugging Face compatible: `QuantbenchLMConfig` (model_type "quantbench_lm") and
`QuantbenchLMForCausalLM` are registered with AutoConfig / AutoModelForCausalLM on import, so a saved
checkpoint folder loads with `AutoModelForCausalLM.from_pretrained(folder)` and runs through the
census and the quantization sweep unchanged. Module names follow Llama (model.embed_tokens,
model.layers[i].input_layernorm / self_attn.{q,k,v,o}_proj / post_attention_layernorm /
mlp.{gate,up,down}_proj, model.norm, lm_head) so quantbench.modeling.arch's Llama row fits.
No KV cache: every forward sees the whole sequence (enough for perplexity, the census and lm-eval
loglikelihoods; `generate` works without a cache, slowly).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import VARIANTS, attention_class
from .attention.base import rope_tables

MODEL_TYPE = "quantbench_lm"


class QuantbenchLMConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 49152, hidden_size: int = 128, intermediate_size: int = 512,
                 num_hidden_layers: int = 4, num_attention_heads: int = 4, max_position_embeddings: int = 512,
                 attention: str = "softmax", clip_gamma: float = -0.03, clip_zeta: float = 1.0,
                 rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0, initializer_range: float = 0.02,
                 tie_word_embeddings: bool = True, **kwargs) -> None:
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.max_position_embeddings, self.attention = max_position_embeddings, attention
        self.clip_gamma, self.clip_zeta = clip_gamma, clip_zeta
        self.rms_norm_eps, self.rope_theta, self.initializer_range = rms_norm_eps, rope_theta, initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class QuantbenchMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: QuantbenchLMConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QuantbenchDecoderLayer(nn.Module):
    def __init__(self, config: QuantbenchLMConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = attention_class(config.attention)(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = QuantbenchMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] residual stream -> [B, T, D]."""
        a, _ = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class QuantbenchPreTrainedModel(PreTrainedModel):
    config_class = QuantbenchLMConfig
    config: QuantbenchLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["QuantbenchDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)

    def initialize_weights(self) -> None:
        """Generic init, then each attention variant's own init of its extra parameters (S_c ≡ 1 ...).
        transformers.initialization skips parameters loaded from a checkpoint, so loading is unaffected."""
        super().initialize_weights()
        for module in self.modules():
            if hasattr(module, "reset_variant_parameters"):
                module.reset_variant_parameters()


class QuantbenchModel(QuantbenchPreTrainedModel):
    def __init__(self, config: QuantbenchLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(QuantbenchDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> final normed hidden states [B, T, D]."""
        x = self.embed_tokens(input_ids)
        hd = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rope_tables(input_ids.shape[1], hd, self.config.rope_theta, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class QuantbenchLMForCausalLM(QuantbenchPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QuantbenchLMConfig) -> None:
        super().__init__(config)
        self.model = QuantbenchModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T, V]; loss = mean next-token CE when labels are given.
        Padding is not supported (no KV cache, no padding mask): an attention_mask must be all ones."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("quantbench_lm does not support padded batches (attention_mask must be all ones)")
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids}


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type 'quantbench_lm' (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, QuantbenchLMConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(QuantbenchLMConfig, QuantbenchLMForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["QuantbenchLMConfig", "QuantbenchLMForCausalLM", "MODEL_TYPE", "VARIANTS", "register"]
