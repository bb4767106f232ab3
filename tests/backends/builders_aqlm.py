"""A real AQLM tiny Llama: transformers cannot quantize to AQLM, so the layers are built by hand.

Every ``nn.Linear`` but ``lm_head`` becomes an ``aqlm.QuantizedLinear`` (1 codebook, in-groups of
8) with random codes and codebooks, the ``AqlmConfig`` goes into the config, and the model is saved
once per session and reloaded through ``from_pretrained`` for each test, so transformers' own AQLM
loading path (``AqlmHfQuantizer``) produces every model the tests see.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..tiny import tiny_llama


@functools.cache
def saved_aqlm_llama(nbits: int = 16, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Build, fill and save a tiny AQLM Llama with ``nbits``-bit codebooks (once per session)."""
    from aqlm import QuantizedLinear
    from transformers import AqlmConfig

    model = tiny_llama(dtype)
    gen = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name == "lm_head":
            continue
        layer = QuantizedLinear(
            mod.in_features,
            mod.out_features,
            in_group_size=8,
            out_group_size=1,
            num_codebooks=1,
            nbits_per_codebook=nbits,
            bias=False,
            dtype=dtype,
        )
        with torch.no_grad():
            layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=gen) * 0.05)
            layer.scales.fill_(1.0)
            codes = torch.randint(0, 2**nbits, layer.codes.shape, generator=gen)
            codes[codes >= 2 ** (nbits - 1)] -= 2**nbits  # aqlm stores codes as signed ints
            layer.codes.copy_(codes.to(layer.codes.dtype))
        model.set_submodule(name, layer)
    model.config.quantization_config = AqlmConfig(
        nbits_per_codebook=nbits, linear_weights_not_to_quantize=["lm_head"]
    ).to_dict()
    path = Path(tempfile.mkdtemp(prefix="kbitprep-aqlm-")) / f"llama-aqlm-1x{nbits}-{str(dtype).removeprefix('torch.')}"
    model.save_pretrained(path)
    return path


def aqlm_llama(nbits: int = 16, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A fresh AQLM tiny Llama loaded by transformers from the session's checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(saved_aqlm_llama(nbits, dtype), dtype=dtype)
