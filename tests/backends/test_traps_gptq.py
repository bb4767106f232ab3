"""GPTQ traps: the quantized storage is buffers, not parameters, and detection must not need flags."""

from __future__ import annotations

import warnings

import pytest
import torch

import kbitprep
from kbitprep._tensors import storage_digest
from kbitprep.plugin import missing_packages

from ..state import model_state, tensor_digests
from ..tiny import batch

pytestmark = pytest.mark.skipif(bool(missing_packages(["gptqmodel", "tokenizers"])), reason="gptqmodel not installed")

GPTQ_TENSORS = ("qweight", "qzeros", "g_idx", "scales")


def _gptq():  # type: ignore[no-untyped-def]
    from .builders_gptq import gptq_llama

    return gptq_llama()


def _declared(model: torch.nn.Module) -> frozenset[str]:
    reg = kbitprep.default_registry()
    sel = reg.select(model)
    return frozenset().union(*(reg.declare(i, model, d).quantized for i, d in sel.detections))


def test_storage_is_buffers_and_every_buffer_is_declared_and_kept() -> None:
    model = _gptq()
    layers = [n for n, m in model.named_modules() if hasattr(m, "qweight")]
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    # The trap: no GPTQ layer has a quantized (or any) Parameter, so parameter dtypes reveal nothing.
    assert not [n for n, p in model.named_parameters() if p.dtype not in (torch.float16, torch.float32)]
    assert not [n for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in layers]
    buffers = dict(model.named_buffers())
    expected = {f"{layer}.{t}" for layer in layers for t in GPTQ_TENSORS}
    assert {buffers[n].dtype for n in expected if not n.endswith("scales")} == {torch.int32}
    assert {buffers[n].dtype for n in expected if n.endswith("scales")} == {torch.float16}
    declared = _declared(model)
    assert expected <= declared
    plan = kbitprep.plan(model, upcast="all")
    assert plan.backend == "gptq"
    # nothing among the parameters: the storage is all buffers, which the plan counts as quantized
    assert {p.name for p in plan.quantized} == set(declared)
    assert not any(p.name in dict(model.named_parameters()) for p in plan.quantized)

    digests = tensor_digests(model, declared)
    kbitprep.prepare(model, upcast="all")
    _lora_steps(model)  # wraps q_proj/v_proj in place: their buffers move under `.base_layer`
    unwrapped = {n.replace(".base_layer.", "."): b for n, b in model.named_buffers()}
    assert {n: storage_digest(unwrapped[n]) for n in sorted(declared)} == digests
    assert {unwrapped[n].dtype for n in expected if n.endswith("scales")} == {torch.float16}


def test_detected_by_layer_class_without_any_quantizer_flag() -> None:
    model = _gptq()
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        vars(model).pop(attr, None)
    del model.config.quantization_config
    assert not getattr(model, "is_quantized", False) and kbitprep.plugin.quant_method(model) is None
    before = model_state(model)
    plan = kbitprep.plan(model)
    assert plan.backend == "gptq"
    assert any("TorchAtenLinear" in e and "GPTQQuantLinear" in e for e in plan.evidence), plan.evidence
    assert not any("hf_quantizer" in e for e in plan.evidence)
    assert model_state(model) == before


def _lora_steps(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-2)
    peft_model.train()
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = peft_model(**batch(vocab=model.config.vocab_size)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    return peft_model
