"""Data-free magnitude criteria do not read a per-channel scale or shift as a weight.

tf2onnx writes a Keras BatchNorm as ``Mul`` and ``Add`` by ``[1, C, 1, 1]`` constants (and
paddle2onnx and others add biases the same way). ``l1``/``l2`` took every constant member of
rank >= 2 for a weight, so the scale and the shift each cast a vote as large as the layer's
weight: the Keras digits CNN of the real-model corpus kept 19 % of its answers on real digits
at ratio 0.3 (49 % now; ``docs/vs_onnxsim.md``, round 27). Their values no longer rank channels.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import group_with, make_model
from onnx import helper

import graphprune
from graphprune.planning.importance import score_group

OPS_UNDER_TEST = ["Mul", "Add", "Sub", "Div"]


def _weight(big: float, small: float) -> np.ndarray:
    """``[8, 4, 3, 3]``: output channels 0-3 of L1 norm ``big`` per element, 4-7 ``small``."""
    signs = np.sign(np.random.default_rng(0).standard_normal((8, 4, 3, 3))).astype(np.float32)
    return signs * np.array([big] * 4 + [small] * 4, np.float32)[:, None, None, None]


def keras_batchnorm(scale: np.ndarray, shift: np.ndarray) -> onnx.ModelProto:
    """``x -> Conv W1 -> Mul(scale) -> Add(shift) -> Relu -> Conv W2 -> y`` (tf2onnx's
    BatchNorm after a Conv); W1's channels 4-7 are twice as large as 0-3."""
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "s"], ["cs"]),
        helper.make_node("Add", ["cs", "t"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["y"]),
    ]
    params = {"W1": _weight(1.0, 2.0), "W2": np.full((6, 8, 1, 1), 0.5, np.float32),
              "s": scale.reshape(1, 8, 1, 1).astype(np.float32),
              "t": shift.reshape(1, 8, 1, 1).astype(np.float32)}
    return make_model(nodes, {"x": [1, 4, 8, 8]}, {"y": None}, params)


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_the_values_of_a_channel_scale_and_shift_do_not_rank_channels(criterion: str) -> None:
    flat = keras_batchnorm(np.ones(8), np.zeros(8))
    # large scales and shifts on the small channels 0-3: each used to vote them in
    skewed = keras_batchnorm(np.array([9.0] * 4 + [0.5] * 4), np.array([5.0] * 4 + [0.0] * 4))
    scores = []
    for model in (flat, skewed):
        analysis = graphprune.analyze(model)
        group = group_with(analysis, "W1", 0)
        scores.append(score_group(group, analysis.context.tensors, criterion, np.random.default_rng(0)))
    np.testing.assert_allclose(scores[0], scores[1])
    assert scores[1][:4].max() < scores[1][4:].min()  # the weights decide
    assert group.affine == {"s", "t"}

    result = graphprune.prune(skewed, ratio=0.5, criterion=criterion, round_to=1)
    assert result.report["verification"]["ok"] is True
    kept = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_allclose(np.abs(kept["W1"]), 2.0)  # channels 4-7 kept
    np.testing.assert_allclose(kept["s"].reshape(-1), 0.5)


def test_a_weight_stays_a_weight_and_a_computed_operand_is_not_affine() -> None:
    """A ``[C, 1, 1]`` PReLU slope is not an affine operand (it still votes, as before); a
    ``Div`` of a constant by the channels (``c / x``) is not a scale of them."""
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c", "slope"], ["p"]),
        helper.make_node("Div", ["k", "p"], ["q"]),
        helper.make_node("Conv", ["q", "W2"], ["y"]),
    ]
    model = make_model(nodes, {"x": [1, 4, 8, 8]}, {"y": None},
                       {"W1": (8, 4, 3, 3), "W2": (6, 8, 1, 1),
                        "slope": np.full((8, 1, 1), 0.25, np.float32), "k": np.ones((1, 8, 1, 1), np.float32)})
    group = group_with(graphprune.analyze(model), "W1", 0)
    assert "slope" not in group.affine and "k" not in group.affine
