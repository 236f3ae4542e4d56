"""Reshapes that move a factor between two axes, and Slices with int32 indices.

``[B, T, C] -> [B, T/k, k*C]`` (frame stacking in speech models, bytes grouped into words in
Google's Magika file-type classifier, exported by jax2tf/tf2onnx) keeps ``C`` as the inner
factor of the merged axis: channel ``c`` owns the ``k`` merged columns ``c, c + C, ...``.
Before, the merged axis and ``C`` were frozen as "inner factor of a reshaped axis"; a real
file (Magika's embedding) lost its only large group to it. Pruning it then rewrote the
Slice behind the reshape with int64 starts/ends beside its int32 axes, which ONNX refuses.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import helper

import graphprune


def stacking_model(*, unstack: bool = False) -> onnx.ModelProto:
    """``x [1, 8, 6] -> MatMul -> Relu -> h -> Reshape -> MatMul -> y``.

    Stacking: ``h [1, 8, 10] -> [1, 4, 20]``; unstacking: ``h [1, 4, 20] -> [1, 8, 10]``
    (``x [1, 4, 6]``).
    """
    t, c_in = (4, 6) if unstack else (8, 6)
    width = 20 if unstack else 10
    target = [1, 8, width // 2] if unstack else [1, 4, 2 * width]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"]),
        helper.make_node("Relu", ["m"], ["h"]),
    ]
    params: dict = {"w1": (c_in, width), "target": np.array(target, dtype=np.int64)}
    nodes += [
        helper.make_node("Reshape", ["h", "target"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    params["w2"] = (target[2], 5)
    return make_model(nodes, {"x": [1, t, c_in]}, {"y": None}, params)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("unstack", [False, True])
def test_the_channels_of_a_stacked_axis_prune(unstack: bool) -> None:
    model = stacking_model(unstack=unstack)
    analysis = graphprune.analyze(model)
    prunable = [g for g in analysis.groups if g.prunable]
    assert len(prunable) == 1, [(g.anchor, g.frozen) for g in analysis.groups]
    # stacking: 10 channels of h, each 2 columns of the merged axis; unstacking: 10 channels
    # of the split axis, each 2 columns of h
    assert prunable[0].num_units == 10

    result = graphprune.prune(model, ratio=0.5, round_to=1)
    assert result.report["verification"]["ok"]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert weights["w1"].shape == (6, 10 if unstack else 5)
    assert weights["w2"].shape == (5 if unstack else 10, 5)
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 4 if unstack else 8, 6)).astype(np.float32)
    assert _run(result.model, x).shape == _run(model, x).shape


def test_removing_the_inner_factor_matches_the_zeroed_original() -> None:
    """Removing channel ``c`` of ``h`` removes the merged columns ``c`` and ``c + 10``: the
    pruned model computes the original with those ``h`` channels zeroed (checked by hand,
    not only by the tool's own verification)."""
    model = stacking_model()
    result = graphprune.prune(model, ratio=0.3, round_to=1)
    w1 = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    kept_w1 = onnx.numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "w1"))
    kept = [next(j for j in range(10) if np.array_equal(w1[:, j], col)) for col in kept_w1.T]
    removed = sorted(set(range(10)) - set(kept))
    assert len(removed) == 3

    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for init in zeroed.graph.initializer:
        if init.name == "w1":
            values = w1.copy()
            values[:, removed] = 0.0
            init.CopyFrom(onnx.numpy_helper.from_array(values, "w1"))
    x = np.random.default_rng(2).standard_normal((1, 8, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(zeroed, x), rtol=1e-5, atol=1e-5)


def test_a_slice_with_int32_indices_keeps_its_index_type() -> None:
    """``h [1, 8, 10] -> Slice(2:10, int32) -> MatMul``: pruning ``h`` rewrites the starts
    and ends, which must keep the type of the axes input."""
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m"]),
            helper.make_node("Relu", ["m"], ["h"]),
            helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["hs"]),
            helper.make_node("MatMul", ["hs", "w2"], ["y"]),
        ],
        {"x": [1, 8, 6]}, {"y": None},
        {"w1": (6, 10), "w2": (8, 5), "starts": np.array([2], dtype=np.int32),
         "ends": np.array([10], dtype=np.int32), "axes": np.array([2], dtype=np.int32)},
    )
    result = graphprune.prune(model, ratio=0.5, round_to=1)
    assert result.report["verification"]["ok"]
    onnx.checker.check_model(result.model, full_check=True)
    slice_node = next(n for n in result.model.graph.node if n.op_type == "Slice")
    types = {i.name: i.data_type for i in result.model.graph.initializer}
    assert {types[name] for name in slice_node.input[1:]} == {onnx.TensorProto.INT32}
    x = np.random.default_rng(3).standard_normal((1, 8, 6)).astype(np.float32)
    assert _run(result.model, x).shape == (1, 8, 5)
