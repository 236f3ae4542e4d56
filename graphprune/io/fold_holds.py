"""What constant folding must leave alone in a model being prepared (:func:`graphprune.io.ir.prepare`).

Folding computes every node whose inputs are constants. Some of those results must not
become constants of their own: an ``Identity`` of a shared weight would be a second copy of
it, a constant input that a rule keeps unfolded (an int8 weight's ``Cast``) would lose what
the analysis follows, and a transformed copy of a weight that another reader keeps (a tied
embedding's ``Transpose``) would store the weight twice. These functions redirect or hide
them (each hidden input becomes a placeholder variable until folding is done; the caller
puts the constant back).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.io.graph_edits import redirect_uses
from graphprune.io.names import fresh_name
from graphprune.rules import registry

__all__ = ["TIED_MIN_ELEMENTS", "hold_tied_weights", "hold_unfolded", "read_aliases_directly"]


def read_aliases_directly(graph: gs.Graph, opset: int) -> None:
    """Consumers of an ``Identity`` of a constant (TorchScript's shared weights) read the
    constant itself: folded, the Identity would become a second copy of the weight."""
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        k = rule.aliased_input(node) if rule is not None else None
        if k is None or len(node.outputs) != 1 or node.outputs[0].name in outputs:
            continue
        if isinstance(node.inputs[k], gs.Constant):
            redirect_uses(node.outputs[0], node.inputs[k])


def hold_unfolded(graph: gs.Graph, opset: int) -> list[tuple[gs.Node, int, gs.Constant]]:
    """Hide from constant folding the constant inputs a rule keeps unfolded
    (``OpRule.unfolded_inputs``): each becomes a placeholder variable until folding is done."""
    held = []
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        for index in rule.unfolded_inputs(node) if rule is not None else ():
            constant = node.inputs[index]
            if isinstance(constant, gs.Constant):
                node.inputs[index] = gs.Variable(f"{constant.name}__gp_held", constant.dtype, constant.shape)
                held.append((node, index, constant))
    return held


def hold_sequences(graph: gs.Graph) -> Callable[[], None]:
    """Hide from constant folding the nodes that make a sequence (or another non-tensor value)
    from constants alone: TorchScript's list-append loop starts from ``SequenceEmpty``, which
    onnx-graphsurgeon's folding evaluated as a tensor (ONNX Runtime refused the type, and all
    folding was skipped). Each is detached until folding is done; the returned function puts
    them back, in their places."""
    held = []
    for position, node in enumerate(graph.nodes):
        if all(isinstance(t, gs.Constant) for t in node.inputs if t.name) and any(
                getattr(t, "type", "tensor_type") != "tensor_type" for t in node.outputs):
            held.append((position, node, list(node.outputs)))
    for _, node, _ in held:
        node.outputs.clear()
        graph.nodes.remove(node)

    def restore() -> None:
        for position, node, outputs in held:
            node.outputs.extend(outputs)
            graph.nodes.insert(min(position, len(graph.nodes)), node)
    return restore


#: smaller weights are folded as before (a scalar or a short vector copied is no weight)
TIED_MIN_ELEMENTS = 64


def hold_tied_weights(graph: gs.Graph, opset: int) -> list[tuple[gs.Node, int, gs.Constant]]:
    """Hide from constant folding a stored float weight where one of its readers computes
    only from constants (it would fold) and another reader stays (a node that reads the
    graph's data, a subgraph, a graph output): folded, the first reader's output would be a
    second weight of its own, a copy that the weight's other reader keeps beside it. The
    dynamo exporter ties a word embedding to the output decoder as one table read by a
    ``Gather`` and by a ``Transpose`` -> ``MatMul``: folding the ``Transpose`` stored the table
    twice (the table and its transpose), and the pruned model was larger than the original
    (re-tying cannot merge them: the transpose is no equal copy). Held, the graph keeps the
    exporter's computation, which the rules follow to the stored weight
    (``ctx.weight_view``), so the tied table's channels prune together. Only readers whose
    output is at least as large as the weight are held (a transposed, cast or reshaped copy):
    a reduction or a shape read from the weight is no copy of it. Each becomes a placeholder
    variable until folding is done, like :func:`hold_unfolded`."""
    nodes = list(graph.nodes)
    main = {id(node) for node in nodes}
    outputs = {id(t) for t in graph.outputs}
    folds: set[int] = set()  # ids of the main-graph nodes that compute from constants alone
    computed: set[int] = set()  # ids of the variables they compute

    def static(tensor: gs.Tensor) -> bool:
        shape = tensor.shape
        return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)

    shapes_read = {id(node) for node in nodes
                   if getattr(registry.lookup(node.domain or "", node.op, opset), "reads_only_shape", False)}

    def shape_only(node: gs.Node) -> bool:
        return id(node) in shapes_read

    changed = True
    while changed:  # a fixed point (one pass and a check where the nodes are in graph order)
        changed = False
        for node in nodes:
            if id(node) in folds or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                continue
            if shape_only(node):
                constant = bool(node.inputs) and static(node.inputs[0])
            else:
                constant = bool(node.inputs) and all(
                    isinstance(t, gs.Constant) or id(t) in computed or (not t.name and not t.inputs)
                    for t in node.inputs)
            if constant:
                folds.add(id(node))
                computed.update(id(t) for t in node.outputs)
                changed = True

    def elements(shape: Any) -> int | None:
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        return int(np.prod(shape, dtype=np.int64))

    held: list[tuple[gs.Node, int, gs.Constant]] = []
    taken = set(graph.tensors())
    for tensor in list(graph.tensors().values()):
        if not isinstance(tensor, gs.Constant) or tensor.dtype is None:
            continue
        try:
            floating = np.dtype(tensor.dtype).kind == "f"
        except TypeError:  # bfloat16, float8: numpy does not know them
            floating = True
        size = elements(tensor.shape)
        if not floating or size is None or size < TIED_MIN_ELEMENTS:
            continue
        readers = list(tensor.outputs)
        stays = id(tensor) in outputs or any(id(r) not in main or id(r) not in folds for r in readers)
        if not stays:
            continue  # every reader folds: the folded values replace the weight
        copies = [r for r in readers if id(r) in folds and not shape_only(r)
                  and any((elements(o.shape) or 0) >= size for o in r.outputs)]
        if not copies:
            continue
        placeholder = gs.Variable(fresh_name(f"{tensor.name}__gp_held", taken), tensor.dtype, tensor.shape)
        for reader in copies:
            for index, value in enumerate(reader.inputs):
                if value is tensor:
                    reader.inputs[index] = placeholder
                    held.append((reader, index, tensor))
    return held


def hold_layer_weights(graph: gs.Graph, opset: int, kept: set[str]) -> list[tuple[gs.Node, int, gs.Constant]]:
    """For an optional fold (one kept where the constants shrink): hide from it the stored
    constants from which a linear layer's weight or bias is computed (a packed projection
    split, a weight transposed or dequantised: ``OpRule.linear``), so that the fold leaves the
    exporter's computation there, which the rules follow to the stored weight, and still folds
    the rest. Before, one such layer rejected the whole fold: the dynamo exporter's
    nn.Transformer kept a 5,000-row positional buffer of which two static slices of 16 and 10
    rows are read (24 % of its parameters, even under ``--lossless``). ``kept``: outputs whose
    fold is kept although a layer reads them (a pruning mask applied to its weight)."""
    held: list[tuple[gs.Node, int, gs.Constant]] = []
    seen: set[int] = set()
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        info = rule.linear(node) if rule is not None else None
        if info is None:
            continue
        todo = [node.inputs[k] for k in (info.weight, info.bias) if k is not None and k < len(node.inputs)]
        while todo:
            tensor = todo.pop()
            if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1 or tensor.name in kept:
                continue
            producer = tensor.inputs[0]
            if id(producer) in seen or any(isinstance(v, gs.Graph) for v in producer.attrs.values()):
                continue
            seen.add(id(producer))
            for index, source in enumerate(producer.inputs):
                if isinstance(source, gs.Constant) and source.shape is not None and len(source.shape) >= 1 \
                        and int(np.prod(source.shape)) > 1:  # (a weight, not a shape or an axis)
                    producer.inputs[index] = gs.Variable(f"{source.name}__gp_held", source.dtype, source.shape)
                    held.append((producer, index, source))
                elif not isinstance(source, gs.Constant):
                    todo.append(source)
    return held
