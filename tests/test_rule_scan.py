"""``Scan`` (graphprune/rules/loop_rnn.py ``ScanRule``): no coupling rule, so the groups that
reach it freeze with the reason; its body runs once per sequence element, so its layers are
named as left out of the MAC count (``report["macs_uncounted"]``)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("Scan",)


def _model() -> onnx.ModelProto:
    """x [T, 4] -> MatMul -> Relu -> MatMul (T x 8) -> Scan (state += x_t @ wb) -> MatMul -> y."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "wb"], ["m"]), helper.make_node("Add", ["s_in", "m"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "step", [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [8]),
                 helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [8]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [8])])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["seq"]),
             helper.make_node("Scan", ["s0", "seq"], ["s", "ys"], body=body, num_scan_inputs=1),
             helper.make_node("MatMul", ["s", "w2"], ["y"])]
    inits = [numpy_helper.from_array(np.zeros(8, dtype=np.float32), "s0")]
    inits += [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
              for name, shape in (("w0", (4, 16)), ("w1", (16, 8)), ("wb", (8, 8)), ("w2", (8, 2)))]
    graph = helper.make_graph(nodes, "scan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("ys", TensorProto.FLOAT, [5, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_scan_freezes_what_reaches_it_and_its_body_is_named_uncounted() -> None:
    result = graphprune.prune(_model(), ratio=0.5)
    report = result.report
    assert report["verification"]["ok"]
    assert report["macs_uncounted"] == {"Scan": 1}
    inits = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert inits["w0"] == (4, 8) and inits["w1"] == (8, 8)  # the hidden layer in front is pruned
    assert inits["w2"] == (8, 2)  # what reaches the Scan is not pruned
    assert "no rule for Scan" in json.dumps(report["frozen"])
