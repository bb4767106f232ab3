"""The gradient-flow check: a tiny forward/backward that proves trainable parameters get gradients.

When the check fails it also says *where* the autograd chain breaks: during the probe, a forward hook
on every module records whether a floating-point input required grad and whether any floating-point
output did; the first module (in forward order) whose input requires grad but whose output does not is
named, with its class and, for quantized layers, the class of its weight.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._anatomy import model_configs
from ._snapshot import Snapshot
from .errors import GradientFlowError, InvalidModelError, NotAModuleError

__all__ = ["GradientFlowResult", "verify_gradient_flow"]

#: How many tokens the default probe feeds.
_PROBE_TOKENS = 8


@dataclass(frozen=True)
class GradientFlowResult:
    """Outcome of :func:`verify_gradient_flow`.

    Attributes:
        checked: trainable parameters checked (when the model has none yet, one frozen parameter
            inside a layer is made trainable for the probe, standing in for an adapter).
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
    """Names ``model.forward`` accepts, and whether it also takes ``**kwargs``."""
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


def _default_inputs(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    text_cfg = _text_config(cfg)
    vocab = getattr(text_cfg, "vocab_size", None) if text_cfg is not None else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise InvalidModelError(
            f"cannot build probe inputs for {type(model).__name__} (no vocab_size in its config or text config); "
            "pass inputs={...} to verify_gradient_flow"
        )
    emb = _call_quietly(model, "get_input_embeddings")
    device = next(
        (p.device for p in (emb.parameters() if isinstance(emb, nn.Module) else model.parameters())),
        torch.device("cpu"),
    )
    gen = torch.Generator().manual_seed(0)
    special = _special_token_ids(cfg, text_cfg)
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    ids = allowed[torch.randint(0, len(allowed), (1, _PROBE_TOKENS), generator=gen)].to(device)
    feed: dict[str, Any] = {"input_ids": ids}
    accepted, any_kw = _forward_parameters(model)
    if getattr(cfg, "is_encoder_decoder", False) and ("decoder_input_ids" in accepted or any_kw):
        start = getattr(cfg, "decoder_start_token_id", None)
        start = start if isinstance(start, int) and 0 <= start < vocab else 0
        feed["decoder_input_ids"] = torch.cat([torch.full((1, 1), start, device=device), ids[:, :-1]], dim=1)
    if ("labels" in accepted or any_kw) and _predicts_tokens(model):
        feed["labels"] = ids.clone()
    return feed


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
        self.handles: list[Any] = []
        for name, mod in model.named_modules():
            try:
                self.handles.append(mod.register_forward_hook(self._hook_for(name), with_kwargs=True))
            except (RuntimeError, TypeError, AttributeError):  # e.g. a TorchScript module: not traced
                continue

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
    (adapters not attached), the output must still require grad, which proves gradients will reach
    adapters placed inside the frozen network (this is what the input-require-grads hook is for with
    reentrant checkpointing). And no module may cut the autograd chain: one whose input requires grad
    while its output does not (a quantized kernel without autograd, a ``detach``) is named in the error.
    Gradients, training mode, the RNG state and the model's config objects are restored afterwards.

    The default probe is 8 random token ids (special token ids such as image placeholders excluded;
    the vocabulary comes from ``config`` or its text config), ``decoder_input_ids`` for
    encoder-decoder models, and ``labels`` only for heads that predict tokens (causal and seq2seq LMs).
    Other heads (sequence or token classification, question answering ...) are probed through a loss
    computed from their outputs.

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
    feed = dict(inputs) if inputs is not None else _default_inputs(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    probe = None if trainable else _probe_parameter(model)
    saved_configs = Snapshot.of_objects(model_configs(model))  # the probe's forward may edit configs
    emb = _call_quietly(model, "get_input_embeddings")
    emb_out: list[bool] = []

    def record_embeddings(_m: nn.Module, _i: Any, out: Any) -> None:
        if torch.is_grad_enabled():
            emb_out.extend(t.requires_grad for t in _tensors(out) if t.is_floating_point())

    if probe is not None:
        probe[1].requires_grad_(True)
        trainable = [probe]
    saved_grads = [p.grad for _, p in trainable]
    modes = [(m, m.training) for m in model.modules()]
    tracer = _Tracer(model)
    emb_handle = emb.register_forward_hook(record_embeddings) if isinstance(emb, nn.Module) else None
    try:
        with torch.random.fork_rng(devices=[]):
            model.train()
            for _, p in trainable:
                p.grad = None
            try:
                out = model(**feed)
            except Exception as exc:
                if not own_inputs:
                    raise
                shown = ", ".join(
                    f"{k}{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}" for k, v in feed.items()
                )
                raise InvalidModelError(
                    f"cannot probe {type(model).__name__}: its forward rejected kbitprep's default probe ({shown}) "
                    f"with {type(exc).__name__}: {exc}. Pass a batch this head accepts: "
                    "verify_gradient_flow(model, inputs={...}) (with prepare, use verify=False and call it yourself)"
                ) from exc
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
        missing = [n for n, p in trainable if p.grad is None]
        zero = tuple(n for n, p in trainable if p.grad is not None and not bool(p.grad.ne(0).any()))
        breaks = tracer.breaks()
        result = GradientFlowResult(
            len(trainable),
            len(trainable) - len(missing),
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
        if probe is not None:
            probe[1].requires_grad_(False)
        for m, was in modes:
            m.training = was
        saved_configs.changes().revert()
    where = _describe(breaks) if breaks else ""
    checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    hook_missing = bool(emb_out) and not any(emb_out) and checkpointed
    if missing:
        if probe is not None:
            head = (
                f"a probe parameter inside the model ({probe[0]}) got no gradient, so adapters placed there "
                "would not train"
            )
        else:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            head = f"{len(missing)} of {len(trainable)} trainable parameters got no gradient ({shown})"
        if where:
            raise GradientFlowError(f"{head}: {where}")
        if hook_missing:
            raise GradientFlowError(
                f"{head}: the input embeddings' output does not require grad and checkpointing is on; reentrant "
                "checkpointing needs the input-require-grads hook (model.enable_input_require_grads()), or use "
                "checkpointing='non_reentrant'"
            )
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
