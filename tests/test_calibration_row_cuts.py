"""A linear layer whose rows are pruned channels is refit on the rows that remain.

An MLP-Mixer's token-mixing MLP reads the channels as rows: ``Transpose(x)[N, C, T] @ W``
mixes the T tokens of each channel. Pruning C removes rows of that MatMul's input and
output, not inputs or outputs of its weight. The refit selected rows of the original's
output and read them from the pruned model's input by the same flat positions: past the
end (IndexError, an internal error) or the wrong rows. Now the selected positions are
mapped to the pruned output's and the removed rows dropped.
"""

from __future__ import annotations

import numpy as np
from conftest import make_model
from onnx import helper

import graphprune
from graphprune.calibration.linear import map_rows


def token_mixer():
    """``h = relu(x W_in)`` [N, T, C]; ``h + (relu(h^T W_t1) W_t2)^T``; ``y = . W_out``."""
    nodes = [
        helper.make_node("MatMul", ["x", "W_in"], ["a"]),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),  # [N, C, T]
        helper.make_node("MatMul", ["ht", "W_t1"], ["u"]),
        helper.make_node("Relu", ["u"], ["g"]),
        helper.make_node("MatMul", ["g", "W_t2"], ["v"]),
        helper.make_node("Transpose", ["v"], ["vt"], perm=[0, 2, 1]),
        helper.make_node("Add", ["h", "vt"], ["s"]),
        helper.make_node("MatMul", ["s", "W_out"], ["y"]),
    ]
    params = {"W_in": (12, 16), "W_t1": (6, 24), "W_t2": (24, 6), "W_out": (16, 5)}
    return make_model(nodes, {"x": ("N", 6, 12)}, {"y": None}, params)


def test_map_rows_matches_deleting_the_rows() -> None:
    rng = np.random.default_rng(3)
    y = rng.standard_normal((3, 7, 5, 4))
    cuts = {1: np.array([0, 4, 6]), 2: np.array([2])}
    pruned = np.delete(np.delete(y, cuts[1], axis=1), cuts[2], axis=2)
    selected = np.sort(rng.choice(3 * 7 * 5, size=40, replace=False))
    mapped, valid = map_rows(selected, y.shape, cuts)
    rows = y.reshape(-1, 4)[selected]
    np.testing.assert_array_equal(pruned.reshape(-1, 4)[mapped], rows[valid])
    index = np.unravel_index(selected, (3, 7, 5))
    assert valid.tolist() == [i1 not in cuts[1] and i2 not in cuts[2] for i1, i2 in zip(index[1], index[2], strict=True)]


def test_token_mixing_layers_are_refit_on_the_remaining_rows() -> None:
    rng = np.random.default_rng(0)
    calibration = {"x": rng.standard_normal((40, 2, 6, 12)).astype(np.float32)}
    result = graphprune.prune(token_mixer(), ratio=0.5, calibration=calibration)
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert not refit.get("skipped"), refit.get("skipped")
    assert refit["layers"] == 3  # W_t1 and W_t2 (rows cut), W_out (inputs cut)
    assert refit["rel_error_after"] < refit["rel_error_before"]
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"]
