"""The gradient-flow check: a tiny forward/backward that proves trainable parameters get gradients.

When the check fails it also says *where* the autograd chain breaks: during the probe, a forward hook
on every module records whether a floating-point input required grad and whether any floating-point
output did; the first module (in forward order) whose input requires grad but whose output does not is
named, with its class and, for quantized layers, the class of its weight.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._anatomy import anatomy, is_checkpointed_layer
from ._master_weights import MasterWeights
from ._snapshot import Snapshot
from .errors import GradientFlowError, InvalidModelError, NotAModuleError

__all__ = ["GradientFlowResult", "verify_gradient_flow"]

#: How many tokens the default probe feeds.
_PROBE_TOKENS = 8


@dataclass(frozen=True)
class GradientFlowResult:
    """Outcome of :func:`verify_gradient_flow`.

    Attributes:
        checked: trainable parameters checked (when the model has none yet, one frozen parameter in
            the first layer of each checkpointed stack the probe runs is made trainable for the probe,
            standing in for an adapter: an encoder and a decoder, a vision tower and a language model
            are each checked).
        with_grad: how many received a gradient.
        zero_grad: names of those whose gradient is all zeros (expected for LoRA A at step 0,
            since LoRA B starts at zero).
        output_requires_grad: whether the model's output required grad (gradients can flow into
            the frozen network, where adapters will sit).
        loss: the probe loss.
        breaks: qualified names of the modules, in forward order, whose output stopped requiring grad
            although their input required it (where the autograd chain is cut); empty when none.
            Information only: a break in a layer with weights of its own fails the check (it raises),
            one in a parameter-free module (a detached side branch) does not.
    """

    checked: int
    with_grad: int
    zero_grad: tuple[str, ...]
    output_requires_grad: bool
    loss: float
    breaks: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the check passed."""
        return self.checked == self.with_grad and self.output_requires_grad


# --------------------------------------------------------------------------- probe inputs


def _call_quietly(obj: object, name: str) -> Any:
    fn = getattr(obj, name, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return None


def _text_config(cfg: Any) -> Any:
    """The config that holds the text vocabulary: ``cfg.get_text_config()`` (LLaVA's ``text_config``), else ``cfg``."""
    if cfg is None:
        return None
    if isinstance(getattr(cfg, "vocab_size", None), int):
        return cfg
    text = _call_quietly(cfg, "get_text_config")
    if text is not None and isinstance(getattr(text, "vocab_size", None), int):
        return text
    sub = getattr(cfg, "text_config", None)
    return sub if sub is not None else cfg


def _special_token_ids(*configs: Any) -> set[int]:
    """Token ids with a special meaning (image/video/audio placeholders, pad, bos, eos ...) in the configs."""
    found: set[int] = set()
    for cfg in configs:
        if cfg is None:
            continue
        for key, value in vars(cfg).items():
            if key.endswith(("_token_id", "_token_index", "_token_ids")):
                values = value if isinstance(value, list | tuple) else [value]
                found.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return found


def _forward_parameters(model: nn.Module) -> tuple[set[str], bool]:
    """Names ``model.forward`` accepts, and whether it also takes ``**kwargs``: the forward of the model a
    PEFT wrapper holds (``get_base_model()``), whose ``**kwargs`` it passes on."""
    base = _call_quietly(model, "get_base_model")
    if isinstance(base, nn.Module) and base is not model:
        model = base
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _predicts_tokens(model: nn.Module) -> bool:
    """Whether ``labels`` are token ids for this model (an LM head), not class indices.

    A transformers model says so through ``get_output_embeddings()`` (``None`` for classification
    heads); a plain module without that method is given token-id labels, as before.
    """
    if not callable(getattr(model, "get_output_embeddings", None)):
        return True
    return isinstance(_call_quietly(model, "get_output_embeddings"), nn.Module)


def _main_input(model: nn.Module) -> str:
    """The model's ``main_input_name`` (``"input_ids"``, ``"input_features"``, ``"pixel_values"`` ...)."""
    name = getattr(model, "main_input_name", None)
    return name if isinstance(name, str) and name else "input_ids"


def _float_input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype for float inputs (features, pixels, waveforms): that of the first convolution's weight (the
    stem of audio and vision towers), else the model's ``dtype``, else its first floating parameter."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d) and mod.weight.is_floating_point():
            return mod.weight.dtype
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _first_int(*values: Any, default: int = 0) -> int:
    """The first value that is an int (or a pair of equal ints such as ``image_size=(32, 32)``)."""
    for v in values:
        if isinstance(v, list | tuple) and v and all(isinstance(x, int) for x in v):
            v = v[0]
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return default


def _speech_features(model: nn.Module, cfg: Any, gen: torch.Generator) -> torch.Tensor | None:
    """Log-mel ``input_features`` (1, mel bins, frames) for a Whisper-style encoder: its length is
    ``max_source_positions`` times the strides of the encoder's 1-D convolutions, which it checks."""
    bins, positions = (
        _first_int(getattr(cfg, "num_mel_bins", None)),
        _first_int(getattr(cfg, "max_source_positions", None)),
    )
    if bins <= 0 or positions <= 0:
        return None
    encoder = _call_quietly(model, "get_encoder")
    scope = encoder if isinstance(encoder, nn.Module) else model
    stride = 1
    for mod in scope.modules():
        if isinstance(mod, nn.Conv1d):
            stride *= int(mod.stride[0])
    return torch.randn(1, bins, positions * stride, generator=gen)


def _waveform(cfg: Any, gen: torch.Generator) -> torch.Tensor | None:
    """Raw audio ``input_values`` (1, samples) for a wav2vec2-style convolutional feature encoder: long
    enough for 16 frames (and for SpecAugment's time masks) after its ``conv_kernel`` / ``conv_stride``."""
    kernels, strides = getattr(cfg, "conv_kernel", None), getattr(cfg, "conv_stride", None)
    if not isinstance(kernels, list | tuple) or not isinstance(strides, list | tuple) or len(kernels) != len(strides):
        return None
    length = max(16, 2 * _first_int(getattr(cfg, "mask_time_length", None)))
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        length = (length - 1) * int(stride) + int(kernel)
    return torch.randn(1, length, generator=gen)


def _vision_config(cfg: Any) -> Any:
    """The config describing the images: ``vision_config``, an image encoder's ``encoder`` config, or ``cfg``."""
    for sub in (getattr(cfg, "vision_config", None), getattr(cfg, "encoder", None), cfg):
        if sub is not None and (hasattr(sub, "image_size") or hasattr(sub, "spatial_merge_size")):
            return sub
    return None


def _image(vision: Any, gen: torch.Generator) -> torch.Tensor | None:
    """``pixel_values`` (1, channels, height, width) from a vision config's ``image_size``."""
    size = getattr(vision, "image_size", None)
    height = _first_int(size)
    width = _first_int(size[1] if isinstance(size, list | tuple) and len(size) > 1 else size)
    if height <= 0 or width <= 0:
        return None
    channels = _first_int(getattr(vision, "num_channels", None), getattr(vision, "in_channels", None), default=3)
    return torch.randn(1, channels, height, width, generator=gen)


@dataclass(frozen=True)
class _ImageProbe:
    """An image for a vision-language model: the forward's keyword arguments and how many placeholder
    tokens stand for it in ``input_ids``."""

    inputs: dict[str, torch.Tensor]
    tokens: int


def _vlm_image(cfg: Any, gen: torch.Generator, dtype: torch.dtype) -> _ImageProbe | None:
    """An image in one of the two layouts transformers' vision-language models read from their configs:
    merged patches (Qwen2-VL and successors: flattened patches, ``image_grid_thw``, one placeholder per
    ``spatial_merge_size``² patches), or a patch grid (LLaVA: ``(image_size / patch_size)²`` placeholders, one
    more with ``vision_feature_select_strategy="full"``, which keeps the CLS token)."""
    vision = getattr(cfg, "vision_config", None)
    if vision is None:
        return None
    merge = _first_int(getattr(vision, "spatial_merge_size", None))
    patch = _first_int(getattr(vision, "patch_size", None))
    channels = _first_int(getattr(vision, "in_channels", None), getattr(vision, "num_channels", None), default=3)
    if merge > 0 and patch > 0:
        temporal = _first_int(getattr(vision, "temporal_patch_size", None), default=1)
        side = 2 * merge
        patches = torch.randn(side * side, channels * temporal * patch * patch, generator=gen)
        grid = torch.tensor([[1, side, side]])
        return _ImageProbe({"pixel_values": patches.to(dtype), "image_grid_thw": grid}, side * side // merge**2)
    image = _image(vision, gen)
    if image is None or patch <= 0:
        return None
    tokens = (image.shape[-2] // patch) * (image.shape[-1] // patch)
    tokens += int(getattr(cfg, "vision_feature_select_strategy", None) == "full")
    return _ImageProbe({"pixel_values": image.to(dtype)}, tokens)


def _image_token(cfg: Any) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _token_ids(model: nn.Module, cfg: Any, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``_PROBE_TOKENS`` random token ids of the text vocabulary, special token ids excluded."""
    text_cfg = _text_config(cfg)
    vocab = getattr(text_cfg, "vocab_size", None) if text_cfg is not None else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise InvalidModelError(
            f"cannot build probe inputs for {type(model).__name__} (no vocab_size in its config or text config); "
            "pass inputs={...} to verify_gradient_flow"
        )
    special = _special_token_ids(cfg, text_cfg)
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    return allowed[torch.randint(0, len(allowed), (1, _PROBE_TOKENS), generator=gen)].to(device)


def _default_feeds(model: nn.Module) -> list[dict[str, Any]]:
    """The default probe inputs, best first: the model's main input built from its config (token ids,
    Whisper-style log-mel features, a wav2vec2-style waveform, pixel values), with an image for a
    vision-language model whose layout is known (and the text-only probe after it, should its forward
    reject the image), ``decoder_input_ids`` for encoder-decoder models and token ``labels`` for LM heads."""
    cfg = getattr(model, "config", None)
    emb = _call_quietly(model, "get_input_embeddings")
    device = next(
        (p.device for p in (emb.parameters() if isinstance(emb, nn.Module) else model.parameters())),
        torch.device("cpu"),
    )
    gen = torch.Generator().manual_seed(0)
    accepted, any_kw = _forward_parameters(model)
    main = _main_input(model)
    dtype = _float_input_dtype(model)
    feed: dict[str, Any] = {}
    if main == "input_features":
        features = _speech_features(model, cfg, gen)
        if features is None:
            raise InvalidModelError(
                f"cannot build probe inputs for {type(model).__name__} (input_features: no num_mel_bins and "
                "max_source_positions in its config); pass inputs={...} to verify_gradient_flow"
            )
        feed[main] = features.to(device, dtype)
    elif main == "input_values":
        wave = _waveform(cfg, gen)
        if wave is None:
            raise InvalidModelError(
                f"cannot build probe inputs for {type(model).__name__} (input_values: no conv_kernel and "
                "conv_stride in its config); pass inputs={...} to verify_gradient_flow"
            )
        return [{main: wave.to(device, dtype)}]  # a CTC or classification head: the loss comes from the logits
    elif main == "pixel_values":
        pixels = _image(_vision_config(cfg), gen)
        if pixels is None:
            raise InvalidModelError(
                f"cannot build probe inputs for {type(model).__name__} (pixel_values: no image_size in its "
                "config); pass inputs={...} to verify_gradient_flow"
            )
        feed[main] = pixels.to(device, dtype)
    text_model = main not in ("input_features", "input_values", "pixel_values")  # token ids, as for any other name
    encoder_decoder = bool(getattr(cfg, "is_encoder_decoder", False))
    if not text_model and not encoder_decoder:
        return [feed]  # an encoder with a classification head: no token ids at all
    ids = _token_ids(model, cfg, gen, device)
    if text_model:
        feed["input_ids"] = ids
    if encoder_decoder and ("decoder_input_ids" in accepted or any_kw):
        vocab = getattr(_text_config(cfg), "vocab_size", 0)
        start = getattr(cfg, "decoder_start_token_id", None)
        start = start if isinstance(start, int) and 0 <= start < vocab else 0
        feed["decoder_input_ids"] = torch.cat([torch.full((1, 1), start, device=device), ids[:, :-1]], dim=1)
    wants_labels = ("labels" in accepted or any_kw) and _predicts_tokens(model)
    if wants_labels:
        feed["labels"] = ids.clone()
    image = _vlm_image(cfg, gen, dtype) if text_model and ("pixel_values" in accepted or any_kw) else None
    token = _image_token(cfg)
    if image is None or token is None:
        return [feed]
    placeholders = torch.full((1, image.tokens), token, device=device)
    with_image = torch.cat([ids[:, :2], placeholders, ids[:, 2:]], dim=1)
    vlm = {**feed, "input_ids": with_image, **{k: v.to(device) for k, v in image.inputs.items()}}
    if "mm_token_type_ids" in accepted:  # Qwen2-VL's multimodal rope: 1 marks image tokens
        vlm["mm_token_type_ids"] = (with_image == token).long()
    if wants_labels:
        vlm["labels"] = with_image.masked_fill(with_image == token, -100)
    return [vlm, feed]


def _default_inputs(model: nn.Module) -> dict[str, Any]:
    """The default probe inputs (the first of :func:`_default_feeds`)."""
    return _default_feeds(model)[0]


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside ``obj`` (tensors, tuples, lists, mappings such as ``ModelOutput``), a few levels deep."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif depth < 4 and isinstance(obj, tuple | list):
        for v in obj:
            yield from _tensors(v, depth + 1)


def _loss_of(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    mapped = out.get("loss") if isinstance(out, Mapping) else None
    if isinstance(mapped, torch.Tensor):
        return mapped
    tensor = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if tensor is None and isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        tensor = out[0]
    if isinstance(tensor, torch.Tensor):
        return tensor.float().pow(2).mean()
    floats = [t for t in _tensors(out) if t.is_floating_point()]  # e.g. start_logits / end_logits
    if not floats:
        raise InvalidModelError(f"cannot derive a loss from the model output ({type(out).__name__})")
    total = floats[0].float().pow(2).mean()
    for t in floats[1:]:
        total = total + t.float().pow(2).mean().to(total.device)
    return total


# --------------------------------------------------------------------------- config snapshot


# --------------------------------------------------------------------------- where the chain breaks


@dataclass(frozen=True)
class _Break:
    name: str
    cls: str
    weight_cls: str
    own_params: bool
    #: ``""`` when the output stopped requiring grad; else the name of the autograd node without a
    #: derivative found in the module's own graph (``torch::autograd::WarnNotImplemented``)
    no_backward: str = ""


def _weight_class(module: nn.Module) -> str:
    """The class of the module's weight when it is not a plain tensor (a quantized tensor subclass)."""
    for p in module.parameters(recurse=False):
        data = p.data if isinstance(p, nn.Parameter) else p
        if type(data) is not torch.Tensor:
            return type(data).__name__
    return ""


class _Tracer:
    """Forward hooks on every module recording where ``requires_grad`` stops propagating.

    Only calls made with grad enabled count (the first pass of reentrant checkpointing runs under
    ``no_grad``; its recomputation during backward runs with grad and is recorded then). The order of
    first completion of every module (whatever the grad mode) orders the breaks as the forward does.
    """

    def __init__(self, model: nn.Module) -> None:
        self.order: dict[str, int] = {}
        self.found: dict[str, _Break] = {}
        self.blamed: set[Any] = set()  # autograd nodes without a derivative already attributed to a module
        #: reentrant-checkpointed layers (by name) whose hidden-state input did not require grad
        self.cold_layers: dict[str, str] = {}
        self.handles: list[Any] = []
        for name, mod in model.named_modules():
            try:
                self.handles.append(mod.register_forward_hook(self._hook_for(name), with_kwargs=True))
                if is_checkpointed_layer(mod):  # registered last: sees the input after kbitprep's pre-hook
                    self.handles.append(mod.register_forward_pre_hook(self._layer_input_hook(name)))
            except (RuntimeError, TypeError, AttributeError):  # e.g. a TorchScript module: not traced
                continue

    def reset(self) -> None:
        """Forget what a forward that failed recorded (before the probe tries its next inputs)."""
        self.order.clear()
        self.found.clear()
        self.blamed.clear()
        self.cold_layers.clear()

    def _layer_input_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if not torch.is_grad_enabled() or not module.training or not _reentrant(module):
                return
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.is_floating_point() and not first.requires_grad:
                self.cold_layers.setdefault(name, type(module).__name__)

        return hook

    def _hook_for(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            self.order.setdefault(name, len(self.order))
            if name in self.found or not torch.is_grad_enabled():
                return
            ins = [t for t in _tensors((args, kwargs)) if t.is_floating_point() and t.requires_grad]
            if not ins:
                return
            outs = [t for t in _tensors(output) if t.is_floating_point()]
            if not outs:
                return
            if any(t.requires_grad for t in outs):
                cut = self._node_without_backward(ins, outs)
                if cut:
                    own = any(True for _ in module.parameters(recurse=False))
                    self.found[name] = _Break(name or "<model>", _qualname(module), _weight_class(module), own, cut)
                return
            holds_weights = any(True for _ in module.parameters())
            shapes = {tuple(t.shape) for t in ins}
            # a module without weights whose outputs have other shapes (rotary embeddings computing cos/sin
            # from positions, mask builders) does not sit on the data path: not a break
            if not holds_weights and not any(tuple(t.shape) in shapes for t in outs):
                return
            own = any(True for _ in module.parameters(recurse=False))
            self.found[name] = _Break(name or "<model>", _qualname(module), _weight_class(module), own)

        return hook

    def _node_without_backward(self, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> str:
        """The name of an autograd node with no derivative (an op without an autograd kernel, whose backward
        gives no gradient) in the graph between the module's inputs and outputs, not yet blamed on a
        module called earlier; ``""`` when there is none."""
        stop = {t.grad_fn for t in ins if t.grad_fn is not None}
        todo: list[Any] = [t.grad_fn for t in outs if t.grad_fn is not None]
        seen: set[Any] = set()
        while todo and len(seen) < 20_000:
            fn = todo.pop()
            if fn is None or fn in seen or fn in stop:
                continue
            seen.add(fn)
            if "NotImplemented" in fn.name() and fn not in self.blamed:
                self.blamed.add(fn)
                return str(fn.name())
            todo.extend(nxt for nxt, _ in fn.next_functions)
        return ""

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def breaks(self) -> list[_Break]:
        """The breaks in forward order."""
        return sorted(self.found.values(), key=lambda b: self.order.get(b.name, len(self.order)))


def _reentrant(layer: nn.Module) -> bool:
    """Whether transformers checkpoints this layer reentrantly (its flag on, ``use_reentrant`` not False)."""
    if getattr(layer, "gradient_checkpointing", False) is not True:
        return False
    func = vars(layer).get("_gradient_checkpointing_func")
    keywords = getattr(func, "keywords", None) or {}
    return func is not None and bool(keywords.get("use_reentrant", True))


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(breaks: list[_Break]) -> str:
    first = breaks[0]
    weight = f", weight {first.weight_cls}" if first.weight_cls else ""
    if first.no_backward:
        what = f"its output requires grad, but it runs an op that has no derivative ({first.no_backward})"
    else:
        what = "its input requires grad but its output does not"
    text = (
        f"the autograd chain breaks at {first.name} ({first.cls}{weight}): {what}, so no gradient reaches "
        "anything before it through this path"
    )
    if len(breaks) > 1:
        kinds = Counter(b.cls.rsplit(".", 1)[-1] + (f"[{b.weight_cls}]" if b.weight_cls else "") for b in breaks[1:])
        listed = ", ".join(f"{n} x {k}" for k, n in kinds.most_common())
        text += f"; {len(breaks) - 1} more module(s) break it the same way ({listed})"
    if first.weight_cls:
        text += (
            f". The {first.weight_cls} weight's forward runs a kernel autograd cannot differentiate (e.g. "
            "activations quantized to integers, or a quantized matmul without a backward): quantize with a "
            "weight-only configuration that trains, or do not train through these layers"
        )
    elif first.no_backward:
        text += (
            f". Find the op in {first.cls.rsplit('.', 1)[-1]}.forward that has no derivative (a custom or "
            "library kernel registered without autograd) and use a path that has one"
        )
    else:
        text += (
            f". Look at {first.cls.rsplit('.', 1)[-1]}.forward for a .detach(), a torch.no_grad() block, an "
            "in-place write into a tensor that does not require grad, or a custom kernel without autograd support"
        )
    return text


# --------------------------------------------------------------------------- the check


def verify_gradient_flow(model: nn.Module, inputs: Mapping[str, Any] | None = None) -> GradientFlowResult:
    """Run one forward/backward in training mode and check that gradients flow.

    Every parameter with ``requires_grad`` must receive a gradient. If no parameter is trainable yet
    (adapters not attached), a frozen parameter in the first layer of each checkpointed stack stands in
    for an adapter and must receive one, which proves gradients will reach adapters placed inside every
    stack of the frozen network (this is what the input-require-grads hooks are for with reentrant
    checkpointing); the output must require grad. And no module may cut the autograd chain: one whose
    input requires grad while its output does not (a quantized kernel without autograd, a ``detach``) is
    named in the error, as is a reentrant-checkpointed layer whose input does not require grad.
    Gradients, training mode, the RNG state, the model's config objects and whatever else the forward
    changed on its modules (hooks a library installs on a first forward) are restored afterwards.

    The default probe is built from the model's config for its main input: 8 random token ids (special
    token ids such as image placeholders excluded; the vocabulary comes from ``config`` or its text
    config); log-mel ``input_features`` for Whisper-style speech encoders (``num_mel_bins`` x the length
    ``max_source_positions`` and the encoder's convolutions give); a raw-audio ``input_values`` for
    wav2vec2-style models (long enough for their ``conv_kernel``/``conv_stride``); ``pixel_values`` from
    ``image_size`` for vision encoders. A vision-language model also gets one image with its placeholder
    tokens (LLaVA's patch grid, or Qwen2-VL's merged patches with ``image_grid_thw``), and is probed
    text-only if its forward rejects that image. Encoder-decoder models get ``decoder_input_ids``, and heads
    that predict tokens (causal and seq2seq LMs) ``labels``; other heads (sequence or token classification,
    question answering, CTC ...) are probed through a loss computed from their outputs.

    Args:
        model: a prepared model (with or without adapters).
        inputs: keyword arguments for ``model(**inputs)``; by default the probe described above.

    Returns:
        The :class:`GradientFlowResult`.

    Raises:
        NotAModuleError: ``model`` is not a ``torch.nn.Module``.
        GradientFlowError: a trainable parameter got no gradient, nothing can receive one, or a module
            cuts the autograd chain; the message names the first module where the chain breaks.
        InvalidModelError: no probe inputs could be built, or the model's forward rejects the default
            probe; pass ``inputs``.
    """
    if not isinstance(model, nn.Module):
        raise NotAModuleError(
            f"verify_gradient_flow expects a torch.nn.Module (a loaded transformers model), got {type(model).__name__}"
        )
    own_inputs = inputs is None
    feeds = [dict(inputs)] if inputs is not None else _default_feeds(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    probes = [] if trainable else _probe_parameters(model)
    # the probe's forward may edit configs (BERT's problem_type) and install hooks of its own (transformers'
    # output capturing, on the first forward of a vision tower): all of it is reverted afterwards
    saved = Snapshot(model)
    emb = _call_quietly(model, "get_input_embeddings")
    emb_out: list[bool] = []

    def record_embeddings(_m: nn.Module, _i: Any, out: Any) -> None:
        if torch.is_grad_enabled():
            emb_out.extend(t.requires_grad for t in _tensors(out) if t.is_floating_point())

    for _, p, _ in probes:
        p.requires_grad_(True)
    if probes:
        trainable = [(n, p) for n, p, _ in probes]
    hidden = _hide_from_master_weights(model, [p for _, p in trainable])
    saved_grads = [p.grad for _, p in trainable]
    modes = [(m, m.training) for m in model.modules()]
    tracer = _Tracer(model)
    emb_handle = emb.register_forward_hook(record_embeddings) if isinstance(emb, nn.Module) else None
    try:
        with torch.random.fork_rng(devices=[]):
            model.train()
            for _, p in trainable:
                p.grad = None
            out = _probe_forward(model, feeds, tracer, own_inputs)
            loss = _loss_of(out)
            requires = bool(loss.requires_grad)
            if requires:
                try:
                    loss.backward()
                except RuntimeError as exc:
                    found = tracer.breaks()
                    raise GradientFlowError(
                        f"the probe's backward failed ({exc})" + (f": {_describe(found)}" if found else "")
                    ) from exc
        breaks = tracer.breaks()
        cold = dict(tracer.cold_layers)
        checked = _probes_reached(probes, tracer.order, cold, bool(breaks)) if probes else trainable
        missing = [n for n, p in checked if p.grad is None]
        zero = tuple(n for n, p in checked if p.grad is not None and not bool(p.grad.ne(0).any()))
        result = GradientFlowResult(
            len(checked),
            len(checked) - len(missing),
            zero,
            requires,
            float(loss.detach().float().item()),
            tuple(b.name for b in breaks),
        )
    finally:
        tracer.remove()
        if emb_handle is not None:
            emb_handle.remove()
        for (_, p), g in zip(trainable, saved_grads):
            p.grad = g
        for _, p, _ in probes:
            p.requires_grad_(False)
        hidden()
        for m, was in modes:
            m.training = was
        saved.changes().revert()
    where = _describe(breaks) if breaks else ""
    checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    hook_missing = bool(emb_out) and not any(emb_out) and checkpointed
    if missing:
        if probes:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            head = (
                f"{'a probe parameter' if len(missing) == 1 else f'{len(missing)} probe parameters'} inside the "
                f"model ({shown}) got no gradient, so adapters placed there would not train"
            )
        else:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            head = f"{len(missing)} of {len(checked)} trainable parameters got no gradient ({shown})"
        if where:
            raise GradientFlowError(f"{head}: {where}")
        if hook_missing:
            raise GradientFlowError(
                f"{head}: the input embeddings' output does not require grad and checkpointing is on; reentrant "
                "checkpointing needs the input-require-grads hook (model.enable_input_require_grads()), or use "
                "checkpointing='non_reentrant'"
            )
        if cold:
            raise GradientFlowError(f"{head}: {_describe_cold(cold)}")
        raise GradientFlowError(
            f"{head}: no module cut the autograd chain during the probe, so they are not used by this forward "
            "(an unused branch, or inputs that skip them); pass inputs that exercise them, or freeze them"
        )
    if not requires:
        raise GradientFlowError(
            "the output does not require grad: no parameter of the model can be trained"
            + (f"; {where}" if where else "")
        )
    own_breaks = [b for b in breaks if b.own_params]
    if own_breaks:
        raise GradientFlowError(
            f"every trainable parameter got a gradient, but only through side branches (adapters): "
            f"{_describe(own_breaks)}. Training would update parameters before this layer with gradients that "
            "skip the base model's path"
        )
    return result


def _hide_from_master_weights(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], None]:
    """Keep the probe's trainable parameters away from prepare's fp32 master-weights hook during the probe: the
    probe is not a training step (its stand-ins train for this one probe, and the probe's changes to the model
    are reverted, so master weights made here would be lost), and a parameter trained for real gets its master
    weights at the first training forward. Returns the function that ends it."""
    stack = contextlib.ExitStack()
    for m in model.modules():
        for h in m._forward_pre_hooks.values():
            if isinstance(h, MasterWeights):
                stack.enter_context(h.ignoring(params))
    return stack.close


def _probe_forward(model: nn.Module, feeds: list[dict[str, Any]], tracer: _Tracer, own_inputs: bool) -> Any:
    """``model(**feed)`` with the first feed its forward accepts. The caller's inputs are tried alone and
    their error propagates; when the default probe's last feed is rejected too, :class:`InvalidModelError`."""
    for i, feed in enumerate(feeds):
        try:
            return model(**feed)
        except Exception as exc:
            if not own_inputs:
                raise
            if i + 1 < len(feeds):
                tracer.reset()  # e.g. an image the model's layout does not take: try the text-only probe
                continue
            shown = ", ".join(f"{k}{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}" for k, v in feed.items())
            raise InvalidModelError(
                f"cannot probe {type(model).__name__}: its forward rejected kbitprep's default probe ({shown}) "
                f"with {type(exc).__name__}: {exc}. Pass a batch this head accepts: "
                "verify_gradient_flow(model, inputs={...}) (with prepare, use verify=False and call it yourself)"
            ) from exc
    raise InvalidModelError(f"cannot probe {type(model).__name__}: no probe inputs")  # no feeds: not reached


def _probes_reached(
    probes: list[tuple[str, nn.Parameter, str]], ran: Mapping[str, int], cold: Mapping[str, str], breaks: bool
) -> list[tuple[str, nn.Parameter]]:
    """The probe parameters the check counts: those in a layer the probe ran (a text-only probe runs no vision
    tower) and whose output the loss uses. A probe parameter without a gradient, in a layer whose input required
    grad, while no module cut the chain, sits in a layer the model does not use (LLaVA's default
    ``vision_feature_layer=-2`` leaves the last vision layer out): not counted, rather than failed."""
    out = []
    for name, p, layer in probes:
        if layer and layer not in ran:
            continue
        if layer and p.grad is None and layer not in cold and not breaks:
            continue
        out.append((name, p))
    return out


def _describe_cold(cold: dict[str, str]) -> str:
    """Why parameters inside reentrant-checkpointed layers got no gradient: their input did not require grad."""
    first, cls = next(iter(cold.items()))
    more = f" (and {len(cold) - 1} more checkpointed layer(s))" if len(cold) > 1 else ""
    return (
        f"the checkpointed layer {first} ({cls}){more} ran with reentrant checkpointing on a hidden-state input "
        "that does not require grad, so nothing inside it gets a gradient. Its stack does not start from hooked "
        "input embeddings (a speech encoder, a vision tower): kbitprep.prepare hooks such stacks; otherwise "
        "register a forward hook making the stack's input require grad, or use checkpointing='non_reentrant'"
    )


def _probe_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """Frozen floating-point parameters that stand in for adapters while none is attached: one in the first
    layer of each checkpointed stack (``(name, parameter, layer name)``), so every stack (an encoder and a
    decoder, a vision tower and a language model) is probed; without stacks, the one
    :func:`_probe_parameter` picks (layer name ``""``)."""
    skip = _quantized_parameter_ids(model)
    emb = _call_quietly(model, "get_input_embeddings")
    if isinstance(emb, nn.Module):
        skip |= {id(p) for p in emb.parameters()}
    found: list[tuple[str, nn.Parameter, str]] = []
    for stack in anatomy(model).stacks:
        pick = next(
            (
                (f"{lname}.{pname}", p, lname)
                for lname, layer in stack.layers
                for pname, p in layer.named_parameters()
                if id(p) not in skip and type(p.data) is torch.Tensor and p.dtype.is_floating_point
            ),
            None,
        )
        if pick is not None:
            found.append(pick)
    if found:
        return found
    single = _probe_parameter(model)
    return [(single[0], single[1], "")] if single is not None else []


def _probe_parameter(model: nn.Module) -> tuple[str, nn.Parameter] | None:
    """A frozen floating-point parameter inside a checkpointed layer (else anywhere but the input
    embeddings) that stands in for an adapter while no adapter is attached.

    The text decoder is searched first (``model.get_decoder()``), so a vision tower that a text-only
    probe never runs is not chosen.
    """
    emb = _call_quietly(model, "get_input_embeddings")
    skip = {id(p) for p in emb.parameters()} if isinstance(emb, nn.Module) else set()
    skip |= _quantized_parameter_ids(model)  # quantized storage (e.g. AQLM codebooks) never gets a gradient
    names = {id(m): n for n, m in model.named_modules()}
    decoder = _call_quietly(model, "get_decoder")
    scopes: list[nn.Module] = [model]
    if isinstance(decoder, nn.Module) and id(decoder) in names and decoder is not model:
        scopes.insert(0, decoder)
    for scope in scopes:
        prefix = names[id(scope)]
        fallback = None
        for _mname, mod in scope.named_modules():
            inside_layer = hasattr(mod, "gradient_checkpointing") and not hasattr(type(mod), "get_input_embeddings")
            for pname, p in mod.named_parameters():
                if id(p) in skip or type(p.data) is not torch.Tensor or not p.dtype.is_floating_point:
                    continue
                full = ".".join(x for x in (prefix, _mname, pname) if x)
                if inside_layer:
                    return full, p
                if fallback is None:
                    fallback = (full, p)
        if fallback is not None:
            return fallback
    return None


def _quantized_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters the applied plan marks as quantized storage (empty when kbitprep did not prepare the model)."""
    from ._mutation import prepared_state

    state = prepared_state(model)
    if state is None:
        return set()
    names = {a for p in state.report.plan.quantized for a in p.aliases}
    return {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names}
