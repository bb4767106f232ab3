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
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._peft_rules import peft_rules, peft_rules_for
from .._plan_types import ParamPlan, Plan
from .._planning import build_plan
from .._policies import UpcastPolicy, resolve_checkpointing, resolve_upcast
from .._registry import Registry, default_registry
from ..errors import BackendUnavailableError, ConfigError, InvalidPolicyError, KbitprepError
from ..plugin import CheckpointMode, Declarations, Scheme

__all__ = [
    "SCHEMES",
    "ConfigError",
    "MetaPlan",
    "PlannedScheme",
    "build_meta_model",
    "config_dtype",
    "converted_linears",
    "is_hub_id",
    "load_config",
    "peft_plan",
    "plan_from_config",
    "quantized_linears",
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


#: A Hugging Face Hub repository id, as huggingface_hub validates one: ``name`` or ``org/name``, each part
#: of letters, digits, ``-``, ``_`` and ``.``, starting and ending with a letter, digit or ``_``.
_HUB_ID = re.compile(r"(?:(?=\w)[\w.-]*\w/)?(?=\w)[\w.-]{0,95}\w")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hugging Face Hub model id (``"org/name"`` or ``"name"``) rather than a
    path: no more than one ``/``, the characters the Hub allows, and not a ``.json`` file name.

    Example:
        >>> is_hub_id("meta-llama/Llama-3.1-8B"), is_hub_id("llama-3.1-8b/config.json"), is_hub_id("./tiny")
        (True, False, False)
    """
    if text.endswith((".json", ".git")) or "--" in text or ".." in text:
        return False
    return _HUB_ID.fullmatch(text) is not None


def _env_flag(*names: str) -> bool | None:
    """The first of the environment variables ``names`` that is set, as a flag; ``None`` when none is."""
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip():
            return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return None


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, else as huggingface_hub read it at import."""
    flag = _env_flag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if flag is not None:
        return flag
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _hub_cache(cache_dir: str | Path | None) -> str:
    """The hub cache to use: ``cache_dir``, else ``HF_HUB_CACHE`` / ``HF_HOME`` as set now, else huggingface_hub's."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.path.expandvars(os.environ[name]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_config(repo_id: str, *, revision: str | None, token: str | bool | None, cache_dir: str | Path | None) -> Path:
    """The ``config.json`` of hub model ``repo_id``, from the hub cache or downloaded into it (that file only).

    Raises:
        ConfigError: not cached while offline, no such repository (or gated, or private), no config.json.
    """
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    offline = _hub_offline()
    cache = _hub_cache(cache_dir)
    where = f"{repo_id!r} is not a local file or folder"
    try:
        found = hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,
            token=token,
            cache_dir=cache,
            local_files_only=offline,
        )
    except hub_errors.GatedRepoError as exc:
        raise ConfigError(
            f"{where}, and {repo_id} is a gated model on the Hugging Face Hub: accept its terms on "
            f"https://huggingface.co/{repo_id}, then log in (`hf auth login`) or set HF_TOKEN"
        ) from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise ConfigError(
            f"config file not found: {where}, and the Hugging Face Hub has no model {repo_id!r} "
            "(for a private one, log in with `hf auth login` or set HF_TOKEN)"
        ) from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise ConfigError(f"{repo_id} on the Hugging Face Hub has no revision {revision!r}") from exc
    except hub_errors.RemoteEntryNotFoundError as exc:
        raise ConfigError(f"{repo_id} on the Hugging Face Hub has no config.json (is it a model repository?)") from exc
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as exc:
        if offline:
            raise ConfigError(
                f"config file not found: {where}, and HF_HUB_OFFLINE is set while the hub cache ({cache}) holds "
                f"no config.json of {repo_id}: unset HF_HUB_OFFLINE to download it (config.json only), or pass "
                "a local config.json"
            ) from exc
        raise ConfigError(
            f"config file not found: {where}, the Hugging Face Hub could not be reached to download the "
            f"config.json of {repo_id}, and the hub cache ({cache}) holds no copy: {' '.join(str(exc).split())}"
        ) from exc
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot get the config.json of {repo_id} from the Hugging Face Hub: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())}"
        ) from exc
    return Path(found)


def load_config(
    path: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """Read a transformers config from a ``config.json`` file, a folder holding one, or a hub model id.

    A ``path`` that is not a local file or folder and reads as a Hugging Face Hub id
    (``"meta-llama/Llama-3.1-8B"``, see :func:`is_hub_id`) is fetched as ``from_pretrained`` would,
    but only its ``config.json``, through ``huggingface_hub``: from the hub cache
    (``HF_HUB_CACHE`` / ``HF_HOME``, or ``cache_dir``) when it holds a copy, else downloaded into it;
    ``HF_HUB_OFFLINE=1`` never touches the network; the token (``HF_TOKEN``, ``hf auth login``, or
    ``token``) opens gated and private models.

    Args:
        path: a ``config.json``, a folder holding one, or a hub model id.
        revision: the hub revision (branch, tag or commit; default ``main``).
        token: a hub token (default: the one huggingface_hub finds).
        cache_dir: the hub cache folder (default: huggingface_hub's, as the environment sets it now).

    Raises:
        ConfigError: the file is missing (or the hub id is not cached while offline, unknown or
            gated), is not JSON, names no model type transformers knows, or is inconsistent.
    """
    text = os.fspath(path)
    p = Path(text)
    label = str(p)
    if not p.exists() and is_hub_id(text):
        p = _hub_config(text, revision=revision, token=token, cache_dir=cache_dir)
        label = f"{text} (config.json from the Hugging Face Hub)"
    if p.is_dir():
        p = p / "config.json"
        label = str(p)
    if not p.is_file():
        raise ConfigError(f"config file not found: {label}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {label}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"malformed config {label}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"malformed config {label}: expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f'malformed config {label}: no "model_type" (e.g. "llama")')
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"malformed config {label}: model_type {model_type!r} is not one transformers knows "
            "(e.g. llama, mistral, qwen2, gemma)"
        )
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"malformed config {label}: {_one_line(exc)}") from exc
    except Exception as exc:  # transformers' config validators raise their own classes (and IndexError ...)
        raise ConfigError(f"inconsistent config {label}: {type(exc).__name__}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
    """The float dtype to plan with: ``dtype`` if given (not ``"auto"``), else the config's, else bf16.

    Raises:
        InvalidPolicyError: ``dtype`` is not a floating-point dtype.
        ConfigError: the config's own dtype is not one.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InvalidPolicyError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. torch.bfloat16)")
        return dtype
    given = dtype not in (None, "auto")
    if not given:
        dtype = getattr(config, "dtype", None)
        # transformers 5 keeps torch_dtype as a deprecated alias of dtype, which warns when read
        if dtype is None and not isinstance(getattr(type(config), "torch_dtype", None), property):
            dtype = getattr(config, "torch_dtype", None)
        dtype = dtype or "bfloat16"
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        if given:
            raise InvalidPolicyError(
                f"dtype={dtype!r} is not a floating-point torch dtype; use bfloat16, float16 or float32"
            )
        raise ConfigError(f"the config's dtype {dtype!r} is not a floating-point torch dtype; pass dtype=")
    return found


def build_meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model ``config`` describes, built on the meta device: shapes and dtypes, no storage.

    Raises:
        ConfigError: transformers cannot build a model from the config (it is invalid or inconsistent).
        BackendUnavailableError: the model's transformers code needs a package that is not installed
            (timm, for instance); the message names it and how to install it.
    """
    model_type = getattr(config, "model_type", "?")
    try:
        cls = model_class(config)
        _check_auto_class(cls, config)
        with torch.device("meta"):
            model = (
                cls.from_config(config, dtype=dtype)
                if hasattr(cls, "from_config")
                else cls._from_config(config, dtype=dtype)
            )
    except KbitprepError:
        raise
    except ImportError as exc:
        raise BackendUnavailableError(_missing_package_message(model_type, exc)) from exc
    except (ValueError, TypeError, AttributeError, KeyError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"cannot build a {model_type} model from this config: {_one_line(exc)}") from exc
    except Exception as exc:  # IndexError from per-layer lists that do not match the depth, validators' own classes
        raise ConfigError(
            f"cannot build a {model_type} model from this config, which looks inconsistent (per-layer settings "
            f"that do not match num_hidden_layers?): {type(exc).__name__}: {_one_line(exc) or 'no message'}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"building from this config gave {type(model).__name__}, not a model")
    return model


def _missing_package_message(model_type: str, exc: ImportError) -> str:
    """What to install, from transformers' ``requires_backends`` message or a ``ModuleNotFoundError``."""
    text = _one_line(exc)
    needs = re.findall(r"requires the ([\w.-]+) library", text)
    who = re.search(r"(\w+) requires the", text)
    if not needs and getattr(exc, "name", None):
        needs = [str(exc.name).split(".")[0]]
    packages = ", ".join(dict.fromkeys(needs)) or "a package"
    commands = re.findall(r"`(pip install [^`]+)`", text)
    urls = re.findall(r"https?://[^\s`]+[^\s`.,;)]", text)
    if commands:
        how = f"install it with: {commands[0]}"
    elif urls:
        how = f"install it as {urls[0]} says"
    elif needs:
        how = f"install it with: pip install {' '.join(dict.fromkeys(needs))}"
    else:
        how = f"install what it names ({text})"
    code = f" ({who.group(1)})" if who else ""
    return (
        f"cannot build a {model_type} model from this config: its transformers code{code} needs {packages}, "
        f"which cannot be imported here; {how}"
    )


def _check_auto_class(cls: Any, config: Any) -> None:
    """Refuse a config no transformers model class is registered for before ``AutoModel`` does: its
    error lists every model type, importing each one's code (seconds), and is hundreds of names long."""
    import transformers

    auto = getattr(transformers, "AutoModel", None)
    mapping = getattr(auto, "_model_mapping", None)
    if cls is not auto or mapping is None or getattr(config, "auto_map", None):
        return
    try:
        known = type(config) in mapping
    except Exception:  # another transformers: let from_config decide
        return
    if not known:
        raise ConfigError(
            f"cannot build a {getattr(config, 'model_type', '?')} model from this config: transformers has no "
            f"model class for {type(config).__name__} (a part of a larger model, or not a model)"
        )


def quantized_linears(model: nn.Module, scheme: PlannedScheme) -> list[str]:
    """The linears ``scheme`` quantizes in ``model`` (none for a scheme that quantizes nothing); bitsandbytes
    converts ``nn.Linear`` itself only, not its subclasses."""
    return converted_linears(model, exact=scheme.backend.startswith("bnb-")) if scheme.quantizes else []


def converted_linears(model: nn.Module, *, exact: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` modules a transformers quantizer would convert (see the module docstring).

    ``exact``: only modules whose type is ``nn.Linear`` itself, not a subclass, as transformers'
    bitsandbytes integration converts (a model's own ``nn.Linear`` subclasses stay in full precision).
    """
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

    def linear(m: nn.Module) -> bool:
        return type(m) is nn.Linear if exact else isinstance(m, nn.Linear)

    return [n for n, m in model.named_modules() if linear(m) and not skipped(n)]


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
        BackendUnavailableError: the model's code needs a package that is not installed.
        InvalidPolicyError: an unknown scheme name or dtype, or an upcast or checkpointing choice the
            backend does not allow.
    """
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise InvalidPolicyError(f"unknown quantization {scheme!r}; choices: {', '.join(SCHEMES)}")
        scheme = SCHEMES[scheme]
    decl = _scheme_declarations(scheme)
    label, _ = resolve_upcast(upcast, decl)
    mode, mode_note = resolve_checkpointing(checkpointing, decl)
    float_dtype = config_dtype(config, dtype)
    model = build_meta_model(config, float_dtype)
    targets = set(quantized_linears(model, scheme))

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
