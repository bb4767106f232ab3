"""Random module trees of cheap stand-in layers, their test backends, and fault seams (issue 18).

The property tests of ``test_properties.py`` build real quantized layers (bitsandbytes, torchao,
quanto, hqq), so they run few examples. This module builds trees from stand-in layers instead,
which cost microseconds, so ``test_properties_scale.py`` runs more than a thousand examples:

* :class:`Recipe` is plain data (its ``repr`` is valid Python), drawn by :func:`random_recipe` from
  a seeded :class:`random.Random`, built by :func:`build`, and made smaller by :func:`shrink` when
  an example fails.
* The trees have nested ``Sequential`` / ``ModuleList`` / ``ModuleDict`` / custom containers, tied
  parameters (one Parameter under two names), shared leaves and shared subtrees, persistent and
  non-persistent buffers, user hooks of every kind, fp16 / bf16 / fp32 / fp64 layers and odd dtypes
  (int64, fp8, complex, bool), frozen layers, a transformers-like root with a config, input
  embeddings and checkpointing (possibly already enabled, possibly through a wrapper), a real tiny
  transformers Llama for a small share, and PEFT LoRA wrappers.
* The stand-in quantized layers (:class:`Int8Linear`, :class:`Packed4Linear`) are claimed by test
  backends declared through the public plugin contract (:class:`Int8Backend`,
  :class:`PackedBackend`, and :class:`GenericBackend` for trees without stand-ins), registered on
  a :class:`kbitprep.Registry` built without entry points (:func:`registry_for`). Their
  declarations (upcast, checkpointing modes, input-grads hook, trainable, fix-ups, warnings) are
  drawn per example (:class:`Rules`).
* :class:`Faults` and :func:`injecting` count the steps of one prepare at public seams and make a
  chosen step fail: ``torch.Tensor.requires_grad_`` (freeze), ``torch.Tensor.to`` to fp32
  (upcast), ``nn.Module.register_forward_hook`` (hooks), the backends' fix-ups, the models'
  checkpointing method and the config's ``use_cache``. No kbitprep internals are patched.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kbitprep import Registry
from kbitprep.plugin import (
    Backend,
    CheckpointMode,
    Declarations,
    Detection,
    FixUp,
    find_modules,
    quantized_tensor_names,
)

from . import layers
from .layers import FLOAT_KINDS, Block, attach, float_layer

__all__ = [
    "SEAMS",
    "CheckpointableModel",
    "Container",
    "Effects",
    "Faults",
    "GenericBackend",
    "InjectedFault",
    "Int8Backend",
    "Int8Linear",
    "Leaf",
    "Options",
    "Packed4Linear",
    "PackedBackend",
    "Recipe",
    "Rules",
    "build",
    "fixup_effects",
    "injecting",
    "random_recipe",
    "registry_for",
    "shrink",
]

# --------------------------------------------------------------------------- fault seams

#: the kinds of step a prepare is made of, as the seams below see them
SEAMS = ("freeze", "fixup", "upcast", "checkpointing", "hook", "use_cache")


class InjectedFault(RuntimeError):
    """The error an injected fault raises (when it is not a KeyboardInterrupt or an out-of-memory)."""


class Faults:
    """The steps of one prepare, counted at the seams; the ``fail_at``-th step raises ``error``.

    With ``fail_at=None`` nothing fails: the run only counts (``steps`` lists the seam of each step).
    The fault fires once; whatever runs afterwards (kbitprep's revert) passes the seams unharmed and
    uncounted.
    """

    def __init__(self, fail_at: int | None = None, error: type[BaseException] = InjectedFault) -> None:
        self.fail_at = fail_at
        self.error = error
        self.steps: list[str] = []
        self.raised: BaseException | None = None

    def tick(self, seam: str) -> None:
        """Record one step at ``seam``; raise if it is the step chosen to fail (after it, record nothing)."""
        if self.raised is not None:
            return
        self.steps.append(seam)
        if len(self.steps) == self.fail_at:
            self.raised = self.error(f"injected fault at step {self.fail_at} ({seam})")
            raise self.raised


_ACTIVE: list[Faults] = []


def tick(seam: str) -> None:
    """Called by the stand-ins after each change they make: counts it, and fails it when chosen."""
    if _ACTIVE:
        _ACTIVE[-1].tick(seam)


def _restore(owner: type, name: str, own: Any) -> None:
    if own is None:
        delattr(owner, name)
    else:
        setattr(owner, name, own)


@contextlib.contextmanager
def injecting(faults: Faults) -> Iterator[Faults]:
    """Within the block, every step of a prepare passes through ``faults`` (see the module docstring).

    The torch seams are class attributes patched for the duration of the block only: a fault is
    raised after ``requires_grad_`` and ``register_forward_hook`` did their change (the model is then
    half-changed), and before the fp32 copy of ``to`` is made (as an out-of-memory would).
    """
    tensor_to = torch.Tensor.to
    tensor_requires_grad = torch.Tensor.requires_grad_
    register_hook = nn.Module.register_forward_hook
    own = {
        (torch.Tensor, "to"): vars(torch.Tensor).get("to"),
        (torch.Tensor, "requires_grad_"): vars(torch.Tensor).get("requires_grad_"),
        (nn.Module, "register_forward_hook"): vars(nn.Module).get("register_forward_hook"),
    }

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = next((a for a in args if isinstance(a, torch.dtype)), kwargs.get("dtype"))
        if dtype is torch.float32 and self.dtype is not torch.float32:
            faults.tick("upcast")
        return tensor_to(self, *args, **kwargs)

    def requires_grad_(self: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
        out = tensor_requires_grad(self, requires_grad)
        faults.tick("freeze")
        return out

    def register_forward_hook(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        handle = register_hook(self, *args, **kwargs)
        faults.tick("hook")
        return handle

    torch.Tensor.to = to  # type: ignore[method-assign,assignment]
    torch.Tensor.requires_grad_ = requires_grad_  # type: ignore[method-assign,assignment]
    nn.Module.register_forward_hook = register_forward_hook  # type: ignore[method-assign]
    _ACTIVE.append(faults)
    try:
        yield faults
    finally:
        _ACTIVE.pop()
        for (owner, name), before in own.items():
            _restore(owner, name, before)


# --------------------------------------------------------------------------- stand-in layers


class Int8Linear(nn.Module):
    """Stand-in for a weight-only int8 layer: int8 ``qweight`` (a frozen Parameter or a buffer), a
    float ``scale`` (a Parameter or a buffer), an optional float ``bias``, a non-persistent float
    ``cache`` buffer and a plain side object (as bitsandbytes keeps its ``quant_state``)."""

    def __init__(self, width: int, dtype: torch.dtype, *, weight_buffer: bool, scale_param: bool, bias: bool) -> None:
        super().__init__()
        qweight = torch.randint(-128, 128, (width, width), dtype=torch.int8)
        if weight_buffer:
            self.register_buffer("qweight", qweight)
        else:
            self.qweight = nn.Parameter(qweight, requires_grad=False)
        scale = torch.rand(width, dtype=dtype) + 0.5
        if scale_param:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_parameter("bias", nn.Parameter(torch.randn(width, dtype=dtype)) if bias else None)
        self.register_buffer("cache", torch.zeros(width, dtype=dtype), persistent=False)
        self.quant_state = {"bits": 8, "axis": 0}


class Packed4Linear(nn.Module):
    """Stand-in for a packed 4-bit layer: a uint8 ``packed`` buffer (two values a byte), a float
    ``absmax`` buffer, a float ``cache`` buffer and an optional float ``bias`` Parameter."""

    def __init__(self, width: int, dtype: torch.dtype, *, absmax_half: bool, bias: bool) -> None:
        super().__init__()
        self.register_buffer("packed", torch.randint(0, 256, (width, width // 2), dtype=torch.uint8))
        self.register_buffer("absmax", torch.rand(width, dtype=torch.float16 if absmax_half else torch.float32))
        self.register_buffer("cache", torch.zeros(width, dtype=dtype), persistent=False)
        self.register_parameter("bias", nn.Parameter(torch.randn(width, dtype=dtype)) if bias else None)


class OddLeaf(nn.Module):
    """Tensors of dtypes kbitprep must leave alone or only freeze (``variant`` picks which)."""

    def __init__(self, width: int, variant: int) -> None:
        super().__init__()
        v = variant % 6
        if v == 0:
            self.positions = nn.Parameter(torch.arange(width, dtype=torch.int64), requires_grad=False)
        elif v == 1:
            self.codes = nn.Parameter(torch.randn(width).to(torch.float8_e4m3fn))
        elif v == 2:
            self.phase = nn.Parameter(torch.randn(width, dtype=torch.complex64))
        elif v == 3:
            self.register_buffer("mask", torch.rand(width) > 0.5)
            self.register_buffer("ids", torch.arange(width, dtype=torch.int32))
        elif v == 4:
            self.precise = nn.Parameter(torch.randn(width, dtype=torch.float64))
            self.register_buffer("lut", torch.randint(0, 256, (width,), dtype=torch.uint8))
        else:
            self.register_buffer("fp8", torch.randn(width).to(torch.float8_e5m2))
            self.gain = nn.Parameter(torch.randn(width, dtype=torch.float16))


class CheckpointedLayer(Block):
    """A container that checkpoints when its model enables it (transformers' per-layer flag)."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False


class StandinConfig:
    """A transformers-like config (what kbitprep recognises: ``model_type``, ``to_dict``, ``use_cache``).

    Setting ``use_cache`` is a fault seam.
    """

    model_type = "standin"

    def __init__(self, use_cache: bool) -> None:
        self.use_cache = use_cache
        self.hidden_size = 8
        self.architectures = ["CheckpointableModel"]

    def __setattr__(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)
        if key == "use_cache":
            tick("use_cache")

    def to_dict(self) -> dict[str, Any]:
        """The settings, as transformers' configs give them."""
        return dict(vars(self))


class CheckpointableModel(nn.Module):
    """A root like a transformers ``PreTrainedModel``: a config, input embeddings and checkpointing.

    ``gradient_checkpointing_enable`` flags the root and every :class:`CheckpointedLayer` with
    ``gradient_checkpointing`` and a ``_gradient_checkpointing_func``, as transformers does; each
    flagged module is a fault seam.
    """

    supports_gradient_checkpointing = True

    def __init__(self, body: nn.Module, config: StandinConfig, embeddings: str | None) -> None:
        super().__init__()
        self.body = body
        self.config = config
        self.embeddings_path = embeddings
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Module:
        """The input embeddings (``NotImplementedError`` when the tree has none, as transformers raises)."""
        if self.embeddings_path is None:
            raise NotImplementedError("no input embeddings")
        return self.get_submodule(self.embeddings_path)

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        *,
        function: Callable[..., Any] = checkpoint,
    ) -> None:
        """Flag every checkpointing module with ``partial(function, **gradient_checkpointing_kwargs)``."""
        func = functools.partial(function, **(gradient_checkpointing_kwargs or {}))
        for mod in self.modules():
            if hasattr(mod, "gradient_checkpointing"):
                layer: Any = mod
                layer._gradient_checkpointing_func = func
                layer.gradient_checkpointing = True
                tick("checkpointing")


def user_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A user's own wrapper around ``torch.utils.checkpoint.checkpoint`` (kbitprep sees it as wrapped)."""
    return checkpoint(function, *args, **kwargs)


def make_inputs_require_grads(module: nn.Module, inputs: Any, output: Any) -> None:
    """The input-require-grads hook a user (or transformers) installed before kbitprep ran."""
    output.requires_grad_(True)


def _user_forward_hook(module: nn.Module, inputs: Any, output: Any) -> None:
    return None


def _user_pre_hook(module: nn.Module, inputs: Any) -> None:
    return None


def _user_kwargs_hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    return None


def _user_backward_hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
    return None


def _user_load_hook(*args: Any, **kwargs: Any) -> None:
    return None


# --------------------------------------------------------------------------- test backends


@dataclass(frozen=True)
class Rules:
    """What a test backend declares for the example (drawn per example, always consistent)."""

    allow_upcast: bool = True
    default_upcast: str = "none"
    modes: tuple[str, ...] = ("reentrant", "non_reentrant")
    default_mode: str = "reentrant"
    input_grads_hook: bool = True
    trainable: bool = True
    scales_quantized: bool = False
    fixups: tuple[str, ...] = ()
    warning: bool = False

    def declarations(self, quantized: frozenset[str], fixups: tuple[FixUp, ...]) -> Declarations:
        """The :class:`~kbitprep.plugin.Declarations` these rules stand for."""
        modes = frozenset(CheckpointMode(m) for m in self.modes)
        return Declarations(
            quantized=quantized,
            allow_upcast=self.allow_upcast,
            upcast_note="" if self.allow_upcast else "the stand-in kernel reads half-precision scales only",
            default_upcast=self.default_upcast,
            checkpointing=modes,
            default_checkpointing=CheckpointMode(self.default_mode) if modes else CheckpointMode.OFF,
            input_grads_hook=self.input_grads_hook,
            trainable=self.trainable,
            not_trainable_reason="" if self.trainable else "the stand-in has no backward",
            fixups=fixups,
            warnings=("stand-in quantization config converted fewer layers than listed",) if self.warning else (),
        )


#: fix-up kinds, each done on every claimed layer: ``mark`` sets an attribute, ``swap`` replaces the
#: ``cache`` buffer by a new tensor, ``hook`` registers a forward hook, ``repack`` gives the quantized
#: storage new data (``t.data = new``, as bitsandbytes' CPU unpacking does) and replaces the side
#: object. ``scribble`` writes into the quantized storage in place, which the FixUp contract forbids
#: (the self-check's broken plugin).
FIXUP_KINDS = ("mark", "swap", "hook", "repack")
#: the quantized storage of each stand-in layer class
STORAGE = {"Int8Linear": "qweight", "Packed4Linear": "packed"}


def _fixup_hook(module: nn.Module, inputs: Any, output: Any) -> None:
    return None


def _fixup(backend: str, kind: str, modules: tuple[str, ...]) -> FixUp:
    def apply(model: nn.Module) -> None:
        for name in modules:
            mod: Any = model.get_submodule(name)
            if kind == "mark":
                mod.standin_ready = True
            elif kind == "swap":
                mod.cache = mod.cache + 1
            elif kind == "hook":
                mod.register_forward_hook(_fixup_hook)
            elif kind == "repack":
                storage = getattr(mod, STORAGE[type(mod).__name__])
                storage.data = storage.data.flip(-1).contiguous()
                mod.quant_state = {**getattr(mod, "quant_state", {}), "layout": "repacked"}
            elif kind == "scribble":
                with torch.no_grad():
                    getattr(mod, STORAGE[type(mod).__name__]).view(-1)[0] += 1  # in place: no snapshot can undo it
            tick("fixup")

    return FixUp(f"{backend}:{kind}", f"stand-in fix-up {kind!r} on {len(modules)} layers", apply)


class StandinBackend(Backend):
    """A test backend claiming the modules of class ``layer``, declaring what its :class:`Rules` say.

    ``meddle`` makes it a broken plugin whose ``declare`` changes the model (for the self-check).
    """

    layer: type[nn.Module] = nn.Module
    description = "test backend for stand-in quantized layers"

    def __init__(self, rules: Rules, *, meddle: bool = False) -> None:
        self.rules = rules
        self.meddle = meddle

    def detect(self, model: nn.Module) -> Detection | None:
        """Claim every module of class ``layer``."""
        names = find_modules(model, self.layer)
        if not names:
            return None
        return Detection(evidence=(f"{len(names)} x {self.layer.__name__}",), modules=tuple(names))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Quantized storage: the non-float tensors of the claimed layers (and their scales if the rules say)."""
        if self.meddle:
            vars(model)["touched_by_plugin"] = True
        include = (lambda local, t: local in ("scale", "absmax")) if self.rules.scales_quantized else None
        quantized = quantized_tensor_names(model, detection.modules, include=include)
        fixups = tuple(_fixup(self.name, kind, detection.modules) for kind in self.rules.fixups)
        return self.rules.declarations(quantized, fixups)


class Int8Backend(StandinBackend):
    """Claims :class:`Int8Linear` layers."""

    name = "standin-int8"
    priority = 60
    layer = Int8Linear


class PackedBackend(StandinBackend):
    """Claims :class:`Packed4Linear` layers (a second library in the same model)."""

    name = "standin-packed"
    priority = 40
    layer = Packed4Linear


class GenericBackend(Backend):
    """Claims any model as a whole (priority 0): chosen when no stand-in layer is present."""

    name = "standin-generic"
    priority = 0
    description = "test backend for models without stand-in layers"

    def __init__(self, rules: Rules) -> None:
        self.rules = rules

    def detect(self, model: nn.Module) -> Detection | None:
        """Claim the whole model."""
        return Detection(evidence=("any model",))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """No quantized storage; the rest as the rules say (fix-ups need layers, so none)."""
        return replace(self.rules, fixups=(), scales_quantized=False).declarations(frozenset(), ())


def registry_for(recipe: Recipe, *, meddle: bool = False, scribble: bool = False) -> Registry:
    """A registry holding the three test backends with the recipe's rules, and nothing else.

    ``meddle`` and ``scribble`` break the int8 backend on purpose: its ``declare`` changes the model,
    or it gets a fix-up that writes into the quantized storage in place.
    """
    reg = Registry(discover=False, strict=True)
    int8_rules = recipe.int8_rules
    if scribble:
        int8_rules = replace(int8_rules, fixups=(*int8_rules.fixups, "scribble"), trainable=True)
    reg.register(Int8Backend(int8_rules, meddle=meddle))
    reg.register(PackedBackend(recipe.packed_rules))
    reg.register(GenericBackend(recipe.generic_rules))
    return reg


@dataclass
class Effects:
    """What the plan's fix-ups may change: module attributes (module name, attribute), buffers they
    replace by other objects, tensors whose data they replace (values change, the objects stay), the
    modules they add a forward hook to."""

    attrs: set[tuple[str, str]] = field(default_factory=set)
    buffers: set[str] = field(default_factory=set)
    rewritten: set[str] = field(default_factory=set)
    hooks: set[str] = field(default_factory=set)


def fixup_effects(model: nn.Module, fixup_names: list[str]) -> Effects:
    """The changes the named fix-ups (``"<backend>:<kind>"``) make, under every name of each layer."""
    layers = {b.name: b.layer for b in (Int8Backend, PackedBackend)}
    effects = Effects()
    for full in fixup_names:
        backend, _, kind = full.partition(":")
        for name, mod in model.named_modules(remove_duplicate=False):
            if not isinstance(mod, layers[backend]):
                continue
            if kind == "mark":
                effects.attrs.add((name, "standin_ready"))
            elif kind == "swap":
                effects.buffers.add(f"{name}.cache")
            elif kind == "hook":
                effects.hooks.add(name)
            elif kind == "repack":
                effects.rewritten.add(f"{name}.{STORAGE[type(mod).__name__]}")
                effects.attrs.add((name, "quant_state"))
    return effects


# --------------------------------------------------------------------------- recipes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
LEAF_KINDS = (*FLOAT_KINDS, "int8", "packed4", "odd")
CONTAINER_KINDS = ("sequential", "modulelist", "moduledict", "block", "layer")
HOOK_KINDS = ("forward", "pre", "kwargs", "backward", "load")
ROOTS = ("plain", "checkpointable", "llama")
#: checkpointing a user may have enabled before: its keyword arguments
EXISTING = (
    (("use_reentrant", True),),
    (("use_reentrant", False),),
    (),
    (("preserve_rng_state", False), ("use_reentrant", False)),
)
ERRORS: dict[str, type[BaseException]] = {
    "runtime": InjectedFault,
    "interrupt": KeyboardInterrupt,
    "oom": torch.OutOfMemoryError,
}


@dataclass(frozen=True)
class Container:
    """A container: its kind and the index of its parent container (lower than its own)."""

    kind: str
    parent: int


@dataclass(frozen=True)
class Leaf(layers.Leaf):
    """A layer (kind, dtype, width, bias, frozen), the container it sits in, and a kind-specific variant."""

    where: int
    variant: int = 0


def upcast_some(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    """A custom upcast policy: the parameters whose qualified name has an even length."""
    return len(name) % 2 == 0


@dataclass(frozen=True)
class Options:
    """The keyword arguments of plan / prepare (upcast policy, checkpointing, FSDP), and whether
    prepare gets the plan itself."""

    upcast: str | None = None
    checkpointing: bool | str | None = True
    checkpointing_kwargs: tuple[tuple[str, Any], ...] | None = None
    fsdp: bool | int | None = False
    with_plan: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for :func:`kbitprep.plan` / :func:`kbitprep.prepare`."""
        out: dict[str, Any] = {"upcast": upcast_some if self.upcast == "custom" else self.upcast}
        out["checkpointing"] = self.checkpointing
        if self.checkpointing_kwargs is not None:
            out["checkpointing_kwargs"] = dict(self.checkpointing_kwargs)
        out["fsdp"] = self.fsdp  # False: not the environment's accelerate settings
        return out


@dataclass(frozen=True)
class Recipe:
    """A random example: the tree, its root, its features, the backends' rules, the options, the fault.

    Indices: ``Leaf.where`` and ``Container.parent`` index ``containers`` (0 is the body's top);
    ``shared`` puts leaf ``i`` a second time into container ``c``; ``shared_containers`` puts
    container ``c`` a second time into container ``t < c``; ``ties`` gives leaf ``b`` the main
    parameter of leaf ``a``; ``hooks`` are ``("leaf" | "container", index, kind)``; ``lora`` and
    ``to_save`` are leaf indices for PEFT; ``embeddings`` is the leaf the root's
    ``get_input_embeddings`` returns. ``fault_at`` (0..1) picks the step to fail, ``sweep`` adds the
    first and last step of every seam.
    """

    seed: int
    containers: tuple[Container, ...]
    leaves: tuple[Leaf, ...]
    shared: tuple[tuple[int, int], ...] = ()
    shared_containers: tuple[tuple[int, int], ...] = ()
    ties: tuple[tuple[int, int], ...] = ()
    hooks: tuple[tuple[str, int, str], ...] = ()
    root: str = "plain"
    embeddings: int | None = None
    use_cache: bool = True
    existing: tuple[tuple[str, Any], ...] | None = None
    wrapped: bool = False
    input_hook: bool = False
    llama: tuple[str, bool, bool] = ("bf16", False, False)  # dtype, tied embeddings, a stand-in inside
    peft: bool = False
    lora: tuple[int, ...] = ()
    to_save: tuple[int, ...] = ()
    int8_rules: Rules = Rules()
    packed_rules: Rules = Rules()
    generic_rules: Rules = Rules()
    options: Options = Options()
    fault_at: float = 0.0
    error: str = "runtime"
    sweep: bool = False

    def features(self) -> set[str]:
        """The features this example has (for the coverage figures)."""
        kinds = {leaf.kind for leaf in self.leaves}
        out = {f"root {self.root}"} | {f"leaf {k}" for k in kinds}
        has_int8 = "int8" in kinds or (self.root == "llama" and self.llama[2])
        embeddings = self.root == "llama" or (self.root == "checkpointable" and self.embeddings is not None)
        flags = {
            "tied parameters": bool(self.ties),
            "shared leaves": bool(self.shared),
            "shared subtrees": bool(self.shared_containers),
            "user hooks": bool(self.hooks),
            "existing checkpointing": self.existing is not None and self.root != "plain",
            "existing input-grads hook": self.input_hook and embeddings,
            "PEFT wrapper": self.peft,
            "FSDP option": self.options.fsdp is not False,
            "custom upcast policy": self.options.upcast == "custom",
            "prepare given the plan": self.options.with_plan,
            "fix-ups": bool(has_int8 and self.int8_rules.fixups)
            or bool("packed4" in kinds and self.packed_rules.fixups),
            "odd dtypes": "odd" in kinds or any(leaf.dtype == "fp64" for leaf in self.leaves),
            "two quantized libraries": {"int8", "packed4"} <= kinds,
            "nesting depth >= 3": _depth(self.containers) >= 3,
        }
        return out | {k for k, v in flags.items() if v}


def _depth(containers: tuple[Container, ...]) -> int:
    depth = [1] * len(containers)
    for i, c in enumerate(containers[1:], start=1):
        depth[i] = depth[c.parent] + 1
    return max(depth)


def _rules(rng: random.Random, *, fixups: bool) -> Rules:
    allow = rng.random() < 0.9
    modes = rng.choices((("reentrant", "non_reentrant"), ("non_reentrant",), ()), (8, 1, 1))[0]
    return Rules(
        allow_upcast=allow,
        default_upcast=rng.choice(("none", "norms", "all")) if allow else "none",
        modes=modes,
        default_mode=rng.choice(modes) if modes else "off",
        input_grads_hook=rng.random() < 0.8,
        trainable=rng.random() < 0.97,
        scales_quantized=rng.random() < 0.4,
        fixups=tuple(k for k in FIXUP_KINDS if fixups and rng.random() < 0.3),
        warning=rng.random() < 0.1,
    )


def _options(rng: random.Random) -> Options:
    return Options(
        upcast=rng.choice((None, "none", "norms", "all", "custom")),
        checkpointing=rng.choice((True, True, None, False, "reentrant", "non_reentrant")),
        checkpointing_kwargs=rng.choice((None, None, None, (("preserve_rng_state", False),))),
        fsdp=rng.choices((False, True, 1, 2), (85, 5, 5, 5))[0],
        with_plan=rng.random() < 0.3,
    )


def random_recipe(rng: random.Random) -> Recipe:
    """Draw one example (only from ``rng``, so a seed gives the same example on every run)."""
    n_containers = rng.randint(1, 6)
    containers = (
        Container("block", 0),
        *(Container(rng.choice(CONTAINER_KINDS), rng.randrange(i)) for i in range(1, n_containers)),
    )
    n_leaves = rng.randint(1, 10)
    weights = (4, 1, 1, 1, 1, 3, 2, 1)
    leaves = tuple(
        Leaf(
            kind=rng.choice(FLOAT_KINDS) if i == 0 else rng.choices(LEAF_KINDS, weights)[0],
            dtype=rng.choices(tuple(DTYPES), (3, 3, 2, 1))[0],
            width=rng.choice((4, 8)),
            bias=rng.random() < 0.5,
            frozen=rng.random() < 0.25,
            where=rng.randrange(n_containers),
            variant=rng.randrange(6),
        )
        for i in range(n_leaves)
    )
    shared = tuple((rng.randrange(n_leaves), rng.randrange(n_containers)) for _ in range(rng.choice((0, 0, 1, 2))))
    shared_containers = tuple(
        (c, rng.randrange(c))
        for _ in range(1 if n_containers > 1 and rng.random() < 0.2 else 0)
        for c in [rng.randrange(1, n_containers)]
    )
    ties = tuple((rng.randrange(n_leaves), rng.randrange(n_leaves)) for _ in range(rng.choice((0, 0, 1, 2))))
    hooks = tuple(
        (where, rng.randrange(n_leaves if where == "leaf" else n_containers), rng.choice(HOOK_KINDS))
        for _ in range(rng.choice((0, 0, 1, 3)))
        for where in [rng.choice(("leaf", "container"))]
    )
    root = rng.choices(ROOTS, (45, 45, 10))[0]
    embedding_leaves = [i for i, leaf in enumerate(leaves) if leaf.kind == "embedding"]
    embeddings = rng.choice(embedding_leaves) if embedding_leaves and rng.random() < 0.85 else None
    linears = [i for i, leaf in enumerate(leaves) if leaf.kind == "linear"]
    norms = [i for i, leaf in enumerate(leaves) if leaf.kind in ("layernorm", "rmsnorm")]
    peft = rng.random() < 0.15 and (bool(linears) or root == "llama")
    lora = tuple(sorted(set(rng.sample(linears, rng.randint(1, len(linears)))))) if peft and linears else ()
    to_save = (rng.choice(norms),) if peft and norms and rng.random() < 0.3 else ()
    return Recipe(
        seed=rng.randrange(2**31),
        containers=containers,
        leaves=leaves,
        shared=shared,
        shared_containers=shared_containers,
        ties=ties,
        hooks=hooks,
        root=root,
        embeddings=embeddings,
        use_cache=rng.random() < 0.7,
        existing=rng.choice(EXISTING) if rng.random() < 0.35 else None,
        wrapped=rng.random() < 0.3,
        input_hook=rng.random() < 0.2,
        llama=(rng.choice(("fp16", "bf16", "fp32")), rng.random() < 0.5, rng.random() < 0.7),
        peft=peft,
        lora=lora,
        to_save=to_save,
        int8_rules=_rules(rng, fixups=True),
        packed_rules=_rules(rng, fixups=True),
        generic_rules=_rules(rng, fixups=False),
        options=_options(rng),
        fault_at=rng.random(),
        error=rng.choices(tuple(ERRORS), (6, 3, 1))[0],
        sweep=rng.random() < 0.125,
    )


# --------------------------------------------------------------------------- building


def _leaf(leaf: Leaf) -> nn.Module:
    dtype, w = DTYPES[leaf.dtype], leaf.width
    module: nn.Module
    if leaf.kind in FLOAT_KINDS:
        module = float_layer(leaf.kind, w, dtype, leaf.bias)
    elif leaf.kind == "int8":
        module = Int8Linear(
            w, dtype, weight_buffer=bool(leaf.variant & 1), scale_param=bool(leaf.variant & 2), bias=leaf.bias
        )
    elif leaf.kind == "packed4":
        module = Packed4Linear(w, dtype, absmax_half=bool(leaf.variant & 1), bias=leaf.bias)
    elif leaf.kind == "odd":
        module = OddLeaf(w, leaf.variant)
    else:
        raise ValueError(leaf.kind)
    if leaf.frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return module


_MAIN_PARAM = {"linear": "weight", "embedding": "weight", "layernorm": "weight", "rmsnorm": "weight", "scaler": "gain"}


def _main_param(leaf: Leaf, module: nn.Module) -> str | None:
    """The name of the leaf's parameter a tie may share (``None``: nothing to tie)."""
    if leaf.kind == "int8":
        return "scale" if isinstance(getattr(module, "scale", None), nn.Parameter) else None
    return _MAIN_PARAM.get(leaf.kind)


def _container(kind: str) -> nn.Module:
    kinds: dict[str, Callable[[], nn.Module]] = {
        "sequential": nn.Sequential,
        "modulelist": nn.ModuleList,
        "moduledict": nn.ModuleDict,
        "block": Block,
        "layer": CheckpointedLayer,
    }
    return kinds[kind]()


_HOOKS: dict[str, Callable[[nn.Module], Any]] = {
    "forward": lambda m: m.register_forward_hook(_user_forward_hook),
    "pre": lambda m: m.register_forward_pre_hook(_user_pre_hook),
    "kwargs": lambda m: m.register_forward_hook(_user_kwargs_hook, with_kwargs=True),
    "backward": lambda m: m.register_full_backward_hook(_user_backward_hook),
    "load": lambda m: m.register_load_state_dict_pre_hook(_user_load_hook),
}


def _body(recipe: Recipe) -> tuple[nn.Module, list[nn.Module]]:
    containers = [_container(c.kind) for c in recipe.containers]
    for i, c in enumerate(recipe.containers[1:], start=1):
        attach(containers[c.parent], containers[i], f"c{i}")
    leaves = [_leaf(leaf) for leaf in recipe.leaves]
    for i, leaf in enumerate(recipe.leaves):
        attach(containers[leaf.where], leaves[i], f"l{i}")
    for j, (i, where) in enumerate(recipe.shared):
        attach(containers[where], leaves[i], f"s{j}")
    for j, (shared, into) in enumerate(recipe.shared_containers):
        attach(containers[into], containers[shared], f"sc{j}")
    for a, b in recipe.ties:
        pa, pb = _main_param(recipe.leaves[a], leaves[a]), _main_param(recipe.leaves[b], leaves[b])
        if a == b or pa is None or pb is None:
            continue
        shared_param = getattr(leaves[a], pa)
        if shared_param.shape == getattr(leaves[b], pb).shape:
            setattr(leaves[b], pb, shared_param)
    for on, i, kind in recipe.hooks:
        _HOOKS[kind](leaves[i] if on == "leaf" else containers[i])
    return containers[0], leaves


@functools.cache
def _ticking_llama() -> type[nn.Module]:
    """``LlamaForCausalLM`` whose checkpointing call is a fault seam (after transformers' own changes)."""
    from transformers import LlamaForCausalLM

    class TickingLlama(LlamaForCausalLM):  # type: ignore[misc]
        """A tiny Llama whose ``activation_checkpointing_enable`` ends with a fault seam."""

        def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
            super().activation_checkpointing_enable(*args, **kwargs)
            tick("checkpointing")

    return TickingLlama


def _llama(recipe: Recipe, body: nn.Module) -> Any:
    from kbitprep.testing import tiny_llama_config

    dtype, tied, standin = recipe.llama
    config = tiny_llama_config(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, tie_word_embeddings=tied, use_cache=recipe.use_cache
    )
    model: Any = _ticking_llama()(config).to(DTYPES[dtype])
    model.extra = body
    if standin:
        mlp = model.model.layers[0].mlp
        mlp.down_proj = Int8Linear(16, DTYPES[dtype], weight_buffer=False, scale_param=False, bias=False)
    if recipe.existing is not None:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=dict(recipe.existing), offload=recipe.wrapped
        )
    if recipe.input_hook and recipe.existing is None:  # (enabling checkpointing installed one already)
        model.get_input_embeddings().register_forward_hook(make_inputs_require_grads)
    return model


def _checkpointable(recipe: Recipe, body: nn.Module, leaves: list[nn.Module]) -> nn.Module:
    path = None
    if recipe.embeddings is not None:
        emb = leaves[recipe.embeddings]
        path = next(("body." + n if n else "body") for n, m in body.named_modules() if m is emb)
    model = CheckpointableModel(body, StandinConfig(recipe.use_cache), path)
    if recipe.existing is not None:
        function = user_checkpoint if recipe.wrapped else checkpoint
        model.gradient_checkpointing_enable(dict(recipe.existing), function=function)
    if recipe.input_hook and path is not None:
        model.get_input_embeddings().register_forward_hook(make_inputs_require_grads)
    return model


def build(recipe: Recipe) -> nn.Module:
    """Build the model of ``recipe`` (the same model for the same recipe; torch's RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        body, leaves = _body(recipe)
        model: nn.Module
        if recipe.root == "llama":
            model = _llama(recipe, body)
        elif recipe.root == "checkpointable":
            model = _checkpointable(recipe, body, leaves)
        else:
            model = body
        if recipe.peft and not (recipe.root == "checkpointable" and recipe.embeddings is None):
            model = _peft(recipe, model, leaves)  # (PEFT needs the embeddings of a model that names them)
    return model


def _peft(recipe: Recipe, model: nn.Module, leaves: list[nn.Module]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {id(m): n for n, m in model.named_modules()}
    targets = [names[id(leaves[i])] for i in recipe.lora if id(leaves[i]) in names]
    if recipe.root == "llama":
        targets += ["q_proj", "v_proj"]
    to_save = [names[id(leaves[i])] for i in recipe.to_save if id(leaves[i]) in names]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, modules_to_save=to_save or None)
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- shrinking


def _without_leaf(r: Recipe, i: int) -> Recipe:
    def idx(j: int) -> int:
        return j - 1 if j > i else j

    return replace(
        r,
        leaves=r.leaves[:i] + r.leaves[i + 1 :],
        shared=tuple((idx(a), c) for a, c in r.shared if a != i),
        ties=tuple((idx(a), idx(b)) for a, b in r.ties if i not in (a, b)),
        hooks=tuple((w, idx(j) if w == "leaf" else j, k) for w, j, k in r.hooks if not (w == "leaf" and j == i)),
        embeddings=None if r.embeddings in (None, i) else idx(r.embeddings),
        lora=tuple(idx(a) for a in r.lora if a != i),
        to_save=tuple(idx(a) for a in r.to_save if a != i),
    )


def _without_container(r: Recipe, c: int) -> Recipe:
    parent = r.containers[c].parent

    def idx(j: int) -> int:
        j = parent if j == c else j
        return j - 1 if j > c else j

    return replace(
        r,
        containers=tuple(Container(x.kind, idx(x.parent)) for k, x in enumerate(r.containers) if k != c),
        leaves=tuple(replace(leaf, where=idx(leaf.where)) for leaf in r.leaves),
        shared=tuple((a, idx(t)) for a, t in r.shared),
        shared_containers=tuple((idx(a), idx(t)) for a, t in r.shared_containers if c not in (a, t)),
        hooks=tuple((w, j if w == "leaf" else idx(j), k) for w, j, k in r.hooks if not (w == "container" and j == c)),
    )


def _simpler(r: Recipe) -> Iterator[Recipe]:
    """Recipes one simplification away from ``r``, the biggest cuts first."""
    default = Recipe(seed=r.seed, containers=r.containers, leaves=r.leaves)
    for name in ("peft", "root", "existing", "hooks", "shared_containers", "shared", "ties", "input_hook"):
        if getattr(r, name) != getattr(default, name):
            yield replace(r, **{name: getattr(default, name)})
    if r.peft:
        yield replace(r, lora=(), to_save=(), peft=False)
    for i in reversed(range(len(r.leaves))):
        if len(r.leaves) > 1:
            yield _without_leaf(r, i)
    for c in reversed(range(1, len(r.containers))):
        yield _without_container(r, c)
    for name in ("int8_rules", "packed_rules", "generic_rules", "options", "sweep", "error", "wrapped", "use_cache"):
        if getattr(r, name) != getattr(default, name):
            yield replace(r, **{name: getattr(default, name)})
    for name in ("shared", "ties", "hooks"):
        items = getattr(r, name)
        for k in range(len(items)):
            yield replace(r, **{name: items[:k] + items[k + 1 :]})
    for k, leaf in enumerate(r.leaves):
        simple = replace(leaf, bias=False, frozen=False, variant=0)
        if simple != leaf:
            yield replace(r, leaves=(*r.leaves[:k], simple, *r.leaves[k + 1 :]))


def shrink(recipe: Recipe, fails: Callable[[Recipe], bool], budget: int = 300) -> Recipe:
    """A smaller recipe that still ``fails`` (greedy: keep each simplification that still fails)."""
    current, tries = recipe, 0
    improved = True
    while improved and tries < budget:
        improved = False
        for candidate in _simpler(current):
            tries += 1
            if fails(candidate):
                current, improved = candidate, True
                break
            if tries >= budget:
                break
    return current
