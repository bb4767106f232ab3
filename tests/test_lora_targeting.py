"""kbitprep.lora_config / lora_targets: LoRA on every quantized and plain linear layer, any backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.errors import InvalidPolicyError

from .backends.cases.hqq import load_hqq
from .tiny import batch, saved_tiny_llama

peft = pytest.importorskip("peft")


def _train_two_steps(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two AdamW steps; returns each LoRA tensor's gradient from the second step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    grads: dict[str, torch.Tensor] = {}
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch()).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
        opt.step()
    return grads


def _lora_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if "lora_" in n]


@pytest.fixture(scope="module")
def hqq_model() -> nn.Module:
    return load_hqq()


def test_peft_all_linear_misses_every_hqq_layer(hqq_model: nn.Module) -> None:
    """The gap lora_config closes: PEFT's all-linear finds no HQQLinear (they are not nn.Linear)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    cfg = peft.LoraConfig(r=4, target_modules="all-linear")
    cfg = _maybe_include_all_linear_layers(cfg, hqq_model)
    assert cfg.target_modules == set(), cfg.target_modules  # only lm_head was linear, and it is excluded


def test_hqq_trains_with_lora_config(hqq_model: nn.Module) -> None:
    model = hqq_model
    targets = kbitprep.lora_targets(model)
    hqq_layers = [n for n, m in model.named_modules() if type(m).__name__ == "HQQLinear"]
    assert hqq_layers and set(hqq_layers) <= set(targets)
    assert "lm_head" not in targets
    kbitprep.prepare(model)
    cfg = kbitprep.lora_config(model, r=4)
    assert cfg.r == 4 and cfg.lora_alpha == 8
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    peft_model = peft.get_peft_model(model, cfg)
    names = _lora_names(peft_model)
    assert len(names) == 2 * len(hqq_layers)
    grads = _train_two_steps(peft_model)
    zero = [n for n in names if n not in grads or not grads[n].abs().sum() > 0]
    assert not zero, f"LoRA tensors without gradient: {zero}"
    kbitprep.undo(peft_model)


def test_bnb_targets_are_the_quantized_layers_and_not_the_head() -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        saved_tiny_llama(), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    targets = kbitprep.lora_targets(model)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert targets == quantized
    assert kbitprep.lora_targets(model, include_head=True) == [*quantized, "lm_head"]


def test_plain_model_targets_every_linear_but_the_head() -> None:
    from .tiny import tiny_llama

    model = tiny_llama()
    targets = kbitprep.lora_targets(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert targets == linears


def test_partial_leaf_names_stay_full_names() -> None:
    """A leaf name only some of whose modules are targets is listed by full name."""
    from .tiny import tiny_llama

    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj = nn.Identity()  # type: ignore[assignment]
    cfg = kbitprep.lora_config(model)
    assert "q_proj" not in cfg.target_modules
    assert "model.layers.1.self_attn.q_proj" in cfg.target_modules


def test_target_modules_cannot_be_passed() -> None:
    from .tiny import tiny_llama

    with pytest.raises(InvalidPolicyError, match="chooses target_modules itself"):
        kbitprep.lora_config(tiny_llama(), target_modules=["q_proj"])


def test_a_peft_wrapped_model_gives_the_same_targets() -> None:
    """On a PEFT-wrapped model the targets are the LoRA layers (never their ``base_layer`` or adapters)."""
    from .tiny import tiny_llama

    model = tiny_llama()
    before = kbitprep.lora_targets(model)
    wrapped = peft.get_peft_model(model, kbitprep.lora_config(model, r=4))
    after = kbitprep.lora_targets(wrapped)
    assert [n.removeprefix("base_model.model.") for n in after] == before
    assert not any(n.endswith("base_layer") or "lora_" in n for n in after)
    assert "base_layer" not in kbitprep.lora_config(wrapped).target_modules


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r=0 is not a LoRA rank"),
        ({"r": -3}, "r=-3 is not a LoRA rank"),
        ({"r": 2.5}, "r=2.5 is not a LoRA rank"),
        ({"r": True}, "r=True is not a LoRA rank"),
        ({"lora_alpha": 0}, "lora_alpha=0 is not a LoRA alpha"),
        ({"lora_alpha": -16}, "lora_alpha=-16 is not a LoRA alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha=nan"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0 must be a number from 0"),
        ({"lora_dropout": -0.1}, "lora_dropout=-0.1"),
        ({"lora_dropout": "0.1"}, "lora_dropout='0.1'"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0 is not a LoRA rank"),
        ({"alpha_pattern": {"q_proj": -1}}, r"alpha_pattern\['q_proj'\]=-1 is not a LoRA alpha"),
        ({"experts": "yes"}, "experts='yes' must be True or False"),
        ({"experts": True, "lora_dropout": 0.05}, "cannot be used with experts=True"),
        ({"target_parameters": ["experts.down_proj"]}, "chooses target_parameters itself"),
    ],
)
def test_invalid_numbers_are_refused_and_the_model_is_untouched(kwargs: dict[str, object], match: str) -> None:
    """PEFT accepts ``r=0`` and ``r=-3`` in the config and fails (or trains nothing) much later."""
    from kbitprep.testing import model_state

    from .tiny import tiny_llama

    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(InvalidPolicyError, match=match):
        kbitprep.lora_config(model, **kwargs)  # type: ignore[arg-type]
    assert model_state(model) == before


def test_valid_numbers_pass_through() -> None:
    from .tiny import tiny_llama

    cfg = kbitprep.lora_config(tiny_llama(), r=1, lora_alpha=0.5, lora_dropout=0.0, rank_pattern={"q_proj": 2})
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.rank_pattern) == (1, 0.5, 0.0, {"q_proj": 2})
