"""Memory modes: the user's ``memory=`` choice, the named presets, and what each asks of the planner."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InvalidPolicyError
from ..plugin import CheckpointMode

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "MEMORY_PRESETS",
    "OFFLOAD_MIN_BYTES",
    "MemoryChoice",
    "MemoryModes",
    "preset_options",
    "resolve_memory",
]

#: Tokens per chunk of the chunked output head unless chosen otherwise.
DEFAULT_CHUNK_TOKENS = 256
#: Saved tensors smaller than this stay on the device when offloading (copies cost more than they save).
OFFLOAD_MIN_BYTES = 1 << 20

#: The named memory presets, with what each does.
MEMORY_PRESETS: dict[str, str] = {
    "default": "kbitprep's defaults: the backend's upcast policy (no upcast of frozen parameters where the "
    "backend allows it) and its default checkpointing; no extra memory mode",
    "chunked_head": f"output head and loss in checkpointed {DEFAULT_CHUNK_TOKENS}-token chunks "
    "(causal-LM training with labels; the model returns logits=None then)",
    "offload": "tensors saved for backward kept in pinned CPU memory (each storage copied once, on a side "
    "CUDA stream; what the backward needs first stays on the device)",
    "lowest": "no upcast + reentrant checkpointing + chunked output head + offloaded checkpointing",
}
"""The named memory presets (``memory=`` of :func:`kbitprep.plan` / :func:`kbitprep.prepare`), each with
a one-line description of what it does; the keys are the valid preset names."""

_MAPPING_KEYS = ("preset", "chunked_head", "offload")


@dataclass(frozen=True)
class MemoryModes:
    """A resolved memory choice.

    Attributes:
        preset: the preset it starts from (a key of :data:`MEMORY_PRESETS`).
        chunked_head: tokens per chunk of the chunked output head; ``0`` turns it off.
        offload: whether saved tensors are offloaded to pinned CPU memory.
        upcast: the upcast policy the preset asks for when the caller gives none (``None``: the backend's).
        checkpointing: the checkpointing mode the preset asks for when the caller asks for the
            default one and the backend supports it (``None``: the backend's).
        required: whether a mode that does not apply to the model is an error (a mode asked for by
            name) rather than a note (a combined preset skips what does not apply).
    """

    preset: str = "default"
    chunked_head: int = 0
    offload: bool = False
    upcast: str | None = None
    checkpointing: str | None = None
    required: bool = True

    @property
    def active(self) -> bool:
        """Whether any mode needs installing on the model."""
        return bool(self.chunked_head or self.offload)


#: A user's ``memory=`` value: a preset name, a mapping (``{"preset": "lowest", "chunked_head": 512}``;
#: keys ``preset``, ``chunked_head`` (``True``/``False``/tokens), ``offload``), a :class:`MemoryModes`, or ``None``.
MemoryChoice = str | Mapping[str, Any] | MemoryModes | None


def _valid_choices() -> str:
    return (
        "valid choices: "
        + ", ".join(repr(k) for k in MEMORY_PRESETS)
        + ", None, or a mapping with keys "
        + ", ".join(repr(k) for k in _MAPPING_KEYS)
        + " (e.g. {'preset': 'lowest', 'chunked_head': 512})"
    )


def _preset(name: str) -> MemoryModes:
    if name == "default":
        return MemoryModes("default")
    if name == "chunked_head":
        return MemoryModes("chunked_head", chunked_head=DEFAULT_CHUNK_TOKENS)
    if name == "offload":
        return MemoryModes("offload", offload=True)
    if name == "lowest":
        return MemoryModes(
            "lowest",
            chunked_head=DEFAULT_CHUNK_TOKENS,
            offload=True,
            upcast="none",
            checkpointing=CheckpointMode.REENTRANT.value,
            required=False,
        )
    raise InvalidPolicyError(f"memory={name!r} is not a memory preset; {_valid_choices()}")


def resolve_memory(memory: MemoryChoice) -> MemoryModes:
    """Turn the user's ``memory=`` value into :class:`MemoryModes`.

    Raises:
        InvalidPolicyError: an unknown preset, key or value; the message lists the valid choices.
    """
    if memory is None:
        return MemoryModes("default")
    if isinstance(memory, MemoryModes):
        if memory.preset not in MEMORY_PRESETS or memory.chunked_head < 0:
            raise InvalidPolicyError(f"invalid MemoryModes {memory!r}; {_valid_choices()}")
        return memory
    if isinstance(memory, str):
        return _preset(memory)
    if isinstance(memory, Mapping):
        unknown = sorted(str(k) for k in memory if k not in _MAPPING_KEYS)
        if unknown:
            raise InvalidPolicyError(f"memory= has unknown key(s) {', '.join(unknown)}; {_valid_choices()}")
        base_name = memory.get("preset", "default")
        if not isinstance(base_name, str):
            raise InvalidPolicyError(f"memory['preset']={base_name!r} is not a preset name; {_valid_choices()}")
        modes = _preset(base_name)
        if "chunked_head" in memory:
            value = memory["chunked_head"]
            if value is True:
                tokens = DEFAULT_CHUNK_TOKENS
            elif value is False or value is None:
                tokens = 0
            elif isinstance(value, int) and value > 0:
                tokens = value
            else:
                raise InvalidPolicyError(
                    f"memory['chunked_head']={value!r} is not valid; use True, False or a positive token count"
                )
            modes = replace(modes, chunked_head=tokens, required=True)
        if "offload" in memory:
            value = memory["offload"]
            if not isinstance(value, bool):
                raise InvalidPolicyError(f"memory['offload']={value!r} is not valid; use True or False")
            modes = replace(modes, offload=value, required=True)
        return modes
    raise InvalidPolicyError(f"memory={memory!r} is not valid; {_valid_choices()}")


def preset_options(
    modes: MemoryModes, upcast: Any, checkpointing: Any, supported: frozenset[CheckpointMode]
) -> tuple[Any, Any]:
    """The ``upcast`` / ``checkpointing`` to plan with: the caller's, or the preset's where the caller
    left the default (``upcast=None``; ``checkpointing=True``/``None`` when the backend supports the mode)."""
    if upcast is None and modes.upcast is not None:
        upcast = modes.upcast
    if checkpointing in (True, None) and modes.checkpointing is not None:
        wanted = CheckpointMode(modes.checkpointing)
        if wanted in supported:
            checkpointing = wanted.value
    return upcast, checkpointing
