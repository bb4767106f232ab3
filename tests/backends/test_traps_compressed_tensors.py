"""compressed-tensors traps: ``is_qat_trainable`` is a method; PEFT cannot wrap packed layers before
the first forward; PEFT's upcast makes the decompressed model fp32."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.plugin import missing_packages

from ..state import model_state
from ..tiny import batch
from .builders_compressed_tensors import ct_llama

pytestmark = pytest.mark.skipif(bool(missing_packages(["compressed_tensors"])), reason="compressed-tensors missing")


def _lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _quantized_linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]


def test_is_qat_trainable_is_a_method_and_is_called() -> None:
    from kbitprep_plugins.compressed_tensors import quantizer_answer

    model = ct_llama(4)
    quantizer = model.hf_quantizer
    # The trap: reading the attribute gives a bound method, always truthy; the answer is False.
    assert callable(quantizer.is_qat_trainable) and bool(quantizer.is_qat_trainable)
    assert quantizer.is_qat_trainable() is False and quantizer.is_trainable is True
    assert quantizer_answer(quantizer, "is_qat_trainable") is False
    assert quantizer_answer(quantizer, "is_trainable") is True
    plan = kbitprep.plan(model)
    assert plan.trainable  # QAT of the packed weights is impossible; LoRA on top is fine
    assert any("is_qat_trainable() = False" in n for n in plan.notes), plan.notes
    assert not any("bound method" in n for n in plan.notes)


def test_quantizer_saying_not_trainable_is_refused_before_anything_changes() -> None:
    model = ct_llama(4)
    # transformers sets this flag when it loads an FP8 checkpoint onto FP8 kernels (CUDA SM89+);
    # then is_trainable (a property) turns False. Set here on the real quantizer: no such GPU.
    model.hf_quantizer.use_fp8_kernel = True
    before = model_state(model)
    with pytest.raises(kbitprep.NotTrainableError, match=r"is_trainable is False.*dequantize=True"):
        kbitprep.prepare(model)
    assert model_state(model) == before


def test_peft_cannot_wrap_packed_layers_until_prepare_fixes_them_up() -> None:
    raw = ct_llama(4)
    assert not [m for m in _quantized_linears(raw) if hasattr(m, "weight")]
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        _lora(raw)

    model = ct_llama(4)
    before = model_state(model)
    plan = kbitprep.plan(model)
    assert [f.name for f in plan.fixups] == ["ct-weight-placeholder"]
    kbitprep.prepare(model)
    layers = _quantized_linears(model)
    assert len(layers) == 14 and all(m.weight.numel() == 0 and "weight" not in m._parameters for m in layers)
    kbitprep.undo(model)
    assert model_state(model) == before and not [m for m in layers if hasattr(m, "weight")]

    kbitprep.prepare(model)
    peft_model = _lora(model)
    peft_model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model(**batch()).loss.backward()
    # The first forward decompressed every layer: a frozen dense bf16 weight replaced the placeholder.
    for m in layers:
        assert isinstance(m.weight, nn.Parameter) and m.weight.shape == (m.out_features, m.in_features)
        assert m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad
        assert not hasattr(m, "weight_packed")
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def _decompressed_weight_bytes(model: nn.Module) -> int:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**batch())  # compressed-tensors decompresses on the first forward
    return sum(m.weight.numel() * m.weight.element_size() for m in _quantized_linears(model))


def test_peft_upcast_makes_the_decompressed_model_fp32_and_kbitprep_does_not() -> None:
    from peft import prepare_model_for_kbit_training as peft_prepare

    elements = sum(m.out_features * m.in_features for m in _quantized_linears(ct_llama(4)))
    assert elements == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # 2 layers: q, o; k, v; gate, up, down

    theirs = ct_llama(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_prepare(theirs)
    assert _decompressed_weight_bytes(theirs) == 4 * elements  # fp32: PEFT cast the scales first

    ours = kbitprep.prepare(ct_llama(4))
    assert _decompressed_weight_bytes(ours) == 2 * elements  # bf16, as loaded

    # The scales are storage, never cast, so fp32 norms would meet bf16 weights: upcasting is refused.
    with pytest.raises(kbitprep.InvalidPolicyError, match="dtype of the \\(never cast\\) scales"):
        kbitprep.prepare(ct_llama(4), upcast="all")
