"""Constant folding repeated while shape inference learns sizes from what was folded
(``graphprune/io/ir.py: FOLD_ROUNDS``).

A TorchScript export with fixed input sizes computes its paddings from its own shapes
(``Pad(x, Concat(0, ..., Sub(n, Gather(Shape(x)))))``: a window size's multiple). ONNX shape
inference does not size a ``Pad`` whose amounts are computed, so everything behind the first one
has no size until the fold makes its amounts constant, and the next ``Shape`` read stayed
computed: that ``Pad`` froze every channel it pads ("pads not constant": Swin2SR's TorchScript
export, whose hidden size froze; SAM's window partition stayed computed too). The preparation
now folds again while a node still reads the shape of a tensor that inference sized.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import ir


def _const(name: str, values: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(values, name))


def _pad_to(name: str, source: str, size: int) -> list[onnx.NodeProto]:
    """``name = Pad(source)`` to ``size x size``, the amounts read from ``source``'s shape."""
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    return [
        helper.make_node("Shape", [source], [f"{name}_shape"]),
        _const(f"{name}_hw", i64([2, 3])), _const(f"{name}_size", i64([size, size])),
        _const(f"{name}_lead", i64([0, 0, 0, 0, 0, 0])),
        helper.make_node("Gather", [f"{name}_shape", f"{name}_hw"], [f"{name}_sizes"]),
        helper.make_node("Sub", [f"{name}_size", f"{name}_sizes"], [f"{name}_ends"]),
        helper.make_node("Concat", [f"{name}_lead", f"{name}_ends"], [f"{name}_pads"], axis=0),
        helper.make_node("Pad", [source, f"{name}_pads"], [name]),
    ]


def _model() -> onnx.ModelProto:
    """Two paddings in a row (Swin2SR pads the image to a multiple of its window, then every
    stage pads its windows): inference sizes the second one's input only once the first one's
    amounts are folded."""
    rng = np.random.default_rng(0)
    nodes = [
        _const("w1", rng.standard_normal((8, 4, 3, 3)).astype(np.float32)),
        _const("w2", rng.standard_normal((4, 8, 3, 3)).astype(np.float32)),
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
        *_pad_to("t", "y", 10),
        *_pad_to("u", "t", 12),
        helper.make_node("Conv", ["u", "w2"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 10, 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_a_padding_read_from_a_shape_that_only_folding_sizes_is_folded():
    model = _model()
    prepared = ir.prepare(model)
    assert not any(n.op_type == "Shape" for n in prepared.graph.node)
    feed = {"x": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    np.testing.assert_allclose(run(prepared), run(model), rtol=1e-5, atol=1e-5)


def test_the_channels_behind_that_padding_prune():
    result = graphprune.prune(_model(), ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["params_after"] < result.report["params_before"]
    assert not any("pads not constant" in r for g in result.report["frozen"] for r in g["reasons"])
    assert not any(n.op_type == "Shape" for n in result.model.graph.node)  # the pruned model computes no padding
