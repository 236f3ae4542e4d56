"""Grouped convolutions inside a frozen group prune position by position.

SqueezeBERT's layers are grouped 1-D convolutions (``groups=4``) that read and write the
residual stream. Tied conv group by conv group (a unit is a whole conv group), the MLP's
hidden width joins the residual stream's group, which the graph input and output freeze: no
MLP neuron could go. Position by position (the same position of every conv group goes
together; the group count stays) the hidden width is a group of its own. The analysis now
retries that way where the group-wise ties leave a group frozen, not only where they leave
it with one unit, and keeps the retry only where it prunes more units.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_prunes_exactly, attr, group_with, make_model, nodes_of
from onnx import helper

import graphprune

OPS_UNDER_TEST = ["Conv"]


def grouped_mlp(groups: int = 4) -> onnx.ModelProto:
    """``x [N, 16, T] -> Conv(16 -> 32, groups) -> Relu -> Conv(32 -> 16, groups) -> + x``."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["h"], group=groups, kernel_shape=[1], name="up"),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Conv", ["a", "W2", "b2"], ["d"], group=groups, kernel_shape=[1], name="down"),
        helper.make_node("Add", ["x", "d"], ["y"]),
    ]
    params = {"W1": (32, 16 // groups, 1), "b1": (32,), "W2": (16, 32 // groups, 1), "b2": (16,)}
    return make_model(nodes, {"x": ("N", 16, 7)}, {"y": None}, params)


def test_hidden_width_prunes_by_position() -> None:
    model = grouped_mlp()
    hidden = group_with(graphprune.analyze(model), "W1", 0)
    assert hidden.prunable  # before: frozen with the residual stream ("graph input 'x'")
    assert hidden.num_units == 8  # 32 channels = 4 conv groups x 8 positions

    result = assert_prunes_exactly(model, 0.5)
    pruned = result.model
    assert [attr(n, "group") for n in nodes_of(pruned, "Conv")] == [4, 4]  # the group count stays
    weights = {i.name: i for i in pruned.graph.initializer}
    assert list(weights["W1"].dims) == [16, 4, 1] and list(weights["W2"].dims) == [16, 4, 1]


def test_calibrated_prune_refits_the_grouped_consumer() -> None:
    """Position-pruned grouped convs are scored and refit one conv group at a time."""
    model = grouped_mlp()
    rng = np.random.default_rng(0)
    calibration = {"x": rng.standard_normal((24, 1, 16, 7)).astype(np.float32)}
    result = graphprune.prune(model, ratio=0.5, calibration=calibration)
    assert result.report["verification"]["ok"] is True
    assert result.report["calibration"]["passes"]["RefitPass"]["layers"] == 1  # the grouped "down"
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"]
