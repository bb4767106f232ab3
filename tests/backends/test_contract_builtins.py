"""kbitprep's shipped contract suite (:mod:`kbitprep.testing`) applied to every built-in backend.

One test class per row of the backend matrix (``tests/backends/cases/*.py``): the same checks a
third-party plugin author runs, proven here on the real built-in backends and real quantized tiny
models. Rows whose packages are missing skip with the reason.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import pytest
from torch import nn

import kbitprep
from kbitprep._registry import module_index_scope
from kbitprep.plugin import Backend, missing_packages
from kbitprep.testing import BackendContract, count_module_walks

from .case import BackendCase
from .registry_of_cases import all_cases

#: Built-in backends that claim a model as a whole rather than specific modules.
GENERIC = {"unquantized", "hf-quantizer"}
#: Built-in backends whose models hold no quantized storage.
UNQUANTIZED = {"unquantized"}


class _BuiltinContract(BackendContract):
    """The contract suite bound to one matrix row; the backend is the registered built-in."""

    case: BackendCase

    @pytest.fixture(autouse=True)
    def _row_context(self) -> Iterator[None]:
        if self.case.stand_in:  # the output must say so
            warnings.warn(f"row {self.case.id!r} uses a stand-in: {self.case.stand_in}", UserWarning, stacklevel=1)
        with self.case.entered():  # e.g. the EETQ row's stand-in, only for the duration of the test
            yield

    def _skip_if_missing(self) -> None:
        missing = missing_packages(self.case.requires)
        if missing:
            pytest.skip(f"not installed: {', '.join(missing)}")

    def get_backend(self) -> Backend:
        self._skip_if_missing()
        info = kbitprep.default_registry().get(self.case.backend)
        assert info.builtin, f"{self.case.backend!r} comes from {info.distribution}, not kbitprep"
        return info.backend

    def make_model(self) -> nn.Module:
        self._skip_if_missing()
        return self.case.build()

    def make_other_model(self) -> nn.Module | None:
        if self.case.backend in UNQUANTIZED:
            return None  # it claims plain models by design
        return super().make_other_model()

    def test_detectors_and_declarations_walk_the_model_once(self) -> None:
        """Built-ins only (a third-party plugin may walk for itself): inside one index scope, every
        installed detector and the chosen backends' declarations read the model's one ModuleIndex."""
        backend = self.require_available()
        model = self.make_model()
        reg = kbitprep.default_registry()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with count_module_walks(model) as walks, module_index_scope(model):
                sel = reg.select(model)
                for info, det in sel.detections:
                    reg.declare(info, model, det)
        assert sel.primary.name == backend.name
        assert walks.count("kbitprep_plugins", "kbitprep.plugin", "kbitprep._registry") <= 1, str(walks)


def _class_name(case: BackendCase) -> str:
    return "TestContract_" + re.sub(r"\W", "_", case.id)


#: Checks of the shipped suite that depend on the backend alone (a subprocess import), or that the matrix
#: (``test_matrix.py``) makes on every row anyway: run on the first row of each backend only, so every
#: backend still passes the whole shipped suite and every row still gets every check, once.
PER_BACKEND = (
    "test_module_import_does_not_import_its_libraries",
    "test_detects_its_model_with_evidence",
    "test_plan_protects_quantized_storage",
    "test_prepare_and_undo_are_exact",
    "test_gradients_flow_after_prepare",
    "test_schemes_are_well_formed",
    "test_detectors_and_declarations_walk_the_model_once",
)

_seen: set[str] = set()
for _case in all_cases():
    _attrs: dict[str, object] = {
        "case": _case,
        "claims_modules": _case.backend not in GENERIC,
        "holds_quantized_storage": _case.backend not in UNQUANTIZED,
        "__doc__": f"The shipped contract suite on the matrix row {_case.id!r} (backend {_case.backend!r}).",
    }
    if _case.backend in _seen:
        _attrs.update(dict.fromkeys(PER_BACKEND))  # None: not collected for this row
    _seen.add(_case.backend)
    _cls = type(_class_name(_case), (_BuiltinContract,), _attrs)
    globals()[_cls.__name__] = _cls
del _case, _cls, _attrs, _seen
