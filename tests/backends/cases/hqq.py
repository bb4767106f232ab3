"""HQQ row: 4-bit HQQLinear from hqq's own quantizer (transformers 5.x cannot load HqqConfig)."""

from __future__ import annotations

from unittest import mock

import torch
from transformers import AutoModelForCausalLM

from ...tiny import saved_tiny_llama
from ..case import BackendCase


def hqq_config(nbits: int = 4, group_size: int = 64) -> dict:
    """hqq's ``BaseQuantizeConfig`` without the proximal optimiser (plain round-to-nearest, fast on CPU)."""
    from hqq.core.quantize import BaseQuantizeConfig

    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    cfg["weight_quant_params"]["optimize"] = False
    return cfg


def load_hqq() -> torch.nn.Module:
    """A tiny Llama quantized by ``AutoHQQHFModel.quantize_model`` (sets ``model.hqq_quantized``)."""
    import hqq.models.base
    from hqq.models.hf.base import AutoHQQHFModel

    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama(torch.bfloat16), dtype=torch.bfloat16)
    # hqq calls gc.collect() three times per model (~1 s each in a big test process); only memory hygiene
    with mock.patch.object(hqq.models.base, "cleanup", lambda: None):
        AutoHQQHFModel.quantize_model(model, quant_config=hqq_config(), compute_dtype=torch.bfloat16, device="cpu")
    return model


CASES = [BackendCase(id="hqq-4bit", backend="hqq", build=load_hqq, requires=("hqq",))]
