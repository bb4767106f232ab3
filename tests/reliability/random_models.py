"""Random module trees for the property tests: a hypothesis strategy for recipes, and their builder.

A :class:`Recipe` is plain data (printed by hypothesis when an example fails); :func:`build` turns it
into a real model: nested containers (Sequential, ModuleList, ModuleDict, a custom block with float
and integer buffers), float layers in fp16 / bf16 / fp32, some frozen, tied parameters (one
Parameter object under two names), shared submodules (one module under two names), and quantized
layers built directly on the CPU with the real libraries: bitsandbytes ``Linear8bitLt`` and
``Linear4bit``, torchao ``quantize_(Int8WeightOnlyConfig())``, optimum-quanto ``quantize``/``freeze``
and hqq ``HQQLinear``. Libraries that are not installed are left out of the strategy.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

from . import layers
from .layers import FLOAT_KINDS, Leaf, attach, float_layer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_QUANT_LIBS = {
    "bnb8": "bitsandbytes",
    "bnb4": "bitsandbytes",
    "torchao": "torchao",
    "quanto": "optimum.quanto",
    "hqq": "hqq",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


#: the quantized layer kinds whose library is importable here
QUANT_KINDS = tuple(k for k, lib in _QUANT_LIBS.items() if _installed(lib))
CONTAINERS = ("sequential", "modulelist", "moduledict", "block")
QUANT_WIDTH = 64  # hqq groups of 64; bnb 4-bit blocks of 64


@dataclass(frozen=True)
class Recipe:
    """A random model: containers (each with its parent), leaves (each with its container), the
    leaves inserted a second time elsewhere (shared), the pairs of leaves whose weights are tied,
    the upcast policy to prepare with, and the seed of the weights."""

    containers: tuple[tuple[str, int], ...]  # (kind, parent index); index 0 is the root block
    leaves: tuple[tuple[Leaf, int], ...]  # (leaf, container index)
    shared: tuple[tuple[int, int], ...]  # (leaf index, another container index)
    ties: tuple[tuple[int, int], ...]  # (leaf index, leaf index): the second takes the first's weight
    policy: str
    seed: int

    @property
    def quantized_kinds(self) -> set[str]:
        """Kinds of quantized layers in the model."""
        return {leaf.kind for leaf, _ in self.leaves if leaf.kind in QUANT_KINDS}


def _leaves(quantized: bool) -> st.SearchStrategy[Leaf]:
    kinds = FLOAT_KINDS + (QUANT_KINDS if quantized else ())
    return st.builds(
        Leaf,
        kind=st.sampled_from(kinds),
        dtype=st.sampled_from(tuple(DTYPES)),
        width=st.sampled_from((16, QUANT_WIDTH)),
        bias=st.booleans(),
        frozen=st.booleans(),
    )


@st.composite
def recipes(draw: st.DrawFn, quantized: bool = True) -> Recipe:
    """Random recipes: up to 4 containers, 2-7 layers, up to 2 shared layers and 2 ties."""
    n_containers = draw(st.integers(1, 4))
    containers = [("block", 0)] + [
        (draw(st.sampled_from(CONTAINERS)), draw(st.integers(0, i - 1))) for i in range(1, n_containers)
    ]
    n_leaves = draw(st.integers(2, 7))
    leaf = _leaves(quantized)
    leaves = [(draw(leaf), draw(st.integers(0, n_containers - 1))) for _ in range(n_leaves)]
    idx = st.integers(0, n_leaves - 1)
    shared = draw(st.lists(st.tuples(idx, st.integers(0, n_containers - 1)), max_size=2))
    ties = draw(st.lists(st.tuples(idx, idx), max_size=2))
    policy = draw(st.sampled_from(("none", "norms", "all")))
    return Recipe(tuple(containers), tuple(leaves), tuple(shared), tuple(ties), policy, draw(st.integers(0, 2**16)))


class Block(layers.Block):
    """The custom container (:class:`.layers.Block`), its non-persistent buffer named ``cache``."""

    SCRATCH = "cache"


def _quantized(kind: str, leaf: Leaf) -> nn.Module:
    dtype = DTYPES[leaf.dtype] if leaf.dtype != "fp32" else torch.bfloat16
    w = QUANT_WIDTH
    if kind in ("bnb8", "bnb4"):
        import bitsandbytes as bnb

        if kind == "bnb8":
            layer = bnb.nn.Linear8bitLt(w, w, bias=leaf.bias, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(w, w, bias=leaf.bias, compute_dtype=dtype, quant_type="nf4")
        layer = layer.to("cpu")  # quantizes the weight (Int8Params int8 / Params4bit uint8)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dtype)
        return layer
    holder = nn.Sequential(nn.Linear(w, w, bias=leaf.bias, dtype=dtype))
    if kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(holder, Int8WeightOnlyConfig())
        return holder[0]
    if kind == "quanto":
        from optimum.quanto import freeze, qint8, quantize

        quantize(holder, weights=qint8)
        freeze(holder)
        return holder[0]
    if kind == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=4, group_size=64)
        config["weight_quant_params"]["optimize"] = False  # the optimiser is slow on CPU and irrelevant here
        return HQQLinear(holder[0], config, compute_dtype=dtype, device="cpu")
    raise ValueError(kind)


def _leaf(leaf: Leaf) -> nn.Module:
    if leaf.kind in QUANT_KINDS:
        return _quantized(leaf.kind, leaf)
    module = float_layer(leaf.kind, leaf.width, DTYPES[leaf.dtype], leaf.bias)
    if leaf.frozen:
        module.requires_grad_(False)
    return module


def _new_container(kind: str) -> nn.Module:
    return {"sequential": nn.Sequential, "modulelist": nn.ModuleList, "moduledict": nn.ModuleDict, "block": Block}[
        kind
    ]()


@dataclass
class Built:
    """A built model and what the recipe made of it."""

    model: nn.Module
    tie_groups: list[list[str]]  # parameter names that must stay one object
    shared_groups: list[list[str]]  # module names that must stay one object


def build(recipe: Recipe) -> Built:
    """Build the model of ``recipe`` (deterministic for a given recipe)."""
    torch.manual_seed(recipe.seed)
    containers = [_new_container(kind) for kind, _ in recipe.containers]
    for i, (_, parent) in enumerate(recipe.containers[1:], start=1):
        attach(containers[parent], containers[i], f"c{i}")
    leaves = [_leaf(leaf) for leaf, _ in recipe.leaves]
    for i, (_, where) in enumerate(recipe.leaves):
        attach(containers[where], leaves[i], f"l{i}")
    for j, (i, where) in enumerate(recipe.shared):
        attach(containers[where], leaves[i], f"s{j}")
    for a, b in recipe.ties:
        wa, wb = getattr(leaves[a], "weight", None), getattr(leaves[b], "weight", None)
        plain = all(
            isinstance(w, nn.Parameter)
            and type(w) is nn.Parameter
            and type(w.data) is torch.Tensor
            and w.dtype.is_floating_point
            for w in (wa, wb)
        )
        if a != b and plain and wa.shape == wb.shape:  # type: ignore[union-attr]
            leaves[b].weight = wa
    model = containers[0]
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    mods: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        mods.setdefault(id(m), []).append(name)
    return Built(
        model,
        [names for names in by_id.values() if len(names) > 1],
        [names for names in mods.values() if len(names) > 1],
    )
