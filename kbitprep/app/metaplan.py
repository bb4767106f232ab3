"""Planning without weights: quantization schemes, their storage formulas, and PEFT's figure.

``kbitprep plan --config config.json --quantization bnb-4bit`` builds the model described by a
transformers config on the meta device (no weight memory at all), plans it with the core planner,
and then replaces every weight the quantization would convert by the bytes that scheme stores for
it, computed from the layer's shape alone. A 70B-parameter config plans in a second or two.

Storage formulas, per converted ``nn.Linear`` weight with ``out`` rows, ``inp`` columns and
``n = out * inp`` elements (``ceil`` rounds up; ``f`` is the byte size of the model's float dtype,
2 for bf16/fp16). Each was checked against the tensors the library really stores on a small model
(``tests/cli/test_metaplan.py``):

``bnb-4bit``  (bitsandbytes NF4, blocksize 64, double quantization, as the demo loads it)
    ``ceil(n/2)`` packed 4-bit data + ``b = ceil(n/64)`` uint8 absmax (one per block) +
    ``4 * ceil(b/256)`` fp32 second-level absmax + 4 (fp32 offset) + 64 (16-entry fp32 NF4 code) +
    1024 (256-entry fp32 code of the second level). About 0.516 byte per parameter.
``bnb-8bit``  (bitsandbytes LLM.int8)
    ``n`` int8 + ``4 * out`` (fp32 row scale ``SCB``). About 1 byte per parameter.
``torchao-int8``  (``Int8WeightOnlyConfig``)
    ``n`` int8 + ``4 * out`` (fp32 row scale) + ``out`` (int8 zero point).
``torchao-int4``  (``IntxWeightOnlyConfig(int4, PerGroup(32))``: int4 values stored unpacked in int8)
    ``n`` int8 + ``g = out * ceil(inp/32)`` groups x (``f`` scale + 1 int8 zero point).
``quanto-int8``  (``QuantoConfig(weights="int8")``)
    ``n`` int8 + ``f * out`` (row scale in the model's dtype).
``quanto-int4``  (``QuantoConfig(weights="int4")``, group size 128)
    ``ceil(n/2)`` packed + ``g = out * ceil(inp/128)`` groups x ``2 f`` (scale and shift).
``hqq-4bit``  (hqq ``BaseQuantizeConfig(nbits=4, group_size=64)``)
    ``ceil(n/2)`` packed + ``g = ceil(n/64)`` groups x ``2 f`` (scale and zero in the compute dtype).

Which linears are converted follows transformers' quantizers: every ``nn.Linear`` except the
output embeddings (``lm_head``), tied weights, the model's last parameter and its
``_keep_in_fp32_modules`` (``transformers.quantizers.base.get_keys_to_not_convert``). Biases and
every other parameter keep the loaded float dtype. The bytes reported for a quantized weight are
its data *plus* its scales / quantization state (the "overhead"), whether the library keeps them
inside the parameter (torchao, quanto) or beside it (bitsandbytes, hqq); a plan of a really
loaded model counts what lives in the parameter objects, so for bitsandbytes and hqq it shows
the data bytes only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._peft_rules import peft_rules, peft_rules_for
from .._planning import ParamPlan, Plan, build_plan
from .._policies import UpcastPolicy, resolve_checkpointing, resolve_upcast
from .._registry import Registry, default_registry
from ..errors import ConfigError, KbitprepError
from ..plugin import CheckpointMode, Declarations, Scheme

__all__ = [
    "SCHEMES",
    "ConfigError",
    "MetaPlan",
    "PlannedScheme",
    "build_meta_model",
    "config_dtype",
    "converted_linears",
    "load_config",
    "peft_plan",
    "plan_from_config",
    "scheme_name",
    "schemes",
]


@dataclass(frozen=True)
class PlannedScheme:
    """A backend's :class:`~kbitprep.plugin.Scheme` as the config planner uses it: with the backend
    that declared it and what PEFT's function would do to a model loaded this way.

    Attributes:
        scheme: the plugin's declaration.
        backend: the name of the backend that declared it.
        peft_upcast: whether PEFT's ``prepare_model_for_kbit_training`` upcasts the other fp16/bf16
            parameters of such a model (as :func:`kbitprep.prepare_model_for_kbit_training`
            reproduces it: where PEFT's function raises, the backend's ``allow_upcast`` decides).
        peft_checkpointing: whether PEFT's function enables checkpointing for it.
        peft_note: a remark on what PEFT's function really does with it.
    """

    scheme: Scheme
    backend: str
    peft_upcast: bool
    peft_checkpointing: bool
    peft_note: str

    def __getattr__(self, name: str) -> Any:  # name, summary, formula, module_class, requires ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.scheme, name)

    @property
    def name(self) -> str:
        """What ``--quantization`` takes."""
        return self.scheme.name

    @property
    def quantizes(self) -> bool:
        """Whether this scheme converts any weight (``"none"`` does not)."""
        return self.scheme.quantizes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "name": self.scheme.name,
            "backend": self.backend,
            "summary": self.scheme.summary,
            "formula": self.scheme.formula,
            "module_class": self.scheme.module_class,
        }


def _planned(scheme: Scheme, backend: str) -> PlannedScheme:
    rules = peft_rules_for(scheme.quant_method, dict(scheme.model_flags))
    note = ""
    upcast = rules.upcast == "all"
    if upcast and scheme.cast_raises:
        note = (
            f"PEFT's function raises on {backend} models (it casts their quantized weights, which refuse a dtype "
            "change); the PEFT figure is kbitprep's drop-in, which casts nothing there, as the backend requires"
        )
        upcast = scheme.allow_upcast
    elif not scheme.quantizes:
        note = "PEFT's function upcasts an unquantized model whole and enables no checkpointing"
    return PlannedScheme(scheme, backend, upcast, rules.checkpointing is not CheckpointMode.OFF, note)


def schemes(registry: Registry | None = None) -> dict[str, PlannedScheme]:
    """Every quantization scheme the installed backends declare, by name (``"none"`` last).

    A scheme name declared by two backends keeps the higher-priority backend's. A backend whose
    ``schemes()`` raises is left out and reported as a plugin failure (a ``PluginWarning``; an error in strict mode).
    """
    reg = registry or default_registry()
    found: dict[str, PlannedScheme] = {}
    for name in reg.names():
        try:
            declared = tuple(reg.get(name).backend.schemes())
        except Exception as exc:  # a broken plugin must not break planning for the others: report it
            reg.report_failure(name, "schemes", f"schemes() raised {type(exc).__name__}: {exc}", exc)
            continue
        for s in declared:
            if isinstance(s, Scheme) and s.name not in found:
                found[s.name] = _planned(s, name)
    ordered = sorted(found.values(), key=lambda p: not p.quantizes)
    return {p.name: p for p in ordered}


class _Schemes(Mapping[str, PlannedScheme]):
    """:func:`schemes` of the process-wide registry, read at each use (plugins can be registered later)."""

    def __getitem__(self, name: str) -> PlannedScheme:
        return schemes()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(schemes())

    def __len__(self) -> int:
        return len(schemes())


def scheme_name(value: str) -> str:
    """An argparse ``type=`` for ``--quantization``: the name of an installed scheme.

    Reads the schemes only when the option is given (so ``--help`` and other commands load no plugin).
    """
    import argparse

    known = schemes()
    if value not in known:
        choices = ", ".join(repr(n) for n in known)
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {choices})")
    return value


#: Every quantization scheme of the installed backends, by ``--quantization`` name (read lazily).
SCHEMES: Mapping[str, PlannedScheme] = _Schemes()


# --------------------------------------------------------------------------- PEFT's figure


def peft_plan(model: nn.Module, *, registry: Registry | None = None) -> Plan:
    """The plan of PEFT's ``prepare_model_for_kbit_training(model)`` with its default arguments.

    The same rules :func:`kbitprep.prepare_model_for_kbit_training` applies (PEFT 0.21): bitsandbytes
    models and models of an unknown backend get every plain fp16/bf16 parameter that is not a
    ``Params4bit`` cast to fp32; GPTQ, AQLM, EETQ, TorchAO and HQQ models get no cast; checkpointing
    (reentrant) only for bitsandbytes and those five. Where PEFT's function raises (a half-dtype
    tensor subclass it tries to cast, as with optimum-quanto) the backend's ``allow_upcast`` decides,
    as in the drop-in. Changes nothing.
    """
    rules = peft_rules(model)
    return build_plan(model, peft_compat=True, registry=registry, **rules.plan_kwargs())


# --------------------------------------------------------------------------- configs and meta models


def load_config(path: str | Path) -> Any:
    """Read a transformers config from a ``config.json`` file (or a folder holding one).

    Raises:
        ConfigError: the file is missing, is not JSON, or names no model type transformers knows.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {p}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"malformed config {p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"malformed config {p}: expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f'malformed config {p}: no "model_type" (e.g. "llama")')
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"malformed config {p}: model_type {model_type!r} is not one transformers knows "
            "(e.g. llama, mistral, qwen2, gemma)"
        )
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"malformed config {p}: {' '.join(str(exc).split())}") from exc


def model_class(config: Any) -> Any:
    """The transformers class a config describes: its ``architectures`` entry, else a causal LM if
    transformers has one for it, else the bare ``AutoModel``."""
    import transformers

    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and hasattr(cls, "_from_config") and hasattr(cls, "from_pretrained"):
            return cls
    try:
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM


def config_dtype(config: Any, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The float dtype to plan with: ``dtype`` if given (not ``"auto"``), else the config's, else bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16"
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ConfigError(f"dtype {dtype!r} is not a floating-point torch dtype")
    return found


def build_meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model ``config`` describes, built on the meta device: shapes and dtypes, no storage.

    Raises:
        ConfigError: transformers cannot build a model from the config.
    """
    cls = model_class(config)
    try:
        with torch.device("meta"):
            model = (
                cls.from_config(config, dtype=dtype)
                if hasattr(cls, "from_config")
                else cls._from_config(config, dtype=dtype)
            )
    except (ValueError, TypeError, AttributeError, KeyError, AssertionError, RuntimeError) as exc:
        raise ConfigError(
            f"cannot build a {getattr(config, 'model_type', '?')} model from this config: {' '.join(str(exc).split())}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"building from this config gave {type(model).__name__}, not a model")
    return model


def converted_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules a transformers quantizer would convert (see the module docstring)."""
    skip: set[str] = set()
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip.update(get_keys_to_not_convert(model))
    except Exception:  # not a transformers model, or an older transformers: keep the output embeddings
        getter = getattr(model, "get_output_embeddings", None)
        out = getter() if callable(getter) else None
        skip.update(n for n, m in model.named_modules() if out is not None and m is out)
    skip.update(getattr(model, "_keep_in_fp32_modules", None) or ())

    def skipped(name: str) -> bool:
        return any(
            name == s or name.startswith(s + ".") or name.endswith("." + s) or f".{s}." in f".{name}." for s in skip
        )

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(n)]


@dataclass(frozen=True)
class MetaPlan:
    """A plan made from a config on the meta device, with PEFT's figure and the quantization totals.

    Attributes:
        plan: kbitprep's plan (same shape as a plan of a loaded model).
        peft: what PEFT's function would do, planned by its rules on the same layers.
        scheme: the quantization.
        parameters: number of parameters the config describes (tied ones once).
        quantized_parameters: how many of them the quantization converts.
        quantized_layers: how many linears it converts.
        weight_bytes: data bytes of the converted weights.
        overhead_bytes: their scales / quantization state bytes.
        dtype: the float dtype of everything else.
    """

    plan: Plan
    peft: Plan
    scheme: PlannedScheme
    parameters: int
    quantized_parameters: int
    quantized_layers: int
    weight_bytes: int
    overhead_bytes: int
    dtype: torch.dtype

    def quantization_dict(self) -> dict[str, Any]:
        """The quantization totals as JSON-ready data."""
        qp = self.quantized_parameters
        return {
            **self.scheme.to_dict(),
            "quantized_layers": self.quantized_layers,
            "quantized_parameters": qp,
            "weight_bytes": self.weight_bytes,
            "overhead_bytes": self.overhead_bytes,
            "bytes_per_quantized_parameter": (self.weight_bytes + self.overhead_bytes) / qp if qp else 0.0,
        }


def _scheme_declarations(scheme: PlannedScheme) -> Declarations:
    """The rules the scheme's backend declares for a loaded model (every built-in: no default upcast,
    reentrant checkpointing by default, both modes supported)."""
    note = "" if scheme.allow_upcast else f"the {scheme.backend} backend does not allow upcasting for {scheme.name}"
    return Declarations(allow_upcast=scheme.allow_upcast, upcast_note=note, default_upcast="none")


def _requantize(
    base: Plan, model: nn.Module, scheme: PlannedScheme, targets: set[str], dtype: torch.dtype
) -> tuple[Plan, int, int, int]:
    """``base`` with the weights of ``targets`` replaced by the scheme's storage; returns the plan and totals."""
    mods = dict(model.named_modules())
    fbytes = torch.empty((), dtype=dtype).element_size()
    params: list[ParamPlan] = []
    weight_total = overhead_total = numel_total = 0
    for pp in base.params:
        owner, _, local = pp.name.rpartition(".")
        if owner in targets and local == "weight" and scheme.quantizes:
            mod = mods[owner]
            assert isinstance(mod, nn.Linear)
            data, extra = scheme.weight_bytes(mod.out_features, mod.in_features, fbytes)
            weight_total += data
            overhead_total += extra
            numel_total += mod.out_features * mod.in_features
            sdtype = scheme.storage_dtype or pp.dtype_before
            params.append(
                replace(
                    pp,
                    name=f"{owner}.{scheme.param_name}",
                    aliases=(f"{owner}.{scheme.param_name}",),
                    module_type=scheme.module_class,
                    dtype_before=sdtype,
                    dtype_after=sdtype,
                    bytes_before=data + extra,
                    bytes_after=data + extra,
                    quantized=True,
                    requires_grad_before=False,
                    requires_grad_after=False,  # quantized weights load frozen
                )
            )
        elif scheme.frozen_on_load and not pp.adapter:
            params.append(replace(pp, requires_grad_before=False))
        else:
            params.append(pp)
    return replace(base, params=tuple(params)), weight_total, overhead_total, numel_total


def plan_from_config(
    config: Any,
    scheme: PlannedScheme | str = "bnb-4bit",
    *,
    upcast: UpcastPolicy = None,
    checkpointing: bool | str | CheckpointMode | None = True,
    dtype: str | torch.dtype | None = None,
    source: str = "",
    registry: Registry | None = None,
) -> MetaPlan:
    """Plan the model ``config`` describes, quantized with ``scheme``, without allocating its weights.

    The model is built on the meta device and planned by the core planner as an unquantized
    model under the scheme backend's rules (its upcast policy and checkpointing defaults); then
    each weight the quantization converts is given the bytes of the scheme's formula. PEFT's
    figure is planned the same way with PEFT's rules for that backend.

    Args:
        config: a transformers config (see :func:`load_config`).
        scheme: a :data:`SCHEMES` name or object.
        upcast: the upcast policy (``None``: the backend's default, ``"none"``).
        checkpointing: as for :func:`kbitprep.plan`.
        dtype: the float dtype of the unconverted parameters (default: the config's, else bf16).
        source: where the config came from, for the evidence line.
        registry: the backend registry (for the backend's distribution).

    Raises:
        ConfigError: the config cannot be built.
        InvalidPolicyError: an upcast or checkpointing choice the backend does not allow.
        KbitprepError: an unknown scheme name.
    """
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise KbitprepError(f"unknown quantization {scheme!r}; choices: {', '.join(SCHEMES)}")
        scheme = SCHEMES[scheme]
    decl = _scheme_declarations(scheme)
    label, _ = resolve_upcast(upcast, decl)
    mode, mode_note = resolve_checkpointing(checkpointing, decl)
    float_dtype = config_dtype(config, dtype)
    model = build_meta_model(config, float_dtype)
    targets = set(converted_linears(model)) if scheme.quantizes else set()

    # The converted weights are planned as float first and replaced by their storage afterwards.
    base = build_plan(
        model,
        backend="unquantized",
        upcast=upcast if callable(upcast) else label,
        checkpointing=mode.value,
        registry=registry,
    )
    plan, weight, overhead, qnumel = _requantize(base, model, scheme, targets, float_dtype)
    reg = registry or default_registry()
    dist = reg.get(scheme.backend).distribution if scheme.backend in reg else "kbitprep"
    parameters = sum(p.numel() for p in model.parameters())
    evidence = (
        f"planned from {source or 'a config'} on the meta device (no weights allocated): "
        f"{type(model).__name__}, {parameters:,} parameters",
        f"quantization {scheme.name}: {scheme.summary}; {len(targets)} linears converted"
        if scheme.quantizes
        else "quantization none: every weight stays in its float dtype",
    )
    notes = [n for n in plan.notes if "non-float or tensor-subclass" not in n]
    notes.append(
        "weights are on the meta device: kbitprep.prepare refuses such a model (UnsupportedModelError); "
        "load the checkpoint to prepare it"
    )
    if scheme.quantizes:
        notes.append(f"quantized bytes = data + scales/state by formula: {scheme.formula}")
    plan = replace(
        plan,
        backend=scheme.backend,
        backends=(scheme.backend,),
        distributions=(dist,),
        evidence=evidence,
        forced=False,
        upcast_policy=label,
        checkpointing_note=mode_note,
        notes=tuple(notes),
        fingerprint=(),
        declarations=(decl,),
    )
    peft_mode = CheckpointMode.REENTRANT.value if scheme.peft_checkpointing else False
    peft_base = build_plan(
        model,
        backend="unquantized",
        upcast="all" if scheme.peft_upcast else "none",
        checkpointing=peft_mode,
        peft_compat=True,
        registry=registry,
    )
    peft, _, _, _ = _requantize(peft_base, model, scheme, targets, float_dtype)  # quantized storage is never cast
    return MetaPlan(
        plan=plan,
        peft=replace(
            peft, backend=scheme.backend, upcast_policy="peft" if scheme.peft_upcast else "none", fingerprint=()
        ),
        scheme=scheme,
        parameters=parameters,
        quantized_parameters=qnumel,
        quantized_layers=len(targets),
        weight_bytes=weight,
        overhead_bytes=overhead,
        dtype=float_dtype,
    )
