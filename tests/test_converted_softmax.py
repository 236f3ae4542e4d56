"""An opset-9/10 attention: ONNX's version converter writes its ``Softmax(axis=3)`` as
``Flatten -> Softmax -> Reshape(Shape(x))`` where it does not know the input's rank (a Reshape
to a computed shape has none at opset 9), and the flattening merged the heads with the batch
and the queries: every head froze ("dynamic axes re-factored at Reshape"). Over the last axis
the flattened softmax is the per-axis one, so the preparation writes it as one node again."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import converter_semantics, model_io

S, D, H = 10, 64, 4


def attention(opset: int, softmax_axis: int = 3) -> onnx.ModelProto:
    """Self-attention with its head split computed from the input's batch size (as the
    TorchScript exporter writes it): x [B, S, 64] -> 4 heads -> [B, S, 64]."""
    rng = np.random.default_rng(0)
    d = D // H

    def weight(name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((D, D)) * 0.1).astype(np.float32), name)

    unsqueeze = (helper.make_node("Unsqueeze", ["b"], ["b1"], axes=[0]) if opset < 13 else
                 helper.make_node("Unsqueeze", ["b", "zero_axes"], ["b1"]))
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Gather", ["xs", "zero"], ["b"], axis=0),
        unsqueeze,
        helper.make_node("Concat", ["b1", "tail4"], ["shp4"], axis=0),
        helper.make_node("Concat", ["b1", "tail3"], ["shp3"], axis=0),
        *[helper.make_node("MatMul", ["x", f"w{t}"], [t]) for t in "qkv"],
        *[helper.make_node("Reshape", [t, "shp4"], [f"{t}4"]) for t in "qkv"],
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=softmax_axis),
        helper.make_node("MatMul", ["p", "vt"], ["o"]), helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "shp3"], ["o3"]), helper.make_node("MatMul", ["o3", "wo"], ["y"]),
    ]
    inits = [weight("wq"), weight("wk"), weight("wv"), weight("wo"),
             numpy_helper.from_array(np.array([-1, H, d], np.int64), "tail4"),
             numpy_helper.from_array(np.array([-1, D], np.int64), "tail3"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "zero_axes"),
             numpy_helper.from_array(np.array(1 / np.sqrt(d), np.float32), "scale")]
    graph = helper.make_graph(nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("opset", [9, 10])
def test_heads_of_an_old_opset_attention_are_pruned(opset: int) -> None:
    model = attention(opset)
    analysis = graphprune.analyze(model)
    heads = [g for g in analysis.groups if ("wk", 1) in g.dims]
    assert heads and heads[0].prunable, [g.frozen for g in heads]
    assert heads[0].num_units == H
    result = graphprune.prune(model, head_ratio=0.5, mlp_ratio=0.0)
    assert result.report["verification"]["ok"] is True
    wq = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "wq")
    assert wq.shape == (D, D // 2)
    x = np.random.default_rng(1).standard_normal((2, S, D)).astype(np.float32)
    assert run(result.model, x).shape == (2, S, D)


def test_only_a_softmax_over_the_last_axis_is_unwrapped() -> None:
    """``Softmax(axis=1)`` below opset 13 normalises axes 1-3 together: the converter's
    flattening is its meaning there, and it stays."""
    for axis, unwrapped in ((3, 1), (1, 0)):
        converted = model_io.infer_shapes(model_io.upgrade_opset(attention(9, softmax_axis=axis), 13))
        before = [n.op_type for n in converted.graph.node]
        assert "Flatten" in before
        count = converter_semantics.unwrap_flattened(
            converted, lambda: {"ss": 4})  # (the rank ONNX inference does not give)
        assert count == unwrapped
        assert ("Flatten" in [n.op_type for n in converted.graph.node]) == (not unwrapped)
        onnx.checker.check_model(converted)
        x = np.random.default_rng(2).standard_normal((2, S, D)).astype(np.float32)
        np.testing.assert_allclose(run(converted, x), run(attention(9, softmax_axis=axis), x), rtol=1e-5, atol=1e-6)


def quantized_softmax(axis: int) -> onnx.ModelProto:
    """An opset-10 ``Conv -> Transpose -> QuantizeLinear -> QLinearSoftmax(opset=10) ->
    Transpose -> DequantizeLinear`` (how ``quantize_static``'s QOperator format writes a
    softmax over channels)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s_in"), numpy_helper.from_array(np.array(0, np.int8), "z_in"),
             numpy_helper.from_array(np.array(1 / 256, np.float32), "s_out"),
             numpy_helper.from_array(np.array(-128, np.int8), "z_out")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("QuantizeLinear", ["t", "s_in", "z_in"], ["tq"]),
             helper.make_node("QLinearSoftmax", ["tq", "s_in", "z_in", "s_out", "z_out"], ["sq"], domain="com.microsoft",
                              axis=axis, opset=10),
             helper.make_node("Transpose", ["sq"], ["st"], perm=[0, 3, 1, 2]),
             helper.make_node("DequantizeLinear", ["st", "s_out", "z_out"], ["y"])]
    graph = helper.make_graph(nodes, "qsoftmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 6
    return model


def _optimised(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("axis", [3, -1, 1])
def test_a_quantized_softmax_keeps_its_function_at_the_new_opset(axis: int) -> None:
    """ONNX's version converter leaves com.microsoft's ``QLinearSoftmax`` as it is, its
    ``opset`` attribute (10: every axis from ``axis`` on, flattened) included, and ONNX
    Runtime's optimizer moved the Transposes across it as the model's opset 13 reads a
    softmax: the written model (``--lossless`` too) computed another function once optimised
    (max difference 0.875 of a probability; unoptimised it was equal). It is written at
    opset 13 now, wrapped in Flatten/Reshape unless ``axis`` is the last."""
    model = quantized_softmax(axis)
    x = np.random.default_rng(1).standard_normal((1, 8, 4, 4)).astype(np.float32)
    out = graphprune.prune(model, lossless=True).model
    assert {o.domain: o.version for o in out.opset_import}[""] == 13
    soft = next(n for n in out.graph.node if n.op_type == "QLinearSoftmax")
    assert {a.name: helper.get_attribute_value(a) for a in soft.attribute} == {"axis": -1, "opset": 13}
    assert ("Flatten" in {n.op_type for n in out.graph.node}) == (axis == 1)
    np.testing.assert_array_equal(_optimised(out, x), _optimised(model, x))
    np.testing.assert_array_equal(run(out, x), run(model, x))


def test_a_conversion_that_changes_the_optimised_function_fails_the_preparation_check(monkeypatch) -> None:
    """Unoptimised, the converted model computed the same; the preparation check also runs
    both models optimised where the opset was converted, and fails on a gross difference
    (the old QLinearSoftmax conversion, put back here, changed it by 0.875 of a probability)."""
    from graphprune.errors import GraphPruneError
    from graphprune.rules.qlinear_softmax import QLinearSoftmaxRule

    monkeypatch.setattr(QLinearSoftmaxRule, "converter_rewrite", lambda self, node, fresh: None)
    with pytest.raises(GraphPruneError, match="optimizations off, but not with them on"):
        graphprune.prune(quantized_softmax(3), lossless=True)
