"""Every exception and warning kbitprep raises.

All exceptions derive from :class:`KbitprepError`, so ``except kbitprep.KbitprepError`` catches
anything kbitprep raised on purpose. Each also derives from the closest built-in exception
(``TypeError``, ``ValueError``, ``LookupError``, ``ImportError``, ``RuntimeError``) so existing
handlers keep working. Whenever one of these is raised by :func:`kbitprep.plan` or
:func:`kbitprep.prepare`, the model has not been changed.
"""

from __future__ import annotations

__all__ = [
    "AlreadyPreparedWarning",
    "BackendConflictError",
    "BackendMismatchError",
    "BackendUnavailableError",
    "BackendWarning",
    "CheckpointingConflictWarning",
    "CheckpointingOverrideWarning",
    "ConfigError",
    "FsdpWarning",
    "GradientFlowError",
    "InvalidModelError",
    "InvalidPolicyError",
    "KbitprepError",
    "KbitprepWarning",
    "NoParametersError",
    "NotAModuleError",
    "NotPreparedError",
    "NotTrainableError",
    "PlanMismatchError",
    "PluginContractError",
    "PluginLoadError",
    "PluginWarning",
    "UnknownBackendError",
    "UnsupportedModelError",
]


class KbitprepError(Exception):
    """Base class of every exception kbitprep raises on purpose."""


class NotAModuleError(KbitprepError, TypeError):
    """The object given is not a ``torch.nn.Module`` (for example ``None`` or a state dict)."""


class NoParametersError(KbitprepError, ValueError):
    """The model has no parameters (or no floating-point ones), so there is nothing to prepare."""


class InvalidModelError(KbitprepError, ValueError):
    """The model is a module but cannot be handled as given."""


class UnsupportedModelError(InvalidModelError):
    """The model is in a state that cannot be prepared: on the meta device, or offloaded."""


class InvalidPolicyError(KbitprepError, ValueError):
    """An option (upcast policy, checkpointing mode, keyword) has a value kbitprep does not know.

    The message lists the valid choices.
    """


class UnknownBackendError(KbitprepError, LookupError):
    """A backend was asked for by a name no registered backend has. The message lists the names."""


class BackendUnavailableError(KbitprepError, ImportError):
    """A package that is needed cannot be imported: a backend's library, peft for
    :func:`kbitprep.patch_peft`, or an optional package the model's transformers code needs (timm,
    for instance) when a model is built from its config. The message names the package and carries
    the install hint."""


class BackendConflictError(KbitprepError, RuntimeError):
    """Two backends of equal priority both claim the model; the message names both and their
    distributions. Pass ``backend=`` to choose, or change one plugin's priority."""


class BackendMismatchError(KbitprepError, ValueError):
    """A backend forced by name does not recognise the model (pass ``allow_mismatch=True`` to force it)."""


class NotTrainableError(KbitprepError, RuntimeError):
    """The backend declares that training through this model is impossible; the message says why."""


class PluginLoadError(KbitprepError, ImportError):
    """A plugin could not be loaded from its entry point (raised in strict mode only)."""


class PluginContractError(KbitprepError, TypeError):
    """A plugin does not satisfy the backend contract, or its detector/declarations misbehaved."""


class PlanMismatchError(KbitprepError, ValueError):
    """A plan was applied to a different model (or a model that changed since it was planned)."""


class NotPreparedError(KbitprepError, LookupError):
    """Undo or a report was asked of a model kbitprep has not prepared."""


class GradientFlowError(KbitprepError, RuntimeError):
    """The gradient-flow check found parameters that should train but received no gradient."""


class KbitprepWarning(UserWarning):
    """Base class of kbitprep's warnings."""


class PluginWarning(KbitprepWarning):
    """A plugin failed to load or misbehaved and was set aside (once per plugin)."""


class AlreadyPreparedWarning(KbitprepWarning):
    """``prepare`` was called on a model kbitprep had already prepared; nothing was changed."""


class BackendWarning(KbitprepWarning):
    """A backend found something about the model the user should act on (shown in the plan too):
    a quantization config that converted no layer, or a model that looks quantized but that no
    installed backend recognises."""


class CheckpointingOverrideWarning(KbitprepWarning):
    """prepare changed checkpointing settings the user had enabled on the model before (the plan
    says which, and why)."""


class ConfigError(InvalidModelError):
    """A config file that cannot be read or does not describe a model transformers can build."""


class FsdpWarning(KbitprepWarning):
    """The model will run under FSDP and something about its dtypes may not work there."""


class CheckpointingConflictWarning(KbitprepWarning):
    """The training arguments ask for checkpointing that contradicts what kbitprep prepared."""
