"""Checkpoints saved after prepare say what the loaded model said: no training-only setting leaks.

Prepare turns ``use_cache`` off on the model's configs (the KV cache is useless in training and
conflicts with checkpointing). ``save_pretrained`` writes the config as it is, so a checkpoint saved
after prepare (the prepared model's, or a merged one: PEFT's ``merge_and_unload`` returns the prepared
model) would say ``"use_cache": false`` and a plain forward of the reloaded model would return no
cache. :class:`SavesAsLoaded`, set by prepare as the instance ``save_pretrained`` of every transformers
model in the prepared model, puts the loaded values back for the length of the save. Undo removes it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["SavesAsLoaded", "guard_saves"]

_LOCK = threading.RLock()


class SavesAsLoaded:
    """Instance ``save_pretrained`` of a transformers model: saves with the configs' loaded ``use_cache``."""

    def __init__(self, module: nn.Module, loaded: Sequence[tuple[Any, Any]]) -> None:
        self.module = module
        self.loaded = list(loaded)  # (config, use_cache as loaded)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            now = [(cfg, cfg.use_cache) for cfg, _ in self.loaded]
            for cfg, value in self.loaded:
                cfg.use_cache = value
            try:
                return type(self.module).save_pretrained(self.module, *args, **kwargs)  # type: ignore[attr-defined]
            finally:
                for cfg, value in now:
                    cfg.use_cache = value


def guard_saves(model: nn.Module, loaded: Sequence[tuple[Any, Any]]) -> None:
    """Set :class:`SavesAsLoaded` on every transformers model inside ``model`` (the root included)."""
    if not loaded:
        return
    for mod in model.modules():
        if callable(getattr(type(mod), "save_pretrained", None)) and hasattr(mod, "config"):
            mod.__dict__["save_pretrained"] = SavesAsLoaded(mod, loaded)
