"""Small backends defined in the tests to exercise the core on real torch models."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, CheckpointMode, Declarations, Detection, FixUp, find_modules


class MarkerBackend(Backend):
    """Claims models carrying ``kbitprep_test_marker``; declarations given at construction."""

    def __init__(
        self,
        name: str = "marker",
        priority: int = 50,
        decl: Declarations | None = None,
        modules: tuple[str, ...] | None = None,
        requires: tuple[str, ...] = (),
        install_hint: str = "",
    ):
        self.name = name  # type: ignore[misc]
        self.priority = priority  # type: ignore[misc]
        self.requires = requires  # type: ignore[misc]
        self.install_hint = install_hint  # type: ignore[misc]
        self._decl = decl or Declarations()
        self._modules = modules

    def detect(self, model: nn.Module) -> Detection | None:
        if not getattr(model, "kbitprep_test_marker", False):
            return None
        mods = self._modules if self._modules is not None else tuple(find_modules(model, nn.Embedding))
        return Detection(evidence=(f"marker set; claims {len(mods)} modules",), modules=mods)

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        return self._decl


def halfway_failing_fixup() -> FixUp:
    """A fix-up that changes several things on the model, then raises."""

    def apply(model: nn.Module) -> None:
        emb = model.get_input_embeddings()
        emb.weight.data = emb.weight.data.float()  # replaced storage
        emb.register_forward_hook(lambda m, i, o: o)  # a hook
        model.model.layers[0].some_flag = True  # a new attribute
        model.config.use_cache = False
        model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
        raise RuntimeError("fix-up exploded halfway")

    return FixUp("explode", "changes things then raises", apply)


NON_REENTRANT_ONLY = Declarations(
    checkpointing=frozenset({CheckpointMode.NON_REENTRANT}), default_checkpointing=CheckpointMode.NON_REENTRANT
)
