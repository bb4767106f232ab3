"""Facts about a model's anatomy that planning and mutation both read: its config objects, the
checkpointing a user may already have enabled on it, and its checkpointed stacks (where each one's
input comes from)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "Anatomy",
    "ExistingCheckpointing",
    "Stack",
    "anatomy",
    "checkpointing_target",
    "count_input_grad_hooks",
    "count_layer_input_hooks",
    "existing_checkpointing",
    "input_embeddings",
    "is_checkpointed_layer",
    "model_configs",
    "output_head",
    "own_adapter_params",
    "text_config",
]

#: Marks the hooks kbitprep registers to make a module's output (or a layer's input) require grad.
INPUT_GRADS_MARK = "_kbitprep_input_grads"


def _is_config(obj: Any) -> bool:
    return (
        obj is not None
        and not isinstance(obj, nn.Module)
        and hasattr(obj, "__dict__")
        and hasattr(obj, "to_dict")
        and hasattr(obj, "model_type")
    )


def _with_nested(configs: list[Any]) -> Iterator[Any]:
    seen: set[int] = set()
    stack = list(configs)
    while stack:
        cfg = stack.pop(0)
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        yield cfg
        for value in list(vars(cfg).values()):
            if _is_config(value) and id(value) not in seen:
                stack.append(value)


def text_config(config: Any) -> Any:
    """The config of a model's text decoder: ``config.get_text_config()`` (LLaVA keeps it in its
    ``text_config``), the config itself where it has no such method or several text configs (MusicGen),
    ``None`` for ``None``."""
    getter = getattr(config, "get_text_config", None)
    if not callable(getter):
        return config
    try:
        return getter()
    except Exception:  # several text configs: ambiguous, so the config itself
        return config


def model_configs(model: nn.Module) -> Iterator[Any]:
    """Every distinct transformers config object reachable from ``model``: each module's ``config``
    and, recursively, the sub-configs they hold (``text_config``, ``vision_config``, ``decoder`` ...)."""
    return _with_nested([cfg for mod in model.modules() if _is_config(cfg := getattr(mod, "config", None))])


@dataclass(frozen=True)
class ExistingCheckpointing:
    """Checkpointing the model already has enabled (by the user, a trainer or an earlier tool).

    Attributes:
        kwargs: the keyword arguments its checkpoint function passes to
            ``torch.utils.checkpoint.checkpoint`` (``use_reentrant`` included when it was given).
        wrapped: the function is not plain ``checkpoint`` (e.g. transformers' offload wrapper).
    """

    kwargs: Mapping[str, Any]
    wrapped: bool

    @property
    def use_reentrant(self) -> bool:
        """Whether it runs reentrant (torch's default when ``use_reentrant`` is not given)."""
        return bool(self.kwargs.get("use_reentrant", True))

    def describe(self) -> str:
        """``use_reentrant=False, preserve_rng_state=False``: the settings, for plans and warnings."""
        items = ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
        return items or "no keyword arguments"


def _existing_on(mod: nn.Module) -> ExistingCheckpointing | None:
    """The checkpointing enabled on this one module (transformers' per-layer flag), or ``None``."""
    if getattr(mod, "gradient_checkpointing", False) is not True:
        return None
    func = vars(mod).get("_gradient_checkpointing_func")
    if func is None:
        return None
    inner, kwargs = (func.func, dict(func.keywords)) if isinstance(func, functools.partial) else (func, {})
    from torch.utils.checkpoint import checkpoint

    return ExistingCheckpointing(kwargs, wrapped=inner is not checkpoint)


def existing_checkpointing(model: nn.Module) -> ExistingCheckpointing | None:
    """The checkpointing enabled on ``model`` now (transformers' per-layer flags), or ``None``."""
    return next((found for mod in model.modules() if (found := _existing_on(mod)) is not None), None)


def _can_checkpoint(mod: nn.Module) -> bool:
    cls = type(mod)
    api = hasattr(cls, "activation_checkpointing_enable") or hasattr(cls, "gradient_checkpointing_enable")
    return api and getattr(mod, "supports_gradient_checkpointing", True)


def _call(mod: nn.Module, getter: str) -> nn.Module | None:
    """``mod.<getter>()`` when the class has it and it returns a module, else ``None``."""
    if not callable(getattr(type(mod), getter, None)):
        return None
    try:
        found = getattr(mod, getter)()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None


def checkpointing_target(model: nn.Module) -> nn.Module | None:
    """The transformers model inside ``model`` (also through a PEFT wrapper) that can checkpoint."""
    return next((mod for mod in model.modules() if _can_checkpoint(mod)), None)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The input embedding module of a transformers model, or ``None``."""
    return _call(checkpointing_target(model) or model, "get_input_embeddings")


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head (``lm_head``) of a transformers model, or ``None``."""
    return next((head for mod in model.modules() if (head := _call(mod, "get_output_embeddings")) is not None), None)


def count_input_grad_hooks(emb: nn.Module | None) -> int:
    """How many input-require-grads hooks (transformers', PEFT's or kbitprep's) an embedding carries."""
    if emb is None:
        return 0
    return sum(
        1
        for h in emb._forward_hooks.values()
        if getattr(h, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad")
        or getattr(h, INPUT_GRADS_MARK, False)
    )


def count_layer_input_hooks(layer: nn.Module) -> int:
    """How many of kbitprep's input-require-grads forward pre-hooks a checkpointed layer carries."""
    return sum(1 for h in layer._forward_pre_hooks.values() if getattr(h, INPUT_GRADS_MARK, False))


def is_checkpointed_layer(mod: nn.Module) -> bool:
    """Whether ``mod`` is a layer transformers checkpoints (a ``GradientCheckpointingLayer``, transformers
    5.x), found by class name so that transformers is not imported."""
    return any(c.__name__ == "GradientCheckpointingLayer" for c in type(mod).__mro__)


def _is_transformers_model(mod: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(mod).__mro__)


@dataclass(frozen=True)
class Stack:
    """A run of checkpointed layers held by one container (``model.encoder.layers``).

    With reentrant checkpointing the parameters inside these layers (LoRA adapters included) get
    gradients only when the input of the stack requires grad: the input-require-grads hook on the
    token embeddings does that for the stacks they feed, not for a speech encoder or a vision tower.

    Attributes:
        name: qualified name of the container.
        layers: ``(qualified name, layer)`` of each outermost checkpointed layer in it, in order.
        main_input: the ``main_input_name`` (``"input_features"``, ``"pixel_values"``, or ``""``) of the
            stack's owner: the enclosing sub-model, the nearest module with ``get_input_embeddings``
            (``model.encoder``, ``model.vision_tower``).
        embeddings: the owner's input embeddings (the module its inputs enter through: the Whisper
            encoder's ``conv1``, a vision tower's patch embedding), or ``None``.
        embeddings_name: their qualified name, ``""`` without them.
    """

    name: str
    layers: tuple[tuple[str, nn.Module], ...]
    main_input: str
    embeddings: nn.Module | None
    embeddings_name: str = ""

    @property
    def layer_class(self) -> str:
        """The class name of the stack's layers (``"A/B"`` when they differ)."""
        return "/".join(dict.fromkeys(type(layer).__name__ for _, layer in self.layers))


def _stacks(named: dict[str, nn.Module], names: dict[int, str], layer_names: list[str]) -> tuple[Stack, ...]:
    """Group the checkpointed layers by container and find each container's owner."""
    groups: dict[str, list[str]] = {}
    for name in layer_names:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    out: list[Stack] = []
    for container, members in groups.items():
        owner: str | None = None
        path = container
        while True:
            mod = named.get(path)
            if mod is not None and callable(getattr(type(mod), "get_input_embeddings", None)):
                owner = path
                break
            if not path:
                break
            path = path.rpartition(".")[0]
        owner_mod = named.get(owner) if owner is not None else None
        emb = _call(owner_mod, "get_input_embeddings") if owner_mod is not None else None
        out.append(
            Stack(
                name=container,
                layers=tuple((n, named[n]) for n in members),
                main_input=str(getattr(owner_mod, "main_input_name", "") or ""),
                embeddings=emb,
                embeddings_name="" if emb is None else names.get(id(emb), type(emb).__name__),
            )
        )
    return tuple(out)


def _submodel_embeddings(target: nn.Module | None, names: dict[int, str]) -> tuple[tuple[str, nn.Module], ...]:
    """The modules transformers' ``enable_input_require_grads`` hooks: the input embeddings of every
    transformers (sub-)model inside ``target``, each once."""
    if target is None:
        return ()
    found: dict[int, tuple[str, nn.Module]] = {}
    for mod in target.modules():
        if not _is_transformers_model(mod):
            continue
        emb = _call(mod, "get_input_embeddings")
        if emb is not None and id(emb) not in found:
            found[id(emb)] = (names.get(id(emb)) or type(emb).__name__, emb)
    return tuple(found.values())


def own_adapter_params(mod: nn.Module, *, saved_copies: bool = True) -> set[int]:
    """``id`` of the PEFT adapter parameters one module holds (lora_A/B ..., modules_to_save copies;
    without those copies, which train in full, when ``saved_copies`` is false)."""
    ids: set[int] = set()
    saved = type(mod).__name__ == "ModulesToSaveWrapper"
    if saved and not saved_copies:
        return ids
    names = tuple(getattr(mod, "adapter_layer_names", ())) + tuple(getattr(mod, "other_param_names", ()))
    if saved:
        names += ("modules_to_save",)
    for attr in names:
        sub = getattr(mod, attr, None)
        if isinstance(sub, nn.Module):
            ids.update(id(p) for p in sub.parameters())
    return ids


@dataclass(frozen=True)
class Anatomy:
    """The parts of a model that planning and preparing look at, found once.

    Attributes:
        target: the transformers model that can checkpoint (also inside a PEFT wrapper), or ``None``.
        embeddings: its input embeddings, or ``None``; ``embeddings_name`` their qualified name.
        head: the output head, or ``None``.
        adapters: ``id`` of every PEFT adapter parameter (lora_A, lora_B, modules_to_save copies).
        peft_wrapped: the model is wrapped by PEFT.
        existing: checkpointing the model already has enabled, or ``None``.
        configs: every config object of the model, nested ones included.
        stacks: the model's checkpointed stacks (see :class:`Stack`), in module order.
        submodel_embeddings: ``(qualified name, module)`` of the input embeddings of every transformers
            (sub-)model inside ``target``: where transformers' ``enable_input_require_grads`` (and PEFT's
            ``prepare_model_for_kbit_training``) put their hooks.
    """

    target: nn.Module | None
    embeddings: nn.Module | None
    embeddings_name: str
    head: nn.Module | None
    adapters: frozenset[int]
    peft_wrapped: bool
    existing: ExistingCheckpointing | None
    configs: tuple[Any, ...]
    stacks: tuple[Stack, ...] = ()
    submodel_embeddings: tuple[tuple[str, nn.Module], ...] = ()


def anatomy(model: nn.Module) -> Anatomy:
    """Find the :class:`Anatomy` of ``model`` in one pass over its modules."""
    names: dict[int, str] = {}
    target: nn.Module | None = None
    head: nn.Module | None = None
    existing: ExistingCheckpointing | None = None
    adapters: set[int] = set()
    has_adapter_layers = False
    configs: list[Any] = []
    named: dict[str, nn.Module] = {}
    layers: list[str] = []
    layer_set: set[str] = set()
    for name, mod in model.named_modules():
        names[id(mod)] = name
        named[name] = mod
        if is_checkpointed_layer(mod) and not _inside(name, layer_set):
            layers.append(name)
            layer_set.add(name)
        cls = type(mod)
        if target is None:
            api = hasattr(cls, "activation_checkpointing_enable") or hasattr(cls, "gradient_checkpointing_enable")
            if api and getattr(mod, "supports_gradient_checkpointing", True):
                target = mod
        if head is None and callable(getattr(mod, "get_output_embeddings", None)):
            head = _call(mod, "get_output_embeddings")
        if existing is None and getattr(mod, "gradient_checkpointing", False) is True:
            existing = existing_checkpointing(mod)
        if hasattr(mod, "adapter_layer_names"):
            has_adapter_layers = True
        adapters.update(own_adapter_params(mod))
        cfg = getattr(mod, "config", None)
        if _is_config(cfg):
            configs.append(cfg)
    emb = _call(target or model, "get_input_embeddings")
    emb_name = "?" if emb is None else ((names[id(emb)] or "<root>") if id(emb) in names else type(emb).__name__)
    return Anatomy(
        target=target,
        embeddings=emb,
        embeddings_name=emb_name,
        head=head,
        adapters=frozenset(adapters),
        peft_wrapped=hasattr(model, "peft_config") and has_adapter_layers,
        existing=existing,
        configs=tuple(_with_nested(configs)),
        stacks=_stacks(named, names, layers),
        submodel_embeddings=_submodel_embeddings(target, names),
    )


def _inside(name: str, layers: set[str]) -> bool:
    """Whether the module ``name`` lies inside one of the modules named in ``layers``."""
    while "." in name:
        name = name.rpartition(".")[0]
        if name in layers:
            return True
    return False
