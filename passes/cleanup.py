"""Cleanup passes: drop Identity nodes and dead code."""

from __future__ import annotations

import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.io.graph_edits import redirect_uses
from graphprune.io.order import toposort_model


class IdentityEliminationPass(Pass):
    """Replace ``y = Identity(x)`` by ``x`` wherever ``y`` is not a graph output."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        outputs = {t.name for t in graph.outputs}
        removed = 0
        for node in list(graph.nodes):
            if node.op != "Identity" or (node.domain or "") not in ("", "ai.onnx"):
                continue
            x, y = node.inputs[0], node.outputs[0]
            if y.name in outputs:
                continue
            redirect_uses(y, x)
            node.outputs.clear()
            node.inputs.clear()
            removed += 1
        if removed:
            toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        return PassResult(graph, bool(removed), {"identities_removed": removed})


class DeadCodeEliminationPass(Pass):
    """Remove nodes and tensors that do not contribute to a graph output."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        removed = before - len(graph.nodes)
        return PassResult(graph, removed > 0, {"nodes_removed": removed})
