"""AQLM traps: codebooks/scales reload trainable; 8-bit codebooks cannot train with PEFT's LoRA on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

import kbitprep
from kbitprep.plugin import missing_packages

from ..state import model_state
from ..tiny import batch
from .builders_aqlm import aqlm_llama

pytestmark = pytest.mark.skipif(bool(missing_packages(["aqlm"])), reason="aqlm not installed")

CODEBOOK_TENSORS = ("codebooks", "scales")


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_codebooks_and_scales_reload_trainable_and_prepare_freezes_them_without_casting() -> None:
    model = aqlm_llama()
    float_storage = {n: p for n, p in model.named_parameters() if n.endswith(CODEBOOK_TENSORS)}
    assert len(float_storage) == 2 * 14
    # The trap: transformers reloads the float codebooks and scales with requires_grad=True.
    assert all(p.requires_grad for p in float_storage.values())
    before = model_state(model)
    # fp32 norms would meet bf16 codebooks in the forward: upcast policies are refused, model untouched.
    with pytest.raises(kbitprep.InvalidPolicyError, match="dtype of their codebooks"):
        kbitprep.prepare(model, upcast="all")
    assert model_state(model) == before
    kbitprep.prepare(model)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    assert {p.dtype for p in float_storage.values()} == {torch.bfloat16}
    assert all(model.get_parameter(n) is p for n, p in float_storage.items())


def test_8bit_codebooks_refused_before_anything_changes() -> None:
    model = aqlm_llama(nbits=8, dtype=torch.float32)  # the CPU kernel for 8-bit codebooks needs float32
    before = model_state(model)
    plan = kbitprep.plan(model)
    assert plan.backend == "aqlm" and not plan.trainable
    assert "8-bit codebooks" in plan.not_trainable_reason and "in place" in plan.not_trainable_reason
    with pytest.raises(kbitprep.NotTrainableError, match="8-bit codebooks on the CPU"):
        kbitprep.prepare(model)
    with pytest.raises(kbitprep.NotTrainableError, match="16-bit codebooks"):
        kbitprep.prepare_model_for_kbit_training(model)
    assert model_state(model) == before


def test_8bit_codebooks_really_break_peft_lora_in_the_first_training_forward() -> None:
    """Why kbitprep refuses: PEFT's own path accepts the model and fails inside autograd."""
    from peft import prepare_model_for_kbit_training as peft_prepare

    model = aqlm_llama(nbits=8, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Without checkpointing the first LoRA-wrapped layer fails in the forward (with PEFT's reentrant
        # checkpointing, in the backward's recomputation; numba compiles a kernel per layer shape first).
        peft_model = _lora(peft_prepare(model, use_gradient_checkpointing=False))
        peft_model.train()
        with pytest.raises(RuntimeError, match="view was created inside a custom Function"):
            peft_model(**batch(vocab=model.config.vocab_size))


def test_16bit_codebooks_in_float32_are_not_refused() -> None:
    model = aqlm_llama(nbits=16, dtype=torch.float32)
    plan = kbitprep.plan(model)
    assert plan.backend == "aqlm" and plan.trainable, plan.not_trainable_reason
