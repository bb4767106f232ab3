"""The example plugin's own tests: kbitprep's shipped contract suite, plus what the plugin adds.

Run with ``pytest`` from this folder once the distribution is installed (``pip install -e .``).
The model is a real bitsandbytes 4-bit tiny Llama, loaded on the CPU.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import kbitprep
import torch
from kbitprep.testing import BackendContract, tiny_causal_lm
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from kbitprep_example_plugin import NonReentrantBnb4bitBackend


@functools.cache
def _checkpoint() -> Path:
    """A tiny bf16 Llama saved once per session (quantized at each load)."""
    path = Path(tempfile.mkdtemp(prefix="kbitprep-example-")) / "tiny-llama"
    tiny_causal_lm(torch.bfloat16).save_pretrained(path)
    return path


def load_bnb_4bit() -> nn.Module:
    """A fresh bitsandbytes NF4 tiny Llama (the kind of model the backend is for)."""
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(_checkpoint(), quantization_config=config, dtype=torch.bfloat16)


class TestNonReentrantBnb4bitBackend(BackendContract):
    """Every check of kbitprep's contract suite, on a real bitsandbytes 4-bit model."""

    backend = NonReentrantBnb4bitBackend

    def make_model(self) -> nn.Module:
        return load_bnb_4bit()


def test_non_reentrant_checkpointing_by_default() -> None:
    model = load_bnb_4bit()
    plan = kbitprep.plan(model)  # every installed backend competes: this one must win
    assert plan.backend == "bnb-4bit-nonreentrant"
    assert plan.checkpointing is kbitprep.CheckpointMode.NON_REENTRANT
    kbitprep.prepare(model)
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    kbitprep.undo(model)


def test_the_user_still_chooses() -> None:
    model = load_bnb_4bit()
    plan = kbitprep.plan(model, checkpointing="reentrant")
    assert plan.backend == "bnb-4bit-nonreentrant"
    assert plan.checkpointing is kbitprep.CheckpointMode.REENTRANT
