"""Slices with a step that pick one element of every block: ``x[..., ::2]`` and ``x[..., 1::2]``.

GPT-OSS computes its experts' gate and up projections in one interleaved matrix and splits
them with ``gate_up[..., ::2]`` and ``gate_up[..., 1::2]``. A Slice with a step used to freeze
its axis, and with it every expert's width. When the slice starts in the first block of
``step`` elements and runs to the end of an axis that ``step`` divides, each output element
stands for one whole block: removing it removes the block, and the kept blocks keep the
stride, so the same slice (its end moved) picks the kept elements.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_prunes_exactly, group_with, make_model
from onnx import helper

import graphprune

OPS_UNDER_TEST = ["Slice"]

HIDDEN, INNER = 8, 12


def interleaved(size: int = 2 * INNER) -> onnx.ModelProto:
    """``h = x W1`` with gate and up interleaved along the last axis, SwiGLU, ``W2``."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((HIDDEN, size)).astype(np.float32)
    w1[:, :2] *= 1e-3  # the first block (gate 0 and up 0) is the weakest: it goes, and the
    w2 = rng.standard_normal((size // 2, HIDDEN)).astype(np.float32)  # up slice's start 1
    w2[0] *= 1e-3  # then lies before every kept element
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Slice", ["h", "zero", "big", "last", "two"], ["gate"], name="gate_slice"),
        helper.make_node("Slice", ["h", "one", "big", "last", "two"], ["up"], name="up_slice"),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["act"]),
        helper.make_node("MatMul", ["act", "W2"], ["out"]),
    ]
    params = {"W1": w1, "W2": w2, "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
              "big": np.array([2**62], np.int64), "last": np.array([-1], np.int64),
              "two": np.array([2], np.int64)}
    return make_model(nodes, {"x": (5, HIDDEN)}, {"out": None}, params)


def test_interleaved_gate_and_up_prune_as_pairs() -> None:
    model = interleaved()
    group = group_with(graphprune.analyze(model), "W1", 1)
    assert group.prunable and group.num_units == INNER, group.frozen  # before: frozen, "step 2"
    for ratio in (0.25, 0.5):
        result = assert_prunes_exactly(model, ratio)
        kept = {t.name: list(t.dims) for t in result.model.graph.initializer}
        removed = result.plan.units_removed
        assert kept["W1"] == [HIDDEN, 2 * (INNER - removed)] and kept["W2"] == [INNER - removed, HIDDEN]
        w1 = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}["W1"]
        assert np.abs(w1[:, :2]).max() > 1e-2  # the weak first block went


def test_a_step_that_does_not_divide_the_axis_freezes() -> None:
    """Seven elements in steps of two: the last block is short, the slices do not split the
    axis into whole blocks, and the axis stays frozen with the reason."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Slice", ["h", "zero", "big", "last", "two"], ["even"], name="even"),
        helper.make_node("Relu", ["even"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["out"]),
    ]
    params = {"W1": rng.standard_normal((HIDDEN, 7)).astype(np.float32),
              "W2": rng.standard_normal((4, HIDDEN)).astype(np.float32),
              "zero": np.array([0], np.int64), "big": np.array([2**62], np.int64),
              "last": np.array([-1], np.int64), "two": np.array([2], np.int64)}
    group = group_with(graphprune.analyze(make_model(nodes, {"x": (5, HIDDEN)}, {"out": None}, params)), "W1", 1)
    assert not group.prunable and any("Slice 'even' with step 2" in r for r in group.frozen)


def test_lossless_removes_a_dead_interleaved_pair() -> None:
    """A neuron whose gate and up columns are zero computes ``silu(0) * 0 = 0``: lossless mode
    finds it through both strided slices and removes exactly that pair."""
    model = interleaved()
    w1 = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[:, 6:8] = 0.0  # gate 3 and up 3
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "W1"))
    result = graphprune.prune(model, lossless=True)
    assert result.report["verification"]["ok"]
    assert result.plan.units_removed == 1
    kept = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(kept["W1"], np.delete(w1, [6, 7], axis=1))
