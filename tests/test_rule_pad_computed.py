"""Pad with pads computed at run time (tf2onnx's SAME padding of a dynamic input, found on the
TF.js EfficientPose and a Keras causal Conv1D): the pads vector is a ``Concat`` of literal
zeros and shape arithmetic, permuted by ``Split``. The axes whose two pads are literal zeros
(batch and channels) pass through the Pad; the padded axis is frozen. The Pad froze every
axis before ("pads not constant")."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_prunes_exactly, conv_node, group_with, make_model
from onnx import helper

import graphprune


def computed_pad_model() -> onnx.ModelProto:
    """``x [1, 3, H, W] -> Conv -> a [1, 8, H, W] -> Pad(pads computed from H) -> Conv -> y``:
    ``p = H // 4``, ``pads = Concat(Split([p, 0, 0, 0, p, 0, 0, 0]) reordered)
    = [0, 0, p, 0, 0, 0, p, 0]``."""
    nodes = [
        conv_node("x", "w1", "a", "b1", k=1),
        helper.make_node("Shape", ["a"], ["s"]),
        helper.make_node("Slice", ["s", "two", "three"], ["l"]),
        helper.make_node("Div", ["l", "four"], ["p"]),
        helper.make_node("Concat", ["p", "zeros2", "zero", "p", "zeros2", "zero"], ["v"], axis=0),
        helper.make_node("Split", ["v", "parts"], ["v0", "v1", "v2", "v3", "v4", "v5"], axis=0),
        helper.make_node("Concat", ["v1", "v0", "v2", "v4", "v3", "v5"], ["pads"], axis=0),
        helper.make_node("Pad", ["a", "pads"], ["b"], mode="constant"),
        helper.make_node("Relu", ["b"], ["r"]),
        conv_node("r", "w2", "y", "b2", k=1),
    ]
    params = {"w1": [8, 3, 1, 1], "b1": [8], "w2": [4, 8, 1, 1], "b2": [4], "zero": np.array([0], np.int64),
              "two": np.array([2], np.int64), "three": np.array([3], np.int64),
              "four": np.array([4], np.int64), "zeros2": np.array([0, 0], np.int64),
              "parts": np.array([1, 2, 1, 1, 2, 1], np.int64)}
    return make_model(nodes, {"x": [1, 3, 16, 16]}, {"y": None}, params, opset=17)


def test_computed_pads_leave_the_channels_prunable() -> None:
    model = computed_pad_model()
    analysis = graphprune.analyze(model)
    channels = group_with(analysis, "a", 1)
    assert channels.prunable, channels
    assert group_with(analysis, "b", 1) is channels
    assert not any(("b", 2) in group.dims for group in analysis.groups)  # the padded height: no group
    result = assert_prunes_exactly(model, 0.5)
    assert result.report["channels"]["removed"] >= 4
