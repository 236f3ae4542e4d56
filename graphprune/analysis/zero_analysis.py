"""Lossless units: channels of a group that are zero (or constant) wherever they are read.

:func:`analyze_constants` runs every rule's ``zero_output`` over a graph, in topological
order, and records the channel vector of each tensor (the lattice and its maths are in
:mod:`graphprune.analysis.constants`). :func:`find_zero_groups` reads those vectors at the
consumers of every exact channel group.

Removing unit ``u`` of an exact channel group is equivalent to zeroing its producer and
consumer parameters (see :mod:`graphprune.verify.validate`). The original function is unchanged when,
at every consumer (a Conv/Gemm/MatMul weight axis with role ``consumer``), either the weight
slice of ``u`` is already zero or the activation it reads is identically zero on ``u``, and the
channel reaches nothing else (no activation-activation contraction, no op outside the group).
A unit whose consumers read a known non-zero constant becomes such a unit once the constant is
folded into the consumers' biases, which is exact for an unpadded Conv and for Gemm.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.constants import ChannelValues, ConstantContext, conv_is_padded
from graphprune.analysis.roles import CONSUMER
from graphprune.io import gs_export
from graphprune.io.order import toposort_model
from graphprune.rules import registry

if TYPE_CHECKING:
    from graphprune.analysis.dims import Dim
    from graphprune.analysis.driver import Analysis
    from graphprune.analysis.groups import ChannelGroup

__all__ = [
    "ConsumerUse",
    "GroupZeros",
    "analyze_constants",
    "consumer_nodes",
    "ensure_shapes",
    "find_zero_groups",
]


def ensure_shapes(graph: gs.Graph, opset: int) -> None:
    """Give every intermediate tensor an inferred shape (in place), if some are missing."""
    missing = [
        t for t in graph.tensors().values()
        if isinstance(t, gs.Variable) and t.shape is None and t.inputs
    ]
    if not missing:
        return
    import onnx

    from graphprune.io import model_io

    toposort_model(graph)
    model = gs_export.export_onnx(graph)
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    for entry in graph.import_domains or []:
        if entry.domain not in ("", "ai.onnx"):
            model.opset_import.append(entry)
    inferred = model_io.infer_shapes(model)
    by_name: dict[str, Any] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        if info.type.HasField("tensor_type"):
            by_name[info.name] = info.type.tensor_type
    for t in missing:
        tt = by_name.get(t.name)
        if tt is None or not tt.HasField("shape"):
            continue
        t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        if t.dtype is None and tt.elem_type:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)


def analyze_constants(graph: gs.Graph, opset: int) -> ConstantContext:
    """Run every rule's ``zero_output`` over ``graph`` in topological order."""
    ctx = ConstantContext(opset)
    toposort_model(graph)
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        if rule is None:
            continue
        try:
            outs = rule.zero_output(node, ctx)
        except Exception:  # a rule that cannot tell knows nothing: fail closed
            continue
        for tensor, state in zip(node.outputs, outs, strict=False):
            if state is None or not tensor.name or not state.any_known:
                continue
            size = ctx.size(tensor, state.axis)
            if size is None or size != state.values.size:
                continue
            ctx.states[tensor.name] = ChannelValues(state.axis % len(ctx.shape(tensor) or [0]), state.values)
    return ctx


@dataclass
class ConsumerUse:
    """One consumer of a group: a parameter axis that reads the channel, its node and input."""

    param: Dim
    node: gs.Node
    activation: Dim | None


@dataclass
class GroupZeros:
    """The lossless findings for one channel group."""

    group: ChannelGroup
    #: units removable now (every consumer reads zero or has zero weights, or none reads them)
    zero_units: list[int] = field(default_factory=list)
    #: units removable once their constants are folded into the consumers' biases
    constant_units: list[int] = field(default_factory=list)
    consumers: list[ConsumerUse] = field(default_factory=list)
    #: per consumer index: per element of its activation dim, the constant read (NaN unknown)
    inputs: list[np.ndarray | None] = field(default_factory=list)
    skipped: str | None = None


def consumer_nodes(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    """Tensor name -> the nodes that read it."""
    users: dict[str, list[gs.Node]] = defaultdict(list)
    for node in graph.nodes:
        for t in node.inputs:
            if t.name:
                users[t.name].append(node)
    return users


def _rule(node: gs.Node, opset: int) -> registry.OpRule | None:
    return registry.lookup(node.domain or "", node.op, opset)


def _leak(
    group: ChannelGroup, users: dict[str, list[gs.Node]], tensors: dict[str, gs.Tensor], opset: int
) -> str | None:
    """Why some channel of ``group`` reaches something other than its consumers (or None)."""
    members = group.unit_of
    for dim in members:
        t = tensors.get(dim[0])
        if not isinstance(t, gs.Variable):
            continue
        for node in users.get(dim[0], []):
            rule = _rule(node, opset)
            if rule is not None and rule.reads_only_shape:
                continue
            if any((o.name, a) in members for o in node.outputs for a in range(len(o.shape or []))):
                continue
            if any(
                isinstance(p, gs.Constant) and (p.name, a) in members and group.roles.get((p.name, a)) == CONSUMER
                for p in node.inputs for a in range(len(p.shape))
            ):
                continue
            return f"channel of '{dim[0]}' reaches {node.op} '{node.name}' outside the group"
    return None


def find_zero_groups(analysis: Analysis, constants: ConstantContext) -> list[GroupZeros]:
    """Per exact, unfrozen group with producers: which units are zero or constant at consumers."""
    graph = analysis.graph
    tensors = analysis.context.tensors
    users = consumer_nodes(graph)
    found: list[GroupZeros] = []
    for group in analysis.groups:
        if group.is_frozen or not group.is_exact or not group.producers or group.num_units < 2:
            continue
        info = GroupZeros(group)
        found.append(info)
        reason = _leak(group, users, tensors, analysis.opset)
        if reason is not None:
            info.skipped = reason
            continue
        n = group.num_units
        zero_ok = np.ones(n, dtype=bool)
        const_ok = np.ones(n, dtype=bool)
        has_consumer = np.zeros(n, dtype=bool)
        for dim in group.params:
            if group.roles.get(dim) != CONSUMER:
                continue
            weight = tensors[dim[0]]
            nodes = users.get(dim[0], [])
            if len(nodes) != 1:
                info.skipped = f"consumer weight '{dim[0]}' shared by {len(nodes)} nodes"
                break
            node = nodes[0]
            activation = None
            for t in node.inputs:
                if isinstance(t, gs.Variable) and t.shape is not None:
                    for a in range(len(t.shape)):
                        if (t.name, a) in group.unit_of:
                            activation = (t.name, a)
            use = ConsumerUse(dim, node, activation)
            info.consumers.append(use)
            labels = group.unit_of[dim]
            free = labels >= 0  # -1: pinned elements, in no unit
            labels = labels[free]
            w = np.asarray(weight.values)
            rows = np.moveaxis(w, dim[1], 0).reshape(w.shape[dim[1]], -1)
            col_zero = ~(rows != 0).any(axis=1)[free]
            has_consumer[labels] = True
            # units whose every weight slice is zero
            unit_col_zero = np.ones(n, dtype=bool)
            np.logical_and.at(unit_col_zero, labels, col_zero)
            read: np.ndarray | None = None
            unit_zero = np.zeros(n, dtype=bool)
            unit_known = np.zeros(n, dtype=bool)
            if activation is not None:
                vector = constants.along(tensors[activation[0]], activation[1])
                if vector is not None:
                    read = vector
                    act_labels = group.unit_of[activation]
                    vector = vector[act_labels >= 0]
                    act_labels = act_labels[act_labels >= 0]
                    unit_zero = np.ones(n, dtype=bool)
                    np.logical_and.at(unit_zero, act_labels, vector == 0)
                    unit_known = np.ones(n, dtype=bool)
                    np.logical_and.at(unit_known, act_labels, ~np.isnan(vector))
                    present = np.zeros(n, dtype=bool)
                    present[act_labels] = True
                    unit_zero &= present
                    unit_known &= present
            info.inputs.append(read)
            zero_here = unit_col_zero | unit_zero
            zero_ok &= zero_here
            const_ok &= zero_here | (unit_known & _foldable(node, dim, constants, analysis.opset))
        if info.skipped is not None:
            continue
        # a unit that meets no consumer (its channel only reaches dead ends) is dead: the
        # leak check above guarantees it reaches nothing else, so it is removable as well
        const_ok &= has_consumer
        # where the group's channels are read all at once (DynamicQuantizeLinear's range:
        # CouplingContext.zeroed_activations), or summed over in a product of two activations
        # (zeroed_axes), only a channel that is exactly 0 there goes
        for dim, labels in group.unit_of.items():
            if dim[0] not in analysis.context.zeroed_activations and dim not in analysis.context.zeroed_axes:
                continue
            vector = constants.along(tensors[dim[0]], dim[1])
            zero_there = np.zeros(n, dtype=bool)
            if vector is not None:
                zero_there[:] = True
                np.logical_and.at(zero_there, labels[labels >= 0], vector[labels >= 0] == 0)
            zero_ok &= zero_there
            const_ok &= zero_there
        info.zero_units = [int(u) for u in np.nonzero(zero_ok)[0]]
        info.constant_units = [int(u) for u in np.nonzero(const_ok & ~zero_ok)[0]]
    return found


def _foldable(node: gs.Node, dim: Dim, constants: ConstantContext, opset: int) -> bool:
    """Can a constant read by this consumer be folded into its bias exactly?

    Yes for an ungrouped, unpadded convolution reading it through weight axis ``dim`` and for
    a dense layer with a bias input (Gemm) whose constant weight is ``dim``'s tensor, when the
    bias is a constant or absent (see :meth:`OpRule.linear`).
    """
    rule = _rule(node, opset)
    info = rule.linear(node) if rule is not None else None
    if info is None:
        return False
    weight = node.inputs[info.weight]
    bias = ConstantContext.present(node, info.bias) if info.bias is not None else None
    if bias is not None and not isinstance(bias, gs.Constant):
        return False
    if info.kernel == "conv":
        if info.group != 1 or dim != (weight.name, info.in_axis):
            return False
        kernel = [int(k) for k in np.asarray(weight.values).shape[2:]]
        return not conv_is_padded(node, kernel, constants.shape(node.inputs[info.data]))
    if info.kernel == "dense" and info.bias is not None:
        if not isinstance(weight, gs.Constant) or weight.name != dim[0]:
            return False
        return bias is None or info.beta != 0.0
    return False
