"""Bias compensation: fold the removed channels' mean contribution into consumer biases.

For a linear layer ``y = sum_c W[:, c] (*) x_c + b`` that loses input channels ``R``, the
removed part has the expectation ``sum_{c in R} W[:, c] E[x_c]`` (for a convolution the
kernel offsets of a channel are summed; padding at the borders is ignored). Adding it to
the bias keeps the layer's output exact in expectation (FLAP's bias compensation):

    b' = b + sum_{c in R} W_original[:, c] E[x_c]

``E[x_c]`` comes from the ORIGINAL model on the calibration samples
(:mod:`graphprune.calibration.stats`); the weights of the removed channels from the
original model (the pruned graph no longer has them). A layer that also lost output channels
gets the entries of its kept outputs. Grouped convolutions are left alone (fail closed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.calibration.bias import write_bias
from graphprune.calibration.linear import linear_view
from graphprune.calibration.stats import LayerStats
from graphprune.io.order import toposort_model


class BiasCompensationPass(Pass):
    """``original``: a graph of the original model (read only); ``stats``: input statistics
    of the original's linear layers by node name; ``removed``: element indices per
    ``(tensor, axis)``."""

    def __init__(
        self, original: gs.Graph, stats: LayerStats, removed: dict[tuple[str, int], np.ndarray],
        only: set[str] | None = None,
    ) -> None:
        self.original = original
        self.stats = stats
        self.removed = removed
        #: node names to compensate (``None``: every consumer of removed channels); the
        #: refit's fallback for layers too large for it
        self.only = only
        self._done = False

    def __repr__(self) -> str:
        return f"{self.name}(layers={len(self.stats.layers)})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self._done:
            return PassResult(graph, False, {"layers": 0})
        originals = {n.name: n for n in self.original.nodes}
        names = set(graph.tensors())
        changed = 0
        shift = 0.0
        for node in list(graph.nodes):
            if self.only is not None and node.name not in self.only:
                continue
            view = linear_view(node, ctx.opset)
            if view is None or view.group != 1 or view.is_transpose or view.bias_fixed:  # a transposed
                continue  # conv's positions read different kernel offsets: no single per-channel shift
            cut = self.removed.get(view.weight_dim(view.info.in_axis))
            layer = self.stats.get(node.name)
            source = originals.get(node.name)
            if cut is None or not len(cut) or layer is None or source is None:
                continue
            before = linear_view(source, ctx.opset)
            if before is None:
                continue
            mats = before.matrices()[0]
            columns = mats.reshape(mats.shape[0], before.in_channels(), -1)
            cut = before.input_channels(cut)  # a packed weight's blocks: their channels
            if layer.total is None or layer.total.shape[0] != columns.shape[1]:
                continue
            delta = columns[:, cut, :].sum(axis=2) @ layer.mean[cut]
            out_cut = self.removed.get(view.weight_dim(view.info.out_axis))
            if out_cut is not None and len(out_cut):
                delta = np.delete(delta, out_cut)
            if delta.shape[0] != view.out_channels():
                continue
            bias = view.bias_values()
            bias = np.zeros_like(delta) if bias is None else bias
            write_bias(graph, view, bias + delta, names)
            changed += 1
            shift = max(shift, float(np.abs(delta).max(initial=0.0)))
        toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        self._done = True
        stats: dict[str, Any] = {"layers": changed, "max_bias_shift": round(shift, 6)}
        return PassResult(graph, changed > 0, stats)
