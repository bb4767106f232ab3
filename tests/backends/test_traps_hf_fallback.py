"""hf-quantizer fallback traps: trainability from the quantizer (property or method), one warning, no upcast.

The models are real transformers BitNet models (``AutoBitLinear`` layers, ``BitNetHfQuantizer``),
a method no kbitprep plugin claims. The method-form test attaches an instance of a subclass of
that real quantizer whose ``is_trainable`` is a plain method, the form some quantizers use.
"""

from __future__ import annotations

import warnings

import pytest
from transformers.quantizers.quantizer_bitnet import BitNetHfQuantizer

import kbitprep

from ..state import model_state
from .cases.hf_fallback import load_bitnet
from .test_traps_bnb import lora_steps


def _fallback_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, kbitprep.KbitprepWarning) and "no backend plugin" in str(w.message)
    ]


def test_unclaimed_quantizer_is_led_by_the_fallback_with_one_warning() -> None:
    """BitNet (online): hf-quantizer backend, evidence from the quantizer and its layers, one warning per model."""
    model = load_bitnet("online")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kbitprep.plan(model)
        kbitprep.plan(model)
        kbitprep.prepare(model)
    found = _fallback_warnings(caught)
    assert len(found) == 1 and "'bitnet'" in found[0] and "BitNetHfQuantizer" in found[0], found
    assert first.backend == "hf-quantizer" and first.trainable
    assert "hf_quantizer: BitNetHfQuantizer (quant_method 'bitnet')" in first.evidence
    assert "14 x transformers.integrations.bitnet.AutoBitLinear" in first.evidence
    assert len(first.quantized) == 14 and not first.to_upcast
    names, missing = lora_steps(model)
    assert names and not missing, missing[:4]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kbitprep.plan(load_bitnet("online"))  # another model: warned again, once
    assert len(_fallback_warnings(caught)) == 1


def test_no_upcast_for_an_unknown_method() -> None:
    model = load_bitnet("online")
    before = model_state(model)
    with pytest.raises(kbitprep.InvalidPolicyError, match="does not know which dtypes 'bitnet' layers accept"):
        kbitprep.prepare(model, upcast="all")
    assert model_state(model) == before


def test_quantizer_property_false_refuses_before_anything_changes() -> None:
    """BitNet offline AutoBitLinear: the real quantizer says is_trainable=False; prepare refuses, model unchanged."""
    model = load_bitnet("offline")
    assert model.hf_quantizer.is_trainable is False
    before = model_state(model)
    with pytest.raises(kbitprep.NotTrainableError, match="is_trainable=False"):
        kbitprep.prepare(model)
    assert model_state(model) == before


class MethodFormQuantizer(BitNetHfQuantizer):
    """transformers' BitNet quantizer with ``is_trainable`` / ``is_qat_trainable`` as plain methods."""

    answer = True

    def is_trainable(self) -> bool:  # type: ignore[override]
        return self.answer

    def is_qat_trainable(self) -> bool:  # type: ignore[override]
        return self.answer


@pytest.mark.parametrize("answer", [True, False])
def test_method_form_is_called_not_taken_as_truthy(answer: bool) -> None:
    """A bound method is always truthy; the fallback calls it, so ``False`` means not trainable."""
    model = load_bitnet("online")
    quantizer = MethodFormQuantizer(model.hf_quantizer.quantization_config)
    quantizer.answer = answer
    model.hf_quantizer = quantizer
    assert callable(model.hf_quantizer.is_trainable)
    if answer:
        assert kbitprep.plan(model).trainable
    else:
        before = model_state(model)
        with pytest.raises(kbitprep.NotTrainableError, match="is_trainable=False, is_qat_trainable=False"):
            kbitprep.prepare(model)
        assert model_state(model) == before


def test_a_specific_backend_wins_and_the_fallback_stays_silent() -> None:
    """A model whose quantizer a plugin knows (bnb) is never led by the fallback, and gets no fallback warning."""
    pytest.importorskip("bitsandbytes")
    from .cases.bnb import load_bnb_4bit

    model = load_bnb_4bit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        the_plan = kbitprep.plan(model)
    assert the_plan.backends == ("bnb-4bit",)
    assert not _fallback_warnings(caught)
