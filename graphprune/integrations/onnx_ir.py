"""graphprune as an onnx-ir pass.

>>> import onnx_ir as ir                                              # doctest: +SKIP
>>> from graphprune.integrations.onnx_ir import PrunePass           # doctest: +SKIP
>>> manager = ir.passes.PassManager([PrunePass(ratio=0.5), OtherPass()])  # doctest: +SKIP
>>> result = manager(ir.load("model.onnx"))                         # doctest: +SKIP
>>> result.modified, result.model                                   # doctest: +SKIP

``PrunePass(ratio=..., **options)`` takes the keyword options of :func:`graphprune.prune`
(``criterion``, ``round_to``, ``keep``, ``lossless``, ``erase_blocks``, ``head_ratio``,
...), checked when the pass is made. It works on an ``onnx_ir.Model`` in memory: the model
goes to a ``ModelProto`` with onnx-ir's serde (external tensors are read into it), through
the same pipeline as ``graphprune prune`` (analysis, plan, rewrite, verification), and back.
The pass is in place: the input model object receives the pruned graph.

``modified`` is true when the plan removed channels or erased operators. A pruned model is
marked in its metadata (``graphprune.pruned``); the pass leaves a marked model alone, so a
``PassManager`` that runs its passes several times prunes once, and a second run reports
``modified=False``. ``report`` holds the last run's report (:mod:`graphprune.pipeline.report`).
A failed verification raises :class:`graphprune.errors.VerificationError`; the model is
left unchanged then.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

__all__ = ["MARK", "PrunePass"]

#: metadata key set on a model this pass pruned (its value: the options, as JSON)
MARK = "graphprune.pruned"


def _prune_options() -> set[str]:
    from graphprune.api import prune

    return {name for name, p in inspect.signature(prune).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _to_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a self-contained ModelProto (external tensors of the main graph read in)."""
    proto = ir.to_proto(model)
    external = {name: value.const_value for name, value in model.graph.initializers.items()
                if isinstance(value.const_value, ir.ExternalTensor)}
    if external:
        for tensor in proto.graph.initializer:
            source = external.get(tensor.name)
            if source is None:
                continue
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = source.tobytes()
    return proto


class PrunePass(InPlacePass):
    """Prune an ``onnx_ir.Model`` with graphprune (see the module docstring)."""

    def __init__(self, ratio: float | None = None, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - _prune_options())
        if unknown:
            raise TypeError(f"PrunePass got unknown option(s) {', '.join(unknown)}; it takes the "
                            f"options of graphprune.prune: {', '.join(sorted(_prune_options()))}")
        self.options: dict[str, Any] = {**({"ratio": ratio} if ratio is not None else {}), **options}
        self.report: dict[str, Any] | None = None

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "progress")
        return f"PrunePass({shown})"

    def _mark(self) -> str:
        return json.dumps({k: v for k, v in self.options.items() if k != "progress"},
                          default=str, sort_keys=True)

    def call(self, model: ir.Model) -> PassResult:
        from graphprune.api import prune

        if MARK in model.metadata_props:
            return PassResult(model, modified=False)
        with prune(_to_proto(model), **self.options) as result:  # its weight folder goes at once
            self.report = result.report
            plan = result.plan
            if not plan.units_removed and not plan.erase:
                return PassResult(model, modified=False)
            pruned = ir.from_proto(result.model)
        model.graph = pruned.graph
        model.functions.clear()
        model.functions.update(pruned.functions)
        model.ir_version = pruned.ir_version
        model.metadata_props[MARK] = self._mark()
        return PassResult(model, modified=True)
