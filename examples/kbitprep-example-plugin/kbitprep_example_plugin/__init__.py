"""kbitprep-example-plugin: bitsandbytes 4-bit with non-reentrant checkpointing by default.

kbitprep's built-in "bnb-4bit" checkpoints reentrantly, which needs a hook making the input
embeddings' output require grad. Adapters whose inputs do not come from the text embeddings (a
vision tower) get no gradient that way; non-reentrant checkpointing needs no hook, and is what TRL
uses by default. This backend specialises the built-in to choose it: it claims the same Linear4bit
modules with a higher priority, so the registry chooses it over "bnb-4bit", and it subclasses the
built-in, so the built-in's detection, storage declarations and fix-ups still apply.
"""

from __future__ import annotations

import dataclasses

from kbitprep.plugin import CheckpointMode, Declarations, Detection
from kbitprep_plugins.bitsandbytes import Bnb4bitBackend
from torch import nn

__all__ = ["NonReentrantBnb4bitBackend"]


class NonReentrantBnb4bitBackend(Bnb4bitBackend):
    """bitsandbytes 4-bit, non-reentrant checkpointing unless the user chooses otherwise."""

    name = "bnb-4bit-nonreentrant"
    priority = 110  # the built-in "bnb-4bit" has 100: same modules, so this one wins
    install_hint = "pip install kbitprep-example-plugin bitsandbytes"
    description = "bitsandbytes 4-bit, non-reentrant checkpointing by default"

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """The built-in's declarations, with non-reentrant checkpointing as the default mode."""
        builtin = super().declare(model, detection)
        if CheckpointMode.NON_REENTRANT not in builtin.checkpointing:
            return builtin  # keep the built-in's rules where non-reentrant does not work
        note = "non-reentrant checkpointing by default (kbitprep-example-plugin)"
        return dataclasses.replace(
            builtin, default_checkpointing=CheckpointMode.NON_REENTRANT, notes=(*builtin.notes, note)
        )
