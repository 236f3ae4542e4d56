"""Constant folding of ``Shape(x, start, end)`` (opset 15; :mod:`graphprune.io.folding`).

onnx-graphsurgeon's shape folding reads a ``Shape`` as the whole shape of its input, whatever
its ``start`` and ``end``. The preparation folded a static ``x``'s sliced shape itself, but
``Gather(Shape(x, start=1), 1)`` with a dynamic batch still folded to ``x.shape[1]`` instead of
``x.shape[2]``: the prepared graph reshaped to ``[-1, 6]`` where the model reshapes to ``[-1,
32]``, and the pruned model's output had another shape than the original's. The shape probes
folded ``Shape(x, start=0, end=1)`` of a probe-sized input to the whole shape, so no probe
sized the dynamo exporter's views (``nn.MultiheadAttention`` with a dynamic batch froze).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import ir
from graphprune.io.folding import fold_constants


def _model(shape_attrs: dict, index: int) -> onnx.ModelProto:
    """``x [B, 6, 32] -> MatMul -> Relu -> MatMul -> b``, then ``b`` reshaped to
    ``[-1, Shape(b, **shape_attrs)[index]]``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(np.array(index, np.int64), "index"),
             numpy_helper.from_array(np.array([0], np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["b"]),
             helper.make_node("Shape", ["b"], ["s"], **shape_attrs),
             helper.make_node("Gather", ["s", "index"], ["g"]),
             helper.make_node("Unsqueeze", ["g", "axes"], ["gu"]),
             helper.make_node("Concat", ["minus_one", "gu"], ["target"], axis=0),
             helper.make_node("Reshape", ["b", "target"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("attrs", "index"), [({"start": 1}, 1), ({"start": -2, "end": 3}, 1), ({"start": 0}, 2)])
def test_a_sliced_shape_of_a_dynamic_tensor_keeps_its_values(attrs, index):
    model = _model(attrs, index)
    x = np.random.default_rng(1).standard_normal((3, 6, 32)).astype(np.float32)
    expected = _run(model, x)
    prepared = ir.prepare(model)
    np.testing.assert_allclose(_run(prepared, x), expected, rtol=1e-5, atol=1e-5)
    pruned = graphprune.prune(model, ratio=0.5).model
    assert _run(pruned, x).shape == expected.shape == (18, 32)


@pytest.mark.parametrize(("start", "end", "expected"), [(0, 1, [3]), (1, None, [6, 32]), (-1, None, [32]), (1, 2, [6])])
def test_a_sliced_shape_of_a_static_tensor_folds_to_its_slice(start, end, expected):
    attrs = {"start": start} | ({} if end is None else {"end": end})
    nodes = [helper.make_node("Shape", ["x"], ["s"], **attrs), helper.make_node("Identity", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    folded = fold_constants(gs.import_onnx(helper.make_model(graph)), fold_shapes=True)
    y = folded.tensors()["y"]
    assert isinstance(y, gs.Constant) and y.values.tolist() == expected


def test_a_sliced_shape_that_is_an_output_folds_in_place():
    """A ``Shape(x, start=1)`` of a static ``x`` that is also a graph output becomes an
    ``Identity`` of the constant (it keeps its name); graphsurgeon's lists refused the slice
    assignment that rewired it (the shape probes make such tensors outputs)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6, 32])],
                              [helper.make_tensor_value_info("s", TensorProto.INT64, [2])])
    folded = gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    fold_constants(folded, fold_shapes=True)
    exported = gs.export_onnx(folded.cleanup())
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((3, 6, 32), np.float32)})[0].tolist() == [6, 32]
    assert [o.name for o in exported.graph.output] == ["s"]
