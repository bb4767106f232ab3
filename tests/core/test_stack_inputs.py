"""Checkpointed stacks that do not start from the token embeddings (issue 17, item 2).

With reentrant checkpointing, the parameters inside a checkpointed layer get gradients only when the
layer's input requires grad. The input-require-grads hook on the token embeddings does that for the
stacks they feed; a speech encoder (Whisper's, fed by ``input_features``) or a vision tower needs a hook
of its own. These tests use the families' tiny models unquantized (bf16, no save/reload); the bnb 4-bit
versions run in ``tests/test_architecture_families.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.testing import model_state

from ..families import FAMILIES, Family

FAMILY = {f.id: f for f in FAMILIES}


def _build(family_id: str) -> tuple[Family, Any]:
    family = FAMILY[family_id]
    return family, family.build()


def _lora(model: nn.Module, targets: list[str]) -> Any:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))


def test_whisper_nf4_encoder_adapters_learn_with_kbitprep_defaults(tmp_path: Path) -> None:
    """Regression (issue 17): Whisper in bitsandbytes NF4, kbitprep's defaults (reentrant checkpointing), LoRA on
    q_proj/v_proj/fc1/fc2 of encoder and decoder: no encoder LoRA tensor got a gradient, silently (PEFT adds
    transformers' hooks itself only to unquantized models). Now every lora_B gets a non-zero gradient and every
    lora_A a gradient at the first step."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    family, model = _build("whisper-speech")
    model.save_pretrained(tmp_path)
    nf4 = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path, quantization_config=nf4, dtype=torch.bfloat16)
    kbitprep.prepare(model)
    assert kbitprep.report(model).plan.checkpointing is kbitprep.CheckpointMode.REENTRANT
    peft_model = _lora(model, ["q_proj", "v_proj", "fc1", "fc2"])
    peft_model.train()
    peft_model(**family.batch(model.config)).loss.backward()
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".encoder." in n for n in lora) and any(".decoder." in n for n in lora)
    without = [n for n, p in lora.items() if p.grad is None or ("lora_B" in n and not bool(p.grad.ne(0).any()))]
    assert not without, f"{len(without)} of {len(lora)} LoRA tensors got no gradient: {without[:4]}"


def test_the_plan_names_the_hooked_stack_and_undo_removes_the_hooks() -> None:
    """The plan says which stack gets kbitprep's pre-hooks and why; the report lists them; undo is exact."""
    _, model = _build("whisper-speech")
    before = model_state(model)
    plan = kbitprep.plan(model, checkpointing="reentrant")
    stack_lines = [h for h in plan.hooks if "model.encoder.layers" in h]
    assert len(stack_lines) == 1 and "input_features" in stack_lines[0] and "(kbitprep)" in stack_lines[0]
    assert not [h for h in plan.hooks if "model.decoder.layers" in h]  # fed by the hooked token embeddings
    kbitprep.prepare(model, plan=plan)
    added = kbitprep.report(model).hooks_added
    assert [h for h in added if h.startswith("WhisperEncoderLayer") and "pre-hook" in h], added
    assert model.model.encoder.layers[0]._forward_pre_hooks
    kbitprep.undo(model)
    assert model_state(model) == before
    assert not kbitprep.plan(model, checkpointing="non_reentrant").input_grads_hooks  # nothing to hook


def test_the_layer_hook_leaves_the_callers_tensor_alone() -> None:
    """The pre-hook makes a detached alias of the hidden states require grad: a tensor the caller passes
    keeps ``requires_grad=False``, and the layer's output requires grad."""
    _, model = _build("whisper-speech")
    kbitprep.prepare(model, checkpointing="reentrant")
    layer = model.model.encoder.layers[0].train()
    hidden = torch.randn(1, 4, model.config.d_model, dtype=torch.bfloat16)
    out = layer(hidden, None)
    assert not hidden.requires_grad and out.requires_grad
    with torch.no_grad():
        assert not layer(hidden, None).requires_grad  # without grad, nothing changes
