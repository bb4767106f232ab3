"""Registry: entry-point discovery (real installed distributions), laziness, selection, conflicts."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import pytest
import torch

import kbitprep
from kbitprep import Declarations, Registry

from ..distributions import install, on_path
from ..tiny import tiny_llama
from .backends_for_tests import MarkerBackend


def _marked(**kw: object) -> torch.nn.Module:
    m = tiny_llama()
    m.kbitprep_test_marker = True
    return m


def test_import_is_lazy_no_plugin_loaded() -> None:
    code = (
        "import sys, kbitprep; from kbitprep._registry import default_registry as d;"
        "import kbitprep._registry as r; assert r._default is None, 'registry created at import';"
        "assert not [m for m in sys.modules if m.startswith('kbitprep_plugins.')], 'plugins imported at import';"
        "reg = d(); assert reg.discovery_count == 0; reg.names(); assert reg.discovery_count == 1; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_builtins_arrive_through_entry_points() -> None:
    infos = kbitprep.default_registry().infos()
    assert "unquantized" in infos
    info = infos["unquantized"]
    assert info.distribution == "kbitprep" and info.builtin
    assert info.entry_point == "kbitprep_plugins.unquantized:UnquantizedBackend"


def test_installed_third_party_plugin_is_discovered_and_cannot_take_a_builtin_name() -> None:
    site = install("good-plugin")
    with on_path(site), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = Registry()
        info = reg.get("scaled-linear")
        assert (info.distribution, info.version) == ("kbitprep-goodplugin", "1.2.3")
        assert reg.get("unquantized").distribution == "kbitprep"  # not replaced by the impostor
        failures = [f for f in reg.failures() if f.distribution == "kbitprep-goodplugin"]
        assert [(f.name, f.stage) for f in failures] == [("unquantized", "conflict")]
        assert "reserved for the built-in backend" in failures[0].reason
        ours = [w for w in caught if issubclass(w.category, kbitprep.PluginWarning) and "goodplugin" in str(w.message)]
        assert len(ours) == 1

        # the plugin really works end to end on a model it recognises
        import kbitprep_goodplugin as gp

        model = gp.quantize(tiny_llama())
        plan = kbitprep.plan(model, registry=reg)
        assert plan.backend == "scaled-linear"
        assert plan.checkpointing is kbitprep.CheckpointMode.NON_REENTRANT
        assert plan.upcast_policy == "norms" and all(p.module_type == "LlamaRMSNorm" for p in plan.to_upcast)
        assert {p.name.rsplit(".", 1)[-1] for p in plan.quantized} == {"weight", "scale"}  # the scale buffer too
        kbitprep.prepare(model, registry=reg)
        fn = model.model.layers[0]._gradient_checkpointing_func
        assert fn.keywords["use_reentrant"] is False


def test_strict_mode_turns_plugin_failures_into_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    site = install("good-plugin")
    with on_path(site):
        with pytest.raises(kbitprep.PluginContractError, match="reserved for the built-in"):
            Registry(strict=True).names()
        monkeypatch.setenv("KBITPREP_STRICT", "1")
        with pytest.raises(kbitprep.PluginContractError, match="strict mode"):
            Registry().names()
        monkeypatch.delenv("KBITPREP_STRICT")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reg = Registry()
            reg.names()
        with pytest.raises(kbitprep.PluginLoadError, match="kbitprep-goodplugin"):
            kbitprep.plan(tiny_llama(), registry=reg, strict=True)
        assert kbitprep.plan(tiny_llama(), registry=reg).backend == "unquantized"


def test_discovery_happens_once_across_threads() -> None:
    reg = Registry()
    barrier = threading.Barrier(4)
    seen: list[list[str]] = []

    def worker() -> None:
        barrier.wait()
        seen.append(reg.names())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.discovery_count == 1
    assert len({tuple(s) for s in seen}) == 1


def test_register_unregister_and_duplicate_names() -> None:
    reg = Registry(discover=False)
    b = reg.register(MarkerBackend("m1"))
    assert reg.names() == ["m1"]
    with pytest.raises(kbitprep.PluginContractError, match="already taken"):
        reg.register(MarkerBackend("m1"))
    reg.register(MarkerBackend("m1", priority=99), replace=True)
    assert reg.get("m1").backend.priority == 99
    assert reg.unregister("m1") is not b
    with pytest.raises(kbitprep.UnknownBackendError, match="no kbitprep backend is called 'm1'"):
        reg.unregister("m1")
    with pytest.raises(kbitprep.PluginContractError, match="priority"):
        reg.register(MarkerBackend("bad", priority="high"))  # type: ignore[arg-type]


def test_selection_explicit_wins_then_priority_then_tie_is_an_error() -> None:
    reg = Registry()
    reg.register(MarkerBackend("low", priority=60))
    reg.register(MarkerBackend("high", priority=80))
    model = _marked()
    assert kbitprep.plan(model, registry=reg).backend == "high"
    assert kbitprep.plan(model, registry=reg, backend="low").backend == "low"
    assert kbitprep.plan(model, registry=reg, backend="low").forced
    reg.register(MarkerBackend("high-too", priority=80))
    with pytest.raises(kbitprep.BackendConflictError) as err:
        kbitprep.plan(model, registry=reg)
    msg = str(err.value)
    assert "'high' (from <registered>)" in msg and "'high-too' (from <registered>)" in msg


def test_specific_backends_with_disjoint_claims_are_combined() -> None:
    reg = Registry(discover=False)
    reg.register(
        MarkerBackend(
            "emb",
            priority=80,
            modules=("model.embed_tokens",),
            decl=Declarations(quantized=frozenset({"model.embed_tokens.weight"})),
        )
    )
    reg.register(
        MarkerBackend(
            "head",
            priority=70,
            modules=("lm_head",),
            decl=Declarations(quantized=frozenset({"lm_head.weight"}), allow_upcast=False, upcast_note="head breaks"),
        )
    )
    plan = kbitprep.plan(_marked(), registry=reg)
    assert plan.backends == ("emb", "head")
    assert {p.name for p in plan.quantized} == {"model.embed_tokens.weight", "lm_head.weight"}
    with pytest.raises(kbitprep.InvalidPolicyError, match="head breaks"):
        kbitprep.plan(_marked(), registry=reg, upcast="all")


def test_detector_that_raises_is_isolated() -> None:
    class Exploding(MarkerBackend):
        def detect(self, model: torch.nn.Module) -> None:
            raise ZeroDivisionError("boom")

    reg = Registry()
    reg.register(Exploding("exploding", priority=500))
    with pytest.warns(kbitprep.PluginWarning, match="exploding .* detect\\(\\) raised ZeroDivisionError: boom"):
        assert kbitprep.plan(tiny_llama(), registry=reg).backend == "unquantized"
    assert [f.stage for f in reg.failures() if f.name == "exploding"] == ["detect"]
    with pytest.raises((kbitprep.PluginContractError, kbitprep.PluginLoadError), match="boom"):
        kbitprep.plan(tiny_llama(), registry=reg, strict=True)
