"""An EETQ tiny Llama on a CPU: transformers' real ``EetqLinear`` layers around a stand-in kernel.

EETQ cannot be installed here (its only wheel is CUDA-only, and transformers fetches its kernel
through the ``kernels`` hub). What is real: transformers' ``EetqLinear`` module, its
``EetqLinearMMFunction`` (forward and backward), the quantizer objects and flags transformers sets,
PEFT's ``EetqLoraLinear`` and the kbitprep plugin. What is stood in, only inside
:func:`eetq_stand_in`:

* the CUDA kernel ``w8_a16_gemm(x, w, s)``: on the CPU, ``x @ (w.to(x.dtype) * s.to(x.dtype))``
  for fp16 ``x`` (the real kernel reads fp16 activations), installed as
  ``transformers.integrations.eetq.eetq_kernels_hub``;
* an importable ``eetq`` package, because PEFT's LoRA dispatcher wraps ``EetqLinear`` only when
  ``import eetq`` works (``peft.import_utils.is_eetq_available``, cached, and a module-level
  ``if`` in ``peft.tuners.lora.eetq``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator

import torch
from torch import nn

from ..tiny import saved_tiny_llama

#: What the matrix prints for the EETQ row.
STAND_IN = (
    "EETQ's CUDA kernel w8_a16_gemm (CPU matmul: x @ (int8 weight * scales)) and an importable `eetq` module "
    "for PEFT's LoRA dispatcher, installed only for the duration of each test; EetqLinear, its autograd "
    "Function, PEFT's EetqLoraLinear and the kbitprep plugin are real"
)


def w8_a16_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """CPU stand-in for EETQ's kernel: ``x [..., in] @ (weight [in, out] int8 * scales [out])``.

    Like the real kernel (``w8_a16_gemm_forward_cuda(const half* input, ...)``) it takes fp16
    activations only.
    """
    if x.dtype != torch.float16:
        raise TypeError(f"w8_a16_gemm takes float16 activations, got {x.dtype}")
    return x @ (weight.to(x.dtype) * scales.to(x.dtype))


class StandInEetqLinear(nn.Module):
    """The stand-in ``eetq`` module's ``EetqLinear`` (PEFT imports the name; never instantiated)."""


@contextlib.contextmanager
def eetq_stand_in() -> Iterator[None]:
    """Install the stand-in kernel and ``eetq`` package; on exit, put everything back exactly."""
    import peft.import_utils as peft_imports
    import peft.tuners.lora.eetq as peft_lora_eetq
    import transformers.integrations.eetq as hf_eetq

    if "eetq" in sys.modules or importlib.util.find_spec("eetq") is not None:
        raise RuntimeError("a real `eetq` package is importable: the stand-in would shadow it")
    saved_lora_eetq = dict(vars(peft_lora_eetq))
    saved_kernel = vars(hf_eetq).get("eetq_kernels_hub", _MISSING)
    fake = types.ModuleType("eetq", "Stand-in for the eetq package (kbitprep tests only).")
    fake.__spec__ = importlib.machinery.ModuleSpec("eetq", loader=None)
    fake.EetqLinear = StandInEetqLinear  # type: ignore[attr-defined]
    sys.modules["eetq"] = fake
    try:
        peft_imports.is_eetq_available.cache_clear()
        importlib.reload(peft_lora_eetq)  # defines EetqLoraLinear / eetq_classes now that eetq "exists"
        hf_eetq.eetq_kernels_hub = types.SimpleNamespace(w8_a16_gemm=w8_a16_gemm)  # type: ignore[attr-defined]
        yield
    finally:
        sys.modules.pop("eetq", None)
        peft_imports.is_eetq_available.cache_clear()
        vars(peft_lora_eetq).clear()
        vars(peft_lora_eetq).update(saved_lora_eetq)
        if saved_kernel is _MISSING:
            vars(hf_eetq).pop("eetq_kernels_hub", None)
        else:
            hf_eetq.eetq_kernels_hub = saved_kernel  # type: ignore[attr-defined]


_MISSING = object()


def quantize_linear(linear: nn.Linear) -> nn.Module:
    """An ``EetqLinear`` holding ``linear``'s weight as EETQ stores it: symmetric per-output-channel
    int8, transposed to ``[in, out]``, with fp16 scales (what ``eetq_kernels_hub.quant_weights`` makes)."""
    from transformers.integrations.eetq import EetqLinear

    w = linear.weight.detach().float()  # [out, in]
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-8)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    layer = EetqLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    layer.weight.data = q.t().contiguous()
    layer.weight_scales.data = scales.to(torch.float16)
    if linear.bias is not None:
        layer.bias.data = linear.bias.detach().to(torch.float16)
    return layer


def eetq_llama() -> nn.Module:
    """A fresh fp16 tiny Llama whose linear layers (not ``lm_head``) are ``EetqLinear``, flagged as
    transformers flags an EETQ model (``is_quantized``, ``quantization_method``, ``hf_quantizer``,
    ``config.quantization_config``)."""
    from transformers import AutoModelForCausalLM, EetqConfig
    from transformers.quantizers.quantizer_eetq import EetqHfQuantizer

    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama(torch.float16), dtype=torch.float16)
    config = EetqConfig()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            model.set_submodule(name, quantize_linear(mod))
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.hf_quantizer = EetqHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    model.config._is_quantized = True
    return model
