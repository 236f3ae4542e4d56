"""Outputs that are NaN on the verification's inputs, in the original too.

swift-f0 (swift-f0 0.3.0) answers NaN pitch for the random ``fmin``/``fmax`` the verification
draws (a negative frequency bound), so every prune failed, ``--lossless`` included: "max
relative difference inf". NaN (or the same infinity) at the same elements of the original and
the pruned model now agree; anywhere else a non-finite element differs by ``inf``. An output
with no finite element on any input is listed (``non_finite_outputs``: nothing was compared
there) and checked again on calibration samples where there are some.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import conv_node, make_model
from onnx import helper

import graphprune
from graphprune.verify.validate import _difference


def _model(always_nan: bool):
    """A prunable Conv-Relu-Conv path ``y`` and ``z = mean(y) * log(s)`` with a scalar input
    ``s`` (NaN for a negative one); ``always_nan``: ``log(-(|s| + 1))`` instead."""
    nodes = [conv_node("x", "w1", "c1"), helper.make_node("Relu", ["c1"], ["r1"]), conv_node("r1", "w2", "y"),
             helper.make_node("ReduceMean", ["y"], ["m"], axes=[1], keepdims=0)]
    if always_nan:
        nodes += [helper.make_node("Abs", ["s"], ["sa"]), helper.make_node("Add", ["sa", "one"], ["sp"]),
                  helper.make_node("Neg", ["sp"], ["sn"]), helper.make_node("Log", ["sn"], ["ls"])]
    else:
        nodes += [helper.make_node("Log", ["s"], ["ls"])]
    nodes += [helper.make_node("Mul", ["m", "ls"], ["z"])]
    return make_model(nodes, {"x": [1, 3, 8, 8], "s": []}, {"y": [1, 4, 8, 8], "z": [1, 8, 8]},
                      {"w1": [16, 3, 3, 3], "w2": [4, 16, 3, 3], "one": np.array(1.0, dtype=np.float32)}, opset=13)


@pytest.mark.parametrize("always_nan", [False, True])
@pytest.mark.parametrize("mode", [{"lossless": True}, {"ratio": 0.5}])
def test_nan_where_the_original_is_nan_verifies(always_nan: bool, mode: dict) -> None:
    result = graphprune.prune(_model(always_nan), **mode)
    verification = result.report["verification"]
    assert verification["ok"], verification
    assert np.isfinite(verification["max_rel_diff"])
    if always_nan:
        assert verification["non_finite_outputs"] == ["z"]
    if "ratio" in mode:
        assert result.report["channels"]["removed"] > 0


def test_non_finite_elements_agree_only_where_both_are() -> None:
    ref = np.array([1.0, np.nan, np.inf, 2.0], dtype=np.float32)
    assert _difference(ref, ref.copy())[:2] == (0.0, 0.0)
    assert _difference(ref, np.array([1.0, np.nan, np.inf, 2.5], dtype=np.float32))[0] == pytest.approx(0.5)
    for other in ([1.0, 0.0, np.inf, 2.0], [1.0, np.nan, -np.inf, 2.0], [np.nan, np.nan, np.inf, 2.0],
                  [1.0, np.nan, 5.0, 2.0]):
        assert _difference(ref, np.array(other, dtype=np.float32))[1] == np.inf, other
    nan = np.full(3, np.nan, dtype=np.float32)
    assert _difference(nan, nan.copy()) == (0.0, 0.0, 0.0)
    assert _difference(nan, np.zeros(3, dtype=np.float32))[0] == np.inf


def test_fidelity_compares_the_finite_elements() -> None:
    """The report's figures: NaN where the original has NaN is no error (it read cosine 0
    and relative L2 0 together); a NaN where the original has a number is all error."""
    from graphprune.calibration.fidelity import compare_outputs, pair_figures

    y = np.array([1.0, np.nan, 2.0], dtype=np.float32)
    assert pair_figures(y, y.copy()) == pytest.approx((1.0, 0.0))
    assert pair_figures(y, np.array([1.0, 0.0, 2.0], dtype=np.float32)) == (0.0, 1.0)
    assert pair_figures(np.array([1.0, 2.0]), np.array([np.nan, 2.0])) == (0.0, 1.0)
    figures = compare_outputs(["o"], [[y], [2 * y]], [[y.copy()], [2 * y]])
    assert figures["cosine"] == pytest.approx(1.0) and figures["pooled_rel_l2"] == 0.0
    result = graphprune.prune(_model(always_nan=False), ratio=0.3, calibration="random:8")
    assert all(np.isfinite(v) for v in (result.report["fidelity"]["cosine"], result.report["fidelity"]["rel_l2"]))
