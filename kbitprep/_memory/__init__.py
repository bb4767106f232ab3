"""Memory modes: a chunked output head, offloaded checkpointing, and the named presets combining them.

Three things cut training memory beyond kbitprep's default (which already keeps frozen parameters
in their loaded dtype where the backend allows it, instead of PEFT's fp32 upcast):

* **chunked output head** (``chunked_head``): for causal-LM training with ``labels``, the output
  projection and the loss are computed in checkpointed chunks of ``chunked_head`` tokens, so the
  ``tokens x vocabulary`` logits (and their fp32 copy for the loss) never exist at once; the
  backward recomputes one chunk at a time. The loss is the one transformers' ``ForCausalLMLoss``
  computes (same label shift, ``ignore_index``, ``shift_labels`` and ``num_items_in_batch``). While
  it is active the model returns ``logits=None``: call the model without ``labels`` (or switch the
  mode off with :func:`set_memory_modes`) to get logits.
* **offloaded checkpointing** (``offload``): tensors autograd saves for backward during the
  forward (with reentrant or non-reentrant checkpointing alike: the inputs of each checkpointed
  layer, plus what the embedding saves) are kept in pinned CPU memory, each storage copied once;
  what the backward needs first (from the output head on, and the tensor saved just before it)
  stays on the device. The device-to-host copies run on a side CUDA stream so the forward does not
  wait for them; the backward copies each storage back on the compute stream once its copy-out
  ended (no prefetch; see :class:`OffloadHooks`). Where tensors already live in CPU memory (a CPU
  model) nothing is copied and training is unchanged.
* **presets** (``memory="lowest"``): no upcast + reentrant checkpointing + chunked head + offload.

The modes are chosen with ``kbitprep.plan(model, memory=...)`` / ``kbitprep.prepare(model,
memory=...)``, carried by the plan (``plan.extras["memory"]``) and installed by
:func:`apply_memory_modes`, a step of the core's atomic transaction (``kbitprep._mutation``): it
sets instance attributes (``forward`` and ``_replicate_for_data_parallel`` of the causal-LM module
and of its output head, and a state object), so a failing prepare and :func:`kbitprep.undo` remove
them exactly. Nothing in this package changes a model outside that step.

The package holds one concern a module:

* :mod:`.options`: the user's ``memory=`` choice and the named presets;
* :mod:`.planning`: where the modes go on a model, and the plan's entry and notes;
* :mod:`.chunked_loss`: the chunked causal-LM loss;
* :mod:`.offload`: the saved-tensor hooks and their per-forward sessions;
* :mod:`.forward`: the patched forwards and the transaction step that installs them;
* :mod:`.control`: reading and switching the installed modes at run time.
"""

from __future__ import annotations

from .chunked_loss import chunked_causal_lm_loss
from .control import full_logits, memory_modes, set_memory_modes
from .forward import apply_memory_modes, state_of
from .offload import OffloadHooks
from .options import (
    DEFAULT_CHUNK_TOKENS,
    MEMORY_PRESETS,
    OFFLOAD_MIN_BYTES,
    MemoryChoice,
    MemoryModes,
    preset_options,
    resolve_memory,
)
from .planning import memory_plan

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "MEMORY_PRESETS",
    "OFFLOAD_MIN_BYTES",
    "MemoryChoice",
    "MemoryModes",
    "OffloadHooks",
    "apply_memory_modes",
    "chunked_causal_lm_loss",
    "full_logits",
    "memory_modes",
    "memory_plan",
    "preset_options",
    "resolve_memory",
    "set_memory_modes",
    "state_of",
]
