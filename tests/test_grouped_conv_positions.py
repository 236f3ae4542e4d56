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


def _mixer_stream(width: int = 16, groups: int = 4) -> onnx.ModelProto:
    """SVTRv2's conv mixer: a LayerNorm'd residual stream read and written by two grouped
    convolutions (``x + conv_g(relu(conv_g(norm(x))))``)."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["s0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("LayerNormalization", ["s0", "ln_s", "ln_b"], ["n"], axis=1),
             helper.make_node("Conv", ["n", "wa"], ["m0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=groups),
             helper.make_node("Relu", ["m0"], ["r"]),
             helper.make_node("Conv", ["r", "wb"], ["m1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=groups),
             helper.make_node("Add", ["s0", "m1"], ["s1"]),
             helper.make_node("Conv", ["s1", "wh"], ["y"], kernel_shape=[1, 1])]
    per = width // groups
    params = {"w0": (width, 3, 3, 3), "ln_s": (width, 8, 8), "ln_b": (width, 8, 8),
              "wa": (width, per, 3, 3), "wb": (width, per, 3, 3), "wh": (4, width, 1, 1)}
    return make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, params)


def test_an_inexact_stream_of_whole_conv_groups_retries_by_position() -> None:
    """Tied by conv group, the stream and both mixers were one inexact group of 4 units (the
    conv groups). By position, the mixer's inner channels are a group of their own, exact,
    of 4 units (one position of every conv group each), as onnxsim prunes SVTRv2's mixers."""
    model = _mixer_stream()
    inner = group_with(graphprune.analyze(model), "m0", 1)
    assert inner.prunable and inner.is_exact and inner.num_units == 4
    assert ("s0", 1) not in inner.dims
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    wa = next(i for i in result.model.graph.initializer if i.name == "wa")
    assert list(wa.dims)[0] < 16 and attr(next(n for n in result.model.graph.node if n.input[1] == "wa"), "group") == 4
