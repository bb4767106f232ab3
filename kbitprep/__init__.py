"""kbitprep: prepare quantized transformers models for LoRA/QLoRA training.

The pipeline is plan -> prepare -> undo::

    import kbitprep
    print(kbitprep.plan(model))          # what would change, with byte totals; changes nothing
    kbitprep.prepare(model)              # freeze, upcast per policy, checkpointing, hooks; atomic
    kbitprep.report(model)               # what was done
    kbitprep.undo(model)                 # back to exactly the loaded state

Backends (bitsandbytes, GPTQ, AQLM, EETQ, HQQ, TorchAO, quanto, compressed-tensors, ...) are
plugins found through the ``kbitprep.backends`` entry-point group; see :mod:`kbitprep.plugin`.
``kbitprep.prepare_model_for_kbit_training`` is a drop-in replacement for PEFT's function.
"""

from __future__ import annotations

import logging as _logging

from . import errors
from ._api import plan, prepare, prepare_model_for_kbit_training, report, undo
from ._fsdp import FsdpSetting, FsdpWarning, detect_fsdp
from ._gradflow import GradientFlowResult, verify_gradient_flow
from ._lora import lora_config, lora_targets
from ._memory import MEMORY_PRESETS, full_logits, memory_modes, set_memory_modes
from ._patch_peft import PeftPatch, patch_peft
from ._plan_types import ParamPlan, Plan, Report
from ._policies import UPCAST_POLICIES, UpcastPolicy
from ._registry import (
    ENTRY_POINT_GROUP,
    BackendInfo,
    PluginFailure,
    Registry,
    Selection,
    default_registry,
    strict_mode,
)
from ._trainer import CheckpointingConflictWarning, CheckpointingStatus, checkpointing_status, training_arguments_for
from .app.estimate import Estimate, EstimateRow, estimate
from .app.estimate import Variant as EstimateVariant
from .errors import (
    AlreadyPreparedWarning,
    BackendConflictError,
    BackendMismatchError,
    BackendUnavailableError,
    BackendWarning,
    CheckpointingOverrideWarning,
    GradientFlowError,
    InvalidModelError,
    InvalidPolicyError,
    KbitprepError,
    KbitprepWarning,
    NoParametersError,
    NotAModuleError,
    NotPreparedError,
    NotTrainableError,
    PlanMismatchError,
    PluginContractError,
    PluginLoadError,
    PluginWarning,
    UnknownBackendError,
    UnsupportedModelError,
)
from .plugin import Backend, CheckpointMode, Declarations, Detection, FixUp

__version__ = "0.1.0"

# Silent by default, like other libraries: what prepare did and why is logged at INFO, diagnosis at
# DEBUG, under the "kbitprep" logger; configure logging (or use the CLI's -v) to see it.
_logging.getLogger("kbitprep").addHandler(_logging.NullHandler())


def register(backend: Backend | type[Backend], *, replace: bool = False) -> Backend:
    """Register a backend in the process-wide registry by hand (tests, notebooks); see :meth:`Registry.register`."""
    return default_registry().register(backend, replace=replace)


def unregister(name: str) -> Backend:
    """Remove a backend from the process-wide registry and return it; see :meth:`Registry.unregister`."""
    return default_registry().unregister(name)


def backends() -> list[BackendInfo]:
    """Every backend registered in the process-wide registry, highest priority first."""
    reg = default_registry()
    return [reg.get(n) for n in reg.names()]


def plugin_failures() -> list[PluginFailure]:
    """Plugins the process-wide registry set aside, with their distribution and reason."""
    return default_registry().failures()


__all__ = [
    "ENTRY_POINT_GROUP",
    "MEMORY_PRESETS",
    "UPCAST_POLICIES",
    "AlreadyPreparedWarning",
    "Backend",
    "BackendConflictError",
    "BackendInfo",
    "BackendMismatchError",
    "BackendUnavailableError",
    "BackendWarning",
    "CheckpointMode",
    "CheckpointingConflictWarning",
    "CheckpointingOverrideWarning",
    "CheckpointingStatus",
    "Declarations",
    "Detection",
    "Estimate",
    "EstimateRow",
    "EstimateVariant",
    "FixUp",
    "FsdpSetting",
    "FsdpWarning",
    "GradientFlowError",
    "GradientFlowResult",
    "InvalidModelError",
    "InvalidPolicyError",
    "KbitprepError",
    "KbitprepWarning",
    "NoParametersError",
    "NotAModuleError",
    "NotPreparedError",
    "NotTrainableError",
    "ParamPlan",
    "PeftPatch",
    "Plan",
    "PlanMismatchError",
    "PluginContractError",
    "PluginFailure",
    "PluginLoadError",
    "PluginWarning",
    "Registry",
    "Report",
    "Selection",
    "UnknownBackendError",
    "UnsupportedModelError",
    "UpcastPolicy",
    "__version__",
    "backends",
    "checkpointing_status",
    "default_registry",
    "detect_fsdp",
    "errors",
    "estimate",
    "full_logits",
    "lora_config",
    "lora_targets",
    "memory_modes",
    "patch_peft",
    "plan",
    "plugin_failures",
    "prepare",
    "prepare_model_for_kbit_training",
    "register",
    "report",
    "set_memory_modes",
    "strict_mode",
    "training_arguments_for",
    "undo",
    "unregister",
    "verify_gradient_flow",
]
