"""The backend registry: entry-point discovery, isolation of broken plugins, and selection."""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata as md
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from .errors import (
    BackendConflictError,
    BackendMismatchError,
    BackendUnavailableError,
    PluginContractError,
    PluginLoadError,
    PluginWarning,
    UnknownBackendError,
)
from .plugin import Backend, Declarations, Detection, _module_index_scope, missing_packages

log = logging.getLogger(__name__)

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendInfo",
    "PluginFailure",
    "Registry",
    "Selection",
    "default_registry",
    "module_index_scope",
    "strict_from_env",
    "strict_mode",
]

#: The entry-point group every backend, built-in or third-party, is published under.
ENTRY_POINT_GROUP = "kbitprep.backends"
#: The distribution whose backends count as built-in.
BUILTIN_DISTRIBUTION = "kbitprep"
_STRICT_ENV = "KBITPREP_STRICT"
_strict_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar("kbitprep_strict", default=None)


@contextlib.contextmanager
def strict_mode(strict: bool | None) -> Iterator[None]:
    """Within the block, registries raise on broken plugins (``True``), never raise (``False``),
    or follow their own setting (``None``). Context-local, so threads do not affect each other."""
    token = _strict_override.set(strict)
    try:
        yield
    finally:
        _strict_override.reset(token)


def module_index_scope(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block, every detector and declaration of ``model`` shares one
    :class:`~kbitprep.plugin.ModuleIndex`, built by the first :func:`~kbitprep.plugin.module_index`
    call and dropped at the end of the block (the next block walks the model afresh).

    :meth:`Registry.select` and :meth:`Registry.declare` open one each; a planner that wraps both in
    one block walks the model's module tree once for all of its backends. Context-local, like
    :func:`strict_mode`: threads never share an index.
    """
    return _module_index_scope(model)


def strict_from_env() -> bool:
    """Whether the ``KBITPREP_STRICT`` environment variable asks for strict mode (1/true/yes/on)."""
    return os.environ.get(_STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend and where it came from.

    Attributes:
        backend: the backend object.
        distribution: the distribution that published it (``"kbitprep"`` for built-ins,
            ``"<registered>"`` for :meth:`Registry.register`).
        version: that distribution's version, or ``""``.
        entry_point: the entry point's value (``"module:attr"``), or ``""``.
    """

    backend: Backend
    distribution: str
    version: str = ""
    entry_point: str = ""

    @property
    def name(self) -> str:
        """The backend's name."""
        return self.backend.name

    @property
    def builtin(self) -> bool:
        """Whether the backend ships with kbitprep."""
        return self.distribution == BUILTIN_DISTRIBUTION

    def missing(self) -> list[str]:
        """The backend's required packages that are not importable here."""
        return missing_packages(self.backend.requires)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin set aside: which one, from which distribution, at which stage, and why.

    Attributes:
        name: entry-point name (or backend name).
        distribution: the distribution that published it.
        stage: ``"load"``, ``"contract"``, ``"conflict"``, ``"detect"`` or ``"declare"``.
        reason: what went wrong, one line.
    """

    name: str
    distribution: str
    stage: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} (from {self.distribution}) failed at {self.stage}: {self.reason}"


@dataclass(frozen=True)
class Selection:
    """The outcome of choosing backends for a model.

    Attributes:
        primary: the backend leading the preparation.
        detections: every chosen backend with its detection, primary first. More than one when a
            model mixes quantization libraries: the rules of all of them apply.
        forced: whether the primary was named by the caller rather than detected.
    """

    primary: BackendInfo
    detections: tuple[tuple[BackendInfo, Detection], ...]
    forced: bool = False


def _contract_problems(obj: Any) -> list[str]:
    problems = []
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name.strip():
        problems.append("has no non-empty string 'name'")
    priority = getattr(obj, "priority", None)
    if not isinstance(priority, int) or isinstance(priority, bool):
        problems.append("'priority' is not an int")
    for meth in ("detect", "declare"):
        if not callable(getattr(obj, meth, None)):
            problems.append(f"has no callable {meth}()")
    requires = getattr(obj, "requires", ())
    if isinstance(requires, str) or not all(isinstance(r, str) for r in requires):
        problems.append("'requires' is not a tuple of module names")
    if not isinstance(getattr(obj, "install_hint", ""), str):
        problems.append("'install_hint' is not a string")
    return problems


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown>", ""
    return str(dist.metadata["Name"] or dist.name), str(dist.version or "")


class Registry:
    """Backends by name, discovered lazily from the ``kbitprep.backends`` entry points.

    Discovery happens once, on first use (never at import), under a lock, so two threads asking
    at once see one discovery. A plugin that fails to import, does not satisfy the contract, or
    collides with a name already taken is recorded in :meth:`failures` with one
    :class:`~kbitprep.errors.PluginWarning`; every other backend keeps working. In strict mode
    (``strict=True`` or ``KBITPREP_STRICT=1``) such failures raise instead.

    Args:
        group: the entry-point group to read (tests may use another).
        strict: raise on broken plugins; ``None`` reads ``KBITPREP_STRICT``.
        discover: read entry points at all (``False`` gives an empty registry for tests).
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP, *, strict: bool | None = None, discover: bool = True):
        self.group = group
        self._strict = strict
        self._discover = discover
        self._lock = threading.RLock()
        self._loaded = False
        self._backends: dict[str, BackendInfo] = {}
        self._failures: list[PluginFailure] = []
        self._warned: set[tuple[str, str, str]] = set()
        #: how many times entry points were read (1 after first use); for tests and diagnostics
        self.discovery_count = 0

    # ------------------------------------------------------------------ discovery
    @property
    def strict(self) -> bool:
        """Whether broken plugins raise instead of being set aside."""
        override = _strict_override.get()
        if override is not None:
            return override
        return strict_from_env() if self._strict is None else self._strict

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            if self._discover:
                try:
                    self._load_entry_points()
                except BaseException:
                    # strict mode stopped discovery part-way: forget the half-filled table, or the next
                    # attempt would report every backend loaded so far as clashing with itself
                    self._backends.clear()
                    raise
            self._loaded = True

    def _load_entry_points(self) -> None:
        self.discovery_count += 1
        eps = sorted(md.entry_points(group=self.group), key=lambda e: (_dist_of(e)[0] != BUILTIN_DISTRIBUTION, e.name))
        # built-in names stay reserved even when a built-in fails to load
        reserved = {ep.name for ep in eps if _dist_of(ep)[0] == BUILTIN_DISTRIBUTION}
        for ep in eps:
            dist, version = _dist_of(ep)
            try:
                obj = ep.load()
            except Exception as exc:  # an import of a plugin may raise anything
                self._fail(ep.name, dist, "load", f"{type(exc).__name__}: {exc}", PluginLoadError, exc)
                continue
            try:
                backend = obj() if isinstance(obj, type) else obj
            except Exception as exc:
                self._fail(
                    ep.name,
                    dist,
                    "load",
                    f"instantiating {obj!r} raised {type(exc).__name__}: {exc}",
                    PluginLoadError,
                    exc,
                )
                continue
            problems = _contract_problems(backend)
            if problems:
                self._fail(ep.name, dist, "contract", f"{ep.value} " + "; ".join(problems), PluginContractError)
                continue
            if dist != BUILTIN_DISTRIBUTION and backend.name in reserved:
                self._fail(
                    ep.name,
                    dist,
                    "conflict",
                    f"name {backend.name!r} is reserved for the built-in backend from {BUILTIN_DISTRIBUTION}; "
                    "a plugin cannot replace it silently (choose another name)",
                    PluginContractError,
                )
                continue
            info = BackendInfo(backend, dist, version, ep.value)
            self._add(info, from_entry_point=True)
            log.debug("loaded backend %r (priority %d) from %s %s", backend.name, backend.priority, dist, version)

    def _add(self, info: BackendInfo, *, from_entry_point: bool, replace: bool = False) -> None:
        name = info.name
        existing = self._backends.get(name)
        if existing is not None and not replace:
            what = "the built-in backend" if existing.builtin else "the backend"
            reason = (
                f"name {name!r} is already taken by {what} from {existing.distribution}; "
                "a plugin cannot replace it silently (choose another name)"
            )
            if from_entry_point:
                self._fail(name, info.distribution, "conflict", reason, PluginContractError)
                return
            raise PluginContractError(f"cannot register {name!r}: {reason}; pass replace=True to replace it")
        self._backends[name] = info

    def report_failure(self, name: str, stage: str, reason: str, cause: BaseException | None = None) -> None:
        """Set aside a registered backend that misbehaved at ``stage`` (e.g. ``"schemes"``): a
        :class:`~kbitprep.errors.PluginWarning` once, listed by :meth:`failures`; raises in strict mode."""
        self._fail(name, self.get(name).distribution, stage, reason, PluginContractError, cause)

    def _fail(
        self,
        name: str,
        dist: str,
        stage: str,
        reason: str,
        exc_type: type[Exception],
        cause: BaseException | None = None,
    ) -> None:
        failure = PluginFailure(name, dist, stage, reason)
        if self.strict:
            raise exc_type(f"kbitprep plugin {failure} (strict mode)") from cause
        key = (name, dist, stage)
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
            self._failures.append(failure)
        outcome = {
            "declare": "it cannot prepare such models",
            "schemes": "its quantization schemes are left out",
        }.get(stage, "it is ignored")
        warnings.warn(
            f"kbitprep: plugin {failure}; {outcome} (set KBITPREP_STRICT=1 to make this an error)",
            PluginWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ public API
    def register(
        self, backend: Backend | type[Backend], *, replace: bool = False, distribution: str = "<registered>"
    ) -> Backend:
        """Add a backend by hand (tests, notebooks). Returns the backend object.

        Raises:
            PluginContractError: the object does not satisfy the contract, or its name is taken
                and ``replace`` is false.
        """
        self._ensure_loaded()
        obj = backend() if isinstance(backend, type) else backend
        problems = _contract_problems(obj)
        if problems:
            raise PluginContractError(f"cannot register {obj!r}: " + "; ".join(problems))
        with self._lock:
            self._add(BackendInfo(obj, distribution), from_entry_point=False, replace=replace)
        return obj

    def unregister(self, name: str) -> Backend:
        """Remove the backend called ``name`` and return it.

        Raises:
            UnknownBackendError: no backend has that name.
        """
        self._ensure_loaded()
        with self._lock:
            if name not in self._backends:
                raise UnknownBackendError(self._unknown_message(name))
            return self._backends.pop(name).backend

    def infos(self) -> Mapping[str, BackendInfo]:
        """A read-only view of the registered backends by name."""
        self._ensure_loaded()
        return MappingProxyType(self._backends)

    def names(self) -> list[str]:
        """Registered backend names, highest priority first."""
        return [i.name for i in sorted(self.infos().values(), key=lambda i: (-i.backend.priority, i.name))]

    def failures(self) -> list[PluginFailure]:
        """Plugins set aside so far (load failures at discovery, detector failures when used)."""
        self._ensure_loaded()
        return list(self._failures)

    def get(self, name: str) -> BackendInfo:
        """The backend registered as ``name``.

        Raises:
            UnknownBackendError: no backend has that name (the message lists the names).
        """
        infos = self.infos()
        if name not in infos:
            raise UnknownBackendError(self._unknown_message(name))
        return infos[name]

    def __iter__(self) -> Iterator[BackendInfo]:
        return iter(list(self.infos().values()))

    def __contains__(self, name: object) -> bool:
        return name in self.infos()

    def _unknown_message(self, name: str) -> str:
        known = ", ".join(sorted(self._backends)) or "(none)"
        extra = ""
        if any(f.name == name for f in self._failures):
            extra = f"; a plugin called {name!r} failed to load (see `kbitprep backends`)"
        return f"no kbitprep backend is called {name!r}; registered backends: {known}{extra}"

    # ------------------------------------------------------------------ selection
    def ensure_available(self, info: BackendInfo) -> None:
        """Raise :class:`~kbitprep.errors.BackendUnavailableError` if the backend's packages are missing."""
        missing = info.missing()
        if missing:
            hint = info.backend.install_hint or f"pip install {' '.join(missing)}"
            raise BackendUnavailableError(
                f"backend {info.name!r} needs {', '.join(missing)}, which cannot be imported here; "
                f"install it with: {hint}"
            )

    def _detect(self, info: BackendInfo, model: nn.Module) -> Detection | None:
        if info.missing():
            return None
        try:
            found = info.backend.detect(model)
        except Exception as exc:
            self._fail(
                info.name,
                info.distribution,
                "detect",
                f"detect() raised {type(exc).__name__}: {exc}",
                PluginContractError,
                exc,
            )
            return None
        if found is not None and not isinstance(found, Detection):
            self._fail(
                info.name,
                info.distribution,
                "detect",
                f"detect() returned {type(found).__name__}, not a Detection or None",
                PluginContractError,
            )
            return None
        return found

    def declare(self, info: BackendInfo, model: nn.Module, detection: Detection) -> Declarations:
        """Ask a backend for its declarations and check them (``declare`` reads the model's
        :class:`~kbitprep.plugin.ModuleIndex` of the enclosing :func:`module_index_scope`, or one of its own).

        Raises:
            PluginContractError: ``declare()`` raised, returned something else than
                :class:`~kbitprep.plugin.Declarations`, or declarations that contradict themselves.
        """
        cause: Exception | None = None
        try:
            with module_index_scope(model):
                decl = info.backend.declare(model, detection)
        except Exception as exc:
            decl, cause, reason = None, exc, f"failed in declare(): {type(exc).__name__}: {exc}"
        if cause is None and not isinstance(decl, Declarations):
            reason = f"declare() returned {type(decl).__name__}, not kbitprep.plugin.Declarations"
        elif isinstance(decl, Declarations):
            problems = decl.problems()
            if not problems:
                return decl
            reason = "declared contradictory rules: " + "; ".join(problems)
        # listed in failures() with one PluginWarning (strict mode raises here), then refused for this model
        self._fail(info.name, info.distribution, "declare", reason, PluginContractError, cause)
        raise PluginContractError(f"backend {info.name!r} (from {info.distribution}) {reason}") from cause

    def select(self, model: nn.Module, backend: str | None = None, *, allow_mismatch: bool = False) -> Selection:
        """Choose the backend(s) for ``model``.

        An explicit ``backend`` wins (it must recognise the model unless ``allow_mismatch``). Otherwise
        the highest-priority backend whose detector fires leads; backends of lower priority that claim
        other modules of the same model join it, so a model mixing libraries gets the rules of both.

        The detectors share one :class:`~kbitprep.plugin.ModuleIndex` of the model (see
        :func:`module_index_scope`): one walk of its module tree for all of them.

        Raises:
            UnknownBackendError: ``backend`` names no registered backend.
            BackendUnavailableError: the named backend's packages are missing.
            BackendMismatchError: the named backend does not recognise the model.
            BackendConflictError: two backends of equal priority claim the same model.
        """
        with module_index_scope(model):
            return self._select(model, backend, allow_mismatch=allow_mismatch)

    def _select(self, model: nn.Module, backend: str | None, *, allow_mismatch: bool) -> Selection:
        if self.strict and self.failures():
            raise PluginLoadError(
                "kbitprep plugins failed (strict mode): " + "; ".join(str(f) for f in self.failures())
            )
        if backend is not None:
            info = self.get(backend)
            self.ensure_available(info)
            found = self._detect(info, model)
            if found is None:
                if not allow_mismatch:
                    raise BackendMismatchError(
                        f"backend {backend!r} does not recognise this {type(model).__name__}; "
                        f"detected: {self._detected_names(model) or 'nothing'}. Omit backend= to let "
                        "kbitprep choose, or pass allow_mismatch=True to force it"
                    )
                found = Detection(evidence=(f"forced by backend={backend!r} (allow_mismatch=True)",))
            return Selection(info, ((info, found),), forced=True)

        found_all = [(i, d) for i in self.infos().values() if (d := self._detect(i, model)) is not None]
        for info, det in found_all:
            log.debug("backend %r recognises %s: %s", info.name, type(model).__name__, "; ".join(det.evidence))
        if not found_all:
            raise BackendMismatchError(
                f"no registered backend recognises this {type(model).__name__} "
                f"(registered: {', '.join(self.names()) or 'none'})"
            )
        found_all.sort(key=lambda p: (-p[0].backend.priority, p[0].name))
        specific = [p for p in found_all if p[1].modules]
        pool = specific or found_all[:1] + [
            p for p in found_all[1:] if p[0].backend.priority == found_all[0][0].backend.priority
        ]
        top = pool[0]
        chosen: list[tuple[BackendInfo, Detection]] = [top]
        claimed = set(top[1].modules)
        for info, det in pool[1:]:
            mods = set(det.modules)
            same_priority = info.backend.priority == top[0].backend.priority
            if same_priority and (not mods or not claimed or mods & claimed):
                raise BackendConflictError(
                    f"backends {top[0].name!r} (from {top[0].distribution}) and {info.name!r} "
                    f"(from {info.distribution}) both claim this model with priority {info.backend.priority}; "
                    f"pass backend='{top[0].name}' or backend='{info.name}', or give one plugin a higher priority"
                )
            new = mods - claimed
            if new:
                chosen.append((info, det))
                claimed |= mods
        log.debug("selected %s for %s", " + ".join(i.name for i, _ in chosen), type(model).__name__)
        return Selection(top[0], tuple(chosen))

    def _detected_names(self, model: nn.Module) -> str:
        return ", ".join(i.name for i in self.infos().values() if self._detect(i, model) is not None)


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry used when no registry is passed (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Registry()
    return _default
