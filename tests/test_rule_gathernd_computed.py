"""GatherND by positions computed at run time: only the indexed axes freeze.

SwinV2 computes its relative position bias with a small MLP, ``table [positions, heads]``,
and looks it up with ``table[relative_position_index]``; the dynamo exporter writes that as a
``GatherND`` whose indices are computed in the graph. The whole node used to freeze, and with
it the attention heads. GatherND indexes only the ``k`` axes after the batch axes
(``indices [..., k]``): the axes after them pass through whatever the positions are, so they
couple with the output and can be pruned; the indexed axes freeze.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_prunes_exactly, group_with, make_model
from onnx import helper

import graphprune

OPS_UNDER_TEST = ["GatherND"]


def bias_lookup(batch_dims: int = 0) -> onnx.ModelProto:
    """``table = MatMul(coords [16, 8], W1) [16, 12]`` looked up at positions computed from
    the input (``floor(sigmoid(p) * 15.99)``), then ``MatMul(W2)``; with ``batch_dims`` 1 the
    table and the indices carry a leading batch axis of 2."""
    lead = [2] if batch_dims else []
    nodes = [
        helper.make_node("MatMul", ["coords", "W1"], ["table"]),
        helper.make_node("Sigmoid", ["p"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["f"]),
        helper.make_node("Floor", ["f"], ["fl"]),
        helper.make_node("Cast", ["fl"], ["idx"], to=onnx.TensorProto.INT64),
        helper.make_node("GatherND", ["table", "idx"], ["rows"], batch_dims=batch_dims, name="lookup"),
        helper.make_node("Relu", ["rows"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    params = {"W1": (8, 12), "W2": (12, 5), "scale": np.array(15.99, np.float32)}
    inputs = {"coords": (*lead, 16, 8), "p": (*lead, 7, 1)}
    return make_model(nodes, inputs, {"y": None}, params)


def test_axes_after_the_indexed_ones_prune() -> None:
    model = bias_lookup()
    analysis = graphprune.analyze(model)
    group = group_with(analysis, "W1", 1)
    assert group.prunable and group.num_units == 12  # before: frozen, "indexed by computed positions"
    result = assert_prunes_exactly(model, 0.5)
    assert result.report["params_after"] < result.report["params_before"]


def test_the_indexed_axis_is_frozen_with_the_reason() -> None:
    """The positions read axis 0 of the table: that axis and the indices' coordinate axis
    can never change size, and the report says which node holds them."""
    analysis = graphprune.analyze(bias_lookup())
    ctx = analysis.context
    reasons = [r for r in ctx.dim_freeze.get(("table", 0), [])]
    assert any("indexed axis at GatherND 'lookup'" in r for r in reasons), reasons


def test_batch_dims_pass_through() -> None:
    model = bias_lookup(batch_dims=1)
    group = group_with(graphprune.analyze(model), "W1", 1)
    assert group.prunable
    feeds = {"coords": np.random.default_rng(0).standard_normal((2, 16, 8)).astype(np.float32),
             "p": np.random.default_rng(1).standard_normal((2, 7, 1)).astype(np.float32)}
    assert_prunes_exactly(model, 0.5, feeds=feeds)
