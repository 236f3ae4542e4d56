"""A ``Reshape`` to a shape computed from open sizes (a TorchScript export's
``data.view(b, c, 1, 1)``, RivaGAN's watermark encoder): ONNX inference gives it no shape at
all, nor anything after it, and every channel group behind it froze ("coupled with an axis of
unknown rank"). The preparation gives such tensors the rank ONNX Runtime's symbolic inference
finds (every size left open)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import ir


def viewed_data(opset: int = 13) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((3, 16, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array([1, 1], np.int64), "ones"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("Shape", ["data"], ["ds"]),
             helper.make_node("Gather", ["ds", "i0"], ["n"], axis=0),
             helper.make_node("Gather", ["ds", "i1"], ["c"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
             helper.make_node("Unsqueeze", ["c", "axis0"], ["c1"]),
             helper.make_node("Concat", ["n1", "c1", "ones"], ["target"], axis=0),  # [N, C, 1, 1]
             helper.make_node("Reshape", ["data", "target"], ["d4"]),
             helper.make_node("Mul", ["x8", "d4"], ["m"]),
             helper.make_node("ReduceSum", ["m", "i1_axes"], ["rs"], keepdims=1),
             helper.make_node("Concat", ["x", "rs"], ["xc"], axis=1),
             helper.make_node("Conv", ["xc", "w1", "b1"], ["y1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "i1_axes"))
    graph = helper.make_graph(
        nodes, "viewed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
                          helper.make_tensor_value_info("x8", TensorProto.FLOAT, ["N", 8, "H", "W"]),
                          helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", "C"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_tensors_after_a_reshape_to_a_computed_shape_get_a_rank():
    model = viewed_data()
    assert "d4" not in {v.name for v in onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info
                        if v.type.tensor_type.HasField("shape")}  # (ONNX inference gives it none)
    prepared = ir.prepare(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in prepared.graph.value_info
             if v.type.tensor_type.HasField("shape")}
    assert ranks["d4"] == 4 and ranks["xc"] == 4 and ranks["r1"] == 4


def test_the_channels_behind_it_are_pruned():
    model = viewed_data()
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    hidden = next(t for t in result.model.graph.initializer if t.name == "w1")
    assert hidden.dims[0] == 8  # 16 -> 8 (frozen before)
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((2, 3, 6, 5)).astype(np.float32),
            "x8": rng.standard_normal((2, 8, 6, 5)).astype(np.float32),
            "data": rng.standard_normal((2, 8)).astype(np.float32)}
    out = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert out.shape == (2, 3, 6, 5) and np.isfinite(out).all()
