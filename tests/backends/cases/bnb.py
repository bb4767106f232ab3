"""bitsandbytes rows: NF4 double-quant 4-bit (bf16 compute) and LLM.int8 8-bit (fp16)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ...tiny import nf4_config, saved_tiny_llama
from ..case import BackendCase


def load_bnb_4bit() -> torch.nn.Module:
    """A tiny Llama reloaded in NF4 with double quantization and bf16 compute (eval mode, as loaded)."""
    qc = nf4_config()
    return AutoModelForCausalLM.from_pretrained(
        saved_tiny_llama(torch.bfloat16), quantization_config=qc, dtype=torch.bfloat16
    )


def load_bnb_8bit(dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """A tiny Llama reloaded in LLM.int8; fp16 by default because Linear8bitLt casts bf16 inputs to fp16."""
    qc = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(saved_tiny_llama(dtype), quantization_config=qc, dtype=dtype)


CASES = [
    BackendCase(id="bnb-4bit-nf4", backend="bnb-4bit", build=load_bnb_4bit, requires=("bitsandbytes",)),
    BackendCase(
        id="bnb-8bit",
        backend="bnb-8bit",
        build=load_bnb_8bit,
        requires=("bitsandbytes",),
        notes="loaded in fp16: Linear8bitLt casts bf16 inputs to fp16 with a warning",
    ),
]
