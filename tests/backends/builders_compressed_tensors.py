"""A real compressed-tensors tiny Llama, built with compressed-tensors' own API and reloaded by transformers.

transformers cannot quantize to compressed-tensors (it needs calibration, normally llm-compressor's
job). Here: ``apply_quantization_config`` attaches the scheme, symmetric max-abs scales are computed
by hand (the observer's job), ``ModelCompressor.compress_model`` packs the weights, the model is
saved (once per session) with ``update_config``, and each test gets a fresh ``from_pretrained``.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..tiny import tiny_llama

#: bits -> (strategy, group size, compressed-tensors format)
FORMATS = {4: ("group", 32, "pack-quantized"), 8: ("channel", None, "int-quantized")}


@functools.cache
def saved_ct_llama(bits: int = 4) -> Path:
    """Quantize the bf16 tiny Llama to ``bits``-bit integer weights with compressed-tensors and save it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    strategy, group_size, fmt = FORMATS[bits]
    model = tiny_llama(torch.bfloat16)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group_size)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
    )
    apply_quantization_config(model, config)
    qmax = 2 ** (bits - 1) - 1
    for mod in model.modules():
        if getattr(mod, "quantization_scheme", None) is None:
            continue
        w = mod.weight.detach().float()
        grouped = w.reshape(w.shape[0], -1, group_size) if group_size else w.unsqueeze(1)
        scale = (grouped.abs().amax(dim=-1) / qmax).clamp_min(1e-8)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    path = Path(tempfile.mkdtemp(prefix="kbitprep-ct-")) / f"llama-ct-int{bits}"
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return path


def ct_llama(bits: int = 4) -> nn.Module:
    """A fresh compressed-tensors tiny Llama (still compressed: no forward has run)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(saved_ct_llama(bits), dtype=torch.bfloat16)
