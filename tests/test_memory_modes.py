"""Memory modes: the chunked output head, offloaded checkpointing and the presets (real tiny Llamas)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

import kbitprep
from kbitprep._memory import (
    MEMORY_PRESETS,
    OffloadHooks,
    chunked_causal_lm_loss,
    full_logits,
    memory_modes,
    set_memory_modes,
)
from kbitprep.errors import InvalidPolicyError, KbitprepWarning, NotPreparedError

from .state import model_state
from .tiny import nf4_config, tiny_llama

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-3, atol=2e-3)}


def _batch(seq: int = 40, vocab: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # prompt tokens that do not count
    labels[1, -3:] = -100
    return {"input_ids": ids, "labels": labels}


def _train_step(
    model: nn.Module, batch: dict[str, torch.Tensor], **extra: object
) -> tuple[float, dict[str, torch.Tensor], Any]:
    model.train()
    out = model(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return float(out.loss.detach()), grads, out


def _unfreeze_some(model: nn.Module) -> None:
    """Stand in for adapters: a few projection weights train (prepare froze everything)."""
    for n, p in model.named_parameters():
        if n.endswith(("q_proj.weight", "down_proj.weight")):
            p.requires_grad_(True)


# --------------------------------------------------------------------------- the loss itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_items_in_batch": 50},
        {"num_items_in_batch": torch.tensor(61)},
        {"ignore_index": 7},
        {"shift_labels": True},
    ],
    ids=["mean", "num_items-int", "num_items-tensor", "ignore_index", "shift_labels"],
)
def test_chunked_loss_equals_transformers_loss(dtype: torch.dtype, kw: dict[str, object]) -> None:
    torch.manual_seed(0)
    head = nn.Linear(32, 100, bias=True, dtype=dtype)
    hidden = torch.randn(3, 29, 32, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 100, (3, 29))
    labels[0, :5] = kw.get("ignore_index", -100)  # type: ignore[index]
    labels[2, 10:] = kw.get("ignore_index", -100)  # type: ignore[index]
    call = dict(kw)
    if call.pop("shift_labels", False):
        call["shift_labels"] = torch.roll(labels, -1, dims=1)
    ref = ForCausalLMLoss(head(hidden), labels, 100, **call)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    got = chunked_causal_lm_loss(hidden, labels, head, chunk_tokens=8, **call)  # type: ignore[arg-type]
    (g_got,) = torch.autograd.grad(got, hidden)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, **TOL[dtype])
    torch.testing.assert_close(g_got, g_ref, **TOL[dtype])


def test_chunked_loss_nothing_counted_is_nan_like_transformers() -> None:
    head = nn.Linear(8, 10)
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    labels = torch.full((1, 5), -100)
    ref = ForCausalLMLoss(head(hidden), labels, 10)
    got = chunked_causal_lm_loss(hidden, labels, head, chunk_tokens=2)
    assert torch.isnan(ref) and torch.isnan(got)
    got.backward()  # still part of the graph
    assert hidden.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_head_model_loss_and_grads_equal_plain(dtype: torch.dtype) -> None:
    plain = tiny_llama(dtype)
    chunked = tiny_llama(dtype)
    kbitprep.prepare(plain)
    kbitprep.prepare(chunked, memory={"chunked_head": 16})  # 2 x 39 counted positions -> several chunks
    _unfreeze_some(plain)
    _unfreeze_some(chunked)
    batch = _batch()
    loss_p, grads_p, out_p = _train_step(plain, batch)
    loss_c, grads_c, out_c = _train_step(chunked, batch)
    assert out_p.logits is not None and out_c.logits is None  # documented: logits are skipped
    assert loss_c == pytest.approx(loss_p, rel=TOL[dtype]["rtol"], abs=TOL[dtype]["atol"])
    assert grads_c.keys() == grads_p.keys() and grads_c
    for name in grads_p:
        torch.testing.assert_close(
            grads_c[name],
            grads_p[name],
            rtol=0.05 if dtype == torch.bfloat16 else 1e-4,
            atol=2e-3 if dtype == torch.bfloat16 else 1e-6,
        )


def test_chunked_head_honours_num_items_in_batch() -> None:
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory={"chunked_head": 16})
    batch = _batch()
    loss_c, _, _ = _train_step(model, batch, num_items_in_batch=torch.tensor(100))
    with full_logits(model):
        loss_p, _, out = _train_step(model, batch, num_items_in_batch=torch.tensor(100))
    assert out.logits is not None
    assert loss_c == pytest.approx(loss_p, rel=1e-5)


def test_chunked_head_only_when_training_with_labels() -> None:
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory="chunked_head")
    batch = _batch()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits is not None and out.loss is not None  # evaluation keeps logits
    model.train()
    assert model(input_ids=batch["input_ids"]).logits is not None  # no labels: plain forward


# --------------------------------------------------------------------------- switching off, undo


def test_switch_off_and_on_at_run_time() -> None:
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory={"chunked_head": 16})
    batch = _batch()
    before = set_memory_modes(model, chunked_head=False)
    assert before == {"chunked_head": 16, "offload": False}
    loss_off, _, out_off = _train_step(model, batch)
    assert out_off.logits is not None
    set_memory_modes(model, chunked_head=True)
    loss_on, _, out_on = _train_step(model, batch)
    assert out_on.logits is None and memory_modes(model)["chunked_head"] == 16
    assert loss_on == pytest.approx(loss_off, rel=1e-5)
    with pytest.raises(InvalidPolicyError, match="offload|chunked"):
        set_memory_modes(model, chunked_head=-3)


def test_switching_needs_an_installed_mode() -> None:
    model = tiny_llama(torch.float32)
    with pytest.raises(NotPreparedError):
        set_memory_modes(model, chunked_head=False)
    kbitprep.prepare(model, memory="offload")
    with pytest.raises(InvalidPolicyError, match="memory='chunked_head'"):
        set_memory_modes(model, chunked_head=True)


@pytest.mark.parametrize(
    "memory",
    ["chunked_head", "offload", "lowest", {"chunked_head": 8, "offload": True}],
    ids=["chunked_head", "offload", "lowest", "mapping"],
)
def test_undo_is_exact_with_modes_on(memory: object) -> None:
    model = tiny_llama(torch.bfloat16)
    before = model_state(model)
    forward_attrs = {n for n, m in model.named_modules() if "forward" in vars(m)}
    kbitprep.prepare(model, memory=memory)  # type: ignore[arg-type]
    assert any("memory:" in s for s in kbitprep.report(model).steps)
    _unfreeze_some(model)
    _train_step(model, _batch())
    kbitprep.undo(model)
    assert model_state(model) == before
    assert {n for n, m in model.named_modules() if "forward" in vars(m)} == forward_attrs
    assert not any("_kbitprep_memory" in vars(m) for m in model.modules())
    out = model(**_batch())
    assert out.logits is not None


def test_failed_prepare_leaves_no_memory_mode_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    from kbitprep import _mutation

    model = tiny_llama(torch.bfloat16)
    before = model_state(model)

    real = _mutation.apply_memory_modes

    def boom(model: nn.Module, plan: object) -> str:
        real(model, plan)  # type: ignore[arg-type]
        raise RuntimeError("a later step failed")

    monkeypatch.setattr(_mutation, "apply_memory_modes", boom)
    with pytest.raises(RuntimeError, match="later step"):
        kbitprep.prepare(model, memory="lowest")
    assert model_state(model) == before
    assert not any("forward" in vars(m) or "_kbitprep_memory" in vars(m) for m in model.modules())


# --------------------------------------------------------------------------- through PEFT


def test_lowest_preset_trains_through_peft() -> None:
    peft = pytest.importorskip("peft")
    losses = {}
    for memory in ("default", "lowest"):
        model = tiny_llama(torch.bfloat16)
        kbitprep.prepare(model, memory=memory)
        torch.manual_seed(0)
        lora = peft.get_peft_model(
            model,
            peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
        )
        # PeftModel -> LoraModel.forward -> the base model's (patched) forward; Trainer reads its signature
        assert "labels" in inspect.signature(lora.base_model.model.forward).parameters
        opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for step in range(3):
            lora.train()
            out = lora(**_batch(seed=step))
            out.loss.backward()
            lora_grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
            assert lora_grads and all(g is not None for g in lora_grads)
            opt.step()
            opt.zero_grad()
            run.append(float(out.loss.detach()))
            assert (out.logits is None) == (memory == "lowest")
        losses[memory] = run
        if memory == "lowest":
            stats = memory_modes(lora)
            assert stats["chunked_head"] == 256 and stats["offload"] and stats["packed"] > 0
            kbitprep.undo(lora)  # adapters stay, modes go
            assert not any("_kbitprep_memory" in vars(m) for m in lora.modules())
            assert lora(**_batch()).logits is not None
    assert losses["lowest"] == pytest.approx(losses["default"], rel=2e-3)


def test_adapter_on_lm_head_falls_back_to_full_logits() -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory={"chunked_head": 16})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0))
    with pytest.warns(KbitprepWarning, match="output head was replaced"):
        loss, _, out = _train_step(lora, _batch())
    assert out.logits is not None and memory_modes(lora)["chunked_head_fallback"]
    with full_logits(lora):
        ref, _, _ = _train_step(lora, _batch())
    assert loss == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------- offload


def test_offload_on_cpu_is_a_no_op_with_the_hooks_running() -> None:
    losses, grads = {}, {}
    for memory in ("default", "offload"):
        model = tiny_llama(torch.bfloat16)
        kbitprep.prepare(model, memory=memory)
        _unfreeze_some(model)
        losses[memory], grads[memory], _ = _train_step(model, _batch())
        if memory == "offload":
            stats = memory_modes(model)
            assert stats["packed"] > 0  # the saved-tensor hooks were active during the forward
            assert stats["offloaded"] == 0  # everything already lives in CPU memory
            assert any("CPU memory" in n for n in kbitprep.report(model).plan.notes)
    assert losses["offload"] == losses["default"]
    assert grads["offload"].keys() == grads["default"].keys()
    for name, g in grads["default"].items():
        assert torch.equal(grads["offload"][name], g)


def test_offload_hooks_round_trip_through_copies() -> None:
    """Exercise pack/unpack with real copies (the CUDA path copies through pinned memory instead)."""
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, checkpointing="reentrant")
    _unfreeze_some(model)
    batch = _batch()
    ref_loss, ref_grads, _ = _train_step(model, batch)
    hooks = OffloadHooks(min_bytes=0, force_copy=True)
    model.train()
    with hooks.context():
        out = model(**batch)
    out.loss.backward()
    assert hooks.offloaded > 0 and hooks.offloaded_bytes > 0
    assert hooks.offloaded < hooks.packed  # parameters (and views of them) are never copied
    assert float(out.loss.detach()) == ref_loss
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert p.grad is not None and torch.equal(p.grad, ref_grads[n])


#: GPU clock cycles torch.cuda._sleep spins: about 10 ms per copy on the copy stream, 50 ms of backlog on
#: the compute stream before each forward - far longer than the tiny model's kernels, so a missing
#: stream wait or record_stream reads memory that is not written yet (or already reused).
COPY_DELAY_CYCLES = 20_000_000
BACKLOG_CYCLES = 100_000_000


def _cuda_run(
    model: nn.Module, steps: int, vocab: int = 256, autocast: bool = False, delay: bool = False
) -> tuple[list[float], list[dict[str, torch.Tensor]], int]:  # pragma: no cover - GPU only
    """``steps`` AdamW steps on distinct batches; per-step losses and gradients, peak allocated bytes."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    losses, grads = [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, vocab, (4, 1024), generator=g).cuda()
        if delay:
            torch.cuda._sleep(BACKLOG_CYCLES)  # the forward's kernels queue behind this on the compute stream
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        del out
    torch.cuda.synchronize()
    return losses, grads, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_on_cuda_survives_delayed_copies_and_lowers_peak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # pragma: no cover - GPU only
    """Several steps with the copy stream delayed and the compute stream backlogged: the results match
    the run without offload only if every stream wait and record_stream is in place."""
    from kbitprep._memory import offload as offload_module

    layers, steps = 4, 4
    results = {}
    for memory in ("default", "offload"):
        model = tiny_llama(torch.bfloat16, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers).cuda()
        kbitprep.prepare(model, memory=memory, checkpointing="reentrant")
        _unfreeze_some(model)
        if memory == "offload":
            monkeypatch.setattr(
                offload_module, "_BEFORE_COPY", lambda kind, stream: torch.cuda._sleep(COPY_DELAY_CYCLES)
            )
        results[memory] = _cuda_run(model, steps, delay=memory == "offload")
        if memory == "offload":
            stats = memory_modes(model)
            # each checkpointed layer's input once per step; the final norm's input and the head's stay
            assert stats["offloaded"] == steps * layers
            assert stats["kept"] > 0 and stats["peak_host_bytes"] > 0
    (ref_losses, ref_grads, ref_peak), (losses, grads, peak) = results["default"], results["offload"]
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for step, (got, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert got.keys() == ref.keys()
        for n, g in ref.items():
            torch.testing.assert_close(got[n], g, msg=lambda m, n=n, step=step: f"step {step}, {n}: {m}")
    assert peak < ref_peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lowest_with_bitsandbytes_under_autocast_on_cuda(tmp_path: Any) -> None:  # pragma: no cover - GPU only
    """The chunked head and offload on a bitsandbytes NF4 model with LoRA under bf16 autocast."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    tiny_llama(torch.bfloat16, hidden_size=512, intermediate_size=1024, num_hidden_layers=2).save_pretrained(tmp_path)
    results = {}
    for memory in ("default", "lowest"):
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path,
            quantization_config=nf4_config(),
            dtype=torch.bfloat16,
            device_map={"": 0},
        )
        kbitprep.prepare(model, memory=memory)
        torch.manual_seed(0)
        lora = peft.get_peft_model(
            model, peft.LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
        )
        results[memory] = _cuda_run(lora, 3, autocast=True)
        if memory == "lowest":
            stats = memory_modes(lora)
            assert stats["chunked_head"] == 256 and not stats["chunked_head_fallback"]
            assert stats["offloaded"] > 0
    assert results["lowest"][0] == pytest.approx(results["default"][0], rel=1e-3)
    assert results["lowest"][2] < results["default"][2]


# --------------------------------------------------------------------------- presets and bad input


def test_lowest_preset_plans_no_upcast_reentrant_and_both_modes() -> None:
    model = tiny_llama(torch.bfloat16)
    plan = kbitprep.plan(model, memory="lowest")
    assert plan.upcast_policy == "none"
    assert plan.checkpointing is kbitprep.CheckpointMode.REENTRANT
    spec = plan.extras["memory"]
    assert spec["preset"] == "lowest" and spec["chunked_head"] == 256 and spec["offload"] is True
    assert spec["head"] == "lm_head"
    assert "memory" in str(plan) and "chunked_head=256" in str(plan)
    assert plan.to_dict()["extras"]["memory"]["offload"] is True
    # explicit options win over the preset's
    other = kbitprep.plan(model, memory="lowest", upcast="norms", checkpointing="non_reentrant")
    assert other.upcast_policy == "norms" and other.checkpointing is kbitprep.CheckpointMode.NON_REENTRANT
    assert "memory" not in kbitprep.plan(model).extras


@pytest.mark.parametrize(
    "memory, match",
    [
        ("fastest", "'lowest'"),
        ("LOWEST", "'default', 'chunked_head', 'offload', 'lowest'"),
        (3, "valid choices"),
        ({"preset": "lowest", "chunk": 5}, "unknown key"),
        ({"chunked_head": 0}, "positive token count"),
        ({"chunked_head": "big"}, "positive token count"),
        ({"offload": "yes"}, "True or False"),
        ({"preset": 1}, "preset name"),
    ],
)
def test_invalid_memory_choices_raise_and_change_nothing(memory: object, match: str) -> None:
    model = tiny_llama(torch.bfloat16)
    before = model_state(model)
    with pytest.raises(InvalidPolicyError, match=match):
        kbitprep.prepare(model, memory=memory)  # type: ignore[arg-type]
    with pytest.raises(InvalidPolicyError, match=match):
        kbitprep.plan(model, memory=memory)  # type: ignore[arg-type]
    assert model_state(model) == before


def test_invalid_preset_message_lists_every_choice() -> None:
    with pytest.raises(InvalidPolicyError) as info:
        kbitprep.plan(tiny_llama(), memory="smallest")
    for name in MEMORY_PRESETS:
        assert repr(name) in str(info.value)


def test_chunked_head_on_a_model_without_a_head() -> None:
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    with pytest.raises(InvalidPolicyError, match="chunked output head does not apply"):
        kbitprep.plan(model, memory="chunked_head")
    plan = kbitprep.plan(model, memory="lowest")  # a combined preset skips what does not apply
    assert plan.extras["memory"]["chunked_head"] == 0
    assert any("chunked output head skipped" in n for n in plan.notes)


def test_verify_and_deepcopy_with_the_lowest_preset() -> None:
    model = tiny_llama(torch.bfloat16)
    kbitprep.prepare(model, memory="lowest", verify=True)
    packed = memory_modes(model)["packed"]
    assert packed > 0  # verify's probe ran through the patched forward
    clone = copy.deepcopy(model)
    _unfreeze_some(clone)
    _, grads, out = _train_step(clone, _batch())
    assert out.logits is None and grads
    assert memory_modes(clone)["packed"] > 0
    assert memory_modes(model)["packed"] == packed  # the copy's forward runs on the copy, not the original
