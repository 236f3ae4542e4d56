"""How graph values are declared, through graphsurgeon's export and ONNX Runtime's loader.

* Non-tensor inputs and outputs: graphsurgeon writes a value's type from its ``type`` and
  ``dtype`` and knows three kinds (tensor, sequence, sparse tensor); an optional (``If``
  branches returning an ``optional(sequence)``) made its export fail. Such values never lose
  channels: :func:`hide` exports them untyped and :func:`restore` gives every graph input and
  output, main graph (skl2onnx's ``ZipMap`` maps) and subgraphs, the type the template declares.
  A type *attribute* (``Optional(type=...)``) graphsurgeon cannot carry: :func:`refuse_unwritable`.
* Declared shapes that make ONNX Runtime refuse a graph it ran undeclared:
  :func:`reshape_scalar_reads` (a 1-D tensor where a scalar must be) and
  :func:`drop_outer_value_info` (outer tensors declared inside a branch that never runs for them).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io.graph_reads import subgraphs

__all__ = ["drop_outer_value_info", "hide", "refuse_unwritable", "reshape_scalar_reads", "restore", "unhide"]

#: the kinds of value graphsurgeon's exporter writes
WRITTEN = ("tensor_type", "sequence_type", "sparse_tensor_type")


def hide(graph: gs.Graph) -> list[tuple[gs.Variable, object]]:
    """Drop the dtype of every graph input and output (subgraphs included) of a kind
    graphsurgeon cannot write, so that it exports them untyped; the tensors and their dtypes,
    for :func:`unhide`."""
    hidden = []
    for g in (graph, *graph.subgraphs(recursive=True)):
        for tensor in (*g.inputs, *g.outputs):
            if isinstance(tensor, gs.Variable) and tensor.dtype is not None and getattr(tensor, "type", "tensor_type") \
                    not in WRITTEN:
                hidden.append((tensor, tensor.dtype))
                tensor.dtype = None
    return hidden


def unhide(hidden: list[tuple[gs.Variable, object]]) -> None:
    """Give back the dtypes :func:`hide` dropped (the graph stays as it was)."""
    for tensor, dtype in hidden:
        tensor.dtype = dtype


def restore(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Every graph input and output of ``model`` whose name the ``template`` declares with a
    non-tensor type (a sequence, a map, an optional) gets that declaration back."""
    declared: dict[str, onnx.ValueInfoProto] = {}
    for g in (template.graph, *subgraphs(template.graph)):
        for value in (*g.input, *g.output):
            if value.type.WhichOneof("value") not in (None, "tensor_type"):
                declared.setdefault(value.name, value)
    if not declared:
        return
    for g in (model.graph, *subgraphs(model.graph)):
        for value in (*g.input, *g.output):
            if value.name in declared:
                value.CopyFrom(declared[value.name])


def refuse_unwritable(model: onnx.ModelProto) -> None:
    """An :class:`~graphprune.errors.InvalidModelError` for a model whose nodes carry a type as
    an attribute (``Optional``'s ``type``, ``SequenceEmpty``'s is a dtype and fine): graphsurgeon
    neither reads nor writes those, so no rewrite of it could be written back as it was."""
    from graphprune.errors import InvalidModelError

    for g in (model.graph, *subgraphs(model.graph)):
        for node in g.node:
            for attr in node.attribute:
                if attr.type in (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS):
                    raise InvalidModelError(
                        f"node '{node.name or node.op_type}' ({node.op_type}) has a type attribute '{attr.name}', "
                        "which graphprune cannot carry through a rewrite (optional values are not supported)")


def reshape_scalar_reads(model: onnx.ModelProto, opset: int) -> int:
    """Read every 1-D tensor (of one element, or of a length inference left open) that is read
    where a scalar must be (:attr:`OpRule.strict_scalar_inputs`) through a ``Reshape`` to a scalar,
    which computes the same where the original runs (the op takes one element) and fails where
    it fails; the number of reads.
    An exporter may compute one (ONNX's own ``AffineGrid`` function: ``Range(0, W, 1)`` with
    ``W`` a ``Split`` of the size), and ONNX Runtime runs it while its shape is unknown; once
    the shape is inferred and declared, or the tensor folded, it refuses the model. Main graph
    only; needs the inferred shapes."""
    from onnx import helper, numpy_helper

    from graphprune.io.names import fresh_name
    from graphprune.rules import registry

    graph = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*graph.value_info, *graph.input, *graph.output)
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    taken = {o for n in graph.node for o in n.output} | {n.name for n in graph.node} | set(shapes)
    empty, nodes, count = None, [], 0
    for node in graph.node:
        rule = registry.lookup(node.domain, node.op_type, opset)
        for index in rule.strict_scalar_inputs if rule is not None else ():
            if index < len(node.input) and shapes.get(node.input[index]) in ([1], [None]):
                if empty is None:
                    empty = fresh_name("scalar_shape", taken)
                    graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.int64), empty))
                scalar = fresh_name(f"{node.input[index]}_scalar", taken)
                nodes.append(helper.make_node("Reshape", [node.input[index], empty], [scalar],
                                              name=fresh_name(f"{node.name}_scalar", taken)))
                node.input[index] = scalar
                count += 1
        nodes.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def drop_outer_value_info(model: onnx.ModelProto) -> None:
    """Remove from every subgraph the ``value_info`` of tensors it does not define (graphsurgeon
    writes a subgraph's outer-scope tensors there too; ONNX inference never does). Declared
    there, an outer tensor's shape is checked against a branch that never runs for it: ONNX's
    ``AffineGrid`` function squeezes a 2-D grid in the branch a 3-D size does not take, and
    ONNX Runtime refused the whole model."""
    for g in subgraphs(model.graph):
        defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
        if any(v.name not in defined for v in g.value_info):
            kept = [v for v in g.value_info if v.name in defined]
            del g.value_info[:]
            g.value_info.extend(kept)
