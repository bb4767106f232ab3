"""An opt-in, reversible switch that routes calls of PEFT's ``prepare_model_for_kbit_training`` through kbitprep.

Training stacks call PEFT's function themselves (TRL's ORPO and CPO trainers bind it with
``from peft import prepare_model_for_kbit_training`` when they are imported; TRL keeps a copy of
its own in ``trl.experimental.utils``; other frameworks call it in their model loaders), and their
users cannot change that code. :func:`patch_peft` replaces every module-level name bound to PEFT's
function (or to a known copy) with a router that prepares the model with kbitprep instead, and
puts every name back when the last active switch is left.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import nn

from ._api import _PREPARE_KEYWORDS, prepare, prepare_model_for_kbit_training
from ._mutation import prepared_state
from .errors import BackendUnavailableError, InvalidPolicyError, KbitprepError

__all__ = ["PeftPatch", "patch_peft"]

#: The policies :func:`patch_peft` accepts by name.
POLICY_NAMES = ("kbitprep", "peft")
#: Keywords of :func:`kbitprep.prepare` a policy mapping may set (``plan`` is per model, so not here).
POLICY_KEYWORDS = tuple(k for k in _PREPARE_KEYWORDS if k != "plan")
#: Copies of PEFT's function that other libraries define themselves: ``(module, attribute)``.
#: Patched only when the module is already imported (the switch never imports a library).
KNOWN_COPIES: tuple[tuple[str, str], ...] = (("trl.experimental.utils", "prepare_model_for_kbit_training"),)
_NAME = "prepare_model_for_kbit_training"

_LOCK = threading.RLock()
_ACTIVE: list[PeftPatch] = []  # the switches in force, oldest first; the newest one's policy applies
_ROUTERS: dict[Callable[..., Any], Callable[..., Any]] = {}  # original function -> its router


def _original_of(func: object) -> Callable[..., Any] | None:
    """The function a router stands for (``None`` when ``func`` is not one of kbitprep's routers)."""
    original = getattr(func, "__kbitprep_original__", None)
    return original if callable(original) and _ROUTERS.get(original) is func else None


def _modules() -> list[tuple[str, types.ModuleType]]:
    """Every module in ``sys.modules`` once, under its own name where it has several: multiprocessing
    registers a script's ``__main__`` again as ``__mp_main__``, and a name bound there is one binding."""
    named: dict[int, tuple[str, types.ModuleType]] = {}
    for name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType):
            continue
        seen = named.get(id(module))
        if seen is None or (name == getattr(module, "__name__", None) and seen[0] != name):
            named[id(module)] = (name, module)
    return list(named.values())


def _bindings(targets: Mapping[int, Callable[..., Any]]) -> list[tuple[str, types.ModuleType, str, Any]]:
    """Every ``module.attribute`` (in ``sys.modules``) bound to one of ``targets`` (keyed by ``id``)."""
    found = []
    for mod_name, module in _modules():
        try:
            items = list(vars(module).items())
        except (TypeError, RuntimeError):  # no __dict__, or it changed under us
            continue
        for attr, value in items:
            if id(value) in targets and targets[id(value)] is value:
                found.append((mod_name, module, attr, value))
    return found


def _rebind(module: types.ModuleType, attr: str, value: object) -> bool:
    """Bind ``module.attr`` to ``value``; ``False`` where the module refuses (it is then left as it was)."""
    try:
        setattr(module, attr, value)
    except (AttributeError, TypeError):
        return False
    return True


def _peft_function() -> Callable[..., Any]:
    try:
        from peft.utils import other
    except ImportError as exc:
        raise BackendUnavailableError(
            f"kbitprep.patch_peft() routes calls of peft's {_NAME}, but peft cannot be imported ({exc}); "
            "install it (pip install peft) or call kbitprep.prepare(model) yourself"
        ) from None
    func = getattr(other, _NAME, None)
    if not callable(func):
        raise BackendUnavailableError(f"this peft ({getattr(other, '__name__', 'peft')}) has no callable {_NAME}")
    return _original_of(func) or func


def _originals() -> list[Callable[..., Any]]:
    """PEFT's function and every known copy already imported (never a router)."""
    found = [_peft_function()]
    for mod_name, attr in KNOWN_COPIES:
        module = sys.modules.get(mod_name)
        func = getattr(module, attr, None) if isinstance(module, types.ModuleType) else None
        if callable(func):
            func = _original_of(func) or func
            if all(func is not f for f in found):
                found.append(func)
    return found


def _router_for(original: Callable[..., Any]) -> Callable[..., Any]:
    router = _ROUTERS.get(original)
    if router is not None:
        return router

    def router_(
        model: Any,
        use_gradient_checkpointing: bool = True,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        auto_clear_cache: bool = True,
    ) -> Any:
        with _LOCK:
            active = _ACTIVE[-1] if _ACTIVE else None
            if active is not None:
                active.calls += 1
        if active is None:  # a reference kept after every switch was left: behave as the original
            extra = {} if auto_clear_cache else {"auto_clear_cache": False}  # TRL's copy lacks it
            return original(model, use_gradient_checkpointing, gradient_checkpointing_kwargs, **extra)
        return _route(active.policy, model, use_gradient_checkpointing, gradient_checkpointing_kwargs, auto_clear_cache)

    router_.__name__ = router_.__qualname__ = getattr(original, "__name__", _NAME)
    router_.__doc__ = (
        f"{getattr(original, '__module__', '?')}.{getattr(original, '__qualname__', _NAME)}, "
        "routed through kbitprep by kbitprep.patch_peft()."
    )
    router_.__kbitprep_original__ = original  # type: ignore[attr-defined]
    _ROUTERS[original] = router_
    return router_


def _route(
    policy: str | Mapping[str, Any],
    model: Any,
    use_gradient_checkpointing: bool,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None,
    auto_clear_cache: bool,
) -> Any:
    """Prepare ``model`` by ``policy`` from the arguments PEFT's function was called with."""
    if isinstance(model, nn.Module) and prepared_state(model) is not None:
        return model  # prepared by kbitprep already (by the user, or by an earlier routed call): keep it
    if policy == "peft":
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing,
            dict(gradient_checkpointing_kwargs) if gradient_checkpointing_kwargs is not None else None,
            auto_clear_cache,
        )
    kwargs = dict(policy) if isinstance(policy, Mapping) else {}
    if "checkpointing" not in kwargs:  # the policy's explicit choice wins over the caller's arguments
        ck = dict(gradient_checkpointing_kwargs or {})
        reentrant = ck.pop("use_reentrant", None)
        if not use_gradient_checkpointing:
            kwargs["checkpointing"] = False
        elif reentrant is not None:
            kwargs["checkpointing"] = "reentrant" if reentrant else "non_reentrant"
        if ck and "checkpointing_kwargs" not in kwargs:
            kwargs["checkpointing_kwargs"] = ck
    return prepare(model, **kwargs)


def _check_policy(policy: object) -> str | dict[str, Any]:
    if policy is None:
        return "kbitprep"
    if isinstance(policy, str):
        if policy not in POLICY_NAMES:
            raise InvalidPolicyError(
                f"patch_peft(policy={policy!r}): unknown policy; use 'kbitprep' (kbitprep.prepare with its "
                "defaults), 'peft' (kbitprep.prepare_model_for_kbit_training: PEFT's results) or a mapping of "
                f"kbitprep.prepare keywords ({', '.join(POLICY_KEYWORDS)})"
            )
        return policy
    if isinstance(policy, Mapping):
        unknown = sorted(str(k) for k in policy if k not in POLICY_KEYWORDS)
        if unknown:
            raise InvalidPolicyError(
                f"patch_peft(policy=...): unknown keyword(s) {', '.join(unknown)}; "
                f"valid keywords of kbitprep.prepare here: {', '.join(POLICY_KEYWORDS)}"
            )
        keywords = dict(policy)
        try:
            _check_values(keywords)
        except KbitprepError as exc:  # the same class, said as the switch's error
            raise type(exc)(f"patch_peft(policy=...): {exc}; nothing was patched") from None
        return keywords
    raise InvalidPolicyError(
        f"patch_peft(policy=...) takes None, 'kbitprep', 'peft' or a mapping of kbitprep.prepare keywords, "
        f"got {type(policy).__name__}"
    )


def _check_values(keywords: Mapping[str, Any]) -> None:
    """Check every value of a policy mapping that does not depend on the model, as :func:`kbitprep.prepare`
    would when the stack calls it: upcast and checkpointing choices, checkpointing keywords, memory modes,
    ``fsdp``, the flags, the registry and the backend (registered, its packages importable).

    What depends on the model (whether the backend recognises it, allows the upcast or supports the mode)
    is checked by the routed call.

    Raises:
        InvalidPolicyError: a value kbitprep does not know.
        UnknownBackendError: ``backend`` names no registered backend.
        BackendUnavailableError: the backend's packages cannot be imported.
    """
    from ._fsdp import detect_fsdp
    from ._memory import resolve_memory
    from ._policies import resolve_checkpointing, resolve_upcast, validate_checkpointing_kwargs
    from ._registry import Registry, default_registry
    from .plugin import Declarations

    anything = Declarations()  # allows every upcast and mode: only the values themselves are checked here
    resolve_upcast(keywords.get("upcast"), anything)
    resolve_checkpointing(keywords.get("checkpointing", True), anything)
    validate_checkpointing_kwargs(keywords.get("checkpointing_kwargs"))
    resolve_memory(keywords.get("memory"))
    detect_fsdp(keywords.get("fsdp"), environ={})
    for flag in ("allow_mismatch", "verify"):
        if not isinstance(keywords.get(flag, False), bool):
            raise InvalidPolicyError(f"{flag}={keywords[flag]!r} must be True or False")
    if keywords.get("strict") not in (None, True, False):
        raise InvalidPolicyError(f"strict={keywords['strict']!r} must be None, True or False")
    registry = keywords.get("registry")
    if registry is not None and not isinstance(registry, Registry):
        raise InvalidPolicyError(f"registry= takes a kbitprep.Registry, got {type(registry).__name__}")
    backend = keywords.get("backend")
    if backend is not None:
        if not isinstance(backend, str):
            raise InvalidPolicyError(f"backend={backend!r} must be a backend name (a string) or None")
        reg = registry or default_registry()
        reg.ensure_available(reg.get(backend))


class PeftPatch:
    """The switch :func:`patch_peft` returns: a handle and a context manager.

    Attributes:
        policy: ``"kbitprep"``, ``"peft"`` or the mapping of :func:`kbitprep.prepare` keywords.
        patched: every ``"module.name"`` that routed through kbitprep when the switch was turned on
            (names an outer, still active switch had already patched included), sorted.
        calls: how many calls were routed while this switch was the newest active one.
    """

    def __init__(self, policy: str | dict[str, Any]) -> None:
        self.policy: str | dict[str, Any] = policy
        self.patched: list[str] = []
        self.calls = 0

    @property
    def active(self) -> bool:
        """Whether this switch is in force (turned on and not yet restored)."""
        with _LOCK:
            return any(p is self for p in _ACTIVE)

    def _activate(self) -> None:
        with _LOCK:
            if self.active:
                return
            originals = _originals()
            targets: dict[int, Callable[..., Any]] = {}
            for original in originals:
                router = _router_for(original)
                targets[id(original)] = original
                targets[id(router)] = router
            names = []
            for mod_name, module, attr, value in _bindings(targets):
                if _original_of(value) is None and not _rebind(module, attr, _router_for(value)):
                    continue
                names.append(f"{mod_name}.{attr}")
            _ACTIVE.append(self)
            self.patched = sorted(names)

    def restore(self) -> list[str]:
        """Turn this switch off; when no other switch is active, put PEFT's function back everywhere.

        Every ``module.name`` still bound to kbitprep's router (including names bound to it while the
        switch was on, e.g. by a module imported meanwhile) gets the original function back; a name
        that something else rebound since is left alone. Calling it again does nothing.

        Returns:
            The names given back their original function (empty while an outer switch is still active).
        """
        with _LOCK:
            if not self.active:
                return []
            _ACTIVE[:] = [p for p in _ACTIVE if p is not self]
            if _ACTIVE:
                return []
            routers = {id(r): r for r in _ROUTERS.values()}
            restored = []
            for mod_name, module, attr, value in _bindings(routers):
                original = _original_of(value)
                if original is not None and _rebind(module, attr, original):
                    restored.append(f"{mod_name}.{attr}")
            return sorted(restored)

    def __enter__(self) -> PeftPatch:
        self._activate()
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
        self.restore()
        return False

    def __repr__(self) -> str:
        return f"PeftPatch(policy={self.policy!r}, active={self.active}, patched={len(self.patched)} names)"


def patch_peft(policy: str | Mapping[str, Any] | None = None) -> PeftPatch:
    """Route every call of PEFT's ``prepare_model_for_kbit_training`` through kbitprep, reversibly.

    Finds each module-level name (in every imported module) bound to PEFT's function, or to a known
    copy of it (:data:`KNOWN_COPIES`: TRL's ``trl.experimental.utils`` one, if imported), including
    names bound by ``from peft import prepare_model_for_kbit_training`` before the switch, and binds
    it to a router with PEFT's signature ``(model, use_gradient_checkpointing=True,
    gradient_checkpointing_kwargs=None, auto_clear_cache=True)``. A module that imports PEFT's name
    while the switch is on gets the router too. Use it as a context manager, or call
    :meth:`PeftPatch.restore` on the returned handle.

    A routed call prepares the model with the newest active switch's policy:

    * ``None`` or ``"kbitprep"``: :func:`kbitprep.prepare` with kbitprep's defaults (nothing upcast
      for bitsandbytes, checkpointing in the backend's mode). ``use_gradient_checkpointing=False``
      becomes ``checkpointing=False``; ``gradient_checkpointing_kwargs`` become
      ``checkpointing_kwargs``, their ``use_reentrant`` choosing ``"reentrant"`` or
      ``"non_reentrant"``.
    * a mapping of :func:`kbitprep.prepare` keywords, e.g. ``{"memory": "lowest"}``: the same, with
      these keywords; a ``checkpointing`` given here wins over the caller's arguments.
    * ``"peft"``: :func:`kbitprep.prepare_model_for_kbit_training`, the drop-in with PEFT's results.

    A model kbitprep already prepared is returned unchanged (no warning: the stack's call is then
    redundant). kbitprep's exceptions propagate, with the model left as it was. The patch is
    process-wide; switches nest (the newest one's policy applies) and may be left in any order; the
    names go back when the last one is left. Thread-safe.

    Args:
        policy: ``None``/``"kbitprep"``, ``"peft"``, or a mapping of :func:`kbitprep.prepare` keywords.

    Returns:
        The active :class:`PeftPatch`; ``.patched`` lists the ``"module.name"`` strings it routes.

    The whole policy is checked when the switch is made, not when the stack first calls PEFT's
    function: an unknown name, keyword or value (``{"memory": "lowset"}``, ``{"upcast": "everything"}``,
    a backend that is not registered) raises here and patches nothing. What depends on the model
    (whether the backend recognises it, allows the upcast, supports the mode) is checked by each
    routed call, as :func:`kbitprep.prepare` checks it.

    Raises:
        InvalidPolicyError: an unknown policy name, keyword or value; nothing was patched.
        UnknownBackendError: the policy's ``backend`` is not registered; nothing was patched.
        BackendUnavailableError: peft, or the policy's backend's packages, cannot be imported; nothing
            was patched.

    Example:
        ```python
        import kbitprep

        with kbitprep.patch_peft() as switch:
            trainer = ORPOTrainer(model=model, args=args, peft_config=lora, ...)  # calls PEFT's function
        print(switch.patched)
        ```
    """
    handle = PeftPatch(_check_policy(policy))
    handle._activate()
    return handle
