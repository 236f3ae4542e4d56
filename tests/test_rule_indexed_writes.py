"""Ops that write or choose positions by value and pass every other axis: ``TensorScatter``
(opset 24's cache update: the hidden axis of the cache and the update prunes as one group;
batch and sequence freeze) and ``OneHot`` (its class axis freezes; the index axes pass)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_prunes_exactly, make_model
from onnx import TensorProto, helper

from graphprune.analysis import analyze_graph
from graphprune.io.ir import import_graph

OPS_UNDER_TEST = ("TensorScatter", "OneHot")


def _analysis(model: onnx.ModelProto):
    analysis = analyze_graph(import_graph(model), opset=model.opset_import[0].version)
    assert not analysis.unsupported, analysis.unsupported
    return analysis


def _cache_update(mode: str) -> onnx.ModelProto:
    """``past [1, 6, 8] -> MatMul [8, 16] -> Relu`` (the cache) and ``x [1, 2, 8] -> MatMul
    [8, 16] -> Relu`` (the update), written at position 3 along the sequence, then ``MatMul
    [16, 4]``: the 16 hidden channels are one group across both."""
    nodes = [helper.make_node("MatMul", ["past", "w_cache"], ["c0"]), helper.make_node("Relu", ["c0"], ["cache"]),
             helper.make_node("MatMul", ["x", "w_new"], ["u0"]), helper.make_node("Relu", ["u0"], ["update"]),
             helper.make_node("TensorScatter", ["cache", "update", "where"], ["present"], axis=1, mode=mode),
             helper.make_node("MatMul", ["present", "w_out"], ["y"])]
    return make_model(nodes, {"past": [1, 6, 8], "x": [1, 2, 8]}, {"y": [1, 6, 4]},
                      {"w_cache": [8, 16], "w_new": [8, 16], "w_out": [16, 4],
                       "where": np.array([3], np.int64) if mode == "linear" else np.array([5], np.int64)},
                      opset=24)


def test_a_cache_update_prunes_its_hidden_axis_with_the_cache_and_the_update() -> None:
    for mode in ("linear", "circular"):
        model = _cache_update(mode)
        result = assert_prunes_exactly(model)
        kept = {t.name: list(t.dims) for t in result.model.graph.initializer}
        assert kept["w_cache"] == [8, 8] and kept["w_new"] == [8, 8] and kept["w_out"] == [8, 4], kept


def test_a_cache_update_freezes_batch_and_sequence() -> None:
    """The sequence axis is the write position: ``Relu(past)`` along it is frozen."""
    nodes = [helper.make_node("Relu", ["past"], ["cache"]),
             helper.make_node("TensorScatter", ["cache", "x"], ["present"], axis=1),
             helper.make_node("Transpose", ["present"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w_seq"], ["y"])]  # reads the sequence as features
    model = make_model(nodes, {"past": [1, 6, 8], "x": [1, 2, 8]}, {"y": [1, 8, 3]}, {"w_seq": [6, 3]}, opset=24)
    (group,) = [g for g in _analysis(model).groups if ("w_seq", 0) in g.params]
    assert any("sequence axis at TensorScatter" in r for r in group.frozen), group.frozen


def test_one_hot_freezes_its_classes_and_passes_the_index_axes() -> None:
    """``OneHot(ids [2, 5], depth 7) [2, 5, 7] -> MatMul [7, 16] -> Relu -> MatMul [16, 4]``:
    the hidden layer prunes; the class axis (read by the first MatMul) is frozen."""
    nodes = [helper.make_node("OneHot", ["ids", "depth", "values"], ["hot"], axis=-1),
             helper.make_node("MatMul", ["hot", "w_in"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w_out"], ["y"])]
    model = make_model(nodes, {"ids": [2, 5]}, {"y": [2, 5, 4]},
                       {"depth": np.array([7], np.int64), "values": np.array([0.0, 1.0], np.float32),
                        "w_in": [7, 16], "w_out": [16, 4]})
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    feeds = {"ids": np.random.default_rng(0).integers(0, 7, size=(2, 5)).astype(np.int64)}
    result = assert_prunes_exactly(model, feeds=feeds)
    assert {t.name: list(t.dims) for t in result.model.graph.initializer}["w_in"] == [7, 8]
    (group,) = [g for g in _analysis(model).groups if ("w_in", 0) in g.params]
    assert any("classes of OneHot" in r for r in group.frozen), group.frozen
