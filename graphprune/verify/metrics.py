"""Parameter and MAC counts of an ONNX model (static shapes; unknown dims count as 1).

MACs are the multiply-accumulates each op's rule reports (:meth:`OpRule.macs`: Conv,
ConvTranspose, Gemm and MatMul, the ops that dominate CNN and transformer cost); ops whose
rule does not count (elementwise ops, ops without a rule) add nothing.
"""

from __future__ import annotations

import math
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from graphprune.io import ir
from graphprune.rules import registry

__all__ = ["count_macs", "count_params", "counted_shape"]


def count_params(model: onnx.ModelProto) -> int:
    """Number of elements in floating-point initializers (weights, biases, norm params) and
    8/4-bit integer ones (quantized weights), those of If/Loop/Scan bodies included."""
    float_types = {
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
        onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
    }

    def walk(graph: onnx.GraphProto) -> int:
        total = sum(math.prod(i.dims) for i in graph.initializer if i.data_type in float_types)
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    total += math.prod(attr.t.dims) if attr.t.data_type in float_types else 0
                elif attr.type == onnx.AttributeProto.GRAPH:
                    total += walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(walk(g) for g in attr.graphs)
        return total

    return int(walk(model.graph))


def counted_shape(tensor: gs.Tensor) -> list[int] | None:
    """The tensor's dims with unknown or symbolic ones as 1 (``None``: no shape known)."""
    shape = tensor.shape
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def count_macs(model: onnx.ModelProto, store: Any = None) -> int:
    """Multiply-accumulates of one run (the main graph's nodes, as their rules count them).
    ``store``: the weight store that ``model``'s external weights refer to (shapes behind a
    com.microsoft op are derived by probing, which reads the small constants)."""
    graph = ir.import_graph(model, store)
    opset = ir.default_opset(model)
    if any((n.domain or "") not in ("", "ai.onnx") for n in graph.nodes) and any(
            t.shape is None for n in graph.nodes for t in n.outputs):
        from graphprune.analysis.driver import derive_missing_shapes

        derive_missing_shapes(graph, opset)  # ONNX inference stops at com.microsoft ops
    total = 0
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        macs = rule.macs(node, counted_shape) if rule is not None else None
        total += macs or 0
    return int(total)
