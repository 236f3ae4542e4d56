"""ai.onnx.ml ops (graphprune/rules/ml.py): ``Scaler`` in front of an MLP (skl2onnx)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphprune

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("ai.onnx.ml::Scaler",)


def test_a_scaler_in_front_of_an_mlp_hides_nothing() -> None:
    """skl2onnx's ``Scaler`` (ai.onnx.ml) has no ONNX shape inference: every group of the
    MLP behind it was missing (0 groups). It has a rule now (features pass through, its
    offset/scale lists are sliced) and the MatMuls after it derive their shapes."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("Scaler", ["r0"], ["s"], domain="ai.onnx.ml",
                              offset=[float(v) for v in rng.standard_normal(6)],
                              scale=[float(v) for v in rng.uniform(0.5, 2, 6)]),
             helper.make_node("MatMul", ["s", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w0", (4, 6)), ("w1", (6, 16)), ("b1", (16,)), ("w2", (16, 1)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)], ir_version=8)
    analysis = graphprune.analyze(model)
    assert sorted(g.num_units for g in analysis.groups if g.prunable) == [6, 16]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    scaler = next(n for n in result.model.graph.node if n.op_type == "Scaler")
    assert len(helper.get_attribute_value(scaler.attribute[0])) == 3
    onnx.checker.check_model(result.model)  # (no full check: Scaler has no type inference)
