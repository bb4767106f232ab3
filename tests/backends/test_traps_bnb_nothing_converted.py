"""bitsandbytes configs that quantize nothing: transformers 5.24 converts no layer of a Falcon model
(its linears are ``FalconLinear``), yet the model carries the bnb quantizer and ``is_loaded_in_4bit``.
The plan must say so, and warn, instead of calling it a "bnb-4bit" model with 0 quantized tensors."""

from __future__ import annotations

import functools
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.errors import KbitprepWarning

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, FalconConfig, FalconForCausalLM

from .cases.bnb import load_bnb_4bit

_DIR = Path(tempfile.mkdtemp(prefix="kbitprep-falcon-"))
CONVERTED_NONE = "transformers converted no layer"


@functools.cache
def saved_tiny_falcon(dtype: torch.dtype) -> Path:
    """A tiny Falcon (2 layers, hidden 64), saved once per session."""
    path = _DIR / str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    model: nn.Module = FalconForCausalLM(
        FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    )
    model.to(dtype).save_pretrained(path)  # type: ignore[operator]
    return path


def load_falcon(bits: int) -> nn.Module:
    """The tiny Falcon reloaded with a bitsandbytes 4-bit (bf16) or 8-bit (fp16) config."""
    if bits == 4:
        qc, dtype = BitsAndBytesConfig(load_in_4bit=True), torch.bfloat16
    else:
        qc, dtype = BitsAndBytesConfig(load_in_8bit=True), torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(saved_tiny_falcon(dtype), quantization_config=qc, dtype=dtype)
    assert isinstance(model, nn.Module)
    return model


@pytest.mark.parametrize(("bits", "backend", "layer"), [(4, "bnb-4bit", "Linear4bit"), (8, "bnb-8bit", "Linear8bitLt")])
def test_a_bnb_config_that_converted_no_layer_is_said_and_warned(bits: int, backend: str, layer: str) -> None:
    model = load_falcon(bits)
    linears = [n for n, m in model.named_modules() if type(m).__name__ == "FalconLinear"]
    assert linears and not [m for m in model.modules() if type(m).__name__ == layer], "transformers converted some"
    assert getattr(model, f"is_loaded_in_{bits}bit") is True  # what makes this look like a bnb model

    with pytest.warns(KbitprepWarning, match=CONVERTED_NONE) as record:
        the_plan = kbitprep.plan(model)
    message = str(next(w.message for w in record if CONVERTED_NONE in str(w.message)))
    assert the_plan.backend == backend and not the_plan.quantized
    assert f"{len(linears)} x transformers.models.falcon.modeling_falcon.FalconLinear" in message
    assert f"bitsandbytes {bits}-bit quantization config" in message and "nothing is quantized" in message
    assert "torch.nn.modules.linear.Linear" not in message, "the output head is never quantized: not listed"
    assert any(CONVERTED_NONE in w for w in the_plan.warnings)
    text = str(the_plan)
    assert "0 layers with" in text and "transformers quantized no layer of this model" in text  # evidence
    assert CONVERTED_NONE in text  # the warning, with the plan

    # prepared as what it is, a full-precision model: every parameter frozen, nothing cast, with the warning
    with pytest.warns(KbitprepWarning, match=CONVERTED_NONE):
        kbitprep.prepare(model)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    assert kbitprep.report(model).plan.byte_delta == 0


def test_a_converted_model_gets_no_such_warning() -> None:
    """The control: the same check on a Llama whose linears bnb did convert stays silent."""
    model = load_bnb_4bit()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        the_plan = kbitprep.plan(model)
    assert the_plan.quantized and not the_plan.warnings
    assert not [w for w in record if CONVERTED_NONE in str(w.message)]


def test_a_quantized_classification_head_is_warned_with_the_fix(tmp_path: Path) -> None:
    """transformers 5.24 quantizes BERT's ``classifier`` under a 4-bit config; PEFT then fails to train it
    in full. The plan warns, naming the head and the ``llm_int8_skip_modules`` fix; with the fix, no warning."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, num_labels=3
    )
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    assert type(model.classifier).__name__ == "Linear4bit"
    with pytest.warns(
        kbitprep.BackendWarning, match=r"classification head \(classifier\).*llm_int8_skip_modules=\['classifier'\]"
    ):
        kbitprep.plan(model)
    fixed = BertForSequenceClassification.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["classifier"])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", kbitprep.BackendWarning)
        assert kbitprep.plan(fixed).warnings == ()


def test_fused_moe_experts_left_in_full_precision_are_noted(tmp_path: Path) -> None:
    """Mixtral's experts are fused 3-D parameters that transformers' bitsandbytes integration does not
    convert: the plan says how much of the model stays in full precision."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    fused = [n for n, p in model.named_parameters() if p.dim() >= 3]
    assert fused, "transformers now converts fused experts: this note is obsolete"
    plan = kbitprep.plan(model)
    note = next((n for n in plan.notes if "fused expert weights" in n), "")
    assert note.startswith(f"{len(fused)} fused expert weights") and "stay in full precision" in note, plan.notes
    dense = kbitprep.plan(load_bnb_4bit())
    assert not any("fused expert" in n for n in dense.notes)
