"""The size of the tests' tiny transformers configs, in one place, and the tiny mixture-of-experts configs.

Every tiny stack is 2 layers of hidden size 64 (MLP 128) with 4 attention heads; decoders add 2
key/value heads and a vocabulary of 256. Tests spread these into the config class they build
(``Qwen2Config(**TINY_DECODER, ...)``); a tiny Llama comes from :func:`kbitprep.testing.tiny_llama_config`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MOE_SETTINGS", "TINY_DECODER", "TINY_EXPERTS", "TINY_STACK", "tiny_moe_config"]

#: A tiny transformer stack: 2 layers, hidden size 64, MLP 128, 4 attention heads.
TINY_STACK: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
#: A tiny decoder: :data:`TINY_STACK` with 2 key/value heads and a vocabulary of 256.
TINY_DECODER: dict[str, Any] = dict(TINY_STACK, num_key_value_heads=2, vocab_size=256)
#: The tiny mixture of experts: 4 experts, 2 per token (under the names most configs use).
TINY_EXPERTS: dict[str, Any] = dict(num_experts=4, num_experts_per_tok=2)
#: The MoE settings of each family's tiny config: 4 experts, 2 per token (:data:`TINY_EXPERTS`, in its names).
MOE_SETTINGS: dict[str, dict[str, int]] = {
    "qwen3_moe": dict(moe_intermediate_size=32, **TINY_EXPERTS),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(TINY_EXPERTS),
}


def tiny_moe_config(model_type: str, **overrides: Any) -> Any:
    """A 2-layer config of ``model_type`` with 4 experts (2 per token), hidden size 64."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY_DECODER, "head_dim": 16, **MOE_SETTINGS[model_type], **overrides})
