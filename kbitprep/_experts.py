"""Mixture-of-experts layers: the fused expert weights and the routers of a model.

transformers stores the experts of most MoE families (Mixtral, Qwen MoE, DeepSeek, GPT-OSS ...) as
fused 3-D parameters (``experts x out x in``, or transposed) that one grouped matmul uses, not as
``nn.Linear`` layers. Quantization integrations convert ``nn.Linear`` layers only, so those
weights stay in the loaded float dtype, and PEFT reaches them only through ``target_parameters``.
A router (the module choosing the experts of each token) is a module whose class name ends in
``Router`` (``MixtralTopKRouter``, ``Llama4Router`` ...).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["expert_parameters", "fused_expert_figures", "fused_expert_text", "router_modules"]


def _is_fused_expert(mod: nn.Module, p: nn.Parameter) -> bool:
    """A floating-point parameter of 3 or more dimensions outside a convolution (whose kernels are 3-D+ too)."""
    return p.dim() >= 3 and p.dtype.is_floating_point and not isinstance(mod, nn.modules.conv._ConvNd)


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The fused expert weights of ``model``: its floating-point parameters of 3 or more dimensions
    outside convolution layers (whose kernels are 3-D+ too, and not experts), by qualified name,
    tied ones once, in model order."""
    found: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for local, p in mod.named_parameters(recurse=False):
            if _is_fused_expert(mod, p) and id(p) not in seen:
                seen.add(id(p))
                found.append((f"{mod_name}.{local}" if mod_name else local, p))
    return found


def fused_expert_figures(modules: Iterable[nn.Module]) -> tuple[int, int, int]:
    """``(count, bytes, all bytes)``: the fused expert weights among the parameters of ``modules`` (each
    module's own, not its children's; tied ones once), their bytes, and the bytes of every parameter
    there, as stored (a loaded quantized model: its quantized storage)."""
    every: dict[int, nn.Parameter] = {}
    fused: dict[int, nn.Parameter] = {}
    for mod in modules:
        for p in mod.parameters(recurse=False):
            every[id(p)] = p
            if _is_fused_expert(mod, p):
                fused[id(p)] = p
    return (
        len(fused),
        sum(p.numel() * p.element_size() for p in fused.values()),
        sum(p.numel() * p.element_size() for p in every.values()),
    )


def fused_expert_text(count: int, fused_bytes: int, total_bytes: int, integration: str) -> str:
    """The note for ``count`` fused expert weights of ``fused_bytes`` among ``total_bytes`` loaded bytes."""
    return (
        f"{count} fused expert weights (3-D parameters, {100 * fused_bytes / max(total_bytes, 1):.0f}% of the "
        f"loaded bytes) stay in full precision: transformers' {integration} integration converts nn.Linear layers "
        "only, so this model is only partly quantized"
    )


def router_modules(model: nn.Module) -> list[str]:
    """Qualified names of the routers of ``model`` (modules whose class name ends in ``Router``), outermost only."""
    names: list[str] = []
    for name, mod in model.named_modules():
        if name and type(mod).__name__.endswith("Router") and not inside(name, names):
            names.append(name)
    return names


def inside(name: str, roots: Iterable[str]) -> bool:
    """Whether the module or parameter ``name`` is one of ``roots`` or lies inside one."""
    return any(name == r or name.startswith(f"{r}.") for r in roots)
