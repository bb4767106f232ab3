"""Backends for bitsandbytes 4-bit (``Linear4bit``/``Params4bit``) and 8-bit (``Linear8bitLt``/``Int8Params``)."""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from kbitprep.plugin import (
    Backend,
    Declarations,
    Detection,
    FixUp,
    Scheme,
    ShardedStorage,
    class_path,
    fused_expert_note,
    hf_quantizer,
    module_index,
    quantization_setting,
    quantized_tensor_names,
)

_UPCAST_NOTE = (
    "frozen embeddings and lm_head keep their loaded dtype; PEFT's choice (fp32 copies of every "
    "fp16/bf16 parameter) is upcast='all'"
)


def _nf4_bytes(out: int, inp: int, f: int) -> tuple[int, int]:
    """NF4, blocksize 64, double quantization: n/2 packed + one uint8 absmax per 64-block + an fp32
    second-level absmax per 256 blocks + fp32 offset + the 16-entry NF4 and 256-entry second-level codes."""
    n = out * inp
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2), blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4 + 256 * 4


def _nf4_config(dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16,
    )


def _int8_config(dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


#: NF4 with double quantization (the QLoRA recipe), as the demo, benchmark and estimate load it.
NF4 = Scheme(
    name="bnb-4bit",
    summary="bitsandbytes NF4, blocksize 64, double quantization, bf16 compute",
    formula="n/2 packed + n/64 uint8 absmax + fp32 absmax per 256 blocks + codes",
    module_class="Linear4bit",
    weight_bytes=_nf4_bytes,
    storage_dtype=torch.uint8,
    requires=("bitsandbytes",),
    install_hint="pip install bitsandbytes",
    quant_method="bitsandbytes",
    model_flags={"is_loaded_in_4bit": True},
    quantization_config=_nf4_config,
)
#: LLM.int8.
INT8 = Scheme(
    name="bnb-8bit",
    summary="bitsandbytes LLM.int8",
    formula="n int8 + fp32 scale per row",
    module_class="Linear8bitLt",
    weight_bytes=lambda out, inp, f: (out * inp, 4 * out),
    storage_dtype=torch.int8,
    requires=("bitsandbytes",),
    install_hint="pip install bitsandbytes",
    quant_method="bitsandbytes",
    model_flags={"is_loaded_in_8bit": True},
    quantization_config=_int8_config,
)


def _as_dtype(value: object) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        return found if isinstance(found, torch.dtype) else None
    return None


def _sharded_storage(model: nn.Module, storage: frozenset[str]) -> ShardedStorage | None:
    """bitsandbytes 4-bit packs into ``bnb_4bit_quant_storage`` (uint8 unless set): what FSDP must know."""
    if not storage or getattr(getattr(model, "config", None), "quantization_config", None) is None:
        return None
    stored = _as_dtype(quantization_setting(model, "bnb_4bit_quant_storage", "uint8")) or torch.uint8

    def hint(dtype: torch.dtype) -> str:
        name = str(dtype).removeprefix("torch.")
        return f"BitsAndBytesConfig(..., bnb_4bit_quant_storage=torch.{name}) and dtype=torch.{name}"

    return ShardedStorage(
        tensors=storage,
        dtype=stored,
        setting="bnb_4bit_quant_storage",
        reload_hint=hint,
        compute_dtype=_as_dtype(quantization_setting(model, "bnb_4bit_compute_dtype")),
        compute_setting="bnb_4bit_compute_dtype",
    )


def _holders(model: nn.Module, param_class: str) -> list[str]:
    """Modules holding a parameter of ``param_class`` (a class name) directly."""
    return [
        name
        for name, mod in module_index(model).items()
        if any(type(p).__name__ == param_class for p in mod.parameters(recurse=False))
    ]


def _detect(model: nn.Module, param_class: str, quantizer_class: str, flag: str) -> Detection | None:
    modules = _holders(model, param_class)
    mods = module_index(model)
    evidence = [
        f"{n} x {c} with {param_class} weights" for c, n in Counter(class_path(mods[m]) for m in modules).items()
    ]
    q = hf_quantizer(model)
    if q is not None and type(q).__name__ == quantizer_class:
        evidence.append(f"hf_quantizer: {quantizer_class}")
    if getattr(model, flag, False):
        evidence.append(f"{flag}=True")
    if not modules and not (q is not None and type(q).__name__ == quantizer_class):
        return None  # a flag alone proves nothing (it may be stale)
    if not modules:
        evidence.insert(0, f"0 layers with {param_class} weights: transformers quantized no layer of this model")
    return Detection(evidence=tuple(evidence), modules=tuple(modules))


def _nothing_converted(model: nn.Module, kind: str, layer_class: str) -> tuple[str, ...]:
    """The warning for a model loaded with a bitsandbytes config in which transformers converted no
    layer (its linear layers are a class transformers' bitsandbytes integration does not replace,
    like Falcon's ``FalconLinear`` in transformers 5.24), or ``()`` when some layer was converted."""
    head = None  # transformers never quantizes the output head: leave it out of the list
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    linears = Counter(class_path(m) for m in module_index(model).values() if isinstance(m, nn.Linear) and m is not head)
    found = ", ".join(f"{n} x {c}" for c, n in sorted(linears.items(), key=lambda kv: (-kv[1], kv[0])))
    return (
        f"this model was loaded with a bitsandbytes {kind} quantization config, but transformers converted no "
        f"layer to {layer_class} ({found or 'no nn.Linear layers'} kept their full-precision weights): nothing is "
        "quantized, the model uses as much memory as an unquantized one, and kbitprep prepares it as such; "
        "check that transformers' bitsandbytes integration supports this architecture's layers",
    )


#: Heads PEFT trains in full for classification (its ``modules_to_save`` for SEQ_CLS / TOKEN_CLS).
_TASK_HEADS = ("classifier", "score")


def _quantized_heads(modules: tuple[str, ...], kind: str) -> tuple[str, ...]:
    """A warning when a classification head was quantized: PEFT trains it in full and cannot."""
    heads = [
        m for m in modules if m.rsplit(".", 1)[-1] in _TASK_HEADS or m.startswith(tuple(f"{h}." for h in _TASK_HEADS))
    ]
    if not heads:
        return ()
    leaves = (next(part for part in h.split(".") if part in _TASK_HEADS) for h in heads)
    names = ", ".join(repr(leaf) for leaf in dict.fromkeys(leaves))
    return (
        f"the classification head ({', '.join(heads)}) was quantized to {kind}: PEFT trains such a head in full "
        "(modules_to_save) and fails on quantized weights ('only Tensors of floating point dtype can require "
        f"gradients'); reload with BitsAndBytesConfig(..., llm_int8_skip_modules=[{names}])",
    )


def _warnings(model: nn.Module, detection: Detection, kind: str, layer_class: str) -> tuple[str, ...]:
    """What the user must act on: no layer converted at all, or a quantized classification head."""
    if not detection.modules:
        return _nothing_converted(model, kind, layer_class)
    return _quantized_heads(detection.modules, kind)


def _packed(mod: nn.Module) -> list[nn.Parameter]:
    """The ``Params4bit`` of ``mod`` whose layout bnb repacked for its CPU inference kernel."""
    return [
        p
        for p in mod.parameters(recurse=False)
        if getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False)
    ]


def _unpack_cpu_weights(modules: tuple[str, ...]) -> FixUp:
    def apply(model: nn.Module) -> None:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        mods = dict(model.named_modules())
        for mod in (mods[name] for name in modules):
            for weight in _packed(mod):
                state = weight.quant_state  # type: ignore[attr-defined]
                # bnb's inverse edits the state it is given: hand it a copy, so undo can restore the original
                data, new_state = _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))
                weight.data, weight.quant_state = data, new_state  # type: ignore[attr-defined]
                if getattr(mod, "quant_state", None) is state:
                    mod.quant_state = new_state
            if getattr(mod, "support_avx512bf16_for_cpu", False):
                mod.support_avx512bf16_for_cpu = False  # no repack in later eval forwards either

    return FixUp(
        name="bnb-cpu-unpack",
        description=(
            "on CPUs with AVX512-BF16, an eval-mode no-grad forward repacks Linear4bit weights for a kernel "
            "without autograd and LoRA grads then stay None: restore the trainable layout and stop the repacking"
        ),
        apply=apply,
    )


class Bnb4bitBackend(Backend):
    """bitsandbytes 4-bit (NF4/FP4): ``Params4bit`` uint8 weights, never cast; embeddings and lm_head kept as loaded.

    Declares the ``bnb-cpu-unpack`` fix-up when a weight is (or could be) repacked for bnb's CPU
    inference kernel, which has no autograd.
    """

    name = "bnb-4bit"
    priority = 100
    requires = ("bitsandbytes",)
    install_hint = "pip install bitsandbytes"
    description = "bitsandbytes 4-bit (Linear4bit / Params4bit)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Modules holding ``Params4bit`` weights, or a ``Bnb4BitHfQuantizer``."""
        return _detect(model, "Params4bit", "Bnb4BitHfQuantizer", "is_loaded_in_4bit")

    def schemes(self) -> tuple[Scheme, ...]:
        """NF4 with double quantization."""
        return (NF4,)

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Quantized ``Params4bit`` storage, no default upcast, both checkpointing modes, CPU unpack fix-up."""
        claimed = set(detection.modules)
        named = [(n, m) for n, m in module_index(model).items() if n in claimed]
        mods = [m for _, m in named]
        packed = sum(len(_packed(m)) for m in mods)
        repacks = any(getattr(m, "support_avx512bf16_for_cpu", False) for m in mods)
        notes: tuple[str, ...] = (
            (f"{packed} Linear4bit weights are packed for CPU inference; prepare unpacks them",) if packed else ()
        )
        notes += fused_expert_note(model, "bitsandbytes")
        # Params4bit is packed storage whatever dtype it reports (bnb_4bit_quant_storage=bf16 packs into bf16)
        storage = quantized_tensor_names(
            model, detection.modules, include=lambda n, t: type(t).__name__ == "Params4bit"
        )
        packed_weights = frozenset(
            f"{n}.{local}" if n else local
            for n, m in named
            for local, p in m.named_parameters(recurse=False)
            if type(p).__name__ == "Params4bit"
        )
        return Declarations(
            quantized=storage,
            sharded_storage=_sharded_storage(model, packed_weights),
            upcast_note=_UPCAST_NOTE,
            fixups=(_unpack_cpu_weights(detection.modules),) if packed or repacks else (),
            notes=notes,
            warnings=_warnings(model, detection, "4-bit", "Linear4bit"),
        )


class Bnb8bitBackend(Backend):
    """bitsandbytes LLM.int8 (``Int8Params`` int8 weights, never cast); embeddings and lm_head kept as loaded."""

    name = "bnb-8bit"
    priority = 100
    requires = ("bitsandbytes",)
    install_hint = "pip install bitsandbytes"
    description = "bitsandbytes 8-bit (Linear8bitLt / Int8Params)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Modules holding ``Int8Params`` weights, or a ``Bnb8BitHfQuantizer``."""
        return _detect(model, "Int8Params", "Bnb8BitHfQuantizer", "is_loaded_in_8bit")

    def schemes(self) -> tuple[Scheme, ...]:
        """LLM.int8."""
        return (INT8,)

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Quantized ``Int8Params`` storage, no default upcast, both checkpointing modes."""
        bf16 = any(p.dtype == torch.bfloat16 for m in module_index(model).values() for p in m.parameters(recurse=False))
        notes: tuple[str, ...] = (
            (
                "Linear8bitLt casts bf16 inputs to fp16 (bitsandbytes warns; only CPU training skips the cast); "
                "load 8-bit models with dtype=torch.float16",
            )
            if bf16
            else ()
        )
        notes += fused_expert_note(model, "bitsandbytes")
        return Declarations(
            quantized=quantized_tensor_names(model, detection.modules),
            upcast_note=_UPCAST_NOTE,
            notes=notes,
            warnings=_warnings(model, detection, "8-bit", "Linear8bitLt"),
        )
