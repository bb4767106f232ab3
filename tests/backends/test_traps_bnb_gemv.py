"""bitsandbytes' CPU 4-bit repack, after kbitprep's ``bnb-cpu-unpack`` fix-up: no gradient goes
through ``bitsandbytes::gemv_4bit`` (the kernel without autograd), and the LoRA gradients are those
of a model that was never repacked.

Where torch's warning "bitsandbytes::gemv_4bit: an autograd kernel was not registered ... silently
incorrect behavior" comes from: a backward through weights bnb repacked, i.e. only when the fix-up
did not run. The eval-mode forward that repacks (and then runs ``gemv_4bit``) needs no gradient and
does not warn; a prepared model never calls the kernel again, in training or in eval.

On an AVX512-BF16 CPU only: elsewhere bitsandbytes never repacks (test_traps_bnb covers the fix-up
on any CPU with bnb's own repacking function).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import kbitprep

from ..tiny import batch

pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import dequantize_blockwise, has_avx512bf16

from .cases.bnb import load_bnb_4bit

pytestmark = pytest.mark.skipif(
    not has_avx512bf16(), reason="this CPU has no AVX512-BF16: bitsandbytes never repacks, gemv_4bit is never used"
)

GEMV = "bitsandbytes::gemv_4bit"
NO_AUTOGRAD = "bitsandbytes::gemv_4bit: an autograd kernel was not registered"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _linear4bit(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def _repacked() -> nn.Module:
    """A bnb 4-bit model after the eval-mode no-grad forward that makes bnb repack every weight."""
    model = load_bnb_4bit()
    with torch.no_grad():
        model(**batch())
    assert all(m.weight.quant_state.packing_format_for_cpu for m in _linear4bit(model).values())
    return model


def _with_lora(model: nn.Module) -> nn.Module:
    """LoRA on every linear, seeded, with non-zero lora_B (so lora_A gets a non-zero gradient too)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    wrapped.train()
    assert isinstance(wrapped, nn.Module)
    return wrapped


def _step(wrapped: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], set[str], list[str]]:
    """One training forward + backward: (loss, LoRA grads, kernels run, warnings raised)."""
    with (
        warnings.catch_warnings(record=True) as caught,
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        warnings.simplefilter("always")
        loss = wrapped(**batch()).loss
        loss.backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {e.key for e in prof.key_averages()}, [str(w.message) for w in caught]


def _ops(fn: object) -> Iterator[str]:
    """The operators ``fn()`` runs (names as the profiler reports them, ``bitsandbytes::gemv_4bit``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()  # type: ignore[operator]
    yield from (e.key for e in prof.key_averages())


@pytest.mark.slow
def test_no_gradient_goes_through_gemv_4bit_after_the_fixup() -> None:
    # The eval forward that repacks runs the kernel, without grad and without the warning.
    model = load_bnb_4bit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            eval_ops = set(_ops(lambda: model(**batch())))
    assert GEMV in eval_ops, "the eval forward did not use gemv_4bit: bnb's CPU path changed"
    assert not [w for w in caught if NO_AUTOGRAD in str(w.message)]

    # prepare (verify=True runs kbitprep's own forward/backward probe): no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kbitprep.prepare(model, verify=True)
    assert not [w for w in caught if NO_AUTOGRAD in str(w.message)]

    # Training after the fix-up: not one call of the kernel, forward or backward, and every LoRA grad non-zero.
    _, fixed, ops, messages = _step(_with_lora(model))
    assert GEMV not in ops
    assert not [m for m in messages if NO_AUTOGRAD in m]
    assert fixed and all(g is not None and bool(g.ne(0).any()) for g in fixed.values())
    # nor in eval after training: the fix-up stopped the repacking
    model.eval()
    with torch.no_grad():
        assert GEMV not in set(_ops(lambda: model(**batch())))

    # The control, fix-up removed from the plan: the backward goes through gemv_4bit and torch warns.
    # No gradient flows back through a repacked layer to its input, so with LoRA on every linear the
    # grads exist but are wrong (with LoRA on q_proj/v_proj only they stay None: test_traps_bnb).
    control = _repacked()
    kbitprep.prepare(control, plan=dataclasses.replace(kbitprep.plan(control), fixups=()))
    _, wrong, ops, messages = _step(_with_lora(control))
    assert GEMV in ops and [m for m in messages if NO_AUTOGRAD in m]
    cosines = [_cosine(wrong[n], g) for n, g in fixed.items()]
    assert min(cosines) < 0.9, "without the fix-up the LoRA gradients should be wrong"


def _cosine(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Cosine similarity of two gradients (both must exist)."""
    assert a is not None and b is not None
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _absmax(state: object) -> torch.Tensor:
    """The float absmax a (nested) QuantState dequantizes with."""
    s: object = state
    if getattr(s, "nested", False):
        return dequantize_blockwise(s.absmax, s.state2) + s.offset  # type: ignore[attr-defined]
    return s.absmax.float()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_lora_grads_after_the_unpack_equal_a_never_repacked_model() -> None:
    """Repacked then unpacked by the fix-up vs never repacked: 4-bit codes bit-identical, LoRA grads equal.

    bnb's repack (in the user's eval forward, before kbitprep runs) rounds each block's absmax to bf16
    in place and drops its double quantization; the unpack re-quantizes it. That rounding cannot be
    undone. So the never-repacked twin gets the quantization state the unpacked model has; with it,
    loss and every LoRA gradient are ``torch.equal``: nothing else of the repack survives, and no
    gradient takes another path. Against the twin's own, unrounded absmax the gradients differ only by
    that rounding (measured on an AVX512-BF16 CPU: cosine similarity >= 0.9998 per tensor, loss equal to
    3e-5 relative; asserted: 0.999 and 1e-4).
    """
    unpacked = _repacked()
    kbitprep.prepare(unpacked)
    assert [f.name for f in kbitprep.report(unpacked).plan.fixups] == ["bnb-cpu-unpack"]

    original = load_bnb_4bit()
    twin = load_bnb_4bit()
    for name, m in _linear4bit(twin).items():
        done, fresh = _linear4bit(unpacked)[name].weight, _linear4bit(original)[name].weight
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(done.data, m.weight.data), f"{name}: 4-bit codes differ after the unpack"
        assert not torch.equal(_absmax(done.quant_state), _absmax(fresh.quant_state)), "bnb's rounding changed"
        state = m.weight.quant_state
        state.absmax, state.offset = done.quant_state.absmax.clone(), done.quant_state.offset.clone()
        state.state2 = copy.deepcopy(done.quant_state.state2)
    # never repacked, never given the fix-up: prepared with the fix-up taken out of its plan
    for model in (twin, original):
        kbitprep.prepare(model, plan=dataclasses.replace(kbitprep.plan(model), fixups=()))
        assert not any(
            getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _linear4bit(model).values()
        )

    loss_u, grads_u, ops_u, _ = _step(_with_lora(unpacked))
    loss_t, grads_t, ops_t, _ = _step(_with_lora(twin))
    assert GEMV not in ops_u | ops_t
    assert len(grads_u) == 2 * len(TARGETS) * 2  # lora_A and lora_B, 7 linears, 2 layers
    assert torch.equal(loss_u, loss_t)
    for name, g in grads_u.items():
        assert g is not None and bool(g.ne(0).any()), name
        assert torch.equal(g, grads_t[name]), f"{name}: gradient differs from the never-repacked twin"

    loss_o, grads_o, _, _ = _step(_with_lora(original))
    assert abs(loss_u.item() - loss_o.item()) < 1e-4 * abs(loss_o.item())
    for name, g in grads_u.items():
        cosine = _cosine(g, grads_o[name])
        assert cosine > 0.999, f"{name}: cosine {cosine:.6f} with the unrounded model"
