"""Channel removal: slice every member of every planned group at once.

For each pruned group the plan names units; a unit expands to element indices on each
member dimension (see :class:`graphprune.analysis.ChannelGroup`). Then, in one sweep:
parameters (weights, biases, norm statistics, per-channel constants) lose those indices
along the member axis; tracked shape literals (Reshape targets, Expand shapes, Resize
sizes) get the new sizes; every node whose rule has a ``rewrite`` fixes its attributes
(grouped Conv ``group``, Split sizes, Slice bounds, GroupNormalization ``num_groups``).
Intermediate shapes are cleared: the caller re-infers them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult
from graphprune.passes.rewrite_context import RewriteContext

from graphprune.analysis import Analysis, Dim
from graphprune.errors import RewriteError
from graphprune.io.blocks import kept
from graphprune.io.ir import clear_intermediate_shapes
from graphprune.io.order import toposort_model
from graphprune.planning.plan import Plan
from graphprune.rules import registry


def removed_elements(analysis: Analysis, plan: Plan) -> dict[Dim, np.ndarray]:
    """Element indices removed from each dimension by ``plan``."""
    by_id = {g.id: g for g in analysis.groups}
    removed: dict[Dim, np.ndarray] = {}
    for gp in plan.groups:
        if not gp.remove:
            continue
        group = by_id[gp.group]
        for dim, idx in group.removed_elements(gp.remove).items():
            removed[dim] = idx
    return removed


class PruneChannelsPass(Pass):
    """Remove the channels a :class:`Plan` names from every member of their groups."""

    def __init__(self, analysis: Analysis, plan: Plan) -> None:
        self.analysis = analysis
        self.plan = plan
        # parameter sizes as analysed (a second run sees them already cut)
        self._sizes = {
            (name, axis): int(t.shape[axis])
            for (name, axis) in removed_elements(analysis, plan)
            if isinstance(t := analysis.context.tensors.get(name), gs.Constant)
            and t.shape is not None and axis < len(t.shape)
        }

    def __repr__(self) -> str:
        pruned = sum(1 for g in self.plan.groups if g.remove)
        return f"PruneChannelsPass(groups={pruned})"

    def _already_applied(self, tensors: dict[str, gs.Tensor], removed: dict[Dim, np.ndarray]) -> bool:
        """True when every sliced parameter already has its pruned size (a second run)."""
        sizes = []
        for (name, axis), idx in removed.items():
            const = tensors.get(name)
            if not isinstance(const, gs.Constant):
                continue
            before = self._sizes.get((name, axis))
            now = const.shape[axis] if const.shape is not None else None
            if before is None or now is None:
                continue
            sizes.append((now, before, before - idx.size))
        if not sizes:
            return False
        if all(now == after for now, _, after in sizes):
            return True
        if all(now == before for now, before, _ in sizes):
            return False
        raise RewriteError("the graph is partly pruned already: channel removal cannot apply")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed = removed_elements(self.analysis, self.plan)
        if not removed:
            return PassResult(graph, False, {"units_removed": 0})
        actx = self.analysis.context
        tensors = graph.tensors()
        if self._already_applied(tensors, removed):
            return PassResult(graph, False)
        shapes = {name: actx.shape(t) for name, t in tensors.items()}

        # 1. parameters
        by_tensor: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for (name, axis), idx in removed.items():
            if isinstance(tensors.get(name), gs.Constant):
                by_tensor[name].append((axis, idx))
        for name, cuts in by_tensor.items():
            const = tensors[name]
            if np.ndim(const.values) == 0:
                raise RewriteError(f"cannot remove channels of the scalar '{name}'")
            # every axis at once, a block of rows at a time (a mapped weight's pages go back as read)
            const.values = kept(const.values, cuts)

        rctx = RewriteContext(graph, removed, shapes, ctx.opset)
        nodes = {n.name: n for n in graph.nodes}

        # 2. tracked shape literals
        pruned_ids = {g.group for g in self.plan.groups if g.remove}
        edits: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
        for group in self.analysis.groups:
            if group.id not in pruned_ids:
                continue
            for se in group.shape_elements:
                if se.dim not in removed:
                    continue
                t = tensors.get(se.dim[0])
                if t is not None:
                    new = rctx.new_size(t, se.dim[1])
                else:  # a dimension only the analysis has (a head count no tensor holds)
                    virtual = actx.tensors.get(se.dim[0])
                    shape = actx.shape(virtual) if virtual is not None else None
                    size = None if shape is None else shape[se.dim[1]]
                    new = None if size is None else size - int(removed[se.dim].size)
                if new is None:
                    raise RewriteError(f"cannot size '{se.dim[0]}' axis {se.dim[1]}")
                slot = edits[(se.node_name, se.input_index)]
                if slot.get(se.element, new) != new:
                    raise RewriteError(
                        f"shape literal {se.element} of node '{se.node_name}' tracks two sizes"
                    )
                slot[se.element] = new
        for (node_name, index), elements in edits.items():
            node = nodes.get(node_name)
            if node is None or not isinstance(node.inputs[index], gs.Constant):
                raise RewriteError(f"shape input {index} of node '{node_name}' is not a constant")
            values = np.array(node.inputs[index].values, copy=True)
            flat = values.reshape(-1)
            for element, new in elements.items():
                flat[element] = new
            rctx.set_input(node, index, flat.reshape(values.shape))

        # 3. per-op rewrites (attributes, split sizes, slice bounds, ...)
        for node in list(graph.nodes):
            rule = registry.lookup(node.domain or "", node.op, ctx.opset)
            if rule is None:
                continue
            touched = any(rctx.changed(t) for t in [*node.inputs, *node.outputs] if t.name)
            if touched:
                rule.rewrite(node, rctx)

        clear_intermediate_shapes(graph)
        toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        count = sum(
            len(gp.remove) for gp in self.plan.groups if gp.remove
        )
        return PassResult(graph, True, {"units_removed": count, "tensors_sliced": len(by_tensor)})
