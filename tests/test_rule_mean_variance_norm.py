"""``MeanVarianceNormalization`` without ``axes``: ONNX's shape inference of the op's function
fails there, which left every tensor after it without a rank and froze every group downstream
("coupled with an axis of unknown rank"). The rule gives its output the input's shape; the
channels it normalises per channel stay frozen (ONNX Runtime: a zeroed channel reads NaN), the
groups after it prune and verify."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("MeanVarianceNormalization",)


def _model() -> onnx.ModelProto:
    """x -> Conv c1 (8) -> MVN (default axes) -> Conv c2 (16) -> Relu -> Conv c3 (4) -> y."""
    rng = np.random.default_rng(0)
    shapes = {"W1": (8, 3, 1, 1), "W2": (16, 8, 3, 3), "W3": (4, 16, 1, 1)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1"),
             helper.make_node("MeanVarianceNormalization", ["a"], ["b"], name="mvn"),
             helper.make_node("Conv", ["b", "W2"], ["c"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Conv", ["d", "W3"], ["y"], name="c3")]
    graph = helper.make_graph(nodes, "mvn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_groups_after_a_default_mean_variance_normalization_prune() -> None:
    analysis = graphprune.analyze(_model())
    before = next(g for g in analysis.groups if ("W1", 0) in g.dims)
    after = next(g for g in analysis.groups if ("W2", 0) in g.dims)
    assert before.frozen and any("normalises to NaN" in r for r in before.frozen), before.frozen
    assert after.prunable and after.is_exact, after.frozen
    result = graphprune.prune(_model(), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 1
    onnx.checker.check_model(result.model)  # (full_check runs the strict inference that fails here)
    w2 = next(i for i in result.model.graph.initializer if i.name == "W2")
    assert list(w2.dims) == [8, 8, 3, 3]
