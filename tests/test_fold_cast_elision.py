"""Constant folding around ``Cast(int -> float) -> op -> Cast(-> int)``
(:mod:`graphprune.io.folding`).

onnx-graphsurgeon's folding first runs such an op on the integers. It looks only at the inputs
that come from the cast: a float input of another origin stays float (the op gets an integer
and a float, ONNX Runtime refuses the fold, and the preparation skipped folding altogether:
OPT's position ids ``(cumsum(mask) * mask - 1).long()`` in the PyTorch frontend's dynamo export
froze every attention head), and a float constant is truncated (``(n * 0.5).long()`` folded to
``n * 0``). Both graphs here are folded now, to the values ONNX Runtime computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from graphprune.io import ir


def _const(name: str, values: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(values, name))


def _model(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": np.array([[10, 20, 30, 40]], np.int64)})[0]


def test_an_op_between_a_cast_and_a_float_of_another_origin_is_folded():
    model = _model([
        _const("mask", np.ones((1, 4), np.float32)),
        _const("one", np.array(1, np.int64)),
        _const("axis", np.array(1, np.int64)),
        helper.make_node("CumSum", ["mask", "axis"], ["cumsum"]),
        helper.make_node("Mul", ["cumsum", "mask"], ["masked"]),
        helper.make_node("Cast", ["one"], ["one_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["masked", "one_f"], ["position"]),
        helper.make_node("Cast", ["position"], ["position_i"], to=TensorProto.INT64),
        helper.make_node("Add", ["ids", "position_i"], ["out"]),
    ])
    prepared = ir.prepare(model)
    assert [n.op_type for n in prepared.graph.node] == ["Add"]  # everything else folded
    np.testing.assert_array_equal(_run(prepared), _run(model))
    np.testing.assert_array_equal(_run(prepared), [[10, 21, 32, 43]])


def test_a_fractional_constant_is_not_truncated_by_folding():
    model = _model([
        _const("n", np.array([[3, 5, 7, 9]], np.int64)),
        _const("half", np.array(0.5, np.float32)),
        helper.make_node("Cast", ["n"], ["n_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["n_f", "half"], ["halved"]),
        helper.make_node("Cast", ["halved"], ["halved_i"], to=TensorProto.INT64),
        helper.make_node("Add", ["ids", "halved_i"], ["out"]),
    ])
    prepared = ir.prepare(model)
    assert [n.op_type for n in prepared.graph.node] == ["Add"]
    np.testing.assert_array_equal(_run(prepared), [[11, 22, 33, 44]])  # floor(n / 2), not n * 0
