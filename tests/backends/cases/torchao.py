"""TorchAO rows: int8 weight-only (Int8Tensor) and int4 intx weight-only (IntxUnpackedToInt8Tensor)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, TorchAoConfig

from ...tiny import saved_tiny_llama
from ..case import BackendCase


def load_torchao(kind: str) -> torch.nn.Module:
    """A tiny Llama reloaded with a TorchAO config: ``"int8"``, ``"intx-int4"`` or ``"int4-opaque"`` (CPU int4)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    if kind == "int8":
        cfg: object = Int8WeightOnlyConfig()
    elif kind == "intx-int4":
        cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    else:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        cfg = PrototypeInt4WeightOnlyConfig(group_size=32)
    return AutoModelForCausalLM.from_pretrained(
        saved_tiny_llama(torch.bfloat16), quantization_config=TorchAoConfig(cfg), dtype=torch.bfloat16
    )


CASES = [
    BackendCase(id="torchao-int8", backend="torchao", build=lambda: load_torchao("int8"), requires=("torchao",)),
    BackendCase(
        id="torchao-intx-int4",
        backend="torchao",
        build=lambda: load_torchao("intx-int4"),
        requires=("torchao",),
        notes="hf_quantizer.is_trainable says False here; it trains",
    ),
]
