"""Least-squares refit of the linear layers of a pruned model (no fine-tuning).

Every linear layer (Conv, Gemm, MatMul with a weight; grouped and depthwise convolutions per
group) whose input changed because of pruning gets new weights and a bias so that, on the
calibration samples, its output matches the ORIGINAL model's output at the same place, with
the pruned model's (already refit) activations as inputs: ridge least squares in closed form
from Gram statistics, wave by wave in topological order. See
:mod:`graphprune.calibration.sequential` for the maths.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.calibration import refit_targets, runner, sequential


def sliced_parameters(removed: Iterable[tuple[str, int]], graph: gs.Graph) -> set[str]:
    """Names of the constants that channel removal sliced."""
    tensors = graph.tensors()
    return {name for name, _ in removed if isinstance(tensors.get(name), gs.Constant)}


class RefitPass(Pass):
    """Refit the linear layers downstream of the removed channels (``removed``: element
    indices per ``(tensor, axis)``, as :func:`removed_elements` gives them). ``ridge``:
    relative ridge strength; ``None`` chooses it per layer by two-fold cross-validation."""

    mode = "refit"

    def __init__(
        self,
        reference: onnx.ModelProto,
        batches: runner.Batches,
        removed: dict[tuple[str, int], np.ndarray],
        *,
        ridge: float | None = None,
        consumers_only: bool = False,
        store: Any = None,
        recorded: Any = None,
    ) -> None:
        self.reference = reference
        self.batches = batches
        self.removed = removed
        self.ridge = ridge
        self.consumers_only = consumers_only
        self.store = store
        #: original outputs recorded by the statistics run (graphprune.calibration.targets)
        self.recorded = recorded
        self._done = False

    def __repr__(self) -> str:
        ridge = "cross-validated" if self.ridge is None else f"{self.ridge:g}"
        return f"{self.name}(samples={sum(self.batches.sizes)}, ridge={ridge})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self._done or not self.removed:
            return PassResult(graph, False, {"layers": 0})
        skipped: dict[str, str] = {}
        targets = refit_targets.find_targets(
            graph, ctx.opset, changed=sliced_parameters(self.removed, graph),
            removed=self.removed, consumers_only=self.consumers_only, skipped=skipped,
            shared=self.mode == "refit",
        )
        engine = sequential.Reconstructor(
            self.reference, self.batches, mode=self.mode, ridge=self.ridge, store=self.store,
            recorded=self.recorded if self.mode == "refit" else None,
        )
        stats = engine.run(graph, self.reference, targets)
        if skipped:
            stats["not_refit"] = len(skipped)
            stats["skipped"] = [f"{k}: {v}" for k, v in list(skipped.items())[:10]]
        elif not targets:
            stats["skipped"] = ["no linear layer with a float or dequantized constant weight reads the "
                                "changed tensors (weights computed in the graph are not refit)"]
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        self._done = True
        return PassResult(graph, bool(stats.get("layers")), stats)
