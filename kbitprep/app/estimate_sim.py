"""One simulated training step on fake tensors, with every allocation and free tracked.

The model a transformers config describes is built on the meta device, its parameters are
replaced by fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and strides, no
storage), and then one real training step runs on it: the real transformers forward (attention,
rotary embeddings, the loss), PEFT's real LoRA layers, transformers' checkpointing, kbitprep's real
memory modes, a real ``torch.optim.AdamW`` step. A ``TorchDispatchMode`` sees every aten op and
records the bytes of every new tensor storage; a weak reference on each storage records when it
is freed. The peak of the live bytes is the estimate.

What is not the real code:

* the quantized linears: a stand-in module (a subclass of the backend's module class where there
  is one, so PEFT wraps it as it wraps the real one) holding the scheme's storage bytes, whose
  forward and backward allocate what the backend allocates: bitsandbytes 4-bit on CUDA dequantizes
  the weight (compute dtype) and its absmax (fp32) when the rows exceed 1536 (its fused kernel
  serves fewer rows and allocates only the output), and always in the backward; torchao keeps the
  weight it dequantized for the backward; hqq and optimum-quanto keep the layer's input. Each
  scheme's stand-in was checked against a real tracked CPU step (``benchmarks/estimate_check.py``);
  where the GPU kernels take another path (:data:`GPU_UNVERIFIED`) the figures say so. Layers the
  integration does not convert stay float: bitsandbytes converts ``nn.Linear`` itself only (not
  ``Llama4Router``), no integration converts the fused 3-D expert weights of MoE models (a note
  gives their share), and layers whose weight the model code reads directly (Mamba's ``dt_proj``)
  are estimated unquantized, with a note on how to load them so;
* the device: fake tensors live on a fake CPU, with CPU autocast standing in for CUDA autocast
  (CUDA's thread-local autocast flag, which ``torch.is_autocast_enabled()`` without a device reads
  and PEFT's bitsandbytes layer asks, is set to match while simulating a GPU); attention is torch's
  fused SDPA (the CPU flash kernel: the same saved tensors as the CUDA flash kernel, output and
  log-sum-exp);
* offloading: kbitprep's real offload hooks run (which tensors go, each storage once, what stays
  for the backward); their copy to the host allocates nothing on the device and their copy back
  allocates the region again;
* the grouped expert matmul (``aten._grouped_mm``) of MoE layers: its fake-tensor rule accepts
  bf16 only (CUDA's fast path), while the op runs in any float dtype (fp32 experts after PEFT's
  upcast take CUDA's per-group fallback); the tracker gives it its output, the only allocation;
* state-space layers (Mamba, Mamba-2) run transformers' torch path: the fused kernels of
  ``mamba_ssm`` / ``causal-conv1d``, used where those packages are installed, are not simulated.

Kernels' internal workspaces (cuBLAS, flash attention's backward accumulators) are not visible;
nor is the caching allocator's rounding (512 bytes a block).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

__all__ = ["SimResult", "StepTracker", "expert_note", "simulate"]

#: bitsandbytes' CUDA gemm_4bit uses its fused kernel up to this many rows; beyond, dequantize + linear.
BNB_FUSED_MAX_ROWS = 1536

PARTS = ("weights", "adapters", "activations", "logits_loss", "transient")

#: Schemes whose stand-ins match a real tracked CPU step but whose GPU kernels take another path,
#: which the CPU cannot show: their GPU figures are unverified, for the reason given.
GPU_UNVERIFIED = {
    "bnb-8bit": (
        "bitsandbytes LLM.int8 runs int8 matmuls on CUDA (activations quantized per row, outlier columns "
        "in fp16, its own saved state); on the CPU, which the stand-in matches, it dequantizes the weight"
    ),
    "quanto-int8": (
        "optimum-quanto uses CUDA int8 matmul kernels where the CPU, which the stand-in matches, dequantizes the weight"
    ),
    "quanto-int4": (
        "optimum-quanto repacks int4 weights for CUDA kernels (Marlin / TinyGemm / AWQ layouts) where the CPU, "
        "which the stand-in matches, dequantizes the weight"
    ),
}


# --------------------------------------------------------------------------- the tracker


class StepTracker(TorchDispatchMode):
    """Tracks the live bytes of tensor storages, by op outputs and weak references.

    Storages that exist before the tracker starts are registered with :meth:`register`. Every
    storage gets a serial number; the allocation and free "times" (op counters) are logged so the
    live set at the peak can be reconstructed and split into parts afterwards.

    Attributes:
        vocab: tensors with a dimension of this size count as logits / loss tensors.
    """

    def __init__(self, vocab: int = 0, fake: bool = False) -> None:
        super().__init__()
        self.vocab = vocab
        self.fake = fake
        self.clock = 0
        self.live: dict[int, int] = {}  # storage cdata -> serial
        self.nbytes: list[int] = []
        self.born: list[int] = []
        self.died: list[int] = []
        self.tags: list[str] = []
        self.total = 0
        self.peak = 0
        self.peak_clock = 0
        self.saved: set[int] = set()
        self.largest_alloc = 0
        self.enabled = True

    # storages -------------------------------------------------------------
    def register(self, t: torch.Tensor, tag: str = "") -> int | None:
        """Start tracking ``t``'s storage (if not tracked yet); returns its serial.

        A tensor subclass that wraps plain tensors (torchao's and optimum-quanto's quantized weights,
        which report a float dtype and shape) is tracked by the storages it really holds: its inner
        tensors (the serial returned is the first one's).
        """
        if not isinstance(t, torch.Tensor) or t.is_sparse:
            return None
        if is_traceable_wrapper_subclass(t) and not self.fake:
            inner, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
            serials = [self.register(getattr(t, name), tag) for name in inner]
            return next((s for s in serials if s is not None), None)
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return None
        key = st._cdata
        serial = self.live.get(key)
        if serial is not None:
            if tag and not self.tags[serial]:
                self.tags[serial] = tag
            return serial
        n = int(st.nbytes())
        serial = len(self.nbytes)
        self.live[key] = serial
        self.nbytes.append(n)
        self.born.append(self.clock)
        self.died.append(-1)
        if not tag and self.vocab and self.vocab in tuple(t.shape) and t.dim() >= 1 and t.numel() > self.vocab:
            tag = "logits_loss"
        self.tags.append(tag)
        weakref.finalize(st, self._free, key, serial)
        self.total += n
        if not tag:
            self.largest_alloc = max(self.largest_alloc, n)
        if self.total > self.peak:
            self.peak = self.total
            self.peak_clock = self.clock
        return serial

    def _free(self, key: int, serial: int) -> None:
        if self.live.get(key) == serial:
            del self.live[key]
        self.clock += 1
        self.died[serial] = self.clock
        self.total -= self.nbytes[serial]

    def tag(self, t: torch.Tensor, tag: str) -> None:
        """Tag the storage of ``t`` (registering it if needed)."""
        serial = self.register(t)
        if serial is not None:
            self.tags[serial] = tag

    # the dispatch mode ----------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.fake and func is torch.ops.aten.nonzero.default:
            # data-dependent: on fake tensors every element counts (the chunked head's kept tokens: all of them)
            x = args[0]
            out = torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        elif self.fake and func is torch.ops.aten._grouped_mm.default:
            out = _grouped_mm_output(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        if self.enabled:
            self.clock += 1
            for t in _tensors(out):
                self.register(t)
        return out

    @contextlib.contextmanager
    def saved_hooks(self) -> Iterator[None]:
        """Record which storages autograd saves for backward (outermost hooks; inner hooks win)."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            serial = self.register(t)
            if serial is not None:
                self.saved.add(serial)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def parts_at_peak(self) -> dict[str, int]:
        """The live bytes at the peak, split into :data:`PARTS`."""
        parts = dict.fromkeys(PARTS, 0)
        when = self.peak_clock
        for serial, n in enumerate(self.nbytes):
            if self.born[serial] <= when and (self.died[serial] == -1 or self.died[serial] > when):
                tag = self.tags[serial]
                if tag not in parts:
                    tag = "activations" if serial in self.saved else "transient"
                parts[tag] += n
        return parts


def _grouped_mm_output(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The output of ``aten._grouped_mm`` (the grouped expert matmul of transformers' MoE layers) on fake tensors.

    Its fake-tensor rule checks the CUDA fast path's requirement (bf16 operands), but the op runs in
    every float dtype: CUDA falls back to one matmul per group into slices of the output, the CPU
    kernel too; fp32 experts (PEFT's upcast) go that way. Either way it allocates its output only,
    in ``out_dtype`` or the operands' dtype.
    """
    a2, b2 = mat_a.dim() == 2, mat_b.dim() == 2
    if a2 and b2:  # the weight gradient: one (m, n) block per group
        assert offs is not None
        size = [offs.shape[0], mat_a.shape[0], mat_b.shape[1]]
    elif a2:  # tokens x experts' weights
        size = [mat_a.shape[0], mat_b.shape[-1]]
    elif b2:
        size = [mat_a.shape[1], mat_b.shape[1]]
    else:
        size = [mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1]]
    return torch.empty(size, dtype=out_dtype or mat_a.dtype, device=mat_a.device)


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                yield o


# --------------------------------------------------------------------------- quantized stand-ins


class _DequantMatmul(torch.autograd.Function):
    """``x @ W.T`` where ``W`` is dequantized from storage: allocates what the backend allocates."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, spec: _QuantSpec) -> torch.Tensor:  # type: ignore[override]
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        rows = x.numel() // max(1, x.shape[-1])
        if spec.fused_max_rows and rows <= spec.fused_max_rows:
            return x.new_empty((*x.shape[:-1], spec.out_features))
        w = spec.dequantize(x.dtype, x.device)
        out: torch.Tensor = torch.nn.functional.linear(x, w)
        if spec.saves_input:  # saved whether or not anything needs it
            ctx.save_for_backward(x)
        elif spec.saves_weight:  # the dequantized weight stays for the backward (autograd saved it)
            scale = x.new_empty((spec.out_features, 1)) if spec.row_scale else None
            if scale is not None:  # y = (x @ W_int8.T) * scale: a second output, the scale saved too
                out = out * scale.view(-1)
            ctx.save_for_backward(w, *(() if scale is None else (scale,)))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        spec: _QuantSpec = ctx.spec
        if spec.saves_weight:
            w = ctx.saved_tensors[0]
            if spec.row_scale:
                grad = grad * ctx.saved_tensors[1].view(-1)
            return torch.matmul(grad, w), None, None
        w = spec.dequantize(spec.compute_dtype or grad.dtype, grad.device)
        if w.dtype != grad.dtype:
            w = w.to(grad.dtype)
        return torch.matmul(grad, w), None, None


@dataclass
class _QuantSpec:
    out_features: int
    in_features: int
    compute_dtype: torch.dtype | None
    absmax_blocks: int  # fp32 absmax dequantized first (bnb double quantization), 0: none
    fused_max_rows: int  # rows served by a fused kernel that allocates only its output (0: never)
    saves_weight: bool = False  # the forward's dequantized weight is saved for the backward (torchao)
    saves_input: bool = False  # the input is saved for the backward (optimum-quanto)
    row_scale: bool = False  # the output is scaled per row after the matmul, the scale saved (torchao int8)

    def dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.absmax_blocks:
            absmax = torch.empty(self.absmax_blocks, dtype=torch.float32, device=device)
        w = torch.empty((self.out_features, self.in_features), dtype=dtype, device=device)
        if self.absmax_blocks:
            del absmax
        return w


def _stand_in_class(scheme_name: str) -> type[nn.Module]:
    if scheme_name == "bnb-4bit":
        try:
            import bitsandbytes as bnb

            base: type[nn.Module] = bnb.nn.Linear4bit  # type: ignore[attr-defined]
        except ImportError:  # pragma: no cover - bitsandbytes is an optional dependency
            base = nn.Linear
    else:
        base = nn.Linear
    return type(f"Simulated{base.__name__}", (base,), {"forward": _stand_in_forward, "__init__": _stand_in_init})


def _stand_in_init(self: nn.Module, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
    raise TypeError("built by _make_stand_in")


def _stand_in_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    spec: _QuantSpec = self._kbitprep_spec
    inp_dtype = x.dtype
    if spec.compute_dtype is not None and x.dtype != spec.compute_dtype:
        x = x.to(spec.compute_dtype)
    out: torch.Tensor = _DequantMatmul.apply(x, self.weight, spec)
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out.to(inp_dtype) if out.dtype != inp_dtype else out


def _make_stand_in(linear: nn.Linear, scheme: Any, dtype: torch.dtype, target: str) -> nn.Module:
    cls = _stand_in_class(scheme.name)
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    out_f, in_f = linear.out_features, linear.in_features
    fbytes = torch.empty((), dtype=dtype).element_size()
    data, extra = scheme.weight_bytes(out_f, in_f, fbytes)
    with torch.device("meta"):
        weight = nn.Parameter(torch.empty(data, dtype=torch.uint8), requires_grad=False)
        state = torch.empty(extra, dtype=torch.uint8)
        bias = nn.Parameter(torch.empty(out_f, dtype=dtype), requires_grad=False) if linear.bias is not None else None
    bnb4 = scheme.name == "bnb-4bit"
    backend = str(getattr(scheme, "backend", ""))
    torchao = backend == "torchao" or scheme.name.startswith("torchao-")
    weight.compress_statistics = True  # type: ignore[attr-defined]
    weight.quant_type = "nf4"  # type: ignore[attr-defined]
    mod.weight = weight
    mod.bias = bias
    mod.register_buffer("quant_state_bytes", state)
    attrs: Any = mod
    attrs.in_features, attrs.out_features = in_f, out_f
    attrs.compute_dtype = dtype
    attrs._kbitprep_spec = _QuantSpec(
        out_f,
        in_f,
        dtype,
        absmax_blocks=math.ceil(out_f * in_f / 64) if bnb4 else 0,
        # bitsandbytes' CPU kernel (and its fused CUDA kernel up to 1536 rows) allocates only its output
        fused_max_rows=(BNB_FUSED_MAX_ROWS if target == "cuda" else sys.maxsize) if bnb4 else 0,
        # torchao's weight-only tensors dequantize in the forward with plain ops (the same on any device):
        # F.linear / mm saves that weight for the backward; Int8Tensor scales the output per row
        saves_weight=torchao,
        # optimum-quanto's QuantizedLinearFunction and hqq's HQQMatmulNoCache* save the input for the backward
        saves_input=backend in ("quanto", "hqq") or scheme.name.startswith(("quanto-", "hqq-")),
        row_scale=torchao and scheme.name == "torchao-int8",
    )
    return mod


# --------------------------------------------------------------------------- offload


@dataclass
class _SimSaveOnCpu:
    """Duck-typed :class:`kbitprep._memory.OffloadHooks` doing what ``torch.autograd.graph.save_on_cpu``
    does: every saved tensor (parameters too) goes to the host; the unpack allocates it on the device again."""

    packed: int = 0
    offloaded: int = 0
    offloaded_bytes: int = 0
    peak_host_bytes: int = 0

    def pack(self, t: torch.Tensor) -> Any:
        self.packed += 1
        n = t.numel() * t.element_size()
        self.offloaded += 1
        self.offloaded_bytes += n
        self.peak_host_bytes = self.offloaded_bytes
        return ("host", t.shape, t.stride(), t.dtype, t.device)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple) and packed and packed[0] == "host":
            _, shape, stride, dtype, device = packed
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return packed  # type: ignore[no-any-return]

    def context(self) -> contextlib.AbstractContextManager[None]:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _HostBytes:
    """Stands for a host copy: not a tensor, so it is not counted as device memory."""

    def __init__(self, n: int) -> None:
        self.n = n


def _fake_offload_hooks() -> Any:
    """kbitprep's real ``OffloadHooks`` with ``force_copy`` (fake CPU tensors stand for CUDA ones), taking a
    fake tensor wherever it takes a plain one, with its two copies simulated (through the hooks' own
    override points, so an offload run elsewhere in the process keeps its real copies): the copy to
    the host frees nothing by itself and allocates nothing on the device; the copy back allocates the
    span on the device once, kept while its saved tensors unpack (as on CUDA)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from .._memory import OffloadHooks

    class SimulatedCopies(OffloadHooks):
        def other_offload(self, module: nn.Module) -> str:
            return ""  # the estimate's own tracker hooks are around the step: not an offload

        def copy_to_host(self, src: torch.Tensor) -> tuple[Any, Any]:
            return _HostBytes(src.numel() * src.element_size()), None

        def copy_to_device(self, span: Any) -> torch.Tensor:
            if span.cached is None:
                span.cached = torch.empty(span.hi - span.lo, dtype=torch.uint8, device=span.device)
            cached: torch.Tensor = span.cached
            return cached

    return SimulatedCopies(force_copy=True, plain_types=(torch.Tensor, FakeTensor))


# --------------------------------------------------------------------------- building the fake model


def _fakify(model: nn.Module, mode: Any) -> None:
    """Replace every meta parameter and buffer by a fake CPU tensor of the same shape and dtype (ties kept)."""
    memo: dict[int, Any] = {}
    with mode:
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                new = memo.get(id(p))
                if new is None:
                    new = nn.Parameter(
                        torch.empty_strided(p.shape, p.stride(), dtype=p.dtype), requires_grad=p.requires_grad
                    )
                    memo[id(p)] = new
                mod._parameters[name] = new
            for name, b in list(mod._buffers.items()):
                if b is None or b.device.type != "meta":
                    continue
                newb = memo.get(id(b))
                if newb is None:
                    newb = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype)
                    memo[id(b)] = newb
                mod._buffers[name] = newb


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _cast_params(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast the named (meta) parameters (tied ones once) to the given float dtypes."""
    done: dict[int, nn.Parameter] = {}
    with torch.device("meta"):
        for mod_name, mod in model.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is None:
                    continue
                full = f"{mod_name}.{pname}" if mod_name else pname
                if id(p) in done:
                    mod._parameters[pname] = done[id(p)]
                    continue
                want = dtypes.get(full)
                if want is not None and want != p.dtype and p.dtype.is_floating_point:
                    new = nn.Parameter(p.detach().to(want), requires_grad=p.requires_grad)
                    done[id(p)] = new
                    mod._parameters[pname] = new


#: Set (to the simulated target) only inside :func:`_simulation_patches`: the wrappers installed in
#: ``transformers.masking_utils`` answer differently only where it is set, so other threads (and other
#: contexts of this one) keep the originals' behaviour while an estimate runs.
_SIMULATING: contextvars.ContextVar[str | None] = contextvars.ContextVar("kbitprep_simulating", default=None)
_INSTALL_LOCK = threading.Lock()


def _install_mask_wrappers() -> None:
    """Wrap transformers' two mask helpers the simulation changes, once per process (idempotent).

    Outside a simulation (``_SIMULATING`` unset, in whatever thread) each wrapper calls the original
    with the same arguments and returns what it returns.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is needed to build the model anyway
        return
    with _INSTALL_LOCK:
        current = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
        if current is not None and not getattr(current, "_kbitprep_wrapper", False):
            original_ignore = current
            try:
                signature = inspect.signature(original_ignore)
            except (TypeError, ValueError):  # pragma: no cover - other transformers versions
                signature = None

            @functools.wraps(original_ignore)
            def ignore_causal_mask(*args: Any, **kwargs: Any) -> Any:
                if _SIMULATING.get() is None or signature is None:
                    return original_ignore(*args, **kwargs)
                bound = signature.bind(*args, **kwargs)
                for key in ("q_offset", "kv_offset"):  # fake offsets count as tracing; their values are not read
                    if isinstance(bound.arguments.get(key), torch.Tensor):
                        bound.arguments[key] = 0
                return original_ignore(*bound.args, **bound.kwargs)

            ignore_causal_mask._kbitprep_wrapper = True  # type: ignore[attr-defined]
            masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
        current = getattr(masking_utils, "find_packed_sequence_indices", None)
        if current is not None and not getattr(current, "_kbitprep_wrapper", False):
            original_find = current

            @functools.wraps(original_find)
            def find_packed(*args: Any, **kwargs: Any) -> Any:
                if _SIMULATING.get() is None:
                    return original_find(*args, **kwargs)
                return None  # the simulated batch is not packed (its position ids are transformers' arange)

            find_packed._kbitprep_wrapper = True  # type: ignore[attr-defined]
            masking_utils.find_packed_sequence_indices = find_packed


@contextlib.contextmanager
def _simulation_patches(target: str) -> Iterator[None]:
    """What makes the real code take, on fake CPU tensors, the paths it takes on real tensors on ``target``.

    Nothing process-wide changes behaviour: everything here is local to the calling context.

    * transformers' mask code treats fake tensors as tracing and then materializes the causal mask
      (on real tensors of an unpadded, unpacked batch it skips it and SDPA runs with
      ``is_causal=True``): inside this context only, it is told the offsets are not traced and the
      batch is not packed (wrappers installed once, see :func:`_install_mask_wrappers`);
    * while simulating a GPU, ``torch.is_autocast_enabled()`` (no device: CUDA's, which PEFT's
      bitsandbytes layer asks) must answer as on the GPU: see :func:`_gpu_autocast_flag` (thread-local
      state, no patch).
    """
    _install_mask_wrappers()
    token = _SIMULATING.set(target)
    try:
        yield
    finally:
        _SIMULATING.reset(token)


@contextlib.contextmanager
def _gpu_autocast_flag(target: str, dtype: torch.dtype, enabled: bool) -> Iterator[None]:
    """While simulating a GPU, CUDA's autocast flag and dtype as the GPU step has them (restored on exit).

    The simulation runs on fake CPU tensors under CPU autocast; code that asks
    ``torch.is_autocast_enabled()`` without a device (PEFT's bitsandbytes LoRA layer) reads CUDA's
    flag. Setting it is thread-local and changes nothing for CPU tensors. It is set for the whole
    step, the backward included, so the forwards that checkpointing recomputes in the backward see
    it as on the GPU (where checkpointing restores CUDA autocast for them); nothing else in a
    backward asks.
    """
    if target != "cuda":
        yield
        return
    was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", was_dtype)


@dataclass(frozen=True)
class SimSetup:
    """What one simulated step trains.

    Attributes:
        config: the transformers config.
        scheme: the quantization (:class:`kbitprep.app.metaplan.Scheme`).
        dtype: the float dtype of the model (and autocast).
        param_dtypes: per parameter name, the dtype after prepare (upcasts).
        checkpointing: ``"reentrant"``, ``"non_reentrant"`` or ``"off"``.
        memory: the plan ``extras["memory"]`` dict of kbitprep's memory modes, or ``None``.
        batch / seq: tokens per step.
        lora_r / lora_alpha / lora_targets: the LoRA config (``lora_targets``: PEFT's ``target_modules``;
            with ``"all-linear"``, the modules PEFT refuses on this model type, Mamba's ``out_proj`` and
            ``conv1d``, are left out as a user must leave them out).
        lora_experts: LoRA also on the fused expert weights (PEFT's ``target_parameters``, as
            :func:`kbitprep.lora_config` with ``experts=True`` sets them).
        lora_router: LoRA also on the routers (``router=True``).
        lr: AdamW's learning rate (no effect on memory).
        foreach: AdamW's ``foreach`` (the CUDA default).
        target: ``"cuda"`` (simulate the GPU paths) or ``"cpu"`` (the CPU paths, to check against a real CPU step).
        steps: training steps tracked; the optimizer state is created by an untracked step first,
            so the first tracked step is a steady-state one.
        autocast: whether the step runs under autocast in ``dtype``.
        keep_outputs: whether the training loop holds the model's output (the logits) through the
            backward; transformers' Trainer keeps only the loss.
        offload_impl: ``"kbitprep"`` (kbitprep's real offload hooks, their copies simulated) or
            ``"save_on_cpu"`` (``torch.autograd.graph.save_on_cpu``: every saved tensor, parameters
            included, to the host and back).
    """

    config: Any
    scheme: Any
    dtype: torch.dtype
    param_dtypes: dict[str, torch.dtype]
    checkpointing: str
    memory: dict[str, Any] | None
    batch: int
    seq: int
    lora_r: int
    lora_alpha: int
    lora_targets: Any
    lr: float = 1e-4
    foreach: bool = True
    target: str = "cuda"
    steps: int = 1
    autocast: bool = True
    keep_outputs: bool = False
    offload_impl: str = "kbitprep"
    lora_experts: bool = False
    lora_router: bool = False
    trainer: str = "plain"


#: The training stacks the estimate simulates: ``plain`` (a loop or ``Trainer``: ``model(..., labels=...)``)
#: and ``trl`` (TRL's SFT/DPO/GRPO/KTO trainers: the causal LM patched with ``add_fused_lm_head`` and called
#: with ``fused_lm_head=True``; kbitprep's head serves those calls on CPU, TRL's on CUDA).
TRAINERS = ("plain", "trl")


@dataclass(frozen=True)
class SimResult:
    """The outcome of one simulation.

    Attributes:
        peak_bytes: the peak of live bytes over the simulated steps.
        parts: the live bytes at the peak, split by :data:`PARTS`.
        largest_alloc: the largest single allocation that is not a weight or adapter state.
        offloaded_bytes: the most bytes the offload hooks held in host memory at once.
        lora_params: trainable LoRA parameters.
        notes: remarks on this row's simulation (a memory mode that stepped aside).
        model_notes: remarks on the model and its adapters, the same for every row of an estimate
            (modules PEFT refuses adapters on; no activation checkpointing in the model code).
        unverified: why this figure is unverified, or ``""``: the scheme's GPU kernels allocate
            differently from its CPU kernels, which are what the stand-ins were checked against
            (see :data:`GPU_UNVERIFIED`).
        fused_experts: ``(count, bytes, all bytes)`` of the fused expert weights a quantized model keeps in
            full precision, and of every weight as loaded (stand-ins hold the quantized storage's
            bytes); zeros when nothing is quantized. :func:`expert_note` words them.
    """

    peak_bytes: int
    parts: dict[str, int]
    largest_alloc: int
    offloaded_bytes: int
    lora_params: int
    notes: tuple[str, ...] = ()
    model_notes: tuple[str, ...] = ()
    unverified: str = ""
    fused_experts: tuple[int, int, int] = (0, 0, 0)


def simulate(setup: SimSetup, meta_model: nn.Module, targets: list[str]) -> SimResult:
    """Run ``setup.steps`` training steps of ``meta_model`` (consumed) on fake tensors and track memory.

    ``targets`` are the linears the scheme quantizes (:func:`kbitprep.app.metaplan.quantized_linears`):
    each becomes a stand-in holding the scheme's storage, unless the model code reads its weight directly."""
    import peft
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .._experts import fused_expert_figures
    from .._memory import apply_memory_modes, state_of
    from .._memory.trl_fused import SFT_OUTPUTS, decide_as_on

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False  # the op cache's hashing costs more than it saves on one step
    model = meta_model
    _check_routing(setup.config, model)
    for p in model.parameters():
        p.requires_grad_(False)
    model_notes: list[str] = []
    fused_experts = (0, 0, 0)
    if setup.scheme.quantizes:
        read = _weights_read_directly(model, targets)
        if read:
            model_notes.append(_read_directly_note(read, setup.scheme.name))
        for name in targets:
            lin = model.get_submodule(name)
            assert isinstance(lin, nn.Linear)
            if name in read:
                continue
            _set_module(model, name, _make_stand_in(lin, setup.scheme, setup.dtype, setup.target))
        if setup.scheme.name == "bnb-4bit":
            model.__dict__["is_loaded_in_4bit"] = True  # PEFT dispatches its bitsandbytes LoRA layer on this
        fused_experts = fused_expert_figures(model.modules())
    if any("A_log" in mod._parameters for mod in model.modules()):  # Mamba / Mamba-2 mixers
        model_notes.append(
            "state-space (Mamba) layers run transformers' torch path here; the fused CUDA kernels of mamba_ssm and "
            "causal-conv1d, which transformers uses where they are installed, are not simulated"
        )
    _cast_params(model, setup.param_dtypes)
    vocab = int(getattr(setup.config, "vocab_size", 0) or 0)
    checkpointing = setup.checkpointing
    if checkpointing != "off" and not getattr(model, "supports_gradient_checkpointing", True):
        checkpointing = "off"
        model_notes.append(
            f"{type(model).__name__} does not support activation checkpointing: every row is simulated without it "
            "(kbitprep.prepare leaves it off; PEFT's prepare_model_for_kbit_training raises on this model)"
        )
    if checkpointing != "off":
        kwargs = {"use_reentrant": checkpointing == "reentrant", "preserve_rng_state": False}
        hf: Any = model
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(hf, "enable_input_require_grads"):
            hf.enable_input_require_grads()
    offload: Any = None
    if setup.memory:
        apply_memory_modes(model, _PlanLike(setup.memory))  # type: ignore[arg-type]
        state = state_of(model)
        if state is not None and state.offload:
            offload = _SimSaveOnCpu() if setup.offload_impl == "save_on_cpu" else _fake_offload_hooks()
            state.offloader = offload
    target_modules, left_out = _lora_target_modules(model, setup.lora_targets)
    if left_out:
        model_notes.append(f"LoRA on all-linear without some layers: {'; '.join(left_out)}")
    extra: dict[str, Any] = {}
    parameters = _lora_target_parameters(model, setup.lora_experts, setup.lora_router)
    if parameters:
        extra["target_parameters"] = parameters
    lora = peft.LoraConfig(
        r=setup.lora_r,
        lora_alpha=setup.lora_alpha,
        lora_dropout=0.0,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        **extra,
    )
    with torch.device("meta"):
        pmodel = peft.get_peft_model(model, lora)
    added = sorted(set(getattr(pmodel.peft_config["default"], "target_parameters", None) or ()) - set(parameters))
    if added and target_modules == "all-linear":
        model_notes.append(
            f"PEFT's all-linear on this model type also adapts {', '.join(added)} (through "
            "its transformers-v5 MoE mapping, with rank 2r on fused gate/up experts): kbitprep.lora_config(model) "
            "adapts neither the experts nor the router (experts=True adds the experts)"
        )
    fused: dict[str, Any] = {}
    if setup.trainer == "trl":
        from trl.trainer.utils import add_fused_lm_head

        # as SFTTrainer does: the causal LM under the PEFT model, with the statistics its metrics read
        add_fused_lm_head(pmodel.get_base_model(), outputs=SFT_OUTPUTS)  # type: ignore[arg-type]
        fused = {"fused_lm_head": True}
    _fakify(pmodel, mode)
    with mode:
        trainable = [p for p in pmodel.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=setup.lr, foreach=setup.foreach)
        ids = torch.empty((setup.batch, setup.seq), dtype=torch.long)
        labels = torch.empty((setup.batch, setup.seq), dtype=torch.long)
    pmodel.train()
    with mode:  # AdamW creates its state lazily: one untracked step, so the tracked ones are steady-state steps
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    adapter_ids = {id(p) for p in trainable}

    def tracked_steps() -> StepTracker:
        if offload is not None:
            offload.offloaded_bytes = 0
            offload.peak_host_bytes = 0
        tracker = StepTracker(vocab, fake=True)
        for p in pmodel.parameters():
            tracker.register(p, "adapters" if id(p) in adapter_ids else "weights")
        for b in pmodel.buffers():
            tracker.register(b, "weights")
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    tracker.register(v, "adapters")
        tracker.register(ids, "weights")
        tracker.register(labels, "weights")
        with (
            mode,
            tracker,
            tracker.saved_hooks(),
            _simulation_patches(setup.target),
            _gpu_autocast_flag(setup.target, setup.dtype, setup.autocast),
            decide_as_on(setup.target),  # which head serves TRL's fused calls: as on the target device
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            for _ in range(setup.steps):
                with torch.autocast("cpu", dtype=setup.dtype, enabled=setup.autocast):
                    result = pmodel(input_ids=ids, labels=labels, use_cache=False, **fused)  # no KV cache
                loss = result.loss
                if not setup.keep_outputs:
                    del result
                loss.backward()
                for p in trainable:
                    if p.grad is not None:
                        tracker.tag(p.grad, "adapters")
                opt.step()
                for st in opt.state.values():
                    for v in st.values():
                        if isinstance(v, torch.Tensor):
                            tracker.tag(v, "adapters")
                opt.zero_grad(set_to_none=True)
                del loss
                if setup.keep_outputs:
                    del result
        return tracker

    tracker = tracked_steps()
    notes: tuple[str, ...] = ()
    state = state_of(pmodel)
    if state is not None and state.head_fallback:
        # the chunked head gave up during the step (and computed the logits twice): the next steps
        # run with full logits from the start, so those are the steady state
        notes = (f"the chunked output head does not apply to this model ({state.head_fallback}): full logits",)
        tracker = tracked_steps()
    return SimResult(
        peak_bytes=tracker.peak,
        parts=tracker.parts_at_peak(),
        largest_alloc=tracker.largest_alloc,
        offloaded_bytes=int(offload.peak_host_bytes) if offload is not None else 0,
        lora_params=sum(p.numel() for p in trainable),
        notes=notes,
        model_notes=tuple(model_notes),
        unverified=GPU_UNVERIFIED.get(setup.scheme.name, "") if setup.target == "cuda" else "",
        fused_experts=fused_experts,
    )


_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b")


def _weights_read_directly(model: nn.Module, targets: list[str]) -> list[str]:
    """The ``targets`` whose weight the model code reads directly (``self.dt_proj.weight @ x`` in Mamba and
    Jamba, ``self.classifier.weight`` in LongCat's router) instead of calling the layer: read from the
    source of the parent module's ``forward``. A quantized weight cannot serve such a read."""
    found: list[str] = []
    reads: dict[type, set[str]] = {}
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        cls = type(parent)
        if cls not in reads:
            try:
                reads[cls] = set(_WEIGHT_READ.findall(inspect.getsource(cls.forward)))
            except (OSError, TypeError):
                reads[cls] = set()
        if leaf in reads[cls]:
            found.append(name)
    return found


def _read_directly_note(names: list[str], scheme: str) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if scheme.startswith("bnb-"):
        how = (
            "bitsandbytes' packed weight cannot serve that read, so training fails as loaded: load with "
            f"BitsAndBytesConfig(..., llm_int8_skip_modules={leaves!r}); estimated so, those layers unquantized"
        )
    else:
        how = "estimated with those layers unquantized"
    return (
        f"the model code reads the weight of {', '.join(leaves)} ({len(names)} layers) directly in its forward: {how}"
    )


def _check_routing(config: Any, model: nn.Module) -> None:
    """Raise :class:`~kbitprep.errors.ConfigError` when an MoE config leaves the experts per token unset
    (DeepSeek-V2's default config): the routers cannot choose experts, and real training fails the same way."""
    from .._anatomy import text_config
    from .._experts import expert_parameters, router_modules
    from ..errors import ConfigError

    text = text_config(config)
    unset = "num_experts_per_tok" in vars(text) and text.num_experts_per_tok is None
    if unset and (expert_parameters(model) or router_modules(model)):
        raise ConfigError(
            f"this {getattr(config, 'model_type', '?')} config has num_experts_per_tok=None, so its routers "
            "cannot choose experts (a training step fails the same way): set num_experts_per_tok to the "
            "checkpoint's value in the config"
        )


def expert_note(figures: tuple[int, int, int], scheme: Any) -> str:
    """The note on the fused expert weights ``scheme`` leaves in full precision (``SimResult.fused_experts``,
    possibly extrapolated to the model's depth); ``""`` when there are none."""
    from .._experts import fused_expert_text

    integration = {"bnb-4bit": "bitsandbytes", "bnb-8bit": "bitsandbytes"}.get(
        scheme.name, str(getattr(scheme, "backend", "") or scheme.name)
    )
    return fused_expert_text(*figures, integration) if figures[0] else ""


def _lora_target_modules(model: nn.Module, targets: Any) -> tuple[Any, list[str]]:
    """PEFT's ``target_modules`` for ``targets`` and what ``"all-linear"`` leaves out on this model (notes).

    ``"all-linear"`` stays as it is unless some of the layers PEFT expands it to must not take an
    adapter: the routers of mixture-of-experts layers (as :func:`kbitprep.lora_targets` leaves them
    out; some are ``nn.Linear`` subclasses returning a tuple, which PEFT's LoRA layer cannot wrap)
    and the layers PEFT refuses on this model type (its Mamba check: ``out_proj`` and ``conv1d``).
    Then it becomes the explicit list without them, which is what a user has to pass.
    """
    if targets != "all-linear":
        return targets, []
    try:
        import peft
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba, _maybe_include_all_linear_layers
    except ImportError:  # pragma: no cover - other PEFT versions: PEFT decides
        return targets, []
    from .._experts import inside, router_modules

    probe: Any = _maybe_include_all_linear_layers(peft.LoraConfig(target_modules="all-linear"), model)
    wanted = set(probe.target_modules or ())  # leaf names, or full names where PEFT keeps them
    linear = [
        name for name, _ in model.named_modules() if name and (name in wanted or name.rsplit(".", 1)[-1] in wanted)
    ]
    refused: list[str] = []
    for leaf in sorted({n.rsplit(".", 1)[-1] for n in linear}):
        try:
            _check_lora_target_modules_mamba(probe, model, leaf)
        except ValueError:
            refused.append(leaf)
    routers = router_modules(model)
    mods = dict(model.named_modules())
    own = [n for n in linear if _own_forward(mods[n]) and not inside(n, routers)]
    kept = [n for n in linear if n.rsplit(".", 1)[-1] not in refused and not inside(n, routers) and n not in own]
    if len(kept) == len(linear):
        return targets, []
    notes = []
    if refused:
        notes.append(f"PEFT refuses LoRA on {', '.join(refused)} in this model type")
    left = [n for n in linear if inside(n, routers)]
    if left:
        notes.append(f"the {len(left)} router layers take no adapter (kbitprep.lora_config leaves them out)")
    if own:
        classes = ", ".join(sorted({type(mods[n]).__name__ for n in own}))
        notes.append(
            f"{len(own)} nn.Linear subclasses whose forward is not x @ W.T ({classes}) take no adapter: PEFT's LoRA "
            "layer assumes it (kbitprep.lora_config leaves them out)"
        )
    return kept, notes


def _own_forward(mod: nn.Module) -> bool:
    """An ``nn.Linear`` subclass whose forward is not a linear map of its input (not a quantized stand-in)."""
    from .._lora import acts_as_linear

    forward = getattr(type(mod), "forward", None)
    return isinstance(mod, nn.Linear) and forward is not _stand_in_forward and not acts_as_linear(mod)


def _lora_target_parameters(model: nn.Module, experts: bool, router: bool) -> list[str]:
    """PEFT's ``target_parameters`` as :func:`kbitprep.lora_config` sets them for ``experts`` / ``router``."""
    from .._lora import target_parameters

    return target_parameters(model, experts=experts, router=router)


@dataclass
class _PlanLike:
    memory: dict[str, Any] | None = None


def _quant_state_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors of quantization states that are neither parameters nor buffers: bitsandbytes'
    ``quant_state`` (absmax, code, offset, nested) and hqq's ``meta`` dict (scale, zero)."""
    seen: set[int] = set()
    for mod in model.modules():
        meta = getattr(mod, "meta", None)
        if isinstance(meta, dict):
            for value in meta.values():
                if isinstance(value, torch.Tensor):
                    yield value
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        while state is not None and id(state) not in seen:
            seen.add(id(state))
            for name in ("absmax", "code", "offset"):
                t = getattr(state, name, None)
                if isinstance(t, torch.Tensor):
                    yield t
            state = getattr(state, "state2", None)


def measure_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    vocab: int = 0,
) -> StepTracker:
    """Track the live storage bytes of one real training step of ``model`` (any device), as :func:`simulate` does.

    The optimizer's state should exist already (one step before); the step runs the forward under
    autocast in ``dtype`` (``None``: no autocast), the backward, ``optimizer.step()`` and
    ``zero_grad``. Storages alive before the step (parameters, buffers, bitsandbytes quantization
    states, optimizer state, the batch) count from the start.
    """
    tracker = StepTracker(vocab)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for p in model.parameters():
        tracker.register(p, "adapters" if id(p) in trainable else "weights")
    for b in model.buffers():
        tracker.register(b, "weights")
    for t in _quant_state_tensors(model):
        tracker.register(t, "weights")
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                tracker.register(v, "adapters")
    for v in batch.values():
        tracker.register(v, "weights")
    device_type = next(iter(batch.values())).device.type
    with tracker, tracker.saved_hooks():
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    return tracker
