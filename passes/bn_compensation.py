"""Data-free bias compensation from BatchNormalization statistics (opt-in).

The fallback of :class:`~graphprune.passes.bias_compensation.BiasCompensationPass` when there
is no calibration data but the graph still has BatchNormalization: ``E[x_c]`` of every
removed input channel of a linear layer is estimated from the running mean and variance of
the BatchNormalization nodes upstream (:mod:`graphprune.calibration.batchnorm`), and
``W_original[:, R] E[x_R]`` is folded into the layer's bias. Never part of a default run:
without calibration data pruning results stay as they were unless this pass is asked for.

    manager = PassManager([BatchNormCompensationPass(session.prepared, removed)])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphprune.passes.base import PassContext, PassResult
from graphprune.passes.bias_compensation import BiasCompensationPass

from graphprune.calibration.batchnorm import expected_inputs
from graphprune.calibration.linear import linear_view
from graphprune.calibration.stats import LayerStats
from graphprune.io import ir


class BatchNormCompensationPass(BiasCompensationPass):
    """``original``: the original (prepared) model; ``removed``: element indices per
    ``(tensor, axis)``, as :func:`~graphprune.passes.prune_channels.removed_elements`
    gives them."""

    def __init__(
        self, original: onnx.ModelProto, removed: dict[tuple[str, int], np.ndarray], *, store: Any = None
    ) -> None:
        super().__init__(ir.import_graph(original, store), LayerStats(), removed)
        self.model = original
        self.data_dir = getattr(store, "root", None)
        self.skipped: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"{self.name}(removed={len(self.removed)})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not self._done:
            views = []
            for node in self.original.nodes:
                view = linear_view(node, ctx.opset)
                if view is not None and view.group == 1 and view.weight_dim(view.info.in_axis) in self.removed:
                    views.append(view)
            self.stats, self.skipped = expected_inputs(self.model, self.original, views, ctx.opset,
                                                       data_dir=self.data_dir)
        result = super().run(graph, ctx)
        if self.skipped:
            result.stats["skipped"] = [f"{k}: {v}" for k, v in list(self.skipped.items())[:10]]
        return result
