"""The toyquant plugin's own tests: kbitprep's shipped contract suite, plus LoRA through PEFT.

Run with ``pytest`` from this folder once the distribution is installed (``pip install -e '.[test]'``).
The model is a tiny transformers Llama whose linear layers ``toyquant.quantize`` swapped for
``ToyInt8Linear``.
"""

from __future__ import annotations

import kbitprep
import peft
import pytest
from kbitprep.testing import BackendContract, tiny_causal_lm
from torch import nn

import toyquant
from toyquant_kbitprep import ToyQuantBackend


def toy_model() -> nn.Module:
    """A fresh tiny Llama quantized by toyquant (every linear but ``lm_head``)."""
    return toyquant.quantize(tiny_causal_lm())


class TestToyQuantBackend(BackendContract):
    """Every check of kbitprep's contract suite, on a toyquant model."""

    backend = ToyQuantBackend

    def make_model(self) -> nn.Module:
        return toy_model()


def test_peft_refuses_the_layer_without_the_mapping() -> None:
    model = toy_model()
    with pytest.raises(ValueError, match=r"Target module ToyInt8Linear\(.*\) is not supported"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))


def test_lora_config_attaches_the_plugins_lora_layer() -> None:
    model = kbitprep.prepare(toy_model())
    peft_model = peft.get_peft_model(model, kbitprep.lora_config(model, r=4))
    wrapped = [m for m in peft_model.modules() if type(m).__name__ == "ToyInt8LoraLinear"]
    assert len(wrapped) == 14  # 7 linears in each of 2 layers; lm_head is not a target
    assert all(isinstance(m.base_layer, toyquant.ToyInt8Linear) for m in wrapped)
