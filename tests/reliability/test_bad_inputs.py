"""Bad inputs: each gets a specific kbitprep exception with an actionable message, and changes nothing."""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep import (
    BackendMismatchError,
    InvalidPolicyError,
    NoParametersError,
    NotAModuleError,
    NotPreparedError,
    Registry,
    UnknownBackendError,
    UnsupportedModelError,
)

from ..tiny import batch, saved_tiny_llama, tiny_llama
from .support import assert_restored, full_state, recorded_warnings

# --------------------------------------------------------------------------- not a module

NOT_MODULES = [
    pytest.param(None, "NoneType", id="None"),
    pytest.param({"weight": torch.zeros(2)}, "dict", id="state-dict"),
    pytest.param(torch.zeros(2, 2), "Tensor", id="tensor"),
    pytest.param("meta-llama/Llama-3.2-1B", "str", id="model-id-string"),
    pytest.param(nn.Linear, "type", id="module-class"),
]


@pytest.mark.parametrize(("obj", "type_name"), NOT_MODULES)
@pytest.mark.parametrize(
    "call",
    [kbitprep.plan, kbitprep.prepare, kbitprep.undo, kbitprep.report, kbitprep.prepare_model_for_kbit_training],
    ids=lambda f: f.__name__,
)
def test_not_a_module(obj: object, type_name: str, call: Callable[..., Any]) -> None:
    with pytest.raises(NotAModuleError) as err:
        call(obj)
    assert str(err.value) == (f"kbitprep expects a torch.nn.Module (a loaded transformers model), got {type_name}")
    assert isinstance(err.value, TypeError)  # existing handlers keep working


# --------------------------------------------------------------------------- meta device, offloading


def _placement(model: nn.Module) -> dict[str, Any]:
    """What accelerate set up, without reading values (meta tensors have none): devices, dtypes,
    requires_grad, the objects under each name, accelerate's hooks and the forward methods they wrap."""
    return {
        "params": {n: (str(p.device), p.dtype, p.requires_grad, id(p)) for n, p in model.named_parameters()},
        "buffers": {n: (str(b.device), b.dtype, id(b)) for n, b in model.named_buffers()},
        "hf_hooks": {n: id(getattr(m, "_hf_hook", None)) for n, m in model.named_modules()},
        "forwards": {n: id(vars(m).get("forward")) for n, m in model.named_modules()},
        "device_map": getattr(model, "hf_device_map", None),
        "flags": {n: (getattr(m, "gradient_checkpointing", None), m.training) for n, m in model.named_modules()},
        "use_cache": model.config.use_cache,
        "attrs": sorted(vars(model)),
    }


def test_meta_device_model_plans_but_does_not_prepare(registry: Registry) -> None:
    with torch.device("meta"):
        model = tiny_llama()
    before = _placement(model)
    plan = kbitprep.plan(model, registry=registry)
    assert plan.backend == "unquantized" and plan.bytes_before == sum(p.numel() * 2 for p in model.parameters())
    with pytest.raises(UnsupportedModelError) as err:
        kbitprep.prepare(model, registry=registry)
    message = str(err.value)
    assert message.startswith(
        f"{len(list(model.parameters()))} parameters (e.g. 'model.embed_tokens.weight') are on "
        "the meta device (no weights loaded)"
    )
    assert "prepare needs every weight materialised" in message and "kbitprep.plan() works on such models" in message
    assert isinstance(err.value, ValueError)
    assert _placement(model) == before


@pytest.fixture
def disk_offloaded() -> Iterator[nn.Module]:
    """A tiny Llama loaded by transformers with a device_map that sends one decoder layer to disk."""
    from transformers import AutoModelForCausalLM

    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    with tempfile.TemporaryDirectory() as folder, recorded_warnings():
        yield AutoModelForCausalLM.from_pretrained(
            saved_tiny_llama(), device_map=device_map, offload_folder=folder, dtype=torch.bfloat16
        )


def _cpu_offloaded() -> nn.Module:
    """A tiny Llama whose weights accelerate keeps in CPU memory and loads at each forward (cpu_offload)."""
    from accelerate import cpu_offload

    model = tiny_llama()
    cpu_offload(model, execution_device=torch.device("cpu"))
    return model


@pytest.mark.parametrize("how", ["disk", "cpu"])
def test_offloaded_model_is_refused_and_nothing_moves(
    how: str, registry: Registry, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue("disk_offloaded") if how == "disk" else _cpu_offloaded()
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert on_meta  # accelerate did offload something
    logits = model(**batch()).logits.detach()  # (accelerate swaps in new Parameter objects at each forward)
    before = _placement(model)
    plan = kbitprep.plan(model, registry=registry)  # planning works
    assert plan.backend == "unquantized"
    for call in (kbitprep.prepare, kbitprep.prepare_model_for_kbit_training):
        with pytest.raises(UnsupportedModelError) as err:
            call(model, **({"registry": registry} if call is kbitprep.prepare else {}))
        message = str(err.value)
        assert message.startswith(f"{len(on_meta)} parameters (e.g. {on_meta[0]!r}) are offloaded by accelerate")
        assert "Load the model without offloading" in message
        assert _placement(model) == before  # nothing moved, no hook removed, no flag set
    assert torch.equal(model(**batch()).logits, logits)  # and it still runs as before


def test_dispatched_model_without_offload_prepares_in_place(registry: Registry) -> None:
    """Dispatched by accelerate (hooks on every module) with every weight present: prepared, nothing moved."""
    from accelerate import dispatch_model

    model = tiny_llama()
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    with recorded_warnings():
        dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)
    assert hasattr(model.model.layers[0], "_hf_hook")
    before, placement = full_state(model), _placement(model)
    kbitprep.prepare(model, registry=registry)
    changed = _placement(model)
    assert {n: v[:2] for n, v in changed["params"].items()} == {n: v[:2] for n, v in placement["params"].items()}
    assert changed["hf_hooks"] == placement["hf_hooks"] and changed["forwards"] == placement["forwards"]
    assert not any(p.requires_grad for p in model.parameters())
    loss = model(**batch()).loss  # reentrant checkpointing through accelerate's hooks
    loss.backward()
    kbitprep.undo(model)
    assert_restored(model, before, "undo of a dispatched model")


# --------------------------------------------------------------------------- PEFT


def test_peft_wrapped_model_keeps_its_adapters_trainable(registry: Registry) -> None:
    from peft import LoraConfig, get_peft_model

    with recorded_warnings():
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    adapters = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert len(adapters) == 8 and all(model.get_parameter(n).requires_grad for n in adapters)
    before = full_state(model)
    plan = kbitprep.plan(model, registry=registry)
    assert {pp.name for pp in plan.params if pp.adapter} == set(adapters)
    assert any("PEFT-wrapped model" in note for note in plan.notes)
    kbitprep.prepare(model, registry=registry, upcast="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters)  # adapters keep requires_grad=True, the base is frozen
    assert {n: model.get_parameter(n).dtype for n in adapters} == adapters  # adapters are never cast
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n not in adapters)
    model(**batch()).loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in adapters)
    kbitprep.undo(model)
    for p in model.parameters():
        p.grad = None
    assert_restored(model, before, "undo of a PEFT-wrapped model")


# --------------------------------------------------------------------------- no float parameters


class IntOnly(nn.Module):
    """A module whose only parameter is an int8 tensor (nothing a backend recognises)."""

    def __init__(self) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (nn.ReLU, "ReLU has no parameters; there is nothing to prepare"),
        (lambda: nn.Sequential(nn.Dropout(), nn.GELU()), "Sequential has no parameters; there is nothing to prepare"),
        (
            IntOnly,
            "IntOnly has no floating-point parameters and no quantized layers a backend recognises; "
            "there is nothing to train",
        ),
    ],
    ids=["no-parameters", "only-parameterless-layers", "only-int8"],
)
def test_model_without_float_parameters(make: Callable[[], nn.Module], message: str, registry: Registry) -> None:
    model = make()
    before = full_state(model)
    for call in (kbitprep.plan, kbitprep.prepare):
        with pytest.raises(NoParametersError) as err:
            call(model, registry=registry)
        assert str(err.value) == message
        assert isinstance(err.value, ValueError)
    assert_restored(model, before, "refused model without float parameters")


# --------------------------------------------------------------------------- invalid options

UPCAST_CHOICES = "valid choices: 'none', 'norms', 'all', or a callable fn(name, parameter, module) -> bool"
CHECKPOINT_CHOICES = "valid choices: True, False, 'on', 'reentrant', 'non_reentrant', 'off'"


def _keywords(func: Callable[..., Any]) -> set[str]:
    """The keyword arguments ``func`` accepts, from its signature."""
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {n for n, p in inspect.signature(func).parameters.items() if p.kind in kinds and n != "model"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"upcast": "fp32"}, f"upcast='fp32' is not a valid policy; {UPCAST_CHOICES}"),
        ({"upcast": "All"}, f"upcast='All' is not a valid policy; {UPCAST_CHOICES}"),
        ({"upcast": 32}, f"upcast=32 is not a valid policy; {UPCAST_CHOICES}"),
        ({"checkpointing": "sometimes"}, f"checkpointing='sometimes' is not valid; {CHECKPOINT_CHOICES}"),
        ({"checkpointing": "REENTRANT"}, f"checkpointing='REENTRANT' is not valid; {CHECKPOINT_CHOICES}"),
    ],
    ids=["upcast-fp32", "upcast-case", "upcast-int", "checkpointing-word", "checkpointing-case"],
)
def test_invalid_policies_list_the_valid_choices(kwargs: dict[str, Any], message: str, registry: Registry) -> None:
    model = tiny_llama()
    before = full_state(model)
    for call in (kbitprep.plan, kbitprep.prepare):
        with pytest.raises(InvalidPolicyError) as err:
            call(model, registry=registry, **kwargs)
        assert str(err.value) == message
        assert isinstance(err.value, ValueError)
    assert_restored(model, before, "refused invalid policy")


@pytest.mark.parametrize(
    "unknown",
    [{"use_gradient_checkpointing": True}, {"upcast_policy": "none", "verbose": True}],
    ids=["peft-keyword", "two-unknown-keywords"],
)
def test_unknown_keywords_list_the_valid_ones(unknown: dict[str, Any], registry: Registry) -> None:
    model = tiny_llama()
    before = full_state(model)
    for call in (kbitprep.plan, kbitprep.prepare):
        with pytest.raises(InvalidPolicyError) as err:
            call(model, registry=registry, **unknown)
        head, _, valid = str(err.value).partition("; valid keywords: ")
        assert head == f"{call.__name__}() got unknown keyword argument(s) {', '.join(sorted(unknown))}"
        assert set(valid.split(", ")) == _keywords(call)
    assert_restored(model, before, "refused unknown keyword")


# --------------------------------------------------------------------------- forced backends


def test_forced_backend_that_does_not_match(registry: Registry) -> None:
    """``unquantized`` forced on a model that says it is quantized: refused unless allow_mismatch=True."""
    model = tiny_llama()
    model.is_quantized = True  # what every transformers quantizer sets; no backend here recognises this model
    before = full_state(model)
    with pytest.raises(BackendMismatchError) as err:
        kbitprep.prepare(model, registry=registry, backend="unquantized")
    assert str(err.value).startswith("backend 'unquantized' does not recognise this LlamaForCausalLM; detected: ")
    assert str(err.value).endswith("Omit backend= to let kbitprep choose, or pass allow_mismatch=True to force it")
    assert_restored(model, before, "refused forced backend")

    plan = kbitprep.plan(model, registry=registry, backend="unquantized", allow_mismatch=True)
    assert plan.forced and plan.evidence == ("forced by backend='unquantized' (allow_mismatch=True)",)
    kbitprep.prepare(model, registry=registry, backend="unquantized", allow_mismatch=True)
    assert kbitprep.report(model).plan.forced
    kbitprep.undo(model)
    assert_restored(model, before, "undo of a forced backend")


def test_forced_backend_that_does_not_exist(registry: Registry) -> None:
    model = tiny_llama()
    before = full_state(model)
    with pytest.raises(UnknownBackendError) as err:
        kbitprep.prepare(model, registry=registry, backend="bnb-5bit")
    names = ", ".join(sorted(registry.names()))
    assert str(err.value) == f"no kbitprep backend is called 'bnb-5bit'; registered backends: {names}"
    assert isinstance(err.value, LookupError)
    assert_restored(model, before, "refused unknown backend")


def test_undo_and_report_of_a_model_never_prepared() -> None:
    model = tiny_llama()
    with pytest.raises(NotPreparedError, match="this LlamaForCausalLM was not prepared by kbitprep; there is nothing"):
        kbitprep.undo(model)
    with pytest.raises(NotPreparedError, match="^this LlamaForCausalLM was not prepared by kbitprep$"):
        kbitprep.report(model)
