"""optimum-quanto traps: weights that report bf16 but cannot be cast (PEFT's function crashes on them)."""

from __future__ import annotations

import pytest
import torch

import kbitprep
from kbitprep.plugin import is_plain_tensor

from ..state import model_state
from .test_traps_bnb import lora_steps

pytest.importorskip("optimum.quanto")

from .cases.quanto import PEFT_CRASH, load_quanto

CLASSES = {"int8": "WeightQBytesTensor", "int4": "WeightQBitsTensor"}


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_peft_crashes_kbitprep_prepares_and_trains(weights: str) -> None:
    """PEFT's function raises on the weight cast; kbitprep protects the weights by class and LoRA trains."""
    from peft import prepare_model_for_kbit_training

    with pytest.raises(ValueError, match=PEFT_CRASH[weights]):
        prepare_model_for_kbit_training(load_quanto(weights))

    model = load_quanto(weights)
    qweights = {n: p for n, p in model.named_parameters() if not is_plain_tensor(p)}
    assert {type(p).__name__ for p in qweights.values()} == {CLASSES[weights]}
    assert {p.dtype for p in qweights.values()} == {torch.bfloat16}  # what a dtype check would see
    the_plan = kbitprep.plan(model)
    assert set(qweights) <= {p.name for p in the_plan.quantized}
    kbitprep.prepare(model)
    assert {n: type(p).__name__ for n, p in model.named_parameters() if n in qweights} == {
        n: CLASSES[weights] for n in qweights
    }
    names, missing = lora_steps(model)
    assert names and not missing, missing[:4]


@pytest.mark.parametrize("policy", ["all", "norms"])
def test_upcast_is_refused_with_the_reason(policy: str) -> None:
    """fp32 norms or embeddings break quanto's forward, so any upcast policy raises before anything changes."""
    model = load_quanto("int8")
    before = model_state(model)
    with pytest.raises(kbitprep.InvalidPolicyError, match="quanto layers compute in the dtype of their weights"):
        kbitprep.prepare(model, upcast=policy)
    assert model_state(model) == before
