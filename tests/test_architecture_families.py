"""Architecture families x bitsandbytes 4-bit on the CPU: the properties kbitprep promises, on every head shape.

Each family in ``tests/families.py`` (Llama with a tied head, Qwen2 untied, GPT-2's Conv1D, Mixtral
and Qwen2-MoE, T5 encoder-decoder, Bert and Llama sequence classification, LLaVA with a CLIP vision
tower, Qwen2-VL with its own vision tower, Whisper speech-to-text, a CLIP + GPT-2 image-to-text
encoder-decoder, wav2vec2 CTC) is built tiny and random, saved once per module and reloaded with NF4
double-quant, bf16 compute. Every family goes through the same checks; the family x check table is
printed at the end of the run:

- ``backend``: kbitprep picks ``bnb-4bit`` and declares every ``Linear4bit`` weight as quantized storage.
- ``lora-grads``: after ``kbitprep.prepare`` (the backend's default, reentrant checkpointing) and PEFT
  LoRA on ``"all-linear"`` (every ``Linear4bit`` wrapped), two AdamW steps. The rule: at step 0 every
  LoRA tensor has a gradient (not ``None``), and every ``lora_B`` and every other trainable tensor (a
  classification head PEFT trains in full) a non-zero one; ``lora_A``'s is exactly zero at step 0
  because ``lora_B`` starts at zero. At step 1, after one update of ``lora_B``, every trainable tensor
  has a non-zero gradient.
- ``grads-non-re``: the same with ``checkpointing="non_reentrant"``.
- ``stack-inputs``: after ``kbitprep.prepare`` (reentrant), one training forward of the family's batch:
  every checkpointed layer (of every stack: a text decoder, a speech encoder, a vision tower) receives
  a hidden-state input that requires grad, and the plan's ``hooks`` name every stack kbitprep hooks.
- ``storage``: the ``Params4bit`` bytes and quantization state (absmax, double-quant state) of every
  ``Linear4bit`` are bit-exact after prepare and after training.
- ``undo``: prepare then undo gives back exactly the loaded model (:func:`kbitprep.testing.model_state`
  plus every config object of the model, sub-configs and per-stack configs included).
- ``peft-parity``: the drop-in gives the parameter dtypes, ``requires_grad`` flags, checkpointing
  flags, input-require-grads hook placement and ``use_cache`` values (of every config) PEFT's
  ``prepare_model_for_kbit_training`` gives a second load of the same checkpoint.
- ``verify``: ``prepare(verify=True)`` passes with kbitprep's default probe inputs.
- ``verify-lora``: :func:`kbitprep.verify_gradient_flow` on the prepared, LoRA-wrapped model passes with
  the family's training batch, and with kbitprep's default probe too, which builds speech features,
  waveforms and images (with their placeholder tokens) from the model's config.
- ``use-cache``: after prepare, no config of the model (sub-configs and per-stack configs such as
  T5's decoder included) keeps ``use_cache=True``, which checkpointed training cannot use.
- ``eval-first``: an eval-mode forward without grad before prepare (on CPUs with AVX512-BF16 it repacks
  ``Linear4bit`` weights for a kernel without autograd) does not stop training: after prepare every
  LoRA tensor trains by the rule above, the 4-bit codes are bit-exact as loaded, and the dequantized
  weights are within 1/32 of the loaded ones (bitsandbytes' repack rounds the block scales to bf16
  and its inverse re-quantizes them, so the scales cannot come back bit-exact).

Families that need a deviation from the plain setup say why in ``tests/families.py`` (Bert keeps its
``classifier`` unquantized; LLaVA uses ``vision_feature_layer=-1`` and a 64-wide vision tower; Whisper,
the image-to-text model and wav2vec2 use PEFT's plain ``PeftModel``; wav2vec2 turns LayerDrop off).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep._anatomy import model_configs
from kbitprep.testing import model_state

from .families import FAMILIES, Family
from .state import config_snapshot

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.id)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, Path]:
    """The family's tiny random bf16 checkpoint, saved once per module."""
    family: Family = request.param
    path = tmp_path_factory.mktemp(family.id)
    model: Any = family.build()
    model.save_pretrained(path)
    return family, path


def _load(saved: tuple[Family, Path]) -> nn.Module:
    """A fresh bitsandbytes 4-bit load of the saved checkpoint (eval mode, as transformers returns it)."""
    from transformers import BitsAndBytesConfig

    family, path = saved
    qc = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(family.skip_modules) or None,
    )
    cls: Any = family.cls()
    model: nn.Module = cls.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16)
    return model


@pytest.fixture
def model(saved: tuple[Family, Path]) -> nn.Module:
    """A fresh 4-bit load of the family's checkpoint."""
    return _load(saved)


# ---------------------------------------------------------------------------------------------- helpers
def _linear4bit(model: nn.Module) -> dict[str, Any]:
    from bitsandbytes.nn.modules import Linear4bit

    linear4bit: Any = Linear4bit
    found: dict[str, Any] = {n: m for n, m in model.named_modules() if isinstance(m, linear4bit)}
    assert found, f"bitsandbytes quantized no layer of {type(model).__name__}: the family tests nothing"
    return found


def _quant_state_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if state is None:
        return out
    for key in ("absmax", "code", "offset"):
        value = getattr(state, key, None)
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value.detach().clone()
    out.update(_quant_state_tensors(getattr(state, "state2", None), prefix + "state2."))
    return out


def _storage(layers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each Linear4bit (by its name at load time): the Params4bit class/dtype/shape, its stored bytes
    as uint8, the quant-state tensors and the CPU packing flag."""
    out = {}
    for name, mod in layers.items():
        w = mod.weight
        state = getattr(w, "quant_state", None)
        out[name] = {
            "class": type(w).__name__,
            "dtype": w.dtype,
            "shape": tuple(w.shape),
            "bytes": w.data.detach().contiguous().view(torch.uint8).clone(),
            "state": _quant_state_tensors(state),
            "packed_for_cpu": bool(getattr(state, "packing_format_for_cpu", False)),
        }
    return out


def _dequantized(layers: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each Linear4bit's weight as bitsandbytes dequantizes it (fp32); the layout must be the trainable one."""
    from bitsandbytes.functional import dequantize_4bit

    out = {}
    for name, mod in layers.items():
        assert not getattr(mod.weight.quant_state, "packing_format_for_cpu", False), f"{name} is packed for CPU"
        out[name] = dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
    return out


def _storage_diff(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    diff = []
    for name, a in before.items():
        b = after[name]
        for key in ("class", "dtype", "shape", "packed_for_cpu"):
            if a[key] != b[key]:
                diff.append(f"{name}: {key} {a[key]} -> {b[key]}")
        if a["bytes"].shape != b["bytes"].shape or not torch.equal(a["bytes"], b["bytes"]):
            diff.append(f"{name}: stored bytes changed")
        if a["state"].keys() != b["state"].keys() or any(
            not torch.equal(t, b["state"][k]) for k, t in a["state"].items()
        ):
            diff.append(f"{name}: quant_state tensors changed")
    return diff


def _full_state(model: nn.Module) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    return model_state(model), config_snapshot(model)


def _lora_model(family: Family, model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type=family.task_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model: nn.Module = get_peft_model(model, config)
    return peft_model


def _train(family: Family, model: nn.Module, steps: int = 2) -> list[dict[str, torch.Tensor | None]]:
    """LoRA on all linear layers, then ``steps`` AdamW steps; the gradients of every trainable tensor per step."""
    layers = _linear4bit(model)
    peft_model = _lora_model(family, model)
    wrapped = {id(m.base_layer) for m in peft_model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    unwrapped = [n for n, m in layers.items() if id(m) not in wrapped]
    assert not unwrapped, f"all-linear LoRA left Linear4bit layers without an adapter: {unwrapped[:4]}"
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n, _ in trainable) and any("lora_B" in n for n, _ in trainable)
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    peft_model.train()
    data = family.batch(model.config)
    grads: list[dict[str, torch.Tensor | None]] = []
    for _ in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = peft_model(**data).loss
        assert loss is not None and math.isfinite(loss.item()), f"loss {loss}"
        loss.backward()
        grads.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in trainable})
        opt.step()
        opt.zero_grad()
    return grads


def _gradient_problems(grads: list[dict[str, torch.Tensor | None]]) -> list[str]:
    """The rule of the module docstring, as a list of violations."""
    problems = []
    for step, per_name in enumerate(grads):
        for name, g in per_name.items():
            if g is None:
                problems.append(f"step {step}: {name} got no gradient (None)")
            elif not bool(g.ne(0).any()) and (step > 0 or "lora_A" not in name):
                problems.append(f"step {step}: {name} got an all-zero gradient")
    return problems


def _quiet_peft_prepare(model: nn.Module) -> None:
    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_model_for_kbit_training(model)  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------------------------- the checks
def test_backend_is_bnb_4bit(model: nn.Module) -> None:
    """kbitprep picks bnb-4bit on real evidence and declares exactly the Linear4bit weights as quantized."""
    plan = kbitprep.plan(model)
    assert plan.backend == "bnb-4bit", (plan.backend, plan.evidence)
    quantized = {a for p in plan.quantized for a in p.aliases}
    assert quantized == {f"{n}.weight" for n in _linear4bit(model)}
    assert not [p.name for p in plan.params if p.quantized and p.upcast]


def test_every_lora_tensor_gets_a_gradient(saved: tuple[Family, Path], model: nn.Module) -> None:
    """Prepare (backend default: reentrant checkpointing), LoRA all-linear, two AdamW steps: every LoRA
    tensor trains (rule in the module docstring)."""
    kbitprep.prepare(model)
    assert kbitprep.report(model).plan.checkpointing is kbitprep.CheckpointMode.REENTRANT
    problems = _gradient_problems(_train(saved[0], model))
    assert not problems, f"{len(problems)} gradient problems:\n" + "\n".join(problems[:12])


def test_every_lora_tensor_gets_a_gradient_non_reentrant(saved: tuple[Family, Path], model: nn.Module) -> None:
    """The same with non-reentrant checkpointing (no input-require-grads hook needed)."""
    kbitprep.prepare(model, checkpointing="non_reentrant")
    assert kbitprep.report(model).plan.checkpointing is kbitprep.CheckpointMode.NON_REENTRANT
    problems = _gradient_problems(_train(saved[0], model))
    assert not problems, f"{len(problems)} gradient problems:\n" + "\n".join(problems[:12])


def test_every_stack_gets_inputs_that_require_grad(saved: tuple[Family, Path], model: nn.Module) -> None:
    """Prepare (reentrant): in one training forward, every checkpointed layer of every stack receives a
    hidden-state input that requires grad (else nothing inside it trains), and the plan's hooks name every
    stack whose layers got a hook."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kbitprep.prepare(model)
    plan = kbitprep.report(model).plan
    assert plan.checkpointing is kbitprep.CheckpointMode.REENTRANT
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)}
    assert layers, "no checkpointed layer: the check would prove nothing"
    cold: dict[str, bool] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                cold.setdefault(name, not first.requires_grad)

        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**saved[0].batch(model.config))
    finally:
        for h in handles:
            h.remove()
    assert cold, "the batch ran no checkpointed layer"
    assert not any(cold.values()), (
        f"layers whose input does not require grad: {sorted(n for n, c in cold.items() if c)}"
    )
    hooked = {n.rpartition(".")[0] for n, layer in layers.items() if layer._forward_pre_hooks}
    unnamed = sorted(name for name in hooked if not any(name in line for line in plan.hooks))
    assert not unnamed, f"stacks hooked without a line in plan.hooks: {unnamed}; hooks: {plan.hooks}"


def test_quantized_storage_bit_exact(saved: tuple[Family, Path], model: nn.Module) -> None:
    """The Params4bit bytes and quant state of every Linear4bit: untouched by prepare and by two LoRA steps."""
    layers = _linear4bit(model)
    loaded = _storage(layers)
    kbitprep.prepare(model)
    assert not _storage_diff(loaded, _storage(layers)), "after prepare: " + "; ".join(
        _storage_diff(loaded, _storage(layers))[:6]
    )
    _train(saved[0], model)
    diff = _storage_diff(loaded, _storage(layers))
    assert not diff, "after training: " + "; ".join(diff[:6])


def test_undo_exact(model: nn.Module) -> None:
    """prepare then undo: parameters, buffers, hooks, module attributes and every config as loaded."""
    before = _full_state(model)
    kbitprep.prepare(model)
    assert model_state(model) != before[0], "prepare changed nothing observable: the check would prove nothing"
    kbitprep.undo(model)
    after = _full_state(model)
    assert after[0] == before[0], "model_state differs after undo"
    assert after[1] == before[1], "a config differs after undo"


def test_dropin_parity_with_peft(saved: tuple[Family, Path], model: nn.Module) -> None:
    """kbitprep.prepare_model_for_kbit_training vs PEFT's on a second load: same dtypes, flags, checkpointing."""
    theirs = _load(saved)
    _quiet_peft_prepare(theirs)
    kbitprep.prepare_model_for_kbit_training(model)
    a = {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    b = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    assert a.keys() == b.keys()
    differ = {n: (a[n], b[n]) for n in a if a[n] != b[n]}
    assert not differ, f"{len(differ)} parameters differ (PEFT, kbitprep): {dict(list(differ.items())[:4])}"
    gc_a = {n: getattr(m, "gradient_checkpointing", None) for n, m in theirs.named_modules()}
    gc_b = {n: getattr(m, "gradient_checkpointing", None) for n, m in model.named_modules()}
    assert gc_a == gc_b
    hooked_a = {n for n, m in theirs.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    hooked_b = {n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    assert hooked_a == hooked_b, f"hooks sit on other modules (PEFT, kbitprep): {hooked_a ^ hooked_b}"
    cache_a = [getattr(c, "use_cache", None) for c in model_configs(theirs)]
    cache_b = [getattr(c, "use_cache", None) for c in model_configs(model)]
    assert cache_a == cache_b, "the drop-in leaves use_cache as PEFT does (it is prepare() that turns it off)"


def test_prepare_verify(model: nn.Module) -> None:
    """prepare(verify=True) passes with the default probe; a failure must be a kbitprep error, model as loaded."""
    before = _full_state(model)
    try:
        kbitprep.prepare(model, verify=True)
    except Exception as exc:
        after = _full_state(model)
        changed = [what for what, a, b in (("model", after[0], before[0]), ("config", after[1], before[1])) if a != b]
        pytest.fail(
            f"prepare(verify=True) raised {type(exc).__name__}"
            f"{'' if isinstance(exc, kbitprep.KbitprepError) else ' (not a kbitprep error)'}"
            f"{'; left changed: ' + '+'.join(changed) if changed else '; model restored'}: {str(exc)[:200]}"
        )
    assert kbitprep.report(model).plan.backend == "bnb-4bit"


def test_verify_gradient_flow_with_adapters(saved: tuple[Family, Path], model: nn.Module) -> None:
    """The gradient-flow check on the LoRA-wrapped model: the family's batch, then kbitprep's default probe."""
    family = saved[0]
    kbitprep.prepare(model)
    peft_model = _lora_model(family, model)
    result = kbitprep.verify_gradient_flow(peft_model, inputs=family.batch(model.config))
    lora = sum("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert result.ok and result.checked == result.with_grad and result.checked >= lora > 0
    result = kbitprep.verify_gradient_flow(peft_model)
    assert result.ok and result.checked >= lora


def test_use_cache_off_everywhere(model: nn.Module) -> None:
    """After prepare (checkpointing on) no config the model's modules read keeps use_cache=True."""
    kbitprep.prepare(model)
    assert kbitprep.report(model).plan.checkpointing is not kbitprep.CheckpointMode.OFF
    left_on = sorted(
        {
            f"{type(c).__name__}" + (" (decoder)" if getattr(c, "is_decoder", False) else "")
            for c in model_configs(model)
            if getattr(c, "use_cache", None) is True
        }
    )
    assert not left_on, f"use_cache=True left on: {left_on}"


def test_eval_forward_before_prepare(saved: tuple[Family, Path], model: nn.Module) -> None:
    """An eval forward without grad first (bnb's CPU repack on AVX512-BF16): training and stored bytes unaffected."""
    from bitsandbytes.functional import has_avx512bf16

    family = saved[0]
    layers = _linear4bit(model)
    loaded = _storage(layers)
    weights = _dequantized(layers)
    model.eval()
    with torch.no_grad():
        model(**{k: v for k, v in family.batch(model.config).items() if k != "labels"} | _decoder_inputs(model))
    if has_avx512bf16():  # type: ignore[no-untyped-call]  # the path this check is about was taken
        assert any(s["packed_for_cpu"] for s in _storage(layers).values()), "the eval forward repacked nothing"
    kbitprep.prepare(model)
    # bitsandbytes' repack rounds the block scales (absmax) to bf16 and its inverse re-quantizes them (double
    # quant), so only the 4-bit codes can come back bit-exact; the scales come back within ~1.5 %
    prepared = _storage(layers)
    diff = [d for d in _storage_diff(loaded, prepared) if "quant_state" not in d]
    assert not diff, "after eval forward + prepare: " + "; ".join(diff[:6])
    for name, w in _dequantized(layers).items():
        close = torch.isclose(w, weights[name], rtol=2**-5, atol=0)
        assert bool(close.all()), f"{name}: {int((~close).sum())} dequantized weights differ by more than 1/32"
    problems = _gradient_problems(_train(family, model))
    assert not problems, f"{len(problems)} gradient problems:\n" + "\n".join(problems[:12])


def _decoder_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Decoder inputs for an eval forward without labels (which encoder-decoder models shift into them)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return {"decoder_input_ids": torch.zeros(2, 4, dtype=torch.long)}
    return {}
