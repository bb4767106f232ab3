"""The CUDA memory modes' logic, checked on the CPU: offload copies (deduplication, what stays on the
device, views, in-place changes, host bytes), checkpointing modes, accelerate's device_map hooks and
``nn.DataParallel``. The offload path runs with ``force_copy=True``, which copies CPU tensors through
the same pack / unpack / deduplication code the CUDA path uses (only the copy function differs)."""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep._memory import OffloadHooks, chunked_causal_lm_loss, memory_modes, state_of
from kbitprep.errors import InvalidPolicyError, KbitprepWarning, UnsupportedModelError

from .state import model_state
from .test_memory_modes import _batch, _train_step, _unfreeze_some
from .tiny import tiny_llama

SEQ = 40  # _batch(): 2 x 40 tokens; the tiny Llama has hidden 64, vocab 256, 2 layers


def _layer_input_bytes(model: nn.Module) -> int:
    return 2 * SEQ * model.config.hidden_size * 4  # fp32


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every copy to host memory the offload hooks make: (storage address, byte offset, bytes)."""
    made: list[tuple[int, int, int]] = []
    real = OffloadHooks.copy_to_host

    def counting(self: OffloadHooks, src: torch.Tensor) -> Any:
        made.append((src.untyped_storage().data_ptr(), src.storage_offset(), src.numel()))
        return real(self, src)

    monkeypatch.setattr(OffloadHooks, "copy_to_host", counting)
    return made


@contextlib.contextmanager
def _count_eligible_saves(min_bytes: int) -> Iterator[list[int]]:
    """Count the saved tensors the offload hooks would consider (what a copy-per-save offload copies)."""
    seen: list[int] = []
    probe = OffloadHooks(min_bytes=min_bytes)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if probe._eligible(t):
            seen.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _prepared(memory: object = "offload", checkpointing: str = "reentrant", **kw: object) -> nn.Module:
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory=memory, checkpointing=checkpointing)  # type: ignore[arg-type]
    _unfreeze_some(model)
    state = state_of(model)
    assert state is not None
    state.offloader = OffloadHooks(**kw)  # type: ignore[arg-type]
    return model


# --------------------------------------------------------------------------- copy counts


def test_offload_copies_each_storage_once_and_keeps_the_head_on_the_device(copies: list[Any]) -> None:
    min_bytes = _layer_input_bytes(tiny_llama()) // 2  # layer inputs and the log-softmax qualify, rsqrt does not
    reference = tiny_llama(torch.float32)
    kbitprep.prepare(reference, checkpointing="reentrant")
    _unfreeze_some(reference)
    reference.train()
    with _count_eligible_saves(min_bytes) as saves:  # the forward only (the backward recomputes layers)
        ref_out = reference(**_batch())
    ref_out.loss.backward()
    ref_loss = float(ref_out.loss.detach())
    ref_grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.grad is not None}
    # what a copy-per-save offload moved: 2 layer inputs, the final norm's input twice (pow, mul),
    # the log-softmax twice (log_softmax, nll_loss): 6 saves of 4 storages
    assert (len(saves), len(set(saves))) == (6, 4)

    model = _prepared(min_bytes=min_bytes, force_copy=True)
    loss, grads, _ = _train_step(model, _batch())
    stats = memory_modes(model)
    # the inputs of the 2 checkpointed layers, once each; the final norm's input (the last tensor the
    # backbone saved, twice) stays on the device, and the head and the loss run after the backbone's
    # offload context: the backward starts with them
    assert len(copies) == stats["offloaded"] == model.config.num_hidden_layers == 2
    assert len({c[0] for c in copies}) == len(copies)
    assert stats["offloaded_bytes"] == 2 * _layer_input_bytes(model)
    vocab_bytes = 2 * SEQ * model.config.vocab_size * 4
    assert all(n < vocab_bytes for *_, n in copies)
    assert stats["deduped"] >= 1 and stats["kept"] == 2
    assert stats["peak_host_bytes"] == stats["offloaded_bytes"]
    gc.collect()
    assert memory_modes(model)["host_bytes"] == 0  # released with the graph
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name


def test_offload_hooks_without_a_known_head_keep_the_last_storage(copies: list[Any]) -> None:
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, checkpointing="reentrant")
    _unfreeze_some(model)
    hooks = OffloadHooks(min_bytes=_layer_input_bytes(model) // 2, force_copy=True)
    model.train()
    with hooks.context():
        out = model(**_batch())
    out.loss.backward()
    # 2 layer inputs + the final norm's input (saved twice, copied once); the log-softmax (saved
    # twice, the last storage) stays
    assert hooks.offloaded == len(copies) == 3
    assert hooks.deduped == 2 and hooks.kept == 2  # the norm's input and the log-softmax, saved twice each


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_offload_moves_the_same_tensors_with_either_checkpointing(checkpointing: str, copies: list[Any]) -> None:
    """torch saves non-reentrant checkpoints' inputs through the active saved-tensor hooks too."""
    model = _prepared(checkpointing=checkpointing, min_bytes=_layer_input_bytes(tiny_llama()) // 2, force_copy=True)
    _train_step(model, _batch())
    assert memory_modes(model)["offloaded"] == 2
    assert memory_modes(model)["offloaded_bytes"] == 2 * _layer_input_bytes(model)
    notes = kbitprep.report(model).plan.notes
    assert not any("torch keeps each layer's inputs itself" in n for n in notes)
    assert any("copies each saved storage once" in n for n in notes)


def test_views_of_one_storage_share_one_copy_and_come_back_right(copies: list[Any]) -> None:
    torch.manual_seed(0)
    a = torch.randn(32, 48, requires_grad=True)

    def run() -> torch.Tensor:
        b = a * 2
        c = b.t() @ b  # saves b.t() and b: one storage
        d = b[1:] * b[1:]  # saves a view of it, twice
        return torch.sin(c).sum() + d.sum()  # sin saves another storage: b's copy is made then

    (ref,) = torch.autograd.grad(run(), a)
    hooks = OffloadHooks(min_bytes=0, force_copy=True)
    with hooks.context():
        value = run()
    (got,) = torch.autograd.grad(value, a)
    assert torch.equal(got, ref)
    assert [n for *_, n in copies] == [32 * 48 * 4]  # b once, for all its views; c stays (the last storage)
    assert hooks.deduped == 3 and hooks.kept == 1


def test_a_saved_tensor_changed_in_place_raises_like_autograd() -> None:
    a = torch.randn(64, 64, requires_grad=True)

    def run() -> torch.Tensor:
        x = a * 2
        y = x.sin()  # saves x
        x.add_(1)
        return (y * torch.ones(64, 64)).exp().sum()  # saves another storage: x's copy is attempted

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        with OffloadHooks(min_bytes=0, force_copy=True).context():
            value = run()
        value.backward()


def test_offload_on_cpu_copies_nothing_without_force_copy(copies: list[Any]) -> None:
    model = _prepared(min_bytes=0)
    _train_step(model, _batch())
    assert not copies and memory_modes(model)["offloaded"] == 0 and memory_modes(model)["packed"] > 0


# --------------------------------------------------------------------------- device_map (accelerate)


def _copying_send_to_device(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make accelerate's hooks copy what they move, as a move between two GPUs does (here all is on the CPU)."""
    import accelerate.hooks
    from accelerate.utils import recursively_apply

    moved: list[int] = []

    def send(obj: Any, device: Any, non_blocking: bool = False, skip_keys: Any = None) -> Any:
        def move(t: torch.Tensor) -> torch.Tensor:
            moved.append(1)
            return t.to(device, copy=True)

        if hasattr(obj, "items") and skip_keys:  # keep accelerate's skip_keys behaviour
            keys = [skip_keys] if isinstance(skip_keys, str) else skip_keys
            return type(obj)({k: v if k in keys else send(v, device) for k, v in obj.items()})
        return recursively_apply(move, obj, test_type=lambda t: isinstance(t, torch.Tensor))

    monkeypatch.setattr(accelerate.hooks, "send_to_device", send)
    return moved


@pytest.mark.parametrize("order", ["hooks-then-prepare", "prepare-then-hooks"])
def test_chunked_head_under_accelerate_device_hooks(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    moved = _copying_send_to_device(monkeypatch)
    reference = tiny_llama(torch.float32)
    kbitprep.prepare(reference)
    _unfreeze_some(reference)
    ref_loss, ref_grads, _ = _train_step(reference, _batch())

    model = tiny_llama(torch.float32)

    def hook() -> None:  # what dispatch_model does: the root moves outputs back, each part runs where it lives
        add_hook_to_module(model, AlignDevicesHook(execution_device="cpu", io_same_device=True))
        add_hook_to_module(model.lm_head, AlignDevicesHook(execution_device="cpu"))

    if order == "hooks-then-prepare":
        hook()
    kbitprep.prepare(model, memory={"chunked_head": 16})
    if order == "prepare-then-hooks":
        hook()
    _unfreeze_some(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KbitprepWarning)  # no fallback to full logits
        loss, grads, out = _train_step(model, _batch())
    assert moved  # the hooks did copy
    assert out.logits is None and not memory_modes(model)["chunked_head_fallback"]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
    remove_hook_from_module(model, recurse=True)


def test_soft_capping_still_detected_under_accelerate_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    _copying_send_to_device(monkeypatch)
    model = tiny_llama(torch.float32)
    original = type(model).forward

    def scaled(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if out.logits is not None:
            out.logits = out.logits * 0.5  # a transformed head output must still be refused
        return out

    model.forward = scaled.__get__(model)  # type: ignore[method-assign]
    add_hook_to_module(model, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    kbitprep.prepare(model, memory={"chunked_head": 16})
    with pytest.warns(KbitprepWarning, match="transforms the head's output"):
        _, _, out = _train_step(model, _batch())
    assert out.logits is not None


def test_chunked_loss_puts_labels_on_the_logits_device() -> None:
    """A head on another device (here 'meta', standing in for a second GPU): labels follow the logits."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    hidden = torch.randn(2, 9, 16)
    labels = torch.randint(0, 50, (2, 9))
    loss = chunked_causal_lm_loss(hidden, labels, lambda h: head(h).to("meta"), chunk_tokens=4)
    assert loss.device.type == "meta" and loss.shape == ()


# --------------------------------------------------------------------------- nn.DataParallel


@pytest.mark.parametrize(
    ("memory", "patched"),
    [("chunked_head", ["", "lm_head"]), ("offload", ["", "model"]), ("lowest", ["", "lm_head", "model"])],
)
def test_data_parallel_replicas_are_refused_with_a_kbitprep_error(memory: str, patched: list[str]) -> None:
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory=memory)
    refused = []
    for name, mod in model.named_modules():
        try:
            mod._replicate_for_data_parallel()  # what torch.nn.parallel.replicate calls for every module
        except UnsupportedModelError as err:
            assert "DistributedDataParallel" in str(err)
            refused.append(name)
    assert sorted(refused) == patched  # the patched causal LM, its head (chunked) and its backbone (offload)
    kbitprep.undo(model)
    for mod in model.modules():
        mod._replicate_for_data_parallel()  # undo removes the refusal


def test_data_parallel_without_replication_still_trains() -> None:
    """On one device (here: no GPU, no device ids) DataParallel calls the module itself."""
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory={"chunked_head": 16})
    _unfreeze_some(model)
    wrapped = nn.DataParallel(model)
    assert not wrapped.device_ids
    out = wrapped(**_batch())
    out.loss.backward()
    assert out.logits is None


def test_plan_refuses_memory_modes_on_a_data_parallel_model() -> None:
    model = tiny_llama(torch.float32)
    wrapped = nn.DataParallel(model)
    before = model_state(model)
    with pytest.raises(InvalidPolicyError, match="DataParallel"):
        kbitprep.plan(wrapped, memory="offload")
    plan = kbitprep.plan(wrapped, memory="lowest")  # a combined preset skips what does not apply
    assert plan.extras["memory"]["chunked_head"] == 0 and plan.extras["memory"]["offload"] is False
    assert any("DataParallel" in n for n in plan.notes)
    assert model_state(model) == before


# --------------------------------------------------------------------------- a real quantized model


def test_lowest_with_copies_on_a_bnb_model_with_lora_under_autocast(copies: list[Any]) -> None:
    """The CUDA test's setup on the CPU: bitsandbytes NF4, LoRA, bf16 autocast, 2 AdamW steps; every
    saved tensor of the offload path really copied (force_copy) gives the same losses and adapters."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .tiny import saved_tiny_llama

    runs = {}
    for memory in ("default", "lowest"):
        model = AutoModelForCausalLM.from_pretrained(
            saved_tiny_llama(),
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            ),
            dtype=torch.bfloat16,
        )
        kbitprep.prepare(model, memory=memory)
        if memory == "lowest":
            state = state_of(model)
            assert state is not None
            state.offloader = OffloadHooks(min_bytes=2 * SEQ * 64 * 2, force_copy=True)  # bf16 layer inputs
        torch.manual_seed(0)
        lora = peft.get_peft_model(
            model, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
        )
        opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(2):
            lora.train()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = lora(**_batch(seed=step))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(out.loss.detach()))
        adapters = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" in n}
        runs[memory] = (losses, adapters, memory_modes(lora))
    (ref_losses, ref_adapters, _), (losses, adapters, stats) = runs["default"], runs["lowest"]
    assert stats["offloaded"] == len(copies) == 2 * 2  # 2 layer inputs a step, 2 steps
    assert losses == pytest.approx(ref_losses, rel=2e-3)
    for name, a in ref_adapters.items():
        torch.testing.assert_close(adapters[name], a, rtol=0.05, atol=2e-3)
