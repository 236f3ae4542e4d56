"""Optional inputs that are provably zero, dropped before the analysis.

A recurrent layer (LSTM, GRU, RNN) without an initial state starts from zeros, and many
exporters write that zero state out anyway: TorchScript as one ``ConstantOfShape([layers *
dirs, batch, H])`` sliced per layer, paddle2onnx as a ``Tile`` of a zero constant by the batch
size, the dynamo exporter as one zero initializer that every layer reads. Read by several
layers, that one tensor couples the hidden units of all of them into one channel group (a
3-layer speaker encoder prunes the same hidden units in every layer), and behind a computed
``Tile`` its size is unknown, which freezes the group (paddle2onnx's bidirectional LSTM heads
of the OCR recognisers).

Each op rule says which of its optional inputs mean zeros when absent
(:meth:`~graphprune.rules.registry.OpRule.zero_default_inputs`) and whether its output is all
zeros given which inputs are (:meth:`~graphprune.rules.registry.OpRule.zero_filled`: data
movement of zeros, a zero ``ConstantOfShape``, a concatenation of zeros). An input proved
zero that way is dropped: the node then reads the default, the same zeros, so the function is
unchanged, and the chain that built the state dies in the cleanup.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.rules import registry

__all__ = ["drop_zero_inputs", "has_zero_defaults"]

#: constants larger than this are not read to prove them zero
READ_LIMIT = 1 << 22


def has_zero_defaults(model: onnx.ModelProto, opset: int) -> bool:
    """Whether a main-graph node's rule has optional inputs that mean zeros when absent
    (cheap: nothing is imported)."""
    return any(registry.overriding_rule(node.domain or "", node.op_type, opset, "zero_default_inputs")
               for node in model.graph.node)


def drop_zero_inputs(graph: gs.Graph, opset: int) -> int:
    """Drop every optional input that a rule reads as zeros when absent and that is provably
    all zeros; return how many were dropped (the caller cleans up the dead chains)."""
    known: dict[str, bool] = {}

    def zero(tensor: gs.Tensor) -> bool:
        if not tensor.name:
            return False
        if tensor.name not in known:
            known[tensor.name] = False  # a cycle proves nothing
            known[tensor.name] = _zero(tensor)
        return known[tensor.name]

    def _zero(tensor: gs.Tensor) -> bool:
        if isinstance(tensor, gs.Constant):
            shape = tensor.shape
            if shape is None or math.prod(int(n) for n in shape) > READ_LIMIT:
                return False
            values = np.asarray(tensor.values)
            return values.dtype.kind in "biuf" and not values.any()
        if len(tensor.inputs) != 1:  # a graph input
            return False
        node = tensor.inputs[0]
        rule = registry.lookup(node.domain or "", node.op, opset)
        return rule is not None and rule.zero_filled(node, zero)

    outputs = {t.name for t in graph.outputs}
    dropped = 0
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        for k in rule.zero_default_inputs(node) if rule is not None else ():
            if k < len(node.inputs) and node.inputs[k].name and node.inputs[k].name not in outputs \
                    and zero(node.inputs[k]):
                node.inputs[k] = gs.Variable.empty()
                dropped += 1
        while node.inputs and not node.inputs[-1].name:  # trailing absent inputs
            node.inputs.pop()
    return dropped
