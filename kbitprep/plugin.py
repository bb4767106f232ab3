"""The backend plugin contract: everything a backend plugin may import from kbitprep.

A backend is an object (usually a subclass of :class:`Backend`) published under the entry-point
group ``kbitprep.backends``. It *declares*; the core *acts*: a backend never changes the model
itself, except through a :class:`FixUp` the core runs, records and can revert.

A minimal plugin::

    from kbitprep.plugin import Backend, Declarations, Detection, find_modules, quantized_tensor_names

    class MyBackend(Backend):
        name = "my-quant"
        priority = 60
        requires = ("my_quant",)
        install_hint = "pip install my-quant"

        def detect(self, model):
            layers = find_modules(model, "my_quant.QLinear")
            if not layers:
                return None
            return Detection(evidence=(f"{len(layers)} x my_quant.QLinear",), modules=tuple(layers))

        def declare(self, model, detection):
            return Declarations(quantized=quantized_tensor_names(model, detection.modules))
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from ._experts import fused_expert_figures, fused_expert_text
from .errors import PluginContractError

__all__ = [
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "Backend",
    "CheckpointMode",
    "Declarations",
    "Detection",
    "FixUp",
    "ModuleIndex",
    "Scheme",
    "ShardedStorage",
    "class_path",
    "detect_layers",
    "find_modules",
    "fused_expert_note",
    "hf_quantizer",
    "is_plain_tensor",
    "missing_packages",
    "module_index",
    "quant_method",
    "quantization_setting",
    "quantized_tensor_names",
]

#: dtypes PEFT's function upcasts to fp32.
HALF_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16})
#: dtypes kbitprep treats as trainable floating point (fp8 types are not among them).
FLOAT_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class CheckpointMode(str, enum.Enum):
    """How activation (gradient) checkpointing recomputes the forward.

    ``REENTRANT`` is ``torch.utils.checkpoint`` with ``use_reentrant=True`` (needs inputs that
    require grad, hence the input-require-grads hook); ``NON_REENTRANT`` is ``use_reentrant=False``;
    ``OFF`` disables checkpointing.
    """

    REENTRANT = "reentrant"
    NON_REENTRANT = "non_reentrant"
    OFF = "off"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Detection:
    """What a backend's detector found: the evidence, and the modules it claims.

    Attributes:
        evidence: human-readable facts the decision rests on, e.g.
            ``"28 x bitsandbytes.nn.Linear4bit"`` or ``"hf_quantizer: BnbHfQuantizer"``.
        modules: qualified names of the modules holding this backend's quantized storage. An
            empty tuple means the backend claims the model as a whole (a generic backend); it is
            then chosen only when no backend claims specific modules.
    """

    evidence: tuple[str, ...]
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.evidence, str) or not all(isinstance(e, str) for e in self.evidence):
            raise PluginContractError("Detection.evidence must be a tuple of strings")
        if isinstance(self.modules, str) or not all(isinstance(m, str) for m in self.modules):
            raise PluginContractError("Detection.modules must be a tuple of module names")


@dataclass(frozen=True)
class FixUp:
    """A backend-specific repair the core runs during prepare, inside its transaction.

    The core snapshots the model before running ``apply`` and reverts every attribute, hook,
    parameter and buffer it changed if anything fails afterwards, and on :func:`kbitprep.undo`.
    The snapshot sees modules, parameters, buffers and config objects: to change any other object
    (a library's quantization state, say), assign a new object instead of editing it in place;
    likewise replace tensors (``param.data = new``) rather than writing into them (``mul_``), since
    the snapshot keeps references, not copies.

    Attributes:
        name: short identifier shown in plans, e.g. ``"bnb-cpu-unpack"``.
        description: one sentence saying what is repaired and why.
        apply: called with the model; may change it.
    """

    name: str
    description: str
    apply: Callable[[nn.Module], None]


@dataclass(frozen=True)
class ShardedStorage:
    """What FSDP needs to know about a backend's packed storage (checked generically by the core).

    FSDP1 flattens every wrapped unit into one tensor of a single floating-point dtype, so packed
    weights must be stored in the dtype of the rest of the model (bitsandbytes 4-bit: its
    ``bnb_4bit_quant_storage``); FSDP2 shards per parameter and accepts a difference.

    Attributes:
        tensors: qualified names of the parameters holding the packed storage.
        dtype: the dtype they are stored as.
        setting: the name of the loading option that chooses that dtype (``"bnb_4bit_quant_storage"``).
        reload_hint: ``fn(dtype) -> str``: how to reload the model with its storage in ``dtype``.
        compute_dtype: the dtype the layers compute in, when the library has one setting for it
            (FSDP wants it equal to the storage dtype); ``None`` when not applicable.
        compute_setting: the name of that setting (``"bnb_4bit_compute_dtype"``).
    """

    tensors: frozenset[str]
    dtype: torch.dtype
    setting: str
    reload_hint: Callable[[torch.dtype], str]
    compute_dtype: torch.dtype | None = None
    compute_setting: str = ""


@dataclass(frozen=True)
class Declarations:
    """What a backend declares about a model it recognised. Pure data: the core acts on it.

    Attributes:
        quantized: qualified names of parameters and buffers that hold quantized storage. The core
            never changes them (no cast, no ``requires_grad``), whatever dtype they report.
        allow_upcast: whether any other floating-point parameter may be cast to fp32. ``False``
            when upcasting breaks the backend's forward (``upcast_note`` says why).
        upcast_note: why upcasting is not allowed, or a remark about the default.
        default_upcast: the upcast policy used when the user does not choose one
            (``"none"``, ``"norms"`` or ``"all"``).
        checkpointing: the checkpointing modes training through this backend supports. Empty
            means checkpointing does not work with it.
        default_checkpointing: the mode used when the user asks for checkpointing without a mode.
        input_grads_hook: whether reentrant checkpointing needs the input-require-grads hook on
            the input embeddings (true for every transformers model).
        trainable: whether LoRA training through this model works at all.
        not_trainable_reason: why not, when ``trainable`` is false (shown to the user).
        fixups: backend-specific repairs to run during prepare.
        notes: remarks shown with the plan (known traps, choices made).
        warnings: problems the user must act on (a quantization config that converted no layer, a
            model that looks quantized but is not recognised). Shown with the plan's notes, and the
            core raises each once as a :class:`~kbitprep.errors.BackendWarning` when the plan is made.
        lora_targets: qualified names of the modules that take LoRA adapters; ``None`` (the
            default) means every module the backend claimed (:attr:`Detection.modules`).
            :func:`kbitprep.lora_config` adds the model's plain linear layers to these.
        sharded_storage: what FSDP must know about the backend's packed storage
            (:class:`ShardedStorage`); ``None`` when its storage needs nothing special.
        lora_layers: for layer classes PEFT has no LoRA layer for: a function returning PEFT's
            custom-module mapping ``{layer class: LoRA layer class}`` (see PEFT's "custom models"
            guide). Called only when a LoRA config is built, so a plugin need not import PEFT itself.
    """

    quantized: frozenset[str] = frozenset()
    allow_upcast: bool = True
    upcast_note: str = ""
    default_upcast: str = "none"
    checkpointing: frozenset[CheckpointMode] = frozenset({CheckpointMode.REENTRANT, CheckpointMode.NON_REENTRANT})
    default_checkpointing: CheckpointMode = CheckpointMode.REENTRANT
    input_grads_hook: bool = True
    trainable: bool = True
    not_trainable_reason: str = ""
    fixups: tuple[FixUp, ...] = ()
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] | None = None
    lora_layers: Callable[[], Mapping[type[nn.Module], type[nn.Module]]] | None = None
    sharded_storage: ShardedStorage | None = None

    def problems(self) -> list[str]:
        """Return the ways these declarations contradict themselves (empty when consistent)."""
        found: list[str] = []
        if not isinstance(self.quantized, frozenset) or not all(isinstance(n, str) for n in self.quantized):
            found.append("quantized must be a frozenset of tensor names")
        if self.default_upcast not in ("none", "norms", "all"):
            found.append(f"default_upcast {self.default_upcast!r} is not one of 'none', 'norms', 'all'")
        if not self.allow_upcast and self.default_upcast != "none":
            found.append(f"allow_upcast is False but default_upcast is {self.default_upcast!r}")
        if CheckpointMode.OFF in self.checkpointing:
            found.append("checkpointing lists OFF; list only the modes that work")
        if (
            self.default_checkpointing is not CheckpointMode.OFF
            and self.checkpointing
            and (self.default_checkpointing not in self.checkpointing)
        ):
            found.append(
                f"default_checkpointing {self.default_checkpointing.value!r} is not among the supported "
                f"modes {sorted(m.value for m in self.checkpointing)}"
            )
        if not self.checkpointing and self.default_checkpointing is not CheckpointMode.OFF:
            found.append("no checkpointing mode is supported but default_checkpointing is not OFF")
        if not self.trainable and not self.not_trainable_reason:
            found.append("trainable is False but not_trainable_reason is empty")
        if self.trainable and self.not_trainable_reason:
            found.append("not_trainable_reason is set but trainable is True")
        for field_name in ("notes", "warnings"):
            value = getattr(self, field_name)
            if isinstance(value, str) or not all(isinstance(n, str) for n in value):
                found.append(f"{field_name} must be a tuple of strings")
        if self.lora_targets is not None and (
            isinstance(self.lora_targets, str) or not all(isinstance(n, str) for n in self.lora_targets)
        ):
            found.append("lora_targets must be None or a tuple of module names")
        if self.lora_layers is not None and not callable(self.lora_layers):
            found.append("lora_layers must be None or a function returning {layer class: LoRA layer class}")
        if not all(isinstance(f, FixUp) for f in self.fixups):
            found.append("fixups must be FixUp instances")
        return found


#: ``(out_features, in_features, float_bytes) -> (data bytes, scale/state bytes)`` of one converted weight.
WeightBytes = Callable[[int, int, int], tuple[int, int]]


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme a backend offers, for planning from a config without weights.

    ``kbitprep plan --config ... --quantization NAME`` (and the demo, the benchmark and
    :func:`kbitprep.estimate`) build the model on the meta device and size every converted
    ``nn.Linear`` weight with :attr:`weight_bytes`; nothing is loaded.

    Attributes:
        name: what ``--quantization`` takes (``"bnb-4bit"``); unique among installed backends.
        summary: the settings, in words.
        formula: the storage formula, in words.
        module_class: the class name a converted ``nn.Linear`` becomes (``"Linear4bit"``).
        weight_bytes: ``(out, inp, float_bytes) -> (data bytes, scale/state bytes)`` for one weight.
        param_name: the name of the quantized parameter in that class (``"W_q"`` for HQQ).
        storage_dtype: the dtype that parameter reports (``None``: the model's float dtype, for
            tensor subclasses that report one).
        requires: modules that must be importable to load a checkpoint this way.
        install_hint: what to install when they are missing.
        allow_upcast: whether the backend lets other parameters be cast to fp32 on such a model.
        quant_method: the ``model.quantization_method`` transformers sets when it loads this way
            (``"bitsandbytes"``), or ``None`` when transformers does not load it.
        model_flags: attributes transformers sets on such a model (``{"is_loaded_in_4bit": True}``).
        quantization_config: ``fn(dtype) -> config`` building the transformers quantization config
            that loads a checkpoint this way (``from_pretrained(path, quantization_config=...)``).
        quantize: for schemes transformers cannot load: ``fn(model, dtype) -> model`` quantizing a
            loaded float model in place (hqq's ``quantize_model``, torchao's ``quantize_``).
        frozen_on_load: loading this way leaves every parameter frozen already.
        cast_raises: casting the quantized weights to another dtype raises (optimum-quanto's refuse
            a dtype change), so PEFT's ``prepare_model_for_kbit_training`` crashes on such a model;
            the config planner's PEFT figure then follows ``allow_upcast``, as the drop-in does.
        skip_modules: leaf names of linear layers the scheme never converts, beyond what
            transformers keeps (``lm_head``, tied and ``_keep_in_fp32_modules`` weights).
    """

    name: str
    summary: str
    formula: str
    module_class: str
    weight_bytes: WeightBytes
    param_name: str = "weight"
    storage_dtype: torch.dtype | None = None
    requires: tuple[str, ...] = ()
    install_hint: str = ""
    allow_upcast: bool = True
    quant_method: str | None = None
    model_flags: Mapping[str, Any] = field(default_factory=dict)
    quantization_config: Callable[[torch.dtype], Any] | None = None
    quantize: Callable[[nn.Module, torch.dtype], nn.Module] | None = None
    frozen_on_load: bool = False
    cast_raises: bool = False
    skip_modules: tuple[str, ...] = ()

    @property
    def quantizes(self) -> bool:
        """Whether this scheme converts any weight (a scheme for unquantized models does not)."""
        return self.module_class != "Linear" or self.quant_method is not None or self.quantize is not None

    def bytes_for(self, out: int, inp: int, dtype: torch.dtype) -> tuple[int, int]:
        """``(data bytes, scale/state bytes)`` of one converted ``out x inp`` weight in a ``dtype`` model."""
        return self.weight_bytes(out, inp, torch.empty((), dtype=dtype).element_size())


class Backend:
    """Base class for backend plugins. Subclasses set the class attributes and implement
    :meth:`detect` and :meth:`declare`.

    Attributes:
        name: unique backend name (``"bnb-4bit"``); what users pass as ``backend=``.
        priority: higher wins when several backends recognise a model. Built-ins use 100 for
            specific quantization libraries, 10 for the generic transformers-quantizer fallback
            and 0 for unquantized models. A plugin that specialises a built-in uses a higher one.
        requires: importable module names the backend needs (checked before use).
        install_hint: what to run when ``requires`` is not satisfied.
        description: one line for ``kbitprep backends``.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 50
    requires: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def detect(self, model: nn.Module) -> Detection | None:
        """Return a :class:`Detection` when this backend recognises ``model``, else ``None``.

        Must not change the model. May be called for models of any kind.
        """
        raise NotImplementedError

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Return the :class:`Declarations` for a model this backend detected. Must not change it."""
        raise NotImplementedError

    def schemes(self) -> tuple[Scheme, ...]:
        """The quantization :class:`Scheme` s this backend offers for planning from a config (default none)."""
        return ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} priority={self.priority}>"


# --------------------------------------------------------------------------- helpers for plugins


def class_path(obj: object) -> str:
    """Return ``module.QualName`` of an object's class, e.g. ``"bitsandbytes.nn.modules.Linear4bit"``."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_loaded(path: str) -> type | None:
    """The class a dotted path names, if its module is already imported (never imports anything).

    This lets ``"toyquant.ToyQuantLinear"`` match a class defined in ``toyquant.layers`` and
    re-exported by ``toyquant``: a model holding such layers has imported the library already.
    """
    module, _, attr = path.rpartition(".")
    if not module or module not in sys.modules:
        return None
    obj = getattr(sys.modules[module], attr, None)
    return obj if isinstance(obj, type) else None


def _class_matches(cls: type, wanted: Iterable[str | type]) -> bool:
    for w in wanted:
        if isinstance(w, type):
            if issubclass(cls, w):
                return True
            continue
        resolved = _resolve_loaded(w) if "." in w else None
        if resolved is not None and issubclass(cls, resolved):
            return True
        for base in cls.__mro__:
            full = f"{base.__module__}.{base.__qualname__}"
            if full == w or base.__qualname__ == w or (full.endswith("." + w) and "." in w):
                return True
    return False


class ModuleIndex(Mapping[str, nn.Module]):
    """The modules of one model by qualified name and by class, from one walk of its module tree.

    A read-only mapping ``{qualified name: module}`` in the order of ``model.named_modules()``
    (the root is ``""``; a module reachable under several names appears once, under the first),
    so ``dict(model.named_modules())`` and ``model.named_modules()`` translate to ``index`` and
    ``index.items()``. Get the one for a model with :func:`module_index`, which hands every detector
    and declaration of one plan the same index instead of each walking the model again.

    The index is what the model looked like when it was built; it does not follow later changes
    (detectors and declarations must not change the model, so within one plan it cannot go stale).

    >>> from torch import nn
    >>> index = ModuleIndex(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
    >>> list(index)
    ['', '0', '1', '2']
    >>> index.find("torch.nn.Linear")
    ['0', '2']
    >>> index.classes[nn.Linear]
    ('0', '2')

    Args:
        model: the root module; walked once, here.
    """

    __slots__ = ("_classes", "_modules", "root")

    def __init__(self, model: nn.Module) -> None:
        #: the model the index was built from
        self.root = model
        self._modules: dict[str, nn.Module] = dict(model.named_modules())
        classes: dict[type[nn.Module], list[str]] = {}
        for name, mod in self._modules.items():
            classes.setdefault(type(mod), []).append(name)
        self._classes: Mapping[type[nn.Module], tuple[str, ...]] = MappingProxyType(
            {cls: tuple(names) for cls, names in classes.items()}
        )

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __repr__(self) -> str:
        return f"<ModuleIndex of {type(self.root).__name__}: {len(self)} modules, {len(self._classes)} classes>"

    @property
    def classes(self) -> Mapping[type[nn.Module], tuple[str, ...]]:
        """Qualified names by exact module class (a class's modules in walk order), read-only."""
        return self._classes

    def find(self, *classes: str | type) -> list[str]:
        """Qualified names of the modules whose class (or a base class) matches one of ``classes``,
        in walk order; the matching rules are :func:`find_modules`'. Each distinct class of the model
        is matched once, not each module."""
        matched = {cls for cls in self._classes if _class_matches(cls, classes)}
        return [name for name, mod in self._modules.items() if type(mod) in matched]


@dataclass
class _IndexScope:
    """The model whose plan is being made, and its index once a detector asked for it."""

    model: nn.Module
    index: ModuleIndex | None = None


#: The scope of the plan being made in this context (thread, task); ``None`` outside one.
_current_scope: contextvars.ContextVar[_IndexScope | None] = contextvars.ContextVar(
    "kbitprep_module_index", default=None
)


@contextlib.contextmanager
def _module_index_scope(model: nn.Module) -> Iterator[None]:
    """Within the block, :func:`module_index` of ``model`` builds its index once (on first use) and
    hands the same one back; it is dropped when the block ends, so the next block walks afresh.

    The registry opens one around detection and around declaration, and the planner around both.
    A block for the model of an enclosing block shares that block's index (no second walk). The
    scope is a context variable: each thread (and asyncio task) has its own.
    """
    outer = _current_scope.get()
    if outer is not None and outer.model is model:
        yield
        return
    token = _current_scope.set(_IndexScope(model))
    try:
        yield
    finally:
        _current_scope.reset(token)


def module_index(model: nn.Module) -> ModuleIndex:
    """The :class:`ModuleIndex` of ``model``: built once per plan and shared by every detector and
    declaration of that plan, or, outside a plan (a test calling ``detect`` directly), built now.

    Use it wherever a detector or ``declare`` would walk ``model.named_modules()``:
    :func:`find_modules`, :func:`detect_layers` and :func:`quantized_tensor_names` already do, so a
    plugin built on them walks the model no more. An index built inside a plan is never reused by
    another plan, or by another thread: a model changed between two plans gets a fresh one.
    """
    scope = _current_scope.get()
    if scope is None or scope.model is not model:
        return ModuleIndex(model)
    if scope.index is None:
        scope.index = ModuleIndex(model)
    return scope.index


def fused_expert_note(model: nn.Module, integration: str) -> tuple[str, ...]:
    """A note for a plan when ``model``'s fused expert weights stay in full precision (empty when it has none).

    Mixture-of-experts families of transformers 5 (Mixtral, Qwen MoE, DeepSeek, GPT-OSS ...) store each
    layer's experts as fused 3-D parameters, which integrations that convert ``nn.Linear`` layers leave
    in the loaded dtype. The note gives their number and their share of the model's bytes as loaded
    (quantized storage as stored). Reads the plan's :func:`module_index`.

    Args:
        model: the model as loaded.
        integration: the quantization library whose transformers integration loaded it (``"bitsandbytes"``).
    """
    count, fused_bytes, total = fused_expert_figures(module_index(model).values())
    return (fused_expert_text(count, fused_bytes, total, integration),) if count else ()


def find_modules(model: nn.Module, *classes: str | type) -> list[str]:
    """Qualified names of the submodules whose class (or a base class) matches one of ``classes``.

    A class may be given as a type or as a string, either a bare class name (``"QLinear"``), a
    full path (``"optimum.quanto.nn.qlinear.QLinear"``) or a dotted suffix of one
    (``"quanto.nn.qlinear.QLinear"``). Strings let a detector look for a library's classes
    without importing the library. The root module is reported as ``""``. Reads the plan's
    :func:`module_index` rather than walking the model again.
    """
    return module_index(model).find(*classes)


def detect_layers(
    model: nn.Module,
    *classes: str | type,
    layers: Iterable[str] | None = None,
    describe: Callable[[nn.Module], str] | None = None,
    quant_methods: Iterable[str] = (),
    flags: Iterable[str] = (),
    claim_without_layers: bool = False,
) -> Detection | None:
    """The usual detector in one call: find a library's layers and collect the evidence.

    Finds the modules whose class matches ``classes`` (see :func:`find_modules`; or takes the module
    names in ``layers``), groups them into ``"N x <description>"`` evidence (``describe(module)``,
    default the class path), and adds the transformers quantizer (``hf_quantizer: ...``) when the
    model's :func:`quant_method` is one of ``quant_methods``, and each attribute in ``flags`` that
    is true on the model (``"is_loaded_in_4bit=True"``).

    Returns ``None`` when no layer matched, unless ``claim_without_layers`` and the quantization
    method matched or one of ``flags`` is set (a model loaded with the library's config whose layers
    were not converted, or a flag the library sets itself, like hqq's ``hqq_quantized``: the backend
    then claims it so its declarations can say so). Without ``claim_without_layers`` a flag alone
    never claims a model: it may be stale. Reads the plan's :func:`module_index`.
    """
    index = module_index(model)
    if layers is None:
        matched = [(n, index[n]) for n in index.find(*classes)]
    else:
        wanted = set(layers)
        matched = [(n, m) for n, m in index.items() if n in wanted]
    names = [n for n, _ in matched]
    label = describe or class_path
    counts: dict[str, int] = {}
    for _, mod in matched:
        key = label(mod)
        counts[key] = counts.get(key, 0) + 1
    evidence = [f"{n} x {what}" for what, n in counts.items()]
    method = quant_method(model)
    method_matches = method is not None and method in set(quant_methods)
    quantizer = hf_quantizer(model)
    if method_matches and quantizer is not None:
        evidence.append(f"hf_quantizer: {type(quantizer).__name__}")
    elif method_matches:
        evidence.append(f"quantization_method: {method}")
    set_flags = [flag for flag in flags if getattr(model, flag, False) is True]
    evidence += [f"{flag}=True" for flag in set_flags]
    if not names and not (claim_without_layers and (method_matches or set_flags)):
        return None
    return Detection(evidence=tuple(evidence), modules=tuple(names))


def is_plain_tensor(t: torch.Tensor) -> bool:
    """True when ``t`` stores its values as an ordinary dense tensor.

    Tensor subclasses (torchao's ``Int8Tensor``, quanto's ``WeightQBytesTensor``, ...) often report
    a float dtype while holding quantized data; they are never plain, whatever ``dtype`` says.
    """
    data = t.data if isinstance(t, nn.Parameter) else t
    return type(data) is torch.Tensor and not data.is_quantized


def quantized_tensor_names(
    model: nn.Module,
    modules: Iterable[str],
    *,
    include: Callable[[str, torch.Tensor], bool] | None = None,
) -> frozenset[str]:
    """Names of the parameters and buffers directly held by ``modules`` that are quantized storage.

    By default a tensor counts as quantized storage when it is not a plain tensor
    (:func:`is_plain_tensor`) or its dtype is not a float dtype (``uint8``, ``int8``, ``int32``,
    fp8 ...). Pass ``include(local_name, tensor)`` to add more (for example fp16 scales).
    Reads the plan's :func:`module_index`.
    """
    found: set[str] = set()
    mods = module_index(model)
    for mname in modules:
        mod = mods[mname]
        prefix = f"{mname}." if mname else ""
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for local, t in tensors:
            if t is None:
                continue
            quantized = not is_plain_tensor(t) or t.dtype not in FLOAT_DTYPES
            if quantized or (include is not None and include(local, t)):
                found.add(prefix + local)
    return frozenset(found)


def hf_quantizer(model: nn.Module) -> Any | None:
    """The transformers quantizer attached at load time (``model.hf_quantizer``), or ``None``."""
    return getattr(model, "hf_quantizer", None)


def quantization_setting(model: nn.Module, key: str, default: Any = None) -> Any:
    """One setting of the model's ``config.quantization_config`` (a dict, or a transformers config
    object), e.g. ``quantization_setting(model, "bnb_4bit_quant_storage", "uint8")``; ``default``
    when the model has no quantization config or the setting is absent."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return default
    if isinstance(qc, Mapping):
        return qc.get(key, default)
    return getattr(qc, key, default)


def quant_method(model: nn.Module) -> str | None:
    """The transformers quantization method as a plain lower-case string (``"gptq"``), or ``None``.

    Reads ``model.quantization_method`` (a str-Enum in transformers 5) and falls back to
    ``config.quantization_config["quant_method"]``.
    """
    method = getattr(model, "quantization_method", None)
    if method is None:
        method = quantization_setting(model, "quant_method")
    if method is None:
        return None
    value = getattr(method, "value", method)
    return str(value).lower()


def missing_packages(requires: Iterable[str]) -> list[str]:
    """The names in ``requires`` that cannot be imported here (checked without importing them)."""
    missing = []
    for name in requires:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing
