"""Parameter and MAC counts of an ONNX model (static shapes; unknown dims count as 1).

MACs count multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul (the ops that
dominate CNN and transformer cost); elementwise ops are ignored.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper


def _shape_map(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    g = model.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1)
        shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def count_params(model: onnx.ModelProto) -> int:
    """Number of elements in floating-point initializers (weights, biases, norm params)."""
    total = 0
    float_types = {
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
    for init in model.graph.initializer:
        if init.data_type in float_types:
            total += math.prod(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in float_types:
                    total += math.prod(attr.t.dims)
    return int(total)


def count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for one run."""
    shapes = _shape_map(model)
    total = 0
    for node in model.graph.node:
        op = node.op_type
        try:
            if op == "Conv":
                w = shapes[node.input[1]]
                y = shapes[node.output[0]]
                total += math.prod(y) * math.prod(w[1:])
            elif op == "ConvTranspose":
                w = shapes[node.input[1]]
                x = shapes[node.input[0]]
                total += math.prod(x) * math.prod(w[1:])
            elif op == "Gemm":
                a = shapes[node.input[0]]
                y = shapes[node.output[0]]
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                k = a[0] if trans_a else a[1]
                total += math.prod(y) * k
            elif op == "MatMul":
                a = shapes[node.input[0]]
                y = shapes[node.output[0]]
                total += math.prod(y) * a[-1]
        except (KeyError, IndexError):
            continue
    return int(total)


def conv_weight_names(model: onnx.ModelProto) -> list[str]:
    return [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None
