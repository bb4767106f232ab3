"""HQQ traps: layers swapped in by hand (no flag), upcasting breaks the forward, and a model mixing bnb and HQQ."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import kbitprep

from ..state import model_state
from ..tiny import batch, saved_tiny_llama
from .test_traps_bnb import lora_steps

pytest.importorskip("hqq")

from .cases.hqq import hqq_config, load_hqq


def _swap_in_hqq(model: nn.Module, names: list[str], source: nn.Module | None = None) -> None:
    """Replace the named layers by ``HQQLinear`` built from the same (or ``source``'s) bf16 ``nn.Linear``."""
    from hqq.core.quantize import HQQLinear

    plain = dict((source or model).named_modules())
    for name in names:
        parent, _, child = name.rpartition(".")
        layer = HQQLinear(plain[name], hqq_config(), compute_dtype=torch.bfloat16, device="cpu")
        setattr(model.get_submodule(parent), child, layer)


def _plain_llama() -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(saved_tiny_llama(torch.bfloat16), dtype=torch.bfloat16)


def _hqq_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "HQQLinear"}


HAND = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_layers_swapped_in_by_hand_are_detected_without_a_flag() -> None:
    """No ``hqq_quantized`` flag: kbitprep still picks HQQ by class; PEFT's function upcasts and breaks the forward."""
    from peft import prepare_model_for_kbit_training

    model = _plain_llama()
    _swap_in_hqq(model, HAND)
    assert not hasattr(model, "hqq_quantized")
    the_plan = kbitprep.plan(model)
    assert the_plan.backend == "hqq" and the_plan.backends == ("hqq",)
    assert any("no hqq_quantized flag" in e for e in the_plan.evidence)
    assert {p.name for p in the_plan.quantized} == {f"{n}.W_q" for n in HAND}
    assert not the_plan.to_upcast

    theirs = _plain_llama()
    _swap_in_hqq(theirs, HAND)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_model_for_kbit_training(theirs)  # sees no flag: upcasts every bf16 parameter
    with pytest.raises(RuntimeError, match="same dtype"):
        theirs(**batch())

    kbitprep.prepare(model)
    names, missing = lora_steps(model)
    assert names and not missing, missing[:4]


@pytest.mark.parametrize("policy", ["all", "norms"])
def test_upcast_is_refused_and_would_break_the_forward(policy: str) -> None:
    """Any upcast policy raises InvalidPolicyError (model unchanged); a hand upcast shows why."""
    model = load_hqq()
    before = model_state(model)
    with pytest.raises(kbitprep.InvalidPolicyError, match="HQQLinear dequantizes to its compute_dtype"):
        kbitprep.prepare(model, upcast=policy)
    assert model_state(model) == before
    for p in model.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    with pytest.raises(RuntimeError, match="same dtype"), torch.no_grad():
        model(**batch())


def test_w_q_and_meta_are_left_alone() -> None:
    """``W_q`` is a uint8 Parameter (declared quantized); scale and zero in ``.meta`` survive prepare/undo."""
    model = load_hqq()
    assert model.hqq_quantized is True
    layers = _hqq_layers(model)
    assert len(layers) == 14
    assert all(m.W_q.dtype == torch.uint8 and isinstance(m.W_q, nn.Parameter) for m in layers.values())
    meta = {n: (m.meta["scale"], m.meta["zero"], m.meta["scale"].clone()) for n, m in layers.items()}
    the_plan = kbitprep.plan(model)
    assert {p.name for p in the_plan.quantized} == {f"{n}.W_q" for n in layers}
    kbitprep.prepare(model)
    kbitprep.undo(model)
    for n, m in layers.items():
        scale, zero, values = meta[n]
        assert m.meta["scale"] is scale and m.meta["zero"] is zero and torch.equal(scale, values)


def test_a_model_mixing_bnb_and_hqq_gets_the_rules_of_both() -> None:
    """A bnb 4-bit model with one HQQLinear swapped in: both backends apply, HQQ's no-upcast rule included."""
    from .cases.bnb import load_bnb_4bit

    pytest.importorskip("bitsandbytes")
    model = load_bnb_4bit()
    swapped = "model.layers.1.self_attn.v_proj"
    _swap_in_hqq(model, [swapped], source=_plain_llama())
    the_plan = kbitprep.plan(model)
    assert the_plan.backend == "bnb-4bit" and the_plan.backends == ("bnb-4bit", "hqq")
    assert any(e.startswith("[hqq] 1 x hqq.core.quantize.HQQLinear") for e in the_plan.evidence)
    kinds = {p.name: p.dtype_before for p in the_plan.quantized}
    assert kinds[f"{swapped}.W_q"] == torch.uint8
    assert sum(1 for n in kinds if n.endswith(".weight")) == 13  # the other 13 Params4bit weights
    with pytest.raises(kbitprep.InvalidPolicyError, match="HQQLinear"):
        kbitprep.plan(model, upcast="all")  # bnb alone would allow it; HQQ's rule wins

    kbitprep.prepare(model)
    names, missing = lora_steps(model)
    assert any(swapped in n for n in names), "LoRA did not attach to the HQQ layer"
    assert names and not missing, missing[:4]
