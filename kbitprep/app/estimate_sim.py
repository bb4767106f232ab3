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
  serves fewer rows and allocates only the output), and always in the backward;
* the device: fake tensors live on a fake CPU, with CPU autocast standing in for CUDA autocast
  (``torch.is_autocast_enabled()`` without a device, which PEFT's bitsandbytes layer asks, answers
  for the CPU while simulating a GPU); attention is torch's fused SDPA (the CPU flash kernel: the
  same saved tensors as the CUDA flash kernel, output and log-sum-exp);
* offloading: kbitprep's real offload hooks run (which tensors go, each storage once, what stays
  for the backward); their copy to the host allocates nothing on the device and their copy back
  allocates the region again.

Kernels' internal workspaces (cuBLAS, flash attention's backward accumulators) are not visible;
nor is the caching allocator's rounding (512 bytes a block).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SimResult", "StepTracker", "simulate"]

#: bitsandbytes' CUDA gemm_4bit uses its fused kernel up to this many rows; beyond, dequantize + linear.
BNB_FUSED_MAX_ROWS = 1536

PARTS = ("weights", "adapters", "activations", "logits_loss", "transient")


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
        """Start tracking ``t``'s storage (if not tracked yet); returns its serial."""
        if not isinstance(t, torch.Tensor) or t.is_sparse:
            return None
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
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        spec: _QuantSpec = ctx.spec
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


@contextlib.contextmanager
def _simulation_patches(target: str) -> Iterator[None]:
    """What makes the real code take, on fake CPU tensors, the paths it takes on real tensors on ``target``.

    * transformers' mask code treats fake tensors as tracing and then materializes the causal mask
      (on real tensors of an unpadded, unpacked batch it skips it and SDPA runs with
      ``is_causal=True``): it is told the offsets are not traced and the batch is not packed;
    * while simulating a GPU, ``torch.is_autocast_enabled()`` (no device: CUDA's, which PEFT's
      bitsandbytes layer asks) answers for the CPU autocast the simulation runs under.
    """
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    try:
        from transformers import masking_utils

        original_ignore = masking_utils._ignore_causal_mask_sdpa
        signature = inspect.signature(original_ignore)

        def ignore_causal_mask(*args: Any, **kwargs: Any) -> bool:
            bound = signature.bind(*args, **kwargs)
            for key in ("q_offset", "kv_offset"):  # fake offsets count as tracing; their values are not read
                if isinstance(bound.arguments.get(key), torch.Tensor):
                    bound.arguments[key] = 0
            return bool(original_ignore(*bound.args, **bound.kwargs))

        patch(masking_utils, "_ignore_causal_mask_sdpa", ignore_causal_mask)

        def no_packing(*args: Any, **kwargs: Any) -> None:
            return None  # the simulated batch is not packed (its position ids are transformers' arange)

        patch(masking_utils, "find_packed_sequence_indices", no_packing)
    except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover - other transformers versions
        pass
    if target == "cuda":
        original = torch.is_autocast_enabled

        def patched(*args: Any, **kwargs: Any) -> bool:
            if not args and not kwargs:
                return bool(original("cpu"))
            return bool(original(*args, **kwargs))

        patch(torch, "is_autocast_enabled", patched)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


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
        lora_r / lora_alpha / lora_targets: the LoRA config (``lora_targets``: PEFT's ``target_modules``).
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


@dataclass(frozen=True)
class SimResult:
    """The outcome of one simulation.

    Attributes:
        peak_bytes: the peak of live bytes over the simulated steps.
        parts: the live bytes at the peak, split by :data:`PARTS`.
        largest_alloc: the largest single allocation that is not a weight or adapter state.
        offloaded_bytes: the most bytes the offload hooks held in host memory at once.
        lora_params: trainable LoRA parameters.
        notes: remarks on the simulation (a memory mode that stepped aside).
    """

    peak_bytes: int
    parts: dict[str, int]
    largest_alloc: int
    offloaded_bytes: int
    lora_params: int
    notes: tuple[str, ...] = ()


def simulate(setup: SimSetup, meta_model: nn.Module, targets: list[str]) -> SimResult:
    """Run ``setup.steps`` training steps of ``meta_model`` (consumed) on fake tensors and track memory."""
    import peft
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .._memory import apply_memory_modes, state_of

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False  # the op cache's hashing costs more than it saves on one step
    model = meta_model
    for p in model.parameters():
        p.requires_grad_(False)
    if setup.scheme.quantizes:
        for name in targets:
            lin = model.get_submodule(name)
            assert isinstance(lin, nn.Linear)
            _set_module(model, name, _make_stand_in(lin, setup.scheme, setup.dtype, setup.target))
        if setup.scheme.name == "bnb-4bit":
            model.__dict__["is_loaded_in_4bit"] = True  # PEFT dispatches its bitsandbytes LoRA layer on this
    _cast_params(model, setup.param_dtypes)
    vocab = int(getattr(setup.config, "vocab_size", 0) or 0)
    if setup.checkpointing != "off":
        kwargs = {"use_reentrant": setup.checkpointing == "reentrant", "preserve_rng_state": False}
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
    lora = peft.LoraConfig(
        r=setup.lora_r,
        lora_alpha=setup.lora_alpha,
        lora_dropout=0.0,
        target_modules=setup.lora_targets,
        task_type="CAUSAL_LM",
    )
    with torch.device("meta"):
        pmodel = peft.get_peft_model(model, lora)
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
        with mode, tracker, tracker.saved_hooks(), _simulation_patches(setup.target), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(setup.steps):
                with torch.autocast("cpu", dtype=setup.dtype, enabled=setup.autocast):
                    result = pmodel(input_ids=ids, labels=labels)
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
    )


@dataclass
class _PlanLike:
    memory: dict[str, Any] | None = None


def _quant_state_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors of bitsandbytes quantization states (not parameters or buffers)."""
    seen: set[int] = set()
    for mod in model.modules():
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
