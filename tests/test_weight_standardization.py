"""Weight standardization computed in the graph is folded before the analysis.

BiT's and NFNet's convolutions standardize their weight at run time (``F.batch_norm`` of the
weight viewed as ``[1, O, I*k*k]``). The dynamo exporter leaves that in the graph:
``Reshape -> BatchNormalization -> Reshape`` of a constant into the conv's weight input, with no
``Constant``, ``Identity`` or ``Shape`` node that would make graphprune fold constants. The
conv's output channels then had no producer (their weight is no constant) and could not be
pruned. A ``BatchNormalization`` whose inputs are all computed from constants now makes the
model fold first (``OpRule.folds_weights``).
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import group_with, make_model, run_ort
from onnx import helper

import graphprune


def standardized_convs() -> onnx.ModelProto:
    """``x -> Conv(W1 standardized) -> Relu -> Conv(W2) -> y``; ``W1 [8, 3, 3, 3]`` is
    standardized per output channel by a BatchNormalization of its ``[1, 8, 27]`` view."""
    nodes = [
        helper.make_node("Reshape", ["W1", "flat"], ["w_flat"]),
        helper.make_node("ReduceMean", ["w_flat", "axes02"], ["w_mean"], keepdims=0),
        helper.make_node("Sub", ["w_flat", "w_mean_k"], ["w_c"]),
        helper.make_node("Mul", ["w_c", "w_c"], ["w_sq"]),
        helper.make_node("ReduceMean", ["w_sq", "axes02"], ["w_var"], keepdims=0),
        helper.make_node("ReduceMean", ["w_flat", "axes02"], ["w_mean_k"], keepdims=1),
        helper.make_node("BatchNormalization", ["w_flat", "ones", "zeros", "w_mean", "w_var"], ["w_std"],
                         epsilon=1e-8),
        helper.make_node("Reshape", ["w_std", "shape4"], ["W1s"]),
        helper.make_node("Conv", ["x", "W1s"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["y"], kernel_shape=[1, 1], name="conv2"),
    ]
    params = {"W1": (8, 3, 3, 3), "W2": (4, 8, 1, 1),
              "flat": np.array([1, 8, 27], np.int64), "shape4": np.array([8, 3, 3, 3], np.int64),
              "axes02": np.array([0, 2], np.int64),
              "ones": np.ones(8, np.float32), "zeros": np.zeros(8, np.float32)}
    # the Sub's mean is read before it is computed in this list: make_model keeps the order,
    # so put the keepdims mean first
    nodes.insert(1, nodes.pop(5))
    return make_model(nodes, {"x": (1, 3, 8, 8)}, {"y": None}, params, opset=18)


def test_standardized_conv_channels_prune() -> None:
    model = standardized_convs()
    analysis = graphprune.analyze(model)
    group = group_with(analysis, "W2", 1)
    assert group.prunable and group.num_units == 8  # before: no producer ("fixed")
    result = graphprune.prune(model, ratio=0.5)  # verified against the zeroed original
    assert result.report["verification"]["ok"] is True
    assert result.report["params_after"] < result.report["params_before"]
    onnx.checker.check_model(result.model, full_check=True)
    (out,) = run_ort(result.model, {"x": np.ones((1, 3, 8, 8), np.float32)})
    assert out.shape == (1, 4, 8, 8)
