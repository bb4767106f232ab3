"""TorchAO traps: subclass weights that report a float dtype, a wrong ``is_trainable``, untrainable CPU int4,
and dynamic-activation configs whose quantized layers cut the gradient (refused up front)."""

from __future__ import annotations

import warnings

import pytest
import torch

import kbitprep
from kbitprep.plugin import is_plain_tensor

from ..state import model_state
from ..tiny import batch
from .test_traps_bnb import lora_steps

pytest.importorskip("torchao")

from .cases.torchao import NOT_TRAINABLE, load_torchao, quantized_tiny_llama

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _subclass_weights(model: torch.nn.Module) -> dict[str, str]:
    return {n: type(p.data).__name__ for n, p in model.named_parameters() if not is_plain_tensor(p)}


@pytest.mark.parametrize("kind", ["int8", "intx-int4"])
def test_subclass_weights_report_bf16_but_are_protected(kind: str) -> None:
    """The weights say bfloat16; kbitprep sees quantized storage (by class) and counts their real bytes."""
    model = load_torchao(kind)
    weights = _subclass_weights(model)
    assert weights and all(dict(model.named_parameters())[n].dtype == torch.bfloat16 for n in weights)
    the_plan = kbitprep.plan(model)
    planned = {p.name: p for p in the_plan.quantized}
    assert set(planned) == set(weights)
    for name, pp in planned.items():
        elements = 1
        for d in pp.shape:
            elements *= d
        assert pp.bytes_before < 2 * elements, f"{name} counted as bf16 ({pp.bytes_before} bytes)"


def test_int8_allows_upcast_and_still_trains() -> None:
    """Int8Tensor accepts fp32 activations: upcast='all' casts only plain params, and LoRA trains."""
    model = load_torchao("int8")
    weights = _subclass_weights(model)
    the_plan = kbitprep.plan(model, upcast="all")
    assert the_plan.to_upcast and not {p.name for p in the_plan.to_upcast} & set(weights)
    kbitprep.prepare(model, upcast="all")
    assert _subclass_weights(model) == weights
    names, missing = lora_steps(model)
    assert names and not missing, missing[:4]


def test_intx_refuses_upcast_because_it_breaks_the_forward() -> None:
    """IntxUnpackedToInt8Tensor: upcast is refused; proof that it would break: a hand upcast fails the forward."""
    model = load_torchao("intx-int4")
    with pytest.raises(kbitprep.InvalidPolicyError, match="IntxUnpackedToInt8Tensor"):
        kbitprep.plan(model, upcast="all")
    for p in model.parameters():
        if is_plain_tensor(p) and p.dtype == torch.bfloat16:
            p.data = p.data.float()
    with pytest.raises(RuntimeError, match="same dtype"), torch.no_grad():
        model(**batch())


def test_intx_trains_although_the_quantizer_says_it_cannot() -> None:
    """``hf_quantizer.is_trainable`` is False for intx; kbitprep does not trust it, and LoRA does train."""
    model = load_torchao("intx-int4")
    assert model.hf_quantizer.is_trainable is False
    the_plan = kbitprep.plan(model)
    assert the_plan.trainable
    assert any("is_trainable is False" in n and "ignored" in n for n in the_plan.notes)
    kbitprep.prepare(model)
    names, missing = lora_steps(model)
    assert names and not missing, missing[:4]


def test_cpu_int4_opaque_is_refused_before_training() -> None:
    """CPU int4 (Int4OpaqueTensor, tinygemm) has no backward: prepare refuses it and changes nothing."""
    model = load_torchao("int4-opaque")
    assert set(_subclass_weights(model).values()) == {"Int4OpaqueTensor"}
    before = model_state(model)
    with pytest.raises(kbitprep.NotTrainableError, match="Int4OpaqueTensor.*no backward"):
        kbitprep.prepare(model)
    assert model_state(model) == before

    # the declaration is true: LoRA's backward through these weights fails
    from peft import LoraConfig, get_peft_model

    other = load_torchao("int4-opaque")
    for p in other.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = peft_model(**batch()).loss
    with pytest.raises(RuntimeError, match="derivative for aten::_weight_int4pack_mm_for_cpu is not implemented"):
        loss.backward()


@pytest.mark.parametrize(("row_id", "build", "reason"), NOT_TRAINABLE, ids=[r[0] for r in NOT_TRAINABLE])
def test_dynamic_activation_configs_are_refused_up_front(row_id: str, build: object, reason: str) -> None:
    """Int8DynamicActivation{Int8,Intx}WeightConfig (TorchAoConfig or quantize_): the plan says not trainable
    and why, prepare raises NotTrainableError before changing anything (regression: both were declared
    trainable and trained with silently zero gradients)."""
    assert callable(build)
    model = build()
    the_plan = kbitprep.plan(model)
    assert the_plan.backend == "torchao"
    assert not the_plan.trainable
    assert the_plan.not_trainable_reason
    assert any("activations quantized in the forward" in e for e in the_plan.evidence), the_plan.evidence
    before = model_state(model)
    with pytest.raises(kbitprep.NotTrainableError, match=reason):
        kbitprep.prepare(model)
    assert model_state(model) == before
    assert kbitprep._mutation.prepared_state(model) is None
    with pytest.raises(kbitprep.NotTrainableError, match="quantize their input activations"):
        kbitprep.prepare_model_for_kbit_training(model)
    assert model_state(model) == before


def _frozen_lora(model: torch.nn.Module, targets: tuple[str, ...]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))


@pytest.mark.parametrize("kind", ["dyn-int8", "dyn-intx"])
def test_dynamic_activation_refusal_is_true(kind: str) -> None:
    """Why the refusal is right: the quantized layer's output does not require grad although its input
    does; LoRA on every linear (frozen by hand, kbitprep bypassed) leaves LoRA tensors with exactly zero
    gradient after two AdamW steps; with lm_head quantized too, backward fails."""
    layer = quantized_tiny_llama(kind).model.layers[0].self_attn.q_proj
    x = torch.randn(1, 4, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    assert not layer(x).requires_grad
    weight_only = quantized_tiny_llama("int8" if kind == "dyn-int8" else "intx-int4").model.layers[0].self_attn.q_proj
    assert weight_only(x).requires_grad  # the weight-only config of the same weights keeps the chain

    names, missing = lora_steps(quantized_tiny_llama(kind), targets=ALL_LINEAR)  # PEFT freezes the base
    assert len(names) == 28 and missing, "dynamic activation quantization was expected to cut the gradient"
    assert any(".layers.0." in n for n in missing), missing

    peft_model = _frozen_lora(quantized_tiny_llama(kind, head=True), targets=("q_proj", "v_proj"))
    peft_model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = peft_model(**batch()).loss
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()


@pytest.mark.parametrize("kind", ["int8", "intx-int4", "float8"])
def test_weight_only_configs_built_with_quantize_train_every_linear(kind: str) -> None:
    """The weight-only configs that run on the CPU stay trainable (quantize_, lm_head excluded): LoRA on
    every linear, two AdamW steps, every LoRA tensor has a non-zero gradient."""
    model = quantized_tiny_llama(kind)
    the_plan = kbitprep.plan(model)
    assert the_plan.backend == "torchao" and the_plan.trainable, the_plan.not_trainable_reason
    kbitprep.prepare(model, verify=True)
    names, missing = lora_steps(model, targets=ALL_LINEAR)
    assert len(names) == 28 and not missing, missing[:4]


def test_float8_activation_quantization_is_refused_by_its_attribute() -> None:
    """Float8DynamicActivationFloat8WeightConfig needs CUDA (sm89+), so the Float8Tensor it makes is built
    directly here: ``act_quant_kwargs`` alone makes the plan refuse it, naming the config; its forward
    does not even run on the CPU. (Same mechanism as int8: activations quantized by ops without autograd.)"""
    from torch import nn
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )

    linear = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    weight = Float8Tensor.from_hp(
        linear.weight.detach(),
        granularity=PerRow(),
        act_quant_kwargs=QuantizeTensorToFloat8Kwargs(granularity=PerRow()),
    )
    linear.weight = nn.Parameter(weight, requires_grad=False)
    model = nn.Sequential(nn.Embedding(16, 64, dtype=torch.bfloat16), linear)
    the_plan = kbitprep.plan(model)
    assert the_plan.backend == "torchao" and not the_plan.trainable
    assert "Float8Tensor with act_quant_kwargs, from Float8DynamicActivationFloat8WeightConfig" in (
        the_plan.not_trainable_reason
    )
    with pytest.raises(AssertionError):
        linear(torch.randn(2, 64, dtype=torch.bfloat16))
    weight_only = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    weight_only.weight = nn.Parameter(
        Float8Tensor.from_hp(weight_only.weight.detach(), granularity=PerRow()), requires_grad=False
    )
    assert kbitprep.plan(nn.Sequential(nn.Embedding(16, 64, dtype=torch.bfloat16), weight_only)).trainable
