"""bitsandbytes traps: the CPU repack bug (silent no-learning), the default upcast, 8-bit dtypes."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.plugin import is_plain_tensor

from ..tiny import batch

pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

from .cases.bnb import load_bnb_4bit, load_bnb_8bit

AVX512_BF16 = bool(has_avx512bf16())
NO_AUTOGRAD = "bitsandbytes::gemv_4bit: an autograd kernel was not registered"
NO_FLAG = (
    "this CPU has no AVX512-BF16 (bitsandbytes.functional.has_avx512bf16() is False): Linear4bit never "
    "repacks its weights here, so the bug cannot happen; test_fixup_unpacks_repacked_weights covers the fix-up"
)


def lora_steps(
    model: nn.Module, targets: Sequence[str] = ("q_proj", "v_proj"), steps: int = 2
) -> tuple[list[str], list[str]]:
    """Attach LoRA and run ``steps`` AdamW steps.

    Returns the LoRA parameter names and those without a non-zero grad after the last step.
    """
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))
    lora = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in lora], lr=1e-2)
    peft_model.train()
    data = batch(vocab=peft_model.config.vocab_size)
    missing: list[str] = []
    for step in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = peft_model(**data).loss
        assert torch.isfinite(loss)
        if loss.requires_grad:
            loss.backward()
        if step == steps - 1:
            missing = [n for n, p in lora if p.grad is None or not bool(p.grad.ne(0).any())]
        opt.step()
        opt.zero_grad()
    return [n for n, _ in lora], missing


def _linear4bit(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def _packed(model: nn.Module) -> list[str]:
    return [n for n, m in _linear4bit(model).items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


@pytest.mark.skipif(not AVX512_BF16, reason=NO_FLAG)
def test_eval_forward_then_prepare_still_trains() -> None:
    """The regression: from_pretrained, one eval no-grad forward, prepare, LoRA: every LoRA grad non-zero.

    The same steps with kbitprep's fix-up removed from the plan leave LoRA grads missing, which proves
    the bug is real on this CPU and that the fix-up is what repairs it. Torch's warning "gemv_4bit: an
    autograd kernel was not registered" comes from that control run alone (a backward through the
    repacked weights); the prepared model never raises it (test_traps_bnb_gemv has the details).
    """

    def run(with_fix: bool) -> tuple[list[str], list[str], list[str]]:
        model = load_bnb_4bit()
        assert not model.training  # from_pretrained returns eval mode
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                model(**batch())
            assert _packed(model) == list(_linear4bit(model)), "bnb did not repack: the bug's trigger changed"
            the_plan = kbitprep.plan(model)
            assert [f.name for f in the_plan.fixups] == ["bnb-cpu-unpack"]
            if not with_fix:
                the_plan = dataclasses.replace(the_plan, fixups=())
            kbitprep.prepare(model, plan=the_plan)
            names, missing = lora_steps(model)
        return names, missing, [str(w.message) for w in caught if NO_AUTOGRAD in str(w.message)]

    names, missing, warned = run(with_fix=True)
    assert names and not missing, f"LoRA parameters without gradient after the fix-up: {missing[:4]}"
    assert not warned, "the prepared model still backpropagates through gemv_4bit"
    names, missing, warned = run(with_fix=False)
    assert missing, "without the fix-up every LoRA grad was non-zero: the repack bug did not reproduce"
    assert warned, "without the fix-up torch should warn about the backward through gemv_4bit"


def test_fixup_unpacks_repacked_weights() -> None:
    """On any CPU: weights in the layout bnb's eval forward leaves on AVX512-BF16 CPUs are restored.

    The repacking is done by bitsandbytes' own ``_convert_weight_packed_for_cpu``, called exactly as
    ``Linear4bit.forward`` calls it; only the trigger (the eval forward) is skipped, because on a CPU
    without the flag bnb never calls it.
    """
    model = load_bnb_4bit()
    reference = load_bnb_4bit()
    layers = _linear4bit(model)
    original = {n: m.weight.data.clone() for n, m in layers.items()}
    nested = {n: m.weight.quant_state.nested for n, m in layers.items()}
    for m in layers.values():
        m.weight.data, _ = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    packed = {n: (m.weight.data, m.weight.quant_state) for n, m in layers.items()}
    assert _packed(model) == list(layers)

    the_plan = kbitprep.plan(model)
    assert [f.name for f in the_plan.fixups] == ["bnb-cpu-unpack"]
    assert any(f"{len(layers)} Linear4bit weights are packed" in n for n in the_plan.notes)
    kbitprep.prepare(model)
    assert _packed(model) == []
    for n, m in layers.items():
        assert torch.equal(m.weight.data, original[n]), f"{n}: weight bytes differ from the trainable layout"
        assert m.weight.quant_state is not packed[n][1] and m.weight.quant_state.nested == nested[n]
        assert not m.support_avx512bf16_for_cpu  # no repacking in later eval forwards
    with torch.no_grad():
        assert model(**batch()).loss.item() == pytest.approx(reference(**batch()).loss.item(), abs=1e-2)

    kbitprep.undo(model)
    for n, m in layers.items():
        assert m.weight.data.data_ptr() == packed[n][0].data_ptr() and m.weight.quant_state is packed[n][1]
        assert m.weight.quant_state.packing_format_for_cpu is True
        assert bool(m.support_avx512bf16_for_cpu) is AVX512_BF16

    kbitprep.prepare(model)
    names, missing = lora_steps(model)
    assert names and not missing, f"LoRA parameters without gradient: {missing[:4]}"


def test_fixup_declared_only_where_needed() -> None:
    """A fresh model gets the fix-up only on CPUs where bnb would repack it later (to stop that)."""
    the_plan = kbitprep.plan(load_bnb_4bit())
    assert [f.name for f in the_plan.fixups] == (["bnb-cpu-unpack"] if AVX512_BF16 else [])


def test_default_keeps_embeddings_and_lm_head_peft_choice_is_all() -> None:
    """Default: nothing upcast, zero bytes added. upcast='all' is PEFT's choice, dtype for dtype."""
    from peft import prepare_model_for_kbit_training

    model = load_bnb_4bit()
    default = kbitprep.plan(model)
    assert default.upcast_policy == "none" and not default.to_upcast and default.byte_delta == 0
    half = {n: p.numel() for n, p in model.named_parameters() if is_plain_tensor(p) and p.dtype == torch.bfloat16}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(half)
    peft_like = kbitprep.plan(model, upcast="all")
    assert {p.name for p in peft_like.to_upcast} == set(half)
    assert peft_like.byte_delta == 2 * sum(half.values())  # bf16 -> fp32: 2 more bytes an element
    assert not [p for p in peft_like.to_upcast if p.quantized]

    kbitprep.prepare(model, upcast="all")
    theirs = load_bnb_4bit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_model_for_kbit_training(theirs)
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}


def test_8bit_int8_storage_and_the_bf16_cast(caplog: pytest.LogCaptureFixture) -> None:
    """Int8Params are int8 storage; a bf16 8-bit model is cast to fp16 inside bnb, so the plan says to load fp16."""
    fp16 = load_bnb_8bit(torch.float16)
    the_plan = kbitprep.plan(fp16)
    int8 = {n for n, p in fp16.named_parameters() if type(p).__name__ == "Int8Params"}
    assert int8 and {p.name for p in the_plan.quantized} == int8
    assert all(p.dtype_before == torch.int8 for p in the_plan.quantized)
    assert not any("bf16" in n for n in the_plan.notes)

    bf16 = load_bnb_8bit(torch.bfloat16)
    assert any("casts bf16 inputs to fp16" in n for n in kbitprep.plan(bf16).notes)
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.no_grad():
        bf16(**batch())  # eval mode (CPU training dequantizes instead, with no cast)
    assert "inputs will be cast from torch.bfloat16 to float16" in caplog.text
