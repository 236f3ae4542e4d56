"""The shape probes' folding rounds (:mod:`graphprune.analysis.shape_probe`).

A probe infers shapes, folds the shape computations that became constant, and repeats. It
folded the whole graph every round (a 40 k-node MAXIM: 3 s a round, seven rounds a probe, five
probes a prune); a round now folds the part of the graph that can fold (``Shape`` and what is
computed from shapes and constants alone), and the whole graph only where that part is done
and the graph has bodies (``If``, ``Loop``) or functions. These tests hold the two to the same
shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_transformers import (
    _computed_head_reshape as _head_reshape,  # view(b, s, -1, D) from Shape(x, 0, 2)
)

from graphprune.analysis import shape_probe


def _zero_state() -> onnx.ModelProto:
    """A zero initial state ``ConstantOfShape([2, batch, 16])`` sliced to its first layer
    and added to every step (what a recurrent exporter writes)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes0"], ["bu"]),
        helper.make_node("Concat", ["two", "bu", "sixteen"], ["state_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["state_shape"], ["h0"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Slice", ["h0", "zero1", "one1", "zero1"], ["h0s"]),
        helper.make_node("Squeeze", ["h0s", "axes0"], ["h"]),
        helper.make_node("Unsqueeze", ["h", "axes1"], ["hu"]),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "hu"], ["y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "axes0": np.array([0], np.int64), "axes1": np.array([1], np.int64),
             "two": np.array([2], np.int64), "sixteen": np.array([16], np.int64), "zero1": np.array([0], np.int64),
             "one1": np.array([1], np.int64), "w": np.ones((8, 16), np.float32)}
    return _model(nodes, inits, 17)


def _if_on_a_shape() -> onnx.ModelProto:
    """An ``If`` on ``x.shape[2] == 8`` whose branches are one node each and differ in rank:
    inlining it (one node for one) leaves the node count as it was."""
    then = helper.make_graph([helper.make_node("Flatten", ["x"], ["t"], axis=0)], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "two"], ["d"], axis=0),
        helper.make_node("Equal", ["d", "eight"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    return _model(nodes, {"two": np.array(2, np.int64), "eight": np.array(8, np.int64)}, 17)


def _model(nodes: list, inits: dict, opset: int) -> onnx.ModelProto:
    width = 8
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    x = np.random.default_rng(0).standard_normal((2, 24, width)).astype(np.float32)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return model


SIZES = {("x", 0): 2, ("x", 1): 24}


@pytest.mark.parametrize("build", [_head_reshape, _zero_state, _if_on_a_shape])
def test_folding_the_shape_part_gives_the_shapes_of_whole_graph_folding(build, monkeypatch):
    model = build()
    probed = shape_probe._probe_shapes(model, SIZES)
    with monkeypatch.context() as patch:  # every round over the whole graph, as before
        patch.setattr(shape_probe, "_fold_shape_part", shape_probe._fold_whole)
        whole = shape_probe._probe_shapes(model, SIZES)
    assert probed == {k: v for k, v in whole.items() if "__gp_" not in k}  # (names the folding made)
    assert all(None not in shape for shape in probed.values()), probed


def test_every_shape_the_probes_need_is_found():
    head = shape_probe._probe_shapes(_head_reshape(), SIZES)
    assert head["q4"] == [2, 24, 4, 4] and head["y"] == [2, 24, 16]
    zero_state = shape_probe._probe_shapes(_zero_state(), SIZES)
    assert zero_state["h0"] == [2, 2, 16] and zero_state["y"] == [2, 24, 16]
    # the If inlined to its then branch: a round that inlines without changing the count of
    # nodes still counts as having folded (the output's rank was unknown before)
    assert shape_probe._probe_shapes(_if_on_a_shape(), SIZES)["y"] == [1, 2 * 24 * 8]
