"""A Conv whose kernel spans an input axis whole, unpadded and undilated, is a dense layer over
that axis: the positions along it are read like input channels and pruned with the producer
that feeds them (TensorFlow graphs concatenate features along an axis that the next conv reads
whole: musicnn's 561 front-end channels froze as a "spatial axis", 99.98 % of its MACs).
Real ONNX Runtime runs of graphs built here."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune


def _model(pad_width: int = 0) -> onnx.ModelProto:
    """Conv(1 -> 12, k [3, 16]) on x [1, 1, 20, 16] -> Relu -> Transpose [0, 3, 2, 1] (the 12
    channels become the last axis) -> Conv(1 -> 8, k [3, 12], pads on the height only) ->
    Relu -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    width = 12 + 2 * pad_width
    inits = {"a.w": rng.standard_normal((12, 1, 3, 16)) * 0.3, "a.b": rng.standard_normal(12) * 0.1,
             "b.w": rng.standard_normal((8, 1, 3, 12)) * 0.3, "b.b": rng.standard_normal(8) * 0.1,
             "fc.w": rng.standard_normal((4, 8 * 20 * (width - 12 + 1))) * 0.3, "fc.b": rng.standard_normal(4) * 0.1}
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "a.b"], ["a"], kernel_shape=[3, 16], pads=[1, 0, 1, 0]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Transpose", ["ra"], ["t"], perm=[0, 3, 2, 1]),
        helper.make_node("Conv", ["t", "b.w", "b.b"], ["c"], kernel_shape=[3, 12],
                         pads=[1, pad_width, 1, pad_width]),
        helper.make_node("Relu", ["c"], ["rc"]),
        helper.make_node("Flatten", ["rc"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "full_span", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 20, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_kernel_spanning_an_axis_whole_reads_it_as_channels() -> None:
    model = _model()
    group = next(g for g in graphprune.analyze(model).groups if ("a.b", 0) in g.dims)
    assert not group.is_frozen and ("b.w", 3) in group.dims, group.frozen
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_rel_diff"] < 1e-5
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv" and n.input[1] == "b.w")
    kernel = next(helper.get_attribute_value(a) for a in conv.attribute if a.name == "kernel_shape")
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert weights["a.w"].shape[0] == 6 and weights["b.w"].shape == (4, 1, 3, 6) and list(kernel) == [3, 6]
    onnx.checker.check_model(result.model, full_check=True)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 1, 20, 16), np.float32)})[0].shape == (1, 4)


@pytest.mark.parametrize("pad_width", [1])
def test_a_kernel_padded_along_that_axis_keeps_it_spatial(pad_width: int) -> None:
    """Padded, the conv slides over that axis (its output is wider than 1): no channels there."""
    group = next(g for g in graphprune.analyze(_model(pad_width)).groups if ("a.b", 0) in g.dims)
    assert group.is_frozen and any("spatial axis" in reason for reason in group.frozen)
