"""Unquantized rows: a plain bf16 and fp16 tiny Llama."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from ...tiny import saved_tiny_llama
from ..case import BackendCase


def _load(dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(saved_tiny_llama(dtype), dtype=dtype)


CASES = [
    BackendCase(id="unquantized-bf16", backend="unquantized", build=lambda: _load(torch.bfloat16)),
    BackendCase(id="unquantized-fp16", backend="unquantized", build=lambda: _load(torch.float16)),
]
