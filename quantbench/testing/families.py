"""Tiny random models of every causal-LM family quantbench lists as supported (transformers 5.24
configs): hidden 64, 2 layers, vocab 128, 4 heads (2 kv heads where the family has GQA), a few
experts. Used by the tests and by the coverage matrix (tools/architectures.py); they exercise each
family's quirks: Gemma's (1 + w) norms, scaled embeddings and sandwich norms, fused projections
(Phi-3, GPT-NeoX, Falcon, GPT-2), parallel blocks (Phi, Falcon, GPT-NeoX), Granite's multipliers,
tied and untied heads, grouped-query attention, mixtures of experts (Mixtral, Qwen2-MoE).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _dec(hidden: int, layers: int, vocab: int, **kw) -> dict:
    """Common decoder kwargs (Llama-style config names)."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **SPECIAL) | kw


def _configs(hidden: int, layers: int, vocab: int) -> dict[str, tuple[str, str, dict]]:
    hd = hidden // 4
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", _dec(hidden, layers, vocab, tie_word_embeddings=False)),
        "mistral": ("MistralConfig", "MistralForCausalLM", _dec(hidden, layers, vocab)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _dec(hidden, layers, vocab, tie_word_embeddings=True)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _dec(hidden, layers, vocab, head_dim=hd)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", _dec(hidden, layers, vocab, head_dim=hd)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _dec(hidden, layers, vocab, head_dim=hd)),
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", _dec(hidden, layers, vocab, head_dim=hd)),
        "phi": ("PhiConfig", "PhiForCausalLM", _dec(hidden, layers, vocab)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", _dec(hidden, layers, vocab)),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                                                       n_positions=256, **SPECIAL)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=256, **SPECIAL)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(
            vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden, **SPECIAL)),
        "falcon": ("FalconConfig", "FalconForCausalLM", dict(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, **SPECIAL)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _dec(hidden, layers, vocab)),
        "granite": ("GraniteConfig", "GraniteForCausalLM", _dec(
            hidden, layers, vocab, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
            logits_scaling=8.0)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", _dec(
            hidden, layers, vocab, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _dec(
            hidden, layers, vocab, moe_intermediate_size=hidden, shared_expert_intermediate_size=hidden,
            num_experts=4, num_experts_per_tok=2)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _dec(
            hidden, layers, vocab, moe_intermediate_size=hidden, num_experts=4, num_experts_per_tok=2, head_dim=hd)),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", _dec(  # MLA; layer 0 dense, then MoE
            hidden, layers, vocab, num_key_value_heads=4, moe_intermediate_size=hidden, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=hidden,
            q_lora_rank=hidden, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=hd, n_group=1, topk_group=1,
            rope_scaling=None)),
        "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _dec(hidden, layers, vocab)),
        "cohere": ("CohereConfig", "CohereForCausalLM", _dec(hidden, layers, vocab)),
        "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", _dec(
            hidden, layers, vocab, num_local_experts=4, num_experts_per_tok=2, head_dim=hd)),
    }


FAMILIES: tuple[str, ...] = tuple(_configs(64, 2, 128))


@torch.no_grad()
def perturb_vectors(model: nn.Module, seed: int = 0, amount: float = 0.3) -> None:
    """Norm weights and biases moved off their initial values (ones / zeros), so that folding a norm
    or a bias the wrong way shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.add_((torch.rand(p.shape, generator=gen) * 2 - 1).to(p) * amount)


def tiny_family(kind: str, seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128,
                attn_implementation: str = "eager", perturb: bool = True) -> nn.Module:
    """A tiny random causal LM of family `kind` (see FAMILIES), fp32, eval mode."""
    import transformers as tf

    cfgs = _configs(hidden, layers, vocab)
    if kind not in cfgs:
        raise ValueError(f"unknown family {kind!r}; known: {', '.join(cfgs)}")
    cfg_name, cls_name, kw = cfgs[kind]
    torch.manual_seed(seed)
    cfg = getattr(tf, cfg_name)(**kw)
    cfg._attn_implementation = attn_implementation
    model = getattr(tf, cls_name)(cfg).eval()
    if perturb:
        perturb_vectors(model, seed)
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {k: (lambda k=k, **kw: tiny_family(k, **kw)) for k in FAMILIES}
