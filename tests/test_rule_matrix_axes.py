"""Ops over the last two axes as a matrix (``Trilu``, ``Det``), and ``CumProd`` along one
axis: the leading axes (channels, heads) pass through and prune exactly; the matrix axes and
the accumulated axis freeze with a reason that names the node."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_prunes_exactly, make_model
from onnx import helper

from graphprune.analysis import analyze_graph
from graphprune.io.ir import import_graph

OPS_UNDER_TEST = ("Trilu", "Det", "CumProd")


def _frozen_reasons(model: onnx.ModelProto) -> list[str]:
    analysis = analyze_graph(import_graph(model), opset=model.opset_import[0].version)
    assert not analysis.unsupported, analysis.unsupported
    return [reason for group in analysis.groups for reason in group.frozen]


def _conv_around(middle: list[onnx.NodeProto], extra: dict | None = None, *, opset: int = 17) -> onnx.ModelProto:
    """``x [1, 3, 6, 6] -> Conv (8) -> middle ('m' -> 'b') -> Relu -> Conv (4)``."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["m"], pads=[1, 1, 1, 1]),
             *middle,
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    return make_model(nodes, {"x": [1, 3, 6, 6]}, {"y": [1, 4, 6, 6]},
                      {"w1": [8, 3, 3, 3], "b1": [8], "w2": [4, 8, 1, 1], **(extra or {})}, opset=opset)


def test_trilu_passes_channels_and_keeps_its_triangle() -> None:
    for upper in (0, 1):
        model = _conv_around([helper.make_node("Trilu", ["m", "k"], ["b"], upper=upper)],
                             {"k": np.array(1, np.int64)})
        result = assert_prunes_exactly(model)
        kept = {t.name: list(t.dims) for t in result.model.graph.initializer}
        assert kept["w1"][0] == 4 and kept["w2"][1] == 4


def test_trilu_on_attention_scores_prunes_heads() -> None:
    """A causal mask applied with ``tril`` to the scores ``[B, H, S, S]``: the heads axis
    passes, the positions are the triangle (frozen)."""
    heads, size, seq, width = 4, 4, 5, 16
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"]), helper.make_node("MatMul", ["x", "wk"], ["k0"]),
        helper.make_node("MatMul", ["x", "wv"], ["v0"]),
        *[helper.make_node("Reshape", [f"{t}0", "split"], [f"{t}1"]) for t in "qkv"],
        helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k1"], ["k"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q", "k"], ["s"]),
        helper.make_node("Exp", ["s"], ["e"]),
        helper.make_node("Trilu", ["e"], ["masked"], upper=0),
        helper.make_node("ReduceSum", ["masked", "last"], ["total"], keepdims=1),
        helper.make_node("Div", ["masked", "total"], ["p"]),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("Transpose", ["o"], ["o1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o1", "merge"], ["o2"]),
        helper.make_node("MatMul", ["o2", "wo"], ["y"]),
    ]
    params = {"wq": np.random.default_rng(1).normal(size=(width, width)).astype(np.float32) * 0.3,
              "wk": np.random.default_rng(2).normal(size=(width, width)).astype(np.float32) * 0.3,
              "wv": [width, width], "wo": [width, width],
              "split": np.array([1, seq, heads, size], np.int64), "merge": np.array([1, seq, width], np.int64),
              "last": np.array([-1], np.int64)}
    model = make_model(nodes, {"x": [1, seq, width]}, {"y": [1, seq, width]}, params)
    result = assert_prunes_exactly(model, head_ratio=0.5, mlp_ratio=0.0)
    kept = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert kept["wq"] == [width, width // 2] and kept["wo"] == [width // 2, width], kept
    _frozen_reasons(model)  # (no op without a rule)


def test_det_passes_leading_axes() -> None:
    """``Conv (8) -> Det over 3x3 maps -> [1, 8] -> MatMul``: the channels pass to the
    determinants."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["m"]),  # [1, 8, 3, 3]
             helper.make_node("Det", ["m"], ["d"]),  # [1, 8]
             helper.make_node("MatMul", ["d", "w2"], ["y"])]
    model = make_model(nodes, {"x": [1, 3, 5, 5]}, {"y": [1, 4]},
                       {"w1": [8, 3, 3, 3], "b1": [8], "w2": [8, 4]})
    result = assert_prunes_exactly(model)
    assert {t.name: list(t.dims) for t in result.model.graph.initializer}["w2"] == [4, 4]


def test_cumprod_freezes_its_axis_and_passes_the_others() -> None:
    def model(axis: int) -> onnx.ModelProto:
        return _conv_around([helper.make_node("Sigmoid", ["m"], ["g"]),
                             helper.make_node("CumProd", ["g", "axis"], ["b"])],
                            {"axis": np.array(axis, np.int64)}, opset=26)

    assert_prunes_exactly(model(3))  # along the width: the channels pass
    assert any("multiplied axis at CumProd" in r for r in _frozen_reasons(model(1)))
