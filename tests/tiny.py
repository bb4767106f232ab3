"""Tiny real models for the tests: built in process from a config, saved, and reloaded."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kbitprep import testing

_CACHE = Path(tempfile.mkdtemp(prefix="kbitprep-tiny-"))


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A 2-layer Llama config small enough for CPU tests (about 0.1 M parameters)."""
    return testing.tiny_llama_config(**overrides)


def tiny_llama(dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama in ``dtype``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)


@functools.cache
def saved_tiny_llama(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A tiny Llama saved with ``save_pretrained`` (once per session); reload it with a quantization config."""
    path = _CACHE / f"llama-{str(dtype).removeprefix('torch.')}-{seed}"
    if not path.exists():
        tiny_llama(dtype, seed).save_pretrained(path)
    return path


def batch(vocab: int = 256, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic causal-LM batch (input_ids and labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def nf4_config() -> object:
    """The NF4 double-quantization, bf16-compute config, as the bnb-4bit plugin's scheme declares it
    (one definition for the demo, the benchmark, the estimate and the tests)."""
    from kbitprep_plugins.bitsandbytes import NF4

    assert NF4.quantization_config is not None
    return NF4.quantization_config(torch.bfloat16)
