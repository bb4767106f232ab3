"""TorchAO rows: int8 weight-only (Int8Tensor), int4 intx weight-only (IntxUnpackedToInt8Tensor) and
float8 weight-only (Float8Tensor), which train on the CPU.

The dynamic-activation configs (``Int8DynamicActivationInt8WeightConfig``,
``Int8DynamicActivationIntxWeightConfig``) cannot train: they quantize activations with ops that have no
autograd, so the gradient stops at every quantized layer. They are listed in :data:`NOT_TRAINABLE`
(the matrix in ``test_matrix.py`` only has rows that train); ``test_traps_torchao.py`` checks that
kbitprep refuses them up front, model unchanged, and that the refusal is true.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, TorchAoConfig

from ...tiny import saved_tiny_llama, tiny_llama
from ..case import BackendCase

#: What ``load_torchao`` / ``quantized_tiny_llama`` accept, with a one-line description.
KINDS = {
    "int8": "Int8WeightOnlyConfig (Int8Tensor)",
    "intx-int4": "IntxWeightOnlyConfig int4, PerGroup(32) (IntxUnpackedToInt8Tensor)",
    "float8": "Float8WeightOnlyConfig (Float8Tensor)",
    "int4-opaque": "PrototypeInt4WeightOnlyConfig, CPU int4 (Int4OpaqueTensor)",
    "dyn-int8": "Int8DynamicActivationInt8WeightConfig (Int8Tensor with act_quant_kwargs)",
    "dyn-intx": "Int8DynamicActivationIntxWeightConfig int4, PerGroup(32) (IntxUnpackedToInt8Tensor, activations int8)",
}


def torchao_config(kind: str) -> object:
    """The torchao config for one of :data:`KINDS`."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    if kind == "int8":
        return Int8WeightOnlyConfig()
    if kind == "intx-int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    if kind == "float8":
        return Float8WeightOnlyConfig()
    if kind == "dyn-int8":
        return Int8DynamicActivationInt8WeightConfig()
    if kind == "dyn-intx":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
    if kind == "int4-opaque":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=32)
    raise ValueError(f"unknown torchao kind {kind!r}; one of {sorted(KINDS)}")


def load_torchao(kind: str) -> torch.nn.Module:
    """A tiny Llama reloaded by transformers with ``TorchAoConfig`` for one of :data:`KINDS` (lm_head stays float)."""
    return AutoModelForCausalLM.from_pretrained(
        saved_tiny_llama(torch.bfloat16), quantization_config=TorchAoConfig(torchao_config(kind)), dtype=torch.bfloat16
    )


def quantized_tiny_llama(kind: str, *, head: bool = False) -> torch.nn.Module:
    """A tiny Llama quantized in place with ``torchao.quantization.quantize_`` (no ``TorchAoConfig``).

    ``head=False`` leaves ``lm_head`` unquantized (``filter_fn``), as users usually do.
    """
    from torchao.quantization import quantize_

    model = tiny_llama(torch.bfloat16)

    def linear_not_head(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and (head or fqn != "lm_head")

    quantize_(model, torchao_config(kind), filter_fn=linear_not_head)
    return model


CASES = [
    BackendCase(id="torchao-int8", backend="torchao", build=lambda: load_torchao("int8"), requires=("torchao",)),
    BackendCase(
        id="torchao-intx-int4",
        backend="torchao",
        build=lambda: load_torchao("intx-int4"),
        requires=("torchao",),
        notes="hf_quantizer.is_trainable says False here; it trains",
    ),
    BackendCase(
        id="torchao-float8",
        backend="torchao",
        build=lambda: load_torchao("float8"),
        requires=("torchao",),
        notes="Float8WeightOnlyConfig: weight-only, trains on the CPU",
    ),
]


#: Rows that kbitprep must refuse (``NotTrainableError`` up front, model unchanged): (id, build, reason
#: pattern). The matrix shows them as "refused" (see ``BackendCase.not_trainable``).
NOT_TRAINABLE: list[tuple[str, Callable[[], torch.nn.Module], str]] = [
    (
        "torchao-dyn-int8",
        lambda: load_torchao("dyn-int8"),
        r"quantize their input activations.*Int8DynamicActivationInt8WeightConfig.*Int8WeightOnlyConfig",
    ),
    (
        "torchao-dyn-intx",
        lambda: load_torchao("dyn-intx"),
        r"quantize their input activations.*Int8DynamicActivationIntxWeightConfig.*IntxWeightOnlyConfig",
    ),
    (
        "torchao-dyn-int8-quantize_",
        lambda: quantized_tiny_llama("dyn-int8"),
        r"quantize their input activations.*Int8DynamicActivationInt8WeightConfig",
    ),
    (
        "torchao-dyn-intx-quantize_",
        lambda: quantized_tiny_llama("dyn-intx"),
        r"quantize their input activations.*Int8DynamicActivationIntxWeightConfig",
    ),
]

# The two rows loaded through TorchAoConfig go into the matrix (detected, planned, refused with the model
# unchanged); the quantize_ variants are checked in test_traps_torchao.py.
CASES += [
    BackendCase(id=row_id, backend="torchao", build=build, requires=("torchao",), not_trainable=reason)
    for row_id, build, reason in NOT_TRAINABLE
    if not row_id.endswith("quantize_")
]
