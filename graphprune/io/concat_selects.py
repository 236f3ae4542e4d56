"""Selections from a concatenation that stay within one of its inputs read that input.

A multi-layer recurrent network's final state ``h_n`` is the concatenation of every layer's
final state along the layer axis, and a classifier or encoder reads one part of it,
``h_n[-1]`` (a ``Gather`` of a constant index after a ``Concat``, in the exports of both torch
exporters). A concatenation couples every axis of its inputs but the joined one, so that one
dead read ties the hidden units of all layers into one channel group. Reading the last
layer's state directly computes the same values and leaves the others' states unread (the
cleanup drops the ``Concat`` when nothing else reads it).

Each op rule says whether its output is a constant index range of its input
(:meth:`~graphprune.rules.registry.OpRule.selected_range`) and whether it joins its inputs
(:meth:`~graphprune.rules.registry.OpRule.concat_axis`); a selection whose range falls within
one input becomes a ``Slice`` of that input (followed by a ``Squeeze`` when the selection
dropped the axis), which is a no-op the cleanup keeps small.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io.names import fresh_name
from graphprune.rules import registry

__all__ = ["bypass_concat_selects", "has_concat_selects"]


def has_concat_selects(model: onnx.ModelProto, opset: int) -> bool:
    """Whether a main-graph node that may select a range reads a node that may join its
    inputs (cheap: nothing is imported)."""
    def overrides(node: onnx.NodeProto, method: str) -> bool:
        return registry.overriding_rule(node.domain or "", node.op_type, opset, method) is not None

    joined = {o for node in model.graph.node if overrides(node, "concat_axis") for o in node.output}
    return bool(joined) and any(node.input and node.input[0] in joined and overrides(node, "selected_range")
                                for node in model.graph.node)


def _source(concat: gs.Node, axis: int, start: int, stop: int) -> tuple[gs.Tensor, int] | None:
    """The input of ``concat`` that holds ``start:stop`` along ``axis``, and its offset."""
    offset = 0
    for x in concat.inputs:
        size = x.shape[axis] if x.shape is not None and len(x.shape) > axis else None
        if not isinstance(size, int) or size < 0:
            return None
        if offset <= start and stop <= offset + size:
            return x, offset
        offset += size
    return None


def bypass_concat_selects(graph: gs.Graph, opset: int) -> int:
    """Make every selection that stays within one input of a concatenation read that input;
    return how many were rewritten (the caller cleans up)."""
    taken = set(graph.tensors())
    done = 0
    for node in list(graph.nodes):
        rule = registry.lookup(node.domain or "", node.op, opset)
        selected = rule.selected_range(node) if rule is not None else None
        data = node.inputs[0] if node.inputs else None
        if selected is None or data is None or len(data.inputs) != 1 or data.shape is None \
                or data.dtype is None or not np.issubdtype(np.dtype(data.dtype), np.floating):
            continue  # activations only: shape computations are traced as they are
        concat = data.inputs[0]
        joiner = registry.lookup(concat.domain or "", concat.op, opset)
        axis, start, stop, squeezed = selected
        joined = joiner.concat_axis(concat) if joiner is not None else None
        if joined is None or joined % len(data.shape) != axis or len(concat.outputs) != 1:
            continue
        found = _source(concat, axis, start, stop)
        if found is None:
            continue
        x, offset = found
        y = node.outputs[0]
        part = gs.Variable(fresh_name(f"{y.name}__gp_part", taken), y.dtype) if squeezed else y
        graph.nodes.append(_slice(x, part, axis, start - offset, stop - offset, opset, taken))
        if squeezed:
            graph.nodes.append(_squeeze(part, y, axis, opset, taken))
        node.outputs.clear()
        node.inputs.clear()
        done += 1
    return done


def _constant(values: list[int], taken: set[str], base: str) -> gs.Constant:
    return gs.Constant(fresh_name(base, taken), np.asarray(values, dtype=np.int64))


def _slice(x: gs.Tensor, y: gs.Tensor, axis: int, start: int, stop: int, opset: int,
           taken: set[str]) -> gs.Node:
    name = fresh_name(f"{y.name}__gp_slice", taken)
    if opset < 10:
        return gs.Node("Slice", name, {"starts": [start], "ends": [stop], "axes": [axis]},
                       inputs=[x], outputs=[y])
    bounds = [_constant([v], taken, f"{name}_{what}") for v, what in ((start, "start"), (stop, "end"), (axis, "axis"))]
    return gs.Node("Slice", name, inputs=[x, *bounds], outputs=[y])


def _squeeze(x: gs.Tensor, y: gs.Tensor, axis: int, opset: int, taken: set[str]) -> gs.Node:
    name = fresh_name(f"{y.name}__gp_squeeze", taken)
    if opset < 13:
        return gs.Node("Squeeze", name, {"axes": [axis]}, inputs=[x], outputs=[y])
    return gs.Node("Squeeze", name, inputs=[x, _constant([axis], taken, f"{name}_axes")], outputs=[y])
