"""PEFT's LoRA layer for ``toyquant.ToyInt8Linear``, following PEFT's "custom models" guide.

PEFT has no LoRA layer for a class it does not know and refuses it (``ValueError: Target module
... is not supported``). This module imports PEFT; the plugin imports it only when a LoRA config
is built (``Declarations.lora_layers``), so installing the plugin does not need PEFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

if TYPE_CHECKING:
    from toyquant import ToyInt8Linear

__all__ = ["ToyInt8LoraLinear"]


class ToyInt8LoraLinear(nn.Module, LoraLayer):  # type: ignore[misc]
    """LoRA on a ``ToyInt8Linear``: ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` per active adapter.

    The int8 base layer stays as it is (no merging: the sum of an int8 weight and a float update
    is not an int8 weight); the adapters are ordinary ``nn.Linear`` layers, made by PEFT's own
    ``update_layer``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        if config.lora_bias:
            raise ValueError(f"{type(self).__name__} does not support lora_bias; set it to False")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup warns about an "unsupported layer type"; this one is supported here.
        layer = cast("ToyInt8Linear", module)
        return layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus each active adapter's low-rank update."""
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = cast(nn.Linear, self.lora_A[name]), self.lora_B[name]
            h = self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))
            result = result + lora_b(lora_a(h)) * self.scaling[name]
        return result.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not supported: an int8 weight cannot absorb a float update exactly."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge adapters into an int8 weight")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
