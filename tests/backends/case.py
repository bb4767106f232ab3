"""One row of the per-backend test matrix: how to build a real quantized tiny model for a backend."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class BackendCase:
    """A backend variant exercised by ``test_matrix.py``.

    Attributes:
        id: the row label (``"bnb-4bit"``, ``"torchao-int8"`` ...).
        backend: the backend name kbitprep must detect.
        build: returns a *fresh* real quantized model each call (cache saved checkpoints, not models).
        requires: importable modules the row needs; missing ones skip the row with the reason.
        lora_targets: module names LoRA attaches to (PEFT ``target_modules``).
        peft_fails: a regular expression matching the error PEFT's own function raises on this model, or ``""``
            when PEFT's function succeeds (then parity is checked).
        stand_in: non-empty when part of the row is a stand-in (a kernel that cannot run here); the
            matrix prints it.
        context: returns a context manager every check of the row runs inside (e.g. one that
            installs the stand-in only for the duration of the test); ``None`` for none.
        train_dtype: autocast-free compute; inputs are token ids so no dtype is needed.
        notes: printed with the matrix.
        not_trainable: a regular expression the :class:`~kbitprep.NotTrainableError` message must match when
            kbitprep must refuse the model up front; the storage, train, undo and parity checks then assert
            the refusal (prepare and the drop-in, model unchanged) instead. ``""`` for rows that train.
    """

    id: str
    backend: str
    build: Callable[[], nn.Module]
    requires: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    peft_fails: str = ""
    stand_in: str = ""
    notes: str = ""
    not_trainable: str = ""
    context: Callable[[], AbstractContextManager[object]] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def entered(self) -> AbstractContextManager[object]:
        """The row's :attr:`context` (a fresh one), or a context that does nothing."""
        return self.context() if self.context is not None else nullcontext()
