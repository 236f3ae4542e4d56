"""Gathers that read a flattened tensor back in its own order are that tensor.

With a dynamic batch, the dynamo exporter lowers an ``as_strided`` view of a tensor whose
strides it cannot prove (torchvision's ConvNeXt: the pooled features before the classifier's
channels-first ``LayerNorm``) to index arithmetic: ``Gather(Reshape(x, [-1]), idx)`` with
``idx = Range(0, batch) * C + arange(C) + ...`` built from the batch the graph reads. Where
``idx`` is ``arange(x.size).reshape(x.shape)`` the result is ``x`` itself, but a ``Gather`` by
computed indices freezes the channels it reads ("gathered axis"): the last stage of ConvNeXt
could not be pruned. :func:`bypass_identity_gathers` lets the readers read ``x``.

``idx`` is computed from sizes only (its inputs are constants and ``Shape`` reads of graph
inputs): it is evaluated with ONNX Runtime at two sets of sizes for the open input axes, and
bypassed only where it is the identity at both.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io import gs_export
from graphprune.io.graph_edits import redirect_uses
from graphprune.rules import registry

__all__ = ["bypass_identity_gathers", "has_indexed_flat_reads"]

#: nodes followed back from an index tensor before giving up
MAX_INDEX_NODES = 64
#: sizes given to the open axes of graph inputs: the batch (axis 0), then any other
_PROBES = ((2, 5), (3, 7))


def has_indexed_flat_reads(model: onnx.ModelProto, opset: int) -> bool:
    """Whether a main-graph node that may read rows by computed indices reads the output of
    a node that may flatten (cheap: nothing is imported)."""
    def overrides(node: onnx.NodeProto, method: str) -> bool:
        return registry.overriding_rule(node.domain or "", node.op_type, opset, method) is not None

    flat = {node.output[0] for node in model.graph.node if node.output and overrides(node, "row_major_flat")}
    constants = {t.name for t in model.graph.initializer}
    return bool(flat) and any(len(node.input) > 1 and node.input[0] in flat and node.input[1] not in constants
                              and overrides(node, "indexed_rows") for node in model.graph.node)


def bypass_identity_gathers(graph: gs.Graph, opset: int) -> int:
    """Readers of ``Gather(Reshape(x, [-1]), idx)`` read ``x`` where ``idx`` enumerates ``x``
    in order (see the module docstring); returns the gathers bypassed (the cleanup drops them)."""
    done = 0
    for node in list(graph.nodes):
        rule = registry.lookup(node.domain or "", node.op, opset)
        if rule is None or not rule.indexed_rows(node) or len(node.outputs) != 1:
            continue
        flat, idx, out = node.inputs[0], node.inputs[1], node.outputs[0]
        if len(flat.inputs) != 1 or flat.shape is None or len(flat.shape) != 1:
            continue
        producer = flat.inputs[0]
        producer_rule = registry.lookup(producer.domain or "", producer.op, opset)
        if producer_rule is None or not producer_rule.row_major_flat(producer):
            continue
        source = producer.inputs[0]
        if any(o is out for o in graph.outputs) or source.shape is None or out.shape is None \
                or len(out.shape) != len(source.shape):
            continue
        if _enumerates(graph, idx, source, opset):
            redirect_uses(out, source)
            done += 1
    return done


def _index_nodes(idx: gs.Tensor, inputs: list[gs.Tensor], opset: int
                 ) -> tuple[list[gs.Node], list[gs.Tensor]] | None:
    """The nodes that compute ``idx`` and the graph inputs they read (only their shapes may
    count: every path from an input passes a node whose rule reads only shapes); None when
    it reads anything else."""
    nodes: dict[int, gs.Node] = {}
    read: dict[str, gs.Tensor] = {}
    stack = [idx]
    graph_inputs = {t.name for t in inputs}
    while stack:
        t = stack.pop()
        if isinstance(t, gs.Constant) or not t.name:
            continue
        if t.name in graph_inputs:
            return None  # a value of an input, not its shape
        if len(t.inputs) != 1:
            return None
        node = t.inputs[0]
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        if len(nodes) > MAX_INDEX_NODES:
            return None
        rule = registry.lookup(node.domain or "", node.op, opset)
        if rule is not None and rule.reads_only_shape:
            source = node.inputs[0]
            if source.name not in graph_inputs:
                return None
            read[source.name] = source
            continue
        stack.extend(node.inputs)
    return list(nodes.values()), list(read.values())


def _concrete(shape: list, sizes: dict[str, int]) -> list[int] | None:
    out = []
    for d in shape:
        if isinstance(d, int) and d >= 0:
            out.append(d)
        elif isinstance(d, str) and d in sizes:
            out.append(sizes[d])
        else:
            return None
    return out


def _enumerates(graph: gs.Graph, idx: gs.Tensor, source: gs.Tensor, opset: int) -> bool:
    """Is ``idx`` ``arange(source.size).reshape(source.shape)`` at both probe sizes?"""
    found = _index_nodes(idx, graph.inputs, opset)
    if found is None:
        return False
    nodes, read = found
    if any(t.shape is None or t.dtype is None for t in read):
        return False
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    try:
        sub = gs.Graph(nodes=nodes, inputs=read, outputs=[idx], opset=graph.opset).copy()
        for t in sub.tensors().values():  # a weight store's stubs: the values themselves
            if isinstance(t, gs.Constant) and isinstance(t._values, gs.ir.tensor.LazyValues):
                t.values = np.array(t._values.load())
        model = gs_export.export_onnx(sub)
        from graphprune.io.runtime import quiet_ort

        with quiet_ort():
            import onnxruntime as ort

            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            for batch, other in _PROBES:
                sizes: dict[str, int] = {}
                feeds = {}
                for t in read:
                    shape = []
                    for axis, d in enumerate(t.shape):
                        if isinstance(d, int) and d >= 0:
                            shape.append(d)
                            continue
                        value = batch if axis == 0 else other
                        if isinstance(d, str):
                            value = sizes.setdefault(d, value)
                        shape.append(value)
                    feeds[t.name] = np.zeros(shape, dtype=np.dtype(t.dtype))
                values = np.asarray(session.run(None, feeds)[0])
                expected = _concrete(list(source.shape), sizes)
                if expected is None or list(values.shape) != expected \
                        or not np.array_equal(values.reshape(-1), np.arange(values.size)):
                    return False
    except Exception:  # not evaluable here: left as it is
        return False
    return True
