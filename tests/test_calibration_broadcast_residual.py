"""A residual operand that broadcasts over the batch is no residual stream for the refit.

MobileBERT's embeddings add position embeddings ``[1, T, C]`` (looked up for the sequence
length, so not a constant) to the output of a linear layer ``[B, T, C]``. The refit took
them for the residual stream ``r`` of ``s = W x + c + r`` and read its rows at the
positions of the layer's output: with calibration samples stacked into batches, a row index
past the first sample's positions (IndexError, an internal error). Such an operand has one
row for many: the layer is refit towards its own output instead.
"""

from __future__ import annotations

import numpy as np
from conftest import make_model
from onnx import helper

import graphprune


def embeddings_then_mlp():
    """``e = relu(x @ W0) @ W_e + pos[:T]`` (pos looked up by ``Range(T)``; ``W_e`` is refit
    when ``W0``'s columns are pruned), then ``e + W2 relu(W1 e)``."""
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["g"]),
        helper.make_node("MatMul", ["g", "W_e"], ["h"]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "one"], ["t"], axis=0),
        helper.make_node("Range", ["zero", "t", "one"], ["positions"]),
        helper.make_node("Gather", ["table", "positions"], ["p"], axis=0),
        helper.make_node("Unsqueeze", ["p", "axis0"], ["pos"]),  # [1, T, 8]
        helper.make_node("Add", ["h", "pos"], ["e"]),
        helper.make_node("MatMul", ["e", "W1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["m"]),
        helper.make_node("Add", ["e", "m"], ["y"]),
    ]
    params = {"W0": (6, 12), "W_e": (12, 8), "table": (16, 8), "W1": (8, 32), "W2": (32, 8),
              "one": np.array(1, np.int64), "zero": np.array(0, np.int64), "axis0": np.array([0], np.int64)}
    return make_model(nodes, {"x": ("N", "T", 6)}, {"y": None}, params)


def test_calibrated_prune_with_a_broadcast_residual_operand() -> None:
    rng = np.random.default_rng(0)
    calibration = {"x": rng.standard_normal((24, 1, 10, 6)).astype(np.float32)}
    result = graphprune.prune(embeddings_then_mlp(), ratio=0.5, calibration=calibration)
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["layers"] == 3  # W_e (towards its own output), W1 and W2
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"]
