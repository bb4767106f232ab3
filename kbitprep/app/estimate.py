"""Will it fit? Peak training memory for LoRA / QLoRA, predicted from a config without a GPU.

:func:`estimate` answers, for a transformers config (or a loaded model) and a training setup
(quantization, batch, sequence length, LoRA rank and targets, AdamW, autocast), what peak memory
one training step needs on the GPU (``torch.cuda.max_memory_allocated``) with PEFT's
``prepare_model_for_kbit_training`` and with kbitprep's default, ``chunked_head``, ``offload`` and
``lowest`` settings, with the parts of each peak.

How: one real training step runs on fake tensors (see :mod:`kbitprep.app.estimate_sim`): the real
transformers model code, PEFT's LoRA layers, transformers' checkpointing, kbitprep's memory modes
and a real AdamW step, with the quantized linears replaced by stand-ins that hold the scheme's
storage bytes and allocate what the backend allocates. Every storage's allocation and free is
tracked; the peak of live bytes is the estimate.

Decoder layers repeat, so by default a model with more than :data:`EXACT_MAX_LAYERS` layers is
simulated with 2 and with 3 layers and each part of the peak is extrapolated linearly to the real
depth (exact for identical layers; ``exact=True`` simulates every layer). Where layers differ (dense
layers before the experts, hybrid patterns), the repeating part is found and the model simulated up
to one and two repeats of it. The largest batch or
sequence that fits a GPU (``gpu_memory=``) is extrapolated from the estimate: the weights and the
adapter state stay, everything else grows with the tokens per step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .._anatomy import text_config as _text_config
from .._render import format_bytes, table
from ..errors import InvalidPolicyError, KbitprepError, UnsupportedModelError
from .estimate_sim import PARTS, TRAINERS, SimSetup, expert_note, simulate
from .output import emit_json

__all__ = [
    "DEFAULT_VARIANTS",
    "EXACT_MAX_LAYERS",
    "PER_LAYER_KEYS",
    "Estimate",
    "EstimateRow",
    "Variant",
    "add_estimate_parser",
    "estimate",
    "format_gpu_memory",
    "parse_bytes",
    "run_estimate",
    "truncated_config",
]

#: Models with at most this many layers are simulated whole; deeper ones with 2 and 3 layers (or up to one and
#: two repeats of their layer pattern), extrapolated.
EXACT_MAX_LAYERS = 6
_FIT_LAYERS = (2, 3)
_MIN_FIT_LAYERS = _FIT_LAYERS[0]

#: The rows :func:`estimate` prints by default.
DEFAULT_VARIANTS = ("peft", "default", "chunked_head", "offload", "lowest")

_OPTIMIZERS = ("adamw",)
_CHECKPOINTING = {
    True: True,
    None: True,
    "on": True,
    False: "off",
    "off": "off",
    "reentrant": "reentrant",
    "non_reentrant": "non_reentrant",
}


@dataclass(frozen=True)
class Variant:
    """One row of an estimate: how the model is prepared.

    Attributes:
        name: the row's name.
        peft: prepared by PEFT's ``prepare_model_for_kbit_training`` (its upcast; its reentrant
            checkpointing unless ``checkpointing`` says otherwise) instead of ``kbitprep.prepare``.
        upcast: kbitprep's upcast policy (``None``: the backend's default; ignored for PEFT rows).
        checkpointing: ``True`` (the default mode), ``"reentrant"``, ``"non_reentrant"`` or ``"off"``.
        memory: kbitprep's ``memory=`` choice (a preset name or a mapping), ``None`` for none.
        offload_impl: what offloads saved tensors when ``memory`` offloads: ``"kbitprep"`` (its
            hooks) or ``"save_on_cpu"`` (``torch.autograd.graph.save_on_cpu(pin_memory=True)``
            around the forward and the loss: every saved tensor, parameters included).
    """

    name: str
    peft: bool = False
    upcast: str | None = None
    checkpointing: bool | str | None = True
    memory: str | dict[str, Any] | None = None
    offload_impl: str = "kbitprep"


def _standard_variant(name: str, upcast: str | None, checkpointing: bool | str | None) -> Variant:
    if name == "peft":
        return Variant("peft", peft=True)
    if name == "default":
        return Variant("default", upcast=upcast, checkpointing=checkpointing)
    if name in ("chunked_head", "offload", "lowest"):
        return Variant(name, upcast=upcast, checkpointing=checkpointing, memory=name)
    raise InvalidPolicyError(
        f"unknown estimate variant {name!r}; choose from {', '.join(DEFAULT_VARIANTS)} "
        "or pass a kbitprep.EstimateVariant"
    )


@dataclass(frozen=True)
class EstimateRow:
    """The estimate for one variant.

    Attributes:
        variant: the row's name (``peft``, ``default``, ``chunked_head``, ``offload``, ``lowest`` or yours).
        peak_bytes: the predicted peak of allocated device memory over a training step.
        parts: the bytes live at the peak: ``weights`` (the base model's parameters, quantized
            storage and its state, buffers, the batch), ``adapters`` (LoRA parameters, their gradients
            and AdamW's state), ``activations`` (tensors autograd saved for backward), ``logits_loss``
            (tensors with a vocabulary-sized dimension: logits, their fp32 copy, log-softmax,
            their gradients) and ``transient`` (everything else: gradients in flight, recomputed
            layer tensors, dequantized weights).
        largest_transient_bytes: the largest single allocation of the step that is not a weight or adapter state.
        upcast: the upcast policy the row trains with (``"peft"`` for PEFT's).
        checkpointing: the checkpointing mode.
        memory: the memory modes (``{"chunked_head": tokens, "offload": bool}``).
        offloaded_bytes: the most bytes held in pinned host memory at once (offload rows).
        fits: whether the peak fits ``gpu_memory`` (``None`` when none was given).
        max_batch: the largest batch (at the estimate's sequence length) that fits ``gpu_memory``.
        max_seq: the largest sequence length (at the estimate's batch) that fits ``gpu_memory``.
        unverified: why this row's figure is unverified on a GPU, or ``""``: the scheme's CUDA kernels
            allocate differently from the CPU kernels its stand-ins were checked against.
    """

    variant: str
    peak_bytes: int
    parts: dict[str, int]
    largest_transient_bytes: int
    upcast: str
    checkpointing: str
    memory: dict[str, Any]
    offloaded_bytes: int = 0
    fits: bool | None = None
    max_batch: int | None = None
    max_seq: int | None = None
    unverified: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "variant": self.variant,
            "peak_bytes": self.peak_bytes,
            "parts": dict(self.parts),
            "largest_transient_bytes": self.largest_transient_bytes,
            "upcast": self.upcast,
            "checkpointing": self.checkpointing,
            "memory": dict(self.memory),
            "offloaded_bytes": self.offloaded_bytes,
            "fits": self.fits,
            "max_batch": self.max_batch,
            "max_seq": self.max_seq,
            "unverified": self.unverified,
        }


@dataclass(frozen=True)
class Estimate:
    """The result of :func:`estimate`: one :class:`EstimateRow` per variant, and the setup.

    Attributes:
        model: the model class the config builds.
        quantization: the quantization scheme name.
        dtype: the float dtype (weights that stay float, compute and autocast).
        batch / seq: sequences per step and tokens per sequence.
        lora_r / lora_alpha / lora_targets: the LoRA setup.
        optimizer: the optimizer.
        layers: the model's number of layers.
        simulated_layers: the layer counts simulated (one entry: exact; two: extrapolated).
        lora_params: trainable LoRA parameters.
        gpu_memory: the GPU memory the rows were checked against (bytes), or ``None``.
        rows: the estimates.
        seconds: wall time of the estimate.
        notes: caveats.
    """

    model: str
    quantization: str
    dtype: str
    batch: int
    seq: int
    lora_r: int
    lora_alpha: int
    lora_targets: Any
    optimizer: str
    layers: int
    simulated_layers: tuple[int, ...]
    lora_params: int
    gpu_memory: int | None
    rows: tuple[EstimateRow, ...]
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def row(self, variant: str) -> EstimateRow:
        """The row of ``variant``.

        Raises:
            KeyError: no such row.
        """
        for r in self.rows:
            if r.variant == variant:
                return r
        raise KeyError(variant)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``rows`` holds one dict per variant)."""
        return {
            "model": self.model,
            "quantization": self.quantization,
            "dtype": self.dtype,
            "batch": self.batch,
            "seq": self.seq,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_targets": self.lora_targets if isinstance(self.lora_targets, str) else list(self.lora_targets),
            "optimizer": self.optimizer,
            "layers": self.layers,
            "simulated_layers": list(self.simulated_layers),
            "lora_params": self.lora_params,
            "gpu_memory": self.gpu_memory,
            "rows": [r.to_dict() for r in self.rows],
            "seconds": round(self.seconds, 2),
            "notes": list(self.notes),
        }

    def render(self) -> str:
        """The estimate as text: one column per variant, the parts of each peak as rows."""
        head = (
            f"kbitprep estimate: {self.model}, {self.quantization}, {self.dtype}, batch {self.batch} x {self.seq} "
            f"tokens, LoRA r={self.lora_r} on {self._targets()}, {self.optimizer}"
        )
        lines = [head, "=" * min(len(head), 100)]
        names = [r.variant for r in self.rows]
        body: list[list[object]] = []
        labels = {
            "weights": "weights (quantized + float)",
            "adapters": "adapters + grads + AdamW",
            "activations": "activations kept for backward",
            "logits_loss": "logits and loss",
            "transient": "transient (grads in flight, ...)",
        }
        for part in PARTS:
            body.append([labels[part], *(format_bytes(r.parts.get(part, 0)) for r in self.rows)])
        body.append(["PEAK", *(format_bytes(r.peak_bytes) for r in self.rows)])
        base = self.rows[0].peak_bytes if self.rows else 0
        if base:
            body.append([f"x {names[0]}", *(f"{r.peak_bytes / base:.2f}x" for r in self.rows)])
        body.append(["largest single transient", *(format_bytes(r.largest_transient_bytes) for r in self.rows)])
        body.append(["verified on GPU", *("NO (see note)" if r.unverified else "yes" for r in self.rows)])
        body.append(["upcast", *(r.upcast for r in self.rows)])
        body.append(["checkpointing", *(r.checkpointing for r in self.rows)])
        body.append(["chunked head (tokens)", *(str(r.memory.get("chunked_head", 0) or "-") for r in self.rows)])
        body.append(
            ["offloaded to host", *(format_bytes(r.offloaded_bytes) if r.offloaded_bytes else "-" for r in self.rows)]
        )
        if self.gpu_memory is not None:
            body.append([f"fits {format_gpu_memory(self.gpu_memory)}", *("yes" if r.fits else "NO" for r in self.rows)])
            body.append([f"max batch at seq {self.seq}", *(_maybe(r.max_batch) for r in self.rows)])
            body.append([f"max seq at batch {self.batch}", *(_maybe(r.max_seq) for r in self.rows)])
        lines.append(table(["", *names], body, right=tuple(range(1, len(names) + 1))))
        how = (
            f"simulated {self.simulated_layers[0]} of {self.layers} layers (exact)"
            if len(self.simulated_layers) == 1
            else f"simulated with {' and '.join(map(str, self.simulated_layers))} layers, extrapolated to {self.layers}"
        )
        lines.append(
            f"peak = torch.cuda.max_memory_allocated of one training step; {how}; "
            f"{self.lora_params:,} LoRA parameters; {self.seconds:.1f} s"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _targets(self) -> str:
        return self.lora_targets if isinstance(self.lora_targets, str) else ",".join(self.lora_targets)


def _maybe(n: int | None) -> str:
    return "-" if n is None else str(n)


def format_gpu_memory(n: int) -> str:
    """A GPU's memory in both units: ``24_000_000_000`` -> ``"24 GB = 22.35 GiB"`` (GB: 10^9 bytes, GiB: 2^30).

    Example:
        >>> format_gpu_memory(24 * 10**9), format_gpu_memory(80 * 2**30)
        ('24 GB = 22.35 GiB', '85.9 GB = 80 GiB')
    """
    return f"{n / 10**9:.4g} GB = {n / 2**30:.4g} GiB"


# --------------------------------------------------------------------------- inputs


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20}
_UNITS.update({"gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12})


def parse_bytes(text: str | int | float) -> int:
    """``"24GB"`` -> ``24_000_000_000``; ``"80GiB"``, ``"1.5 TB"``, plain numbers (bytes) too.

    ``GB``, ``MB``, ``TB`` (and ``G``, ``M``, ``T``) are decimal (10^9 ...); ``GiB``, ``MiB``, ``TiB`` binary
    (2^30 ...). A GPU sold as "24GB" has 24 GiB: write ``24GiB`` for it.

    Example:
        >>> parse_bytes("24GB"), parse_bytes("1 GiB")
        (24000000000, 1073741824)

    Raises:
        InvalidPolicyError: not a size.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise InvalidPolicyError(f"memory size {text!r} must be positive")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidPolicyError(
            f"{text!r} is not a memory size; write it like 24GiB (2^30 bytes), 24GB (10^9 bytes) or 16000000000"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise InvalidPolicyError(f"memory size {text!r} must be positive")
    return int(value)


def _scheme_of_model(model: nn.Module) -> str:
    if getattr(model, "is_loaded_in_4bit", False):
        return "bnb-4bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return "bnb-8bit"
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q:
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
        raise InvalidPolicyError(
            f"cannot tell which --quantization scheme this {method} model uses; pass quantization= "
            "(see kbitprep.app.metaplan.SCHEMES)"
        )
    return "none"


def _config_of(model_or_config: Any) -> tuple[Any, str | None]:
    """(config, quantization inferred from a loaded model or None)."""
    from .metaplan import load_config

    if isinstance(model_or_config, nn.Module):
        inner = model_or_config
        get_base = getattr(inner, "get_base_model", None)
        if callable(get_base):
            inner = get_base()
        config = getattr(inner, "config", None)
        if config is None:
            raise InvalidPolicyError(
                f"{type(model_or_config).__name__} has no transformers config; pass a config or a config.json path"
            )
        return config, _scheme_of_model(inner)
    if isinstance(model_or_config, (str, bytes)) or hasattr(model_or_config, "__fspath__"):
        return load_config(model_or_config), None  # type: ignore[arg-type]
    if hasattr(model_or_config, "to_dict") and hasattr(model_or_config, "model_type"):
        return model_or_config, None
    raise InvalidPolicyError(
        f"estimate() takes a transformers config, a config.json path or a loaded model, "
        f"not {type(model_or_config).__name__}"
    )


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidPolicyError(f"{name}={value!r} must be a positive integer")
    return value


def _depth(config: Any) -> int:
    """The model's number of layers (0 when the config does not say it as one number)."""
    value = getattr(_text_config(config), "num_hidden_layers", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _decoder_layers(model: nn.Module, depth: int) -> list[nn.Module] | None:
    """The layers of the stack ``num_hidden_layers`` sets: the one list of ``depth`` checkpointed layers
    (``None`` when there is none, or several: an encoder and a decoder of the same depth)."""
    from .._anatomy import is_checkpointed_layer

    found = [
        list(m)
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) == depth and all(is_checkpointed_layer(x) for x in m)
    ]
    return found[0] if len(found) == 1 else None


def _layer_kinds(config: Any, model: nn.Module, depth: int) -> list[tuple[Any, ...]] | None:
    """One signature per decoder layer, equal for layers that hold the same modules and parameters
    (classes, names, shapes) and have the same per-layer types in the config (``layer_types`` ...);
    ``None`` when the decoder's layers cannot be told apart from the model's other stacks."""
    layers = _decoder_layers(model, depth)
    if layers is None:
        return None
    text = _text_config(config)
    per_layer = [
        value
        for key in (*PER_LAYER_KEYS, "layers_block_type")  # Jamba's, derived from its periods
        if isinstance(value := getattr(text, key, None), (list, tuple)) and len(value) == depth
    ]
    return [
        (
            tuple((name, type(mod).__name__) for name, mod in layer.named_modules()),
            tuple((name, tuple(p.shape), p.dtype) for name, p in layer.named_parameters()),
            tuple(str(value[i]) for value in per_layer),
        )
        for i, layer in enumerate(layers)
    ]


def _repeating_part(kinds: Sequence[object]) -> tuple[int, int] | None:
    """``(start, period)``: the smallest ``start + 2 * period`` such that from layer ``start`` on, the layers
    repeat every ``period`` layers (``(0, 1)``: all alike; ``(3, 1)``: DeepSeek-V3's 3 dense layers, then
    all alike; ``(0, 8)``: Jamba's pattern of 8); ``None`` when no part repeats twice."""
    numbers: dict[object, int] = {}
    kinds = [numbers.setdefault(k, len(numbers)) for k in kinds]
    n = len(kinds)
    for total in range(2, n + 1):
        for period in range(1, total // 2 + 1):
            start = total - 2 * period
            if all(kinds[i] == kinds[start + (i - start) % period] for i in range(start, n)):
                return start, period
    return None


def _fit_depths(config: Any, dtype: torch.dtype, layers: int) -> tuple[tuple[int, ...], str]:
    """The depths to simulate (two, a repeating part apart, or every layer) and a note on the choice.

    Identical layers are simulated with 2 and 3 layers. Models whose layers differ (dense layers before
    the experts, Mamba and attention layers in a pattern) are simulated with their first layers up to
    one and two repeats of the pattern, which the truncated config reproduces; where nothing repeats,
    every layer."""
    from .metaplan import build_meta_model

    try:
        with _quiet():
            kinds = _layer_kinds(config, build_meta_model(config, dtype), layers)
    except KbitprepError:
        raise
    except Exception:  # a model the meta device cannot build here: the simulation says why
        return _FIT_LAYERS, ""
    if kinds is None:
        return _FIT_LAYERS, ""
    part = _repeating_part(kinds)
    if part is None:
        return (layers,), "every layer simulated: the layers follow no repeating pattern"
    start, period = part
    # at least 2 layers in the shallower one: with 1 the peak may fall elsewhere in the step (at the logits
    # rather than in a layer's backward), and the parts would not grow by one layer's worth
    first = start + period * max(1, -(-(_MIN_FIT_LAYERS - start) // period))
    sims = (first, first + period)
    if sims[0] + sims[1] > layers:  # the two depths would cost more than the whole model
        late = "every layer simulated: the layers' pattern starts or repeats too late to save time"
        return (layers,), "" if (start, period) == (0, 1) else late
    if (start, period) == (0, 1):
        return sims, ""
    try:  # the truncated config must build the same first layers (per-layer settings kept by other keys)
        with _quiet():
            cut = truncated_config(config, sims[1])
            same = _layer_kinds(cut, build_meta_model(cut, dtype), sims[1]) == kinds[: sims[1]]
    except Exception:
        same = False
    if not same:
        return (layers,), "every layer simulated: the layers differ, and a config cut to fewer layers builds other ones"
    lead = f"{start} leading layers of their own, then " if start else ""
    return sims, (
        f"layers differ ({lead}a pattern repeating every {period}): simulated with {sims[0]} and {sims[1]} layers"
        + ("" if (layers - start) % period == 0 else f"; the last {(layers - start) % period} are a partial repeat")
    )


#: Per-layer lists of a text config, cut with its depth (``layer_types``: Gemma's sliding/full attention ...).
PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "block_types")


def truncated_config(config: Any, layers: int) -> Any:
    """A copy of ``config`` whose text config has ``layers`` layers: ``num_hidden_layers`` set and the lists
    of :data:`PER_LAYER_KEYS` cut to as many entries; every other attribute as it was.

    Raises:
        Exception: whatever the config raises when its depth is set (Funnel, ProphetNet set it by other keys).
    """
    cfg = copy.deepcopy(config)
    text = _text_config(cfg)
    text.num_hidden_layers = layers
    for key in PER_LAYER_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, list) and len(value) > layers:
            setattr(text, key, value[:layers])
    return cfg


# --------------------------------------------------------------------------- the estimate

#: Loggers kept quiet while an estimate builds and simulates models: transformers' (config and
#: deprecation notices about the models kbitprep builds, "use_cache=True is incompatible with gradient
#: checkpointing"), and torch's fake-tensor log, which prints the traceback of a kernel that fails on
#: fake tensors before the UnsupportedModelError that reports it.
_QUIET_LOGGERS = {"transformers": logging.ERROR, "torch._subclasses.fake_tensor": logging.CRITICAL + 1}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings and no library log records below the levels of :data:`_QUIET_LOGGERS` from the
    models kbitprep builds and runs itself; every level is restored afterwards."""
    saved = [(logging.getLogger(name), level) for name, level in _QUIET_LOGGERS.items()]
    before = [(logger, logger.level) for logger, _ in saved]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for logger, level in saved:
                if logger.getEffectiveLevel() < level:
                    logger.setLevel(level)
            yield
        finally:
            for logger, level in before:
                logger.setLevel(level)


@dataclass(frozen=True)
class _Resolved:
    name: str
    peft: bool
    upcast_label: str
    checkpointing: str
    memory: dict[str, Any] | None
    upcast: str | None
    modes: Any = None
    offload_impl: str = "kbitprep"


def _resolve_variant(v: Variant, scheme: Any) -> _Resolved:
    from .._memory import preset_options, resolve_memory
    from ..plugin import CheckpointMode

    ck: Any = v.checkpointing
    if ck not in _CHECKPOINTING:
        raise InvalidPolicyError(
            f"checkpointing={ck!r} is not valid; use True/False or 'reentrant', 'non_reentrant', 'off'"
        )
    ck = _CHECKPOINTING[ck]
    if v.peft:
        default = "reentrant" if scheme.peft_checkpointing else "off"
        mode = default if ck is True else str(ck)
        return _Resolved(v.name, True, "peft" if scheme.peft_upcast else "none", mode, None, None)
    modes = resolve_memory(v.memory)
    supported = frozenset(CheckpointMode)
    upcast, ck2 = preset_options(modes, v.upcast, ck, supported)
    mode = "reentrant" if ck2 is True else str(ck2)
    if v.offload_impl not in ("kbitprep", "save_on_cpu"):
        raise InvalidPolicyError(f"offload_impl={v.offload_impl!r} is not valid; use 'kbitprep' or 'save_on_cpu'")
    return _Resolved(v.name, False, upcast or "none", mode, _memory_spec(modes), upcast, modes, v.offload_impl)


def _memory_spec(modes: Any) -> dict[str, Any] | None:
    if not modes.active:
        return None
    return {"preset": modes.preset, "chunked_head": modes.chunked_head, "offload": modes.offload}


def _param_dtypes(plan: Any) -> dict[str, torch.dtype]:
    out: dict[str, torch.dtype] = {}
    for pp in plan.params:
        if pp.quantized:
            continue
        for name in (pp.name, *pp.aliases):
            out[name] = pp.dtype_after
    return out


def _simulate_variant(
    config: Any,
    scheme: Any,
    dtype: torch.dtype,
    rv: _Resolved,
    common: dict[str, Any],
    plans: dict[tuple[int, str], Any] | None = None,
) -> Any:
    """Simulate one row at one depth. ``plans`` caches the config plans by (config, upcast): every row
    and depth needs one, and they depend on nothing else."""
    from .._memory import memory_plan
    from ..plugin import CheckpointMode
    from .metaplan import build_meta_model, plan_from_config, quantized_linears

    key = (id(config), str(rv.upcast))
    meta_plan = plans.get(key) if plans is not None else None
    if meta_plan is None:
        meta_plan = plan_from_config(config, scheme, upcast=rv.upcast, checkpointing=True, dtype=dtype)
        if plans is not None:
            plans[key] = meta_plan
    plan = meta_plan.peft if rv.peft else meta_plan.plan
    model = build_meta_model(config, dtype)
    targets = quantized_linears(model, scheme)
    memory = None
    if rv.memory:
        extras, _ = memory_plan(rv.modes, model, CheckpointMode(rv.checkpointing))
        memory = extras.get("memory")
        if memory and not (memory.get("chunked_head") or memory.get("offload")):
            memory = None
    setup = SimSetup(
        config=config,
        scheme=scheme,
        dtype=dtype,
        param_dtypes=_param_dtypes(plan),
        checkpointing=rv.checkpointing,
        memory=memory,
        offload_impl=rv.offload_impl,
        **common,
    )
    return simulate(setup, model, targets)


def estimate(
    model_or_config: Any,
    *,
    quantization: str | None = None,
    batch: int = 4,
    seq: int = 1024,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_targets: str | Sequence[str] = "all-linear",
    dtype: str | torch.dtype | None = None,
    optimizer: str = "adamw",
    upcast: str | None = None,
    checkpointing: bool | str | None = True,
    memory: str | dict[str, Any] | None = None,
    variants: Sequence[str | Variant] | None = None,
    gpu_memory: str | int | None = None,
    keep_logits: bool = False,
    exact: bool = False,
    progress: bool = False,
    trainer: str = "plain",
    lora_experts: bool = False,
    lora_router: bool = False,
) -> Estimate:
    """Predict the peak GPU memory of one LoRA / QLoRA training step, without a GPU.

    Args:
        model_or_config: a transformers config, a ``config.json`` path (or a folder holding one),
            a Hugging Face Hub model id (only its ``config.json`` is fetched, through the hub cache;
            see :func:`kbitprep.app.metaplan.load_config`), or a loaded model (its config and, for
            bitsandbytes, its quantization are used; nothing in it is touched).
        quantization: a scheme name of :data:`kbitprep.app.metaplan.SCHEMES` (``"bnb-4bit"``: NF4 with
            double quantization; ``"none"``: the float model). Default: a loaded model's, else ``"bnb-4bit"``.
        batch: sequences per step.
        seq: tokens per sequence.
        lora_r: LoRA rank (``lora_alpha`` defaults to ``2 * lora_r``; it does not change memory).
        lora_targets: PEFT's ``target_modules`` (``"all-linear"`` or module names).
        dtype: the float dtype of the model, the compute dtype and autocast (default: the config's, else bf16).
        optimizer: ``"adamw"`` (torch's AdamW, ``foreach`` as on CUDA).
        upcast: kbitprep's upcast policy for its rows (default: the backend's).
        checkpointing: kbitprep's checkpointing for its rows (``True``: the backend's default mode).
        memory: one kbitprep ``memory=`` choice: the rows become ``peft`` and that one.
        variants: the rows: names of :data:`DEFAULT_VARIANTS` or :class:`Variant` objects.
        gpu_memory: a GPU's memory (``"24GiB"``: 2^30 bytes, as cards are sold; ``"24GB"``: 10^9
            bytes; or bytes): each row says whether it fits and the largest batch and sequence
            length that do.
        keep_logits: the training loop holds the model output (logits) through the backward
            (transformers' Trainer does not: it keeps the loss only).
        exact: simulate every layer instead of extrapolating from two depths.
        progress: print progress to stderr.
        trainer: the training stack the rows predict: ``"plain"`` (a loop or transformers' ``Trainer``:
            ``model(..., labels=...)``) or ``"trl"`` (TRL's SFT/DPO/GRPO/KTO trainers, which call
            ``model(..., fused_lm_head=True)``: TRL's fused head, or kbitprep's chunked head where it
            serves those calls; see docs/training.md).
        lora_experts: LoRA also on a mixture-of-experts model's fused expert weights (PEFT's
            ``target_parameters``, as ``kbitprep.lora_config(model, experts=True)``); ``all-linear``
            leaves them out.
        lora_router: LoRA also on the routers (as ``kbitprep.lora_config(model, router=True)``).

    Raises:
        InvalidPolicyError: an invalid option (the message says what is valid).
        ConfigError: the config cannot be read or built.
        UnsupportedModelError: the model's code cannot run on fake tensors (for example a router
            that reads per-expert token counts as Python numbers, as JetMoE's does).
        BackendUnavailableError: the model's code needs a package that is not installed.

    Example:
        ```python
        est = kbitprep.estimate("meta-llama/Llama-3.1-8B", gpu_memory="24GiB")  # a hub id: config.json only
        print(est.render())
        ```
    """
    from .metaplan import SCHEMES, config_dtype

    started = time.perf_counter()
    config, inferred = _config_of(model_or_config)
    scheme_name = quantization or inferred or "bnb-4bit"
    if scheme_name not in SCHEMES:
        raise InvalidPolicyError(f"unknown quantization {scheme_name!r}; choices: {', '.join(SCHEMES)}")
    scheme = SCHEMES[scheme_name]
    batch, seq, lora_r = _positive("batch", batch), _positive("seq", seq), _positive("lora_r", lora_r)
    alpha = 2 * lora_r if lora_alpha is None else _positive("lora_alpha", lora_alpha)
    if optimizer not in _OPTIMIZERS:
        raise InvalidPolicyError(f"optimizer={optimizer!r} is not supported; choose from {', '.join(_OPTIMIZERS)}")
    from .._policies import UPCAST_POLICIES

    if upcast is not None and upcast not in UPCAST_POLICIES:
        raise InvalidPolicyError(f"upcast={upcast!r} is not valid; choose from {', '.join(UPCAST_POLICIES)}")
    if isinstance(lora_targets, str):
        targets: Any = lora_targets
    else:
        targets = list(lora_targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise InvalidPolicyError(f"lora_targets={lora_targets!r} must be 'all-linear' or module names")
    float_dtype = config_dtype(config, dtype)
    gpu = parse_bytes(gpu_memory) if gpu_memory is not None else None
    if variants is not None and memory is not None:
        raise InvalidPolicyError("give either memory= (one kbitprep row beside PEFT's) or variants=, not both")
    if memory is not None:
        label = memory if isinstance(memory, str) else "custom"
        chosen: list[Variant] = [
            Variant("peft", peft=True),
            Variant(label, upcast=upcast, checkpointing=checkpointing, memory=memory),
        ]
    else:
        chosen = [
            v if isinstance(v, Variant) else _standard_variant(str(v), upcast, checkpointing)
            for v in (variants if variants is not None else DEFAULT_VARIANTS)
        ]
        if not chosen:
            raise InvalidPolicyError("variants= is empty; name at least one row")
    resolved = [_resolve_variant(v, scheme) for v in chosen]
    if trainer not in TRAINERS:
        raise InvalidPolicyError(f"trainer={trainer!r} is not valid; use one of {', '.join(map(repr, TRAINERS))}")
    _flag("lora_experts", lora_experts)
    _flag("lora_router", lora_router)
    layers = _depth(config)
    sims: tuple[int, ...] = (layers,)
    depth_note = ""
    if not exact and layers > EXACT_MAX_LAYERS:
        sims, depth_note = _fit_depths(config, float_dtype, layers)
    common = {
        "lora_experts": lora_experts,
        "lora_router": lora_router,
        "trainer": trainer,
        "batch": batch,
        "seq": seq,
        "lora_r": lora_r,
        "lora_alpha": alpha,
        "lora_targets": targets,
        "keep_outputs": keep_logits,
        "autocast": float_dtype in (torch.bfloat16, torch.float16),
    }
    rows: list[EstimateRow] = []
    lora_params = 0
    notes: list[str] = [depth_note] if depth_note else []
    total = len(resolved) * len(sims)
    done = 0
    depths: dict[int, Any] = {layers: config}
    if len(sims) > 1:
        try:
            with _quiet():
                depths = {n: truncated_config(config, n) for n in sims}
        except Exception as exc:  # a config whose depth is set by other keys (Funnel): simulate it whole
            sims = (layers,)
            total = len(resolved)
            notes.append(f"every layer simulated: the config cannot be cut to fewer layers ({type(exc).__name__})")
    plans: dict[tuple[int, str], Any] = {}
    for rv in resolved:
        results = []
        for n in sims:
            cfg = depths[n]
            if progress:
                print(
                    f"\rkbitprep estimate: {rv.name} ({n} layers) [{done + 1}/{total}] "
                    f"{time.perf_counter() - started:5.1f} s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            with _quiet():
                try:
                    res = _simulate_variant(cfg, scheme, float_dtype, rv, common, plans)
                except KbitprepError:
                    raise
                except Exception as exc:  # the model code cannot run on fake tensors
                    raise UnsupportedModelError(
                        f"cannot simulate a training step of this {getattr(config, 'model_type', '?')} model "
                        f"({rv.name} row) on fake tensors: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    ) from exc
            results.append(res)
            notes.extend(f"{rv.name}: {n}" for n in res.notes if f"{rv.name}: {n}" not in notes)
            notes.extend(n for n in res.model_notes if n not in notes)
            done += 1
        peak, parts, largest, off, lp = _extrapolate(results, sims, layers)
        lora_params = lp
        fused = _extrapolate_figures([r.fused_experts for r in results], sims, layers)
        note = expert_note(fused, scheme)
        if note and note not in notes:
            notes.insert(0, note)
        rows.append(
            EstimateRow(
                variant=rv.name,
                peak_bytes=peak,
                parts=parts,
                largest_transient_bytes=largest,
                upcast=rv.upcast_label,
                checkpointing=rv.checkpointing,
                memory=dict(rv.memory or {"chunked_head": 0, "offload": False}),
                offloaded_bytes=off,
                unverified=results[0].unverified,
            )
        )
    if progress:
        print(file=sys.stderr)
    if gpu is not None:
        rows = [_fit(r, gpu, batch, seq) for r in rows]
    notes.append(
        "quantized linears are stand-ins holding the scheme's bytes (bitsandbytes 4-bit: dequantized weight "
        "and fp32 absmax as transients, as its CUDA kernels allocate); kernel workspaces are not counted"
    )
    if trainer == "trl":
        notes.append(
            "trainer trl: each row trains through TRL's fused head (fused_lm_head=True, as SFTTrainer and DPOTrainer "
            "call the model); with kbitprep's chunked head, kbitprep's head serves those calls on CPU and TRL's on "
            "CUDA, where it is simulated by its torch fallback, which allocates more than its Triton kernel: an "
            "upper bound for its share"
        )
    unverified = sorted({r.unverified for r in rows if r.unverified})
    notes.extend(f"{scheme.name} rows are unverified on a GPU: {why}" for why in unverified)
    if any(r.memory.get("offload") for r in rows):
        notes.append("offload rows count device memory only; the offloaded bytes sit in pinned host memory")
    if gpu is not None:
        notes.append(
            f"GPU memory {format_gpu_memory(gpu)} (GB: 10^9 bytes, GiB: 2^30; a card sold as 24GB has 24 GiB: "
            "pass 24GiB); max batch / seq: weights and adapter state fixed, the rest scaled with the tokens per "
            "step (linear)"
        )
    model_name = type(config).__name__.removesuffix("Config") or "model"
    return Estimate(
        model=model_name,
        quantization=scheme.name,
        dtype=str(float_dtype).removeprefix("torch."),
        batch=batch,
        seq=seq,
        lora_r=lora_r,
        lora_alpha=alpha,
        lora_targets=targets,
        optimizer=optimizer,
        layers=layers,
        simulated_layers=sims,
        lora_params=lora_params,
        gpu_memory=gpu,
        rows=tuple(rows),
        seconds=time.perf_counter() - started,
        notes=tuple(notes),
    )


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidPolicyError(f"{name}={value!r} must be True or False")
    return value


def _extrapolate(results: list[Any], sims: tuple[int, ...], layers: int) -> tuple[int, dict[str, int], int, int, int]:
    """Peak, parts, largest transient, offloaded bytes and LoRA parameters at ``layers`` layers."""
    if len(results) == 1:
        r = results[0]
        return r.peak_bytes, dict(r.parts), r.largest_alloc, r.offloaded_bytes, r.lora_params
    (a, b), k = results, _depth_factor(sims, layers)

    def lin(x: int, y: int) -> int:
        return _linear(x, y, k)

    parts = {p: lin(a.parts[p], b.parts[p]) for p in PARTS}
    peak = sum(parts.values())
    return (
        peak,
        parts,
        max(a.largest_alloc, b.largest_alloc),
        lin(a.offloaded_bytes, b.offloaded_bytes),
        lin(a.lora_params, b.lora_params),
    )


def _extrapolate_figures(figures: list[tuple[int, ...]], sims: tuple[int, ...], layers: int) -> tuple[int, int, int]:
    """Counts and bytes that grow by the same amount with each layer, at ``layers`` layers."""
    if len(figures) == 1:
        a = figures[0]
        return a[0], a[1], a[2]
    (a, b), k = figures, _depth_factor(sims, layers)
    x, y, z = (_linear(u, v, k) for u, v in zip(a, b, strict=True))
    return x, y, z


def _depth_factor(sims: tuple[int, ...], layers: int) -> float:
    """Where ``layers`` lies on the line through the two simulated depths (0 at the first, 1 at the second)."""
    return (layers - sims[0]) / (sims[1] - sims[0])


def _linear(x: int, y: int, k: float) -> int:
    """The value at ``k`` on the line through ``x`` (k=0) and ``y`` (k=1), never below zero."""
    return max(0, round(x + (y - x) * k))


def _fit(row: EstimateRow, gpu: int, batch: int, seq: int) -> EstimateRow:
    fixed = row.parts["weights"] + row.parts["adapters"]
    per_token = (row.peak_bytes - fixed) / (batch * seq)
    max_tokens = 0 if fixed >= gpu or per_token <= 0 else int((gpu - fixed) / per_token)
    return replace(
        row,
        fits=row.peak_bytes <= gpu,
        max_batch=max_tokens // seq,
        max_seq=max_tokens // batch,
    )


# --------------------------------------------------------------------------- command line


def add_estimate_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = (), scheme_type: Any = None
) -> argparse.ArgumentParser:
    """Add the ``estimate`` sub-command to a ``kbitprep`` command line's sub-parsers; returns its parser."""
    from .._policies import UPCAST_POLICIES
    from .metaplan import scheme_name

    p = subparsers.add_parser(
        "estimate",
        parents=list(parents),
        help="predict peak training memory (PEFT vs kbitprep's settings) from a config",
        description="Predict the peak GPU memory of one LoRA/QLoRA training step for PEFT's "
        "prepare_model_for_kbit_training and kbitprep's default, chunked_head, offload and lowest "
        "settings, by running one training step of the real model code on fake tensors. No GPU, "
        "no weights.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="a config.json, a folder holding one, or a Hugging Face Hub model id (only its config.json is "
        "fetched, through the hub cache; HF_HUB_OFFLINE and HF_TOKEN apply)",
    )
    p.add_argument(
        "--quantization",
        type=scheme_type or scheme_name,
        default="bnb-4bit",
        metavar="SCHEME",
        help="a scheme an installed backend declares (bnb-4bit, bnb-8bit, hqq-4bit, torchao-int4, none, ...; "
        "default: bnb-4bit)",
    )
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-targets", default="all-linear", help="all-linear (default) or comma-separated module names")
    p.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto", help="default: the config's"
    )
    p.add_argument("--optimizer", choices=list(_OPTIMIZERS), default="adamw")
    p.add_argument("--upcast", choices=list(UPCAST_POLICIES), default=None, help="kbitprep rows' upcast policy")
    p.add_argument(
        "--checkpointing",
        choices=["on", "off", "reentrant", "non_reentrant"],
        default="on",
        help="kbitprep rows' checkpointing (on: the backend's default)",
    )
    p.add_argument(
        "--memory",
        choices=list(DEFAULT_VARIANTS[1:]),
        default=None,
        help="only this kbitprep setting (beside PEFT's) instead of all four",
    )
    p.add_argument(
        "--gpu-memory",
        default=None,
        help="a GPU's memory: which rows fit, and the largest batch/seq. 24GiB is 24 x 2^30 bytes (a card sold "
        "as 24GB has that), 24GB is 24 x 10^9 bytes, a plain number is bytes",
    )
    p.add_argument("--exact", action="store_true", help="simulate every layer (slower)")
    p.add_argument(
        "--trainer",
        choices=list(TRAINERS),
        default="plain",
        help="the training stack: plain (a loop or transformers' Trainer) or trl (TRL's SFT/DPO/GRPO/KTO "
        "trainers, which call the model with fused_lm_head=True)",
    )
    p.add_argument(
        "--lora-experts",
        action="store_true",
        help="LoRA also on the fused expert weights of a mixture-of-experts model (PEFT's target_parameters)",
    )
    p.add_argument("--lora-router", action="store_true", help="LoRA also on the routers of a mixture-of-experts model")
    p.add_argument("--keep-logits", action="store_true", help="the training loop holds the logits through backward")
    if not any(a.dest == "json" for a in p._actions):
        p.add_argument("--json", action="store_true", help="print one JSON object")
    parser: argparse.ArgumentParser = p
    return parser


def run_estimate(args: argparse.Namespace, out: Any = None) -> int:
    """Run ``kbitprep estimate`` with parsed ``args``; prints the table (or JSON) to ``out``; returns 0.

    Raises:
        KbitprepError: bad options or config (the CLI turns it into an error message and exit code).
    """
    out = out or sys.stdout
    targets: Any = args.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in str(targets).split(",") if t.strip()]
    checkpointing: Any = {"on": True, "off": "off"}.get(args.checkpointing, args.checkpointing)
    result = estimate(
        args.config,
        quantization=args.quantization,
        batch=args.batch,
        seq=args.seq,
        lora_r=args.lora_r,
        lora_targets=targets,
        dtype=None if args.dtype == "auto" else args.dtype,
        optimizer=args.optimizer,
        upcast=args.upcast,
        checkpointing=checkpointing,
        memory=args.memory,
        gpu_memory=args.gpu_memory,
        keep_logits=bool(getattr(args, "keep_logits", False)),
        exact=bool(getattr(args, "exact", False)),
        progress=not getattr(args, "json", False) and sys.stderr.isatty(),
        trainer=getattr(args, "trainer", "plain"),
        lora_experts=bool(getattr(args, "lora_experts", False)),
        lora_router=bool(getattr(args, "lora_router", False)),
    )
    if getattr(args, "json", False):
        emit_json({"command": "estimate", **result.to_dict()}, out)
    else:
        out.write(result.render() + "\n")
    return 0
