"""kbitprep.plugin.detect_layers: the one detector helper, and class matching by re-exported paths."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kbitprep.plugin import detect_layers, find_modules

_LAYERS = """
import torch
from torch import nn

class ToyQuantLinear(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(n, n, dtype=torch.int8))
"""


@pytest.fixture
def toyquant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    pkg = tmp_path / "toyquant_reexport"
    pkg.mkdir()
    (pkg / "layers.py").write_text(_LAYERS)
    (pkg / "__init__.py").write_text("from .layers import ToyQuantLinear\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("toyquant_reexport")
    yield mod
    for name in [n for n in sys.modules if n.startswith("toyquant_reexport")]:
        del sys.modules[name]


def _model(toyquant) -> nn.Module:  # type: ignore[no-untyped-def]
    return nn.Sequential(toyquant.ToyQuantLinear(4), nn.Linear(4, 4), toyquant.ToyQuantLinear(4))


def test_class_given_by_its_reexported_path_matches(toyquant) -> None:  # type: ignore[no-untyped-def]
    model = _model(toyquant)
    assert toyquant.ToyQuantLinear.__module__ == "toyquant_reexport.layers"
    assert find_modules(model, "toyquant_reexport.ToyQuantLinear") == ["0", "2"]
    assert find_modules(model, "toyquant_reexport.layers.ToyQuantLinear") == ["0", "2"]


def test_a_path_whose_module_is_not_imported_is_never_imported() -> None:
    assert "surely_not_a_module_xyz" not in sys.modules
    assert find_modules(nn.Sequential(nn.Linear(2, 2)), "surely_not_a_module_xyz.Linear") == []
    assert "surely_not_a_module_xyz" not in sys.modules


def test_detect_layers_groups_evidence_and_claims_modules(toyquant) -> None:  # type: ignore[no-untyped-def]
    det = detect_layers(_model(toyquant), "toyquant_reexport.ToyQuantLinear")
    assert det is not None
    assert det.evidence == ("2 x toyquant_reexport.layers.ToyQuantLinear",)
    assert det.modules == ("0", "2")


def test_detect_layers_without_layers_returns_none_and_a_flag_alone_claims_nothing() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model.is_loaded_in_4bit = True  # type: ignore[assignment]
    assert detect_layers(model, "bitsandbytes.nn.Linear4bit", flags=("is_loaded_in_4bit",)) is None


def test_detect_layers_claims_by_quantization_method_only_when_asked() -> None:
    model = nn.Sequential(nn.Linear(2, 2, dtype=torch.bfloat16))
    model.quantization_method = "quanto"  # type: ignore[assignment]
    assert detect_layers(model, "optimum.quanto.QLinear", quant_methods=("quanto",)) is None
    det = detect_layers(model, "optimum.quanto.QLinear", quant_methods=("quanto",), claim_without_layers=True)
    assert det is not None and det.modules == () and det.evidence == ("quantization_method: quanto",)


def test_detect_layers_custom_description(toyquant) -> None:  # type: ignore[no-untyped-def]
    det = detect_layers(_model(toyquant), toyquant.ToyQuantLinear, describe=lambda m: f"{type(m).__name__} (int8)")
    assert det is not None and det.evidence == ("2 x ToyQuantLinear (int8)",)


def test_a_flag_the_library_sets_itself_claims_only_when_asked() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model.hqq_quantized = True  # type: ignore[assignment]
    assert detect_layers(model, "hqq.core.quantize.HQQLinear", flags=("hqq_quantized",)) is None
    det = detect_layers(model, "hqq.core.quantize.HQQLinear", flags=("hqq_quantized",), claim_without_layers=True)
    assert det is not None and det.modules == () and det.evidence == ("hqq_quantized=True",)
