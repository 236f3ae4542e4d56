"""Calibration where sizes are chosen by value: rows selected by a threshold on a pruned
layer's output (``NonZero``), as a duration expands a TTS model's sequence (Kokoro). The
pruned model selects other rows than the original, so the original's rows are not its
positions there: the layers after the selection are not refit towards them (before, their
rows were paired with other positions, or an index ran past the pruned model's and the prune
failed with an internal error); the layers before it are. Activations too large for float32
sums (past ~1e19) are accumulated in float64; statistics that are not finite are not used."""

from __future__ import annotations

import numpy as np
from conftest import make_model
from onnx import helper

import graphprune
from graphprune.calibration.stats import ChannelStats
from graphprune.planning import data_aware


def _selected_rows_model():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["b"]),  # [1, 32, 8]: reads the pruned hidden layer
             helper.make_node("ReduceSum", ["b", "last"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["keep"]),
             helper.make_node("Squeeze", ["keep", "first"], ["keep1"]),
             helper.make_node("NonZero", ["keep1"], ["nz"]), helper.make_node("Squeeze", ["nz", "first"], ["idx"]),
             helper.make_node("Squeeze", ["b", "first"], ["b1"]),
             helper.make_node("Gather", ["b1", "idx"], ["rows"], axis=0),  # [n, 8]: n chosen by value
             helper.make_node("MatMul", ["rows", "w3"], ["c"]), helper.make_node("Relu", ["c"], ["g"]),
             helper.make_node("MatMul", ["g", "w4"], ["d"]),
             helper.make_node("ReduceMean", ["d"], ["y"], axes=[0], keepdims=1)]
    return make_model(nodes, {"x": [1, 32, 6]}, {"y": [1, 3]},
                      {"w1": [6, 32], "w2": [32, 8], "w3": [8, 32], "w4": [32, 3],
                       "last": np.array([-1], np.int64), "zero": np.array(0.0, np.float32),
                       "first": np.array([0], np.int64)})


def test_layers_after_a_selection_the_prune_moved_are_not_refit() -> None:
    result = graphprune.prune(_selected_rows_model(), ratio=0.5, calibration="random:32", reconstruction="refit")
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert set(refit["not_refit_positions_differ"]) == {"MatMul_10", "MatMul_12"}, refit
    assert refit["rel_error_after"] < refit["rel_error_before"]  # MatMul_2, before the selection
    assert result.report["verification"]["ok"] is True


def test_statistics_of_huge_activations_stay_finite() -> None:
    stats = ChannelStats()
    rows = np.full((4, 3), 3e19, np.float32)
    stats.add(rows, rows)
    stats.flush()
    assert np.isfinite(stats.gram).all() and np.isfinite(stats.squares).all()
    assert np.isclose(stats.gram[0, 0], 4 * 9e38, rtol=1e-5)
    stats.gram[0, 1] = np.inf  # (an activation that was infinite)
    assert data_aware._inverse_gram(stats) is None
