"""LoRA on mixture-of-experts models: ``kbitprep.lora_config(model, experts=True)`` adapts the fused
expert weights (3-D parameters, which bitsandbytes leaves in bf16) through PEFT's ``target_parameters``.

Tiny Qwen3-MoE and Mixtral models are built from a config, saved, and reloaded with bitsandbytes NF4
(the attention linears quantized, the experts not); each trains two AdamW steps with the experts'
adapters, which must all get a gradient while the quantized storage stays bit-exact, and undo
(after PEFT's ``unload``) must give back exactly the loaded model.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep._experts import expert_parameters, router_modules
from kbitprep._lora import expert_target_parameters
from kbitprep.plugin import fused_expert_note
from kbitprep.testing import model_state, storage_digest

from .tiny import batch, nf4_config
from .tiny_configs import tiny_moe_config

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

#: The families the expert-adapter training test loads.
FAMILIES = ("qwen3_moe", "mixtral")


@functools.cache
def _saved(model_type: str) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix=f"kbitprep-{model_type}-"))
    AutoModelForCausalLM.from_config(tiny_moe_config(model_type)).to(torch.bfloat16).save_pretrained(path)
    return path


def load_nf4(model_type: str) -> nn.Module:
    """The tiny model reloaded with bitsandbytes NF4, in train mode before any forward (see
    backends-on-cpu.md: an eval-mode forward repacks the weights for a kernel without autograd)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_saved(model_type), quantization_config=nf4_config())
    model.train()
    return model


def _quantized_digests(model: nn.Module) -> dict[str, str]:
    """Digest of every ``Params4bit`` storage, by its name without PEFT's ``base_layer`` steps."""
    return {
        n.replace(".base_layer.", "."): storage_digest(p)
        for n, p in model.named_parameters()
        if type(p).__name__ == "Params4bit"
    }


@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_adapters_train_on_a_bnb_4bit_moe_and_undo_is_exact(model_type: str) -> None:
    model = load_nf4(model_type)
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert experts and all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n in experts)
    quantized = _quantized_digests(model)
    assert quantized  # the attention projections are Linear4bit
    before = model_state(model)

    kbitprep.prepare(model)
    cfg = kbitprep.lora_config(model, r=4, experts=True)
    assert set(cfg.target_parameters) == {"experts.gate_up_proj", "experts.down_proj"}
    assert not any(t.rsplit(".", 1)[-1] == "gate" for t in cfg.target_modules)  # the router is left out
    peft_model = peft.get_peft_model(model, cfg)
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert all(p.requires_grad for p in lora.values())
    expert_lora = [n for n in lora if ".experts." in n]
    assert len(expert_lora) == 2 * len(experts)  # lora_A and lora_B per fused expert weight

    opt = torch.optim.AdamW(list(lora.values()), lr=1e-2)
    grads: dict[str, torch.Tensor] = {}
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft_model(**batch()).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in lora.items() if p.grad is not None}
        opt.step()
    missing = [n for n in lora if n not in grads or not grads[n].abs().sum() > 0]
    assert not missing, f"LoRA tensors without a gradient: {missing}"
    assert torch.isfinite(loss)
    assert _quantized_digests(peft_model.base_model.model) == quantized  # bit-exact after two steps

    base = peft_model.unload()
    kbitprep.undo(base)
    assert model_state(base) == before


def test_router_targets_only_when_asked() -> None:
    """The router (a ``*Router`` module) takes no adapter by default; ``router=True`` adds its weight."""
    model = load_nf4("qwen3_moe")
    assert router_modules(model) == [f"model.layers.{i}.mlp.gate" for i in range(2)]
    assert expert_target_parameters(model) == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    ]
    plain = kbitprep.lora_config(model, r=4, experts=True)
    with_router = kbitprep.lora_config(model, r=4, experts=True, router=True)
    assert set(with_router.target_parameters) == {*plain.target_parameters, "gate.weight"}
    router_only = kbitprep.lora_config(model, r=4, router=True)
    assert list(router_only.target_parameters) == ["gate.weight"]
    assert getattr(kbitprep.lora_config(model, r=4), "target_parameters", None) in (None, [])


def test_linear_routers_are_left_out_of_the_module_targets() -> None:
    """A router that is an ``nn.Linear`` (Llama 4's) is not a target unless ``router=True``."""

    class TinyRouter(nn.Linear):
        pass

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.router = TinyRouter(8, 4)

    model = nn.Sequential(Block(), nn.Linear(8, 8))
    assert kbitprep.lora_targets(model) == ["0.proj", "1"]
    assert kbitprep.lora_targets(model, router=True) == ["0.proj", "0.router", "1"]


def test_fused_expert_note_matches_the_bitsandbytes_plan_note() -> None:
    """One wording and one share for the plan's note (the bnb plugin, through the contract's
    ``fused_expert_note``) and the estimate's."""

    from kbitprep._experts import fused_expert_figures
    from kbitprep.app.estimate_sim import expert_note
    from kbitprep.app.metaplan import SCHEMES

    model = load_nf4("mixtral")
    note = fused_expert_note(model, "bitsandbytes")
    from_figures = expert_note(fused_expert_figures(model.modules()), SCHEMES["bnb-4bit"])
    assert note == (from_figures,) and note[0] in kbitprep.plan(model).notes  # the bitsandbytes plan's note
    fused = sum(p.numel() * p.element_size() for _, p in expert_parameters(model))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert f"{100 * fused / total:.0f}% of the loaded bytes" in note[0]
    assert note[0].startswith("4 fused expert weights")


def test_linear_subclasses_are_targets_when_they_act_as_linear_layers() -> None:
    """Falcon's ``FalconLinear`` (its own forward, still ``x @ W.T``) takes an adapter; DeepSeek-V4's grouped
    projection (an ``nn.Linear`` whose forward is a block-diagonal product) does not: PEFT's LoRA layer
    would add ``B @ A @ x`` of the wrong shape."""

    class OwnForwardLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    class GroupedLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight.view(2, -1, x.shape[-1]).transpose(1, 2)
            return torch.bmm(x.reshape(-1, 2, x.shape[-1]).transpose(0, 1), w).transpose(0, 1)

    model = nn.Sequential(OwnForwardLinear(8, 8), GroupedLinear(8, 8), nn.Linear(8, 4))
    assert kbitprep.lora_targets(model) == ["0", "2"]
    assert model[0].weight.device.type == "cpu"  # probed on the meta device, the module untouched
