"""EETQ traps: PEFT's LoRA needs the `eetq` package; weight_scales are created trainable and EETQ's
backward cannot give them a gradient. Uses the stand-in kernel and package of ``builders_eetq``, only
inside :func:`eetq_stand_in`."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import kbitprep

from ..state import model_state
from .builders_eetq import eetq_llama, eetq_stand_in

NOTE = "the `eetq` package is not importable"


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _stand_in_absent() -> bool:
    import peft.import_utils
    import peft.tuners.lora.eetq as lora_eetq
    import transformers.integrations.eetq as hf_eetq

    return (
        "eetq" not in sys.modules
        and importlib.util.find_spec("eetq") is None
        and not peft.import_utils.is_eetq_available()
        and not hasattr(lora_eetq, "EetqLoraLinear")
        and not hasattr(hf_eetq, "eetq_kernels_hub")
    )


def test_peft_lora_needs_the_eetq_package_and_the_plan_says_so() -> None:
    assert _stand_in_absent()
    model = eetq_llama()
    plan = kbitprep.plan(model)
    assert plan.backend == "eetq"
    assert any(NOTE in n for n in plan.notes), plan.notes
    with pytest.raises(ValueError, match="not supported"):  # PEFT refuses EetqLinear without `import eetq`
        _lora(model)

    with eetq_stand_in():
        model = eetq_llama()
        plan = kbitprep.plan(model)
        assert not any(NOTE in n for n in plan.notes), plan.notes
        kbitprep.prepare(model)
        peft_model = _lora(model)
        wrapped = {type(m).__name__ for n, m in peft_model.named_modules() if n.endswith(("q_proj", "v_proj"))}
        assert wrapped == {"EetqLoraLinear"}
    assert _stand_in_absent(), "the stand-in leaked out of its context"


def test_weight_scales_are_created_trainable_and_break_eetq_backward_unless_frozen() -> None:
    with eetq_stand_in():
        raw = eetq_llama()
        layer = raw.model.layers[0].self_attn.q_proj
        assert layer.weight_scales.requires_grad and not layer.weight.requires_grad
        x = torch.randn(2, 5, layer.weight.shape[0], dtype=torch.float16, generator=torch.Generator().manual_seed(0))
        # EETQ's backward computes the input's gradient only: asked for the scales' alone it crashes.
        with pytest.raises(UnboundLocalError, match="grad_input"):
            layer(x).float().sum().backward()

        model = eetq_llama()
        kbitprep.prepare(model)
        layer = model.model.layers[0].self_attn.q_proj
        decl = kbitprep.report(model).plan
        assert {f"model.layers.0.self_attn.q_proj.{t}" for t in ("weight", "weight_scales")} <= {
            a for p in decl.quantized for a in p.aliases
        }
        assert not layer.weight_scales.requires_grad
        assert not layer(x).requires_grad  # nothing asks EETQ's backward for a scale gradient any more
        x.requires_grad_(True)
        layer(x).float().sum().backward()
        dequantized = layer.weight.to(torch.float16) * layer.weight_scales  # [in, out]
        expected = torch.ones(2, 5, dequantized.shape[1], dtype=torch.float16) @ dequantized.t()
        assert x.grad is not None and torch.equal(x.grad, expected)


def test_nothing_is_upcast_because_the_kernel_reads_fp16_activations() -> None:
    with eetq_stand_in():
        model = eetq_llama()
        before = model_state(model)
        with pytest.raises(kbitprep.InvalidPolicyError, match="fp16 activations"):
            kbitprep.prepare(model, upcast="norms")
        assert model_state(model) == before
        kbitprep.prepare(model)
        assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float16}
