"""An ``If`` whose branches only move an outer value's axes: torch 1.x's export of
``x.squeeze(d)`` on an axis of unknown size (``If(size(x, d) == 1, Squeeze(x), Identity(x))``).
The channels that pass through it are pruned, and the pruned model computes the original with
the removed channels zeroed whichever branch a feed takes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune

OPS_UNDER_TEST = ("If",)
C, H = 6, 32


def squeeze_if_model(opset: int = 13, *, else_moves: bool = False, dead: int = 0) -> onnx.ModelProto:
    """``x [B, C, T] -> Conv1x1 (C -> H) -> Relu -> Transpose [B, T, H] -> If(T == 1:
    Squeeze axis 1, else Identity) -> MatMul [H, 8] -> Flatten``. ``else_moves``: the else
    branch puts the channels elsewhere (``Unsqueeze`` at the end), so they cannot follow;
    ``dead``: that many hidden channels are zero (weights and bias)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((H, C, 1)).astype(np.float32)
    b1 = rng.standard_normal(H).astype(np.float32)
    w1[:dead] = 0
    b1[:dead] = 0
    if opset >= 13:
        axes = helper.make_node("Constant", [], ["sq_axes"], value=numpy_helper.from_array(np.array([1], np.int64)))
        squeeze = [axes, helper.make_node("Squeeze", ["y", "sq_axes"], ["sq"])]
    else:
        squeeze = [helper.make_node("Squeeze", ["y"], ["sq"], axes=[1])]
    if else_moves:
        if opset >= 13:
            front = [helper.make_node("Constant", [], ["un_axes"], value=numpy_helper.from_array(np.array([-1], np.int64))),
                     helper.make_node("Unsqueeze", ["y", "un_axes"], ["id"])]
        else:
            front = [helper.make_node("Unsqueeze", ["y"], ["id"], axes=[-1])]
        other = front
    else:
        other = [helper.make_node("Identity", ["y"], ["id"])]
    then_g = helper.make_graph(squeeze, "then", [], [helper.make_tensor_value_info("sq", TensorProto.FLOAT, ["B", H])])
    else_g = helper.make_graph(other, "else", [], [helper.make_tensor_value_info("id", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1]),
        helper.make_node("Shape", ["y"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
        helper.make_node("Equal", ["t", "one"], ["is_one"]),
        helper.make_node("If", ["is_one"], ["z"], name="squeeze_if", then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["z", "w2"], ["m"], name="proj"),
        helper.make_node("Flatten", ["m"], ["out"], axis=0),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(rng.standard_normal((H, 8)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(1, np.int64), "one")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", C, "T"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "N"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def zeroed_like(original: onnx.ModelProto, pruned: onnx.ModelProto) -> onnx.ModelProto:
    """``original`` with the hidden channels that ``pruned`` no longer has zeroed (a kept
    channel's weight row is copied unchanged, so it is found by value)."""
    weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    kept_rows = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}["w1"]
    kept = [next(i for i in range(H) if np.array_equal(weights["w1"][i], row)) for row in kept_rows]
    removed = sorted(set(range(H)) - set(kept))
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(original)
    for tensor in zeroed.graph.initializer:
        if tensor.name in ("w1", "b1"):
            values = weights[tensor.name].copy()
            values[removed] = 0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return zeroed


@pytest.mark.parametrize("opset", [11, 13])
def test_channels_pass_through_a_squeeze_if_and_are_pruned(opset: int) -> None:
    model = squeeze_if_model(opset)
    analysis = graphprune.analyze(model)
    through = [g for g in analysis.groups if ("w2", 0) in g.dims]
    assert through and through[0].prunable, [g.frozen for g in through]
    result = graphprune.prune(model, ratio=0.5, input_shapes={"x": [1, C, 10]})
    pruned = result.model
    # the branches hold no weight: nothing is tried or reported inside them
    assert not (result.report.get("branches") or {}).get("skipped"), result.report["branches"]
    onnx.checker.check_model(pruned, full_check=True)
    w2 = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "w2")
    assert w2.shape == (H // 2, 8)
    zeroed = zeroed_like(model, pruned)
    rng = np.random.default_rng(1)
    for steps in (1, 7):  # both branches: squeezed and not
        x = rng.standard_normal((2, C, steps)).astype(np.float32)
        np.testing.assert_allclose(run(pruned, x), run(zeroed, x), rtol=1e-5, atol=1e-5)


def test_lossless_removes_dead_channels_through_the_if() -> None:
    model = squeeze_if_model(13, dead=4)
    result = graphprune.prune(model, lossless=True, input_shapes={"x": [1, C, 1]})
    w2 = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "w2")
    assert w2.shape == (H - 4, 8)
    rng = np.random.default_rng(2)
    for steps in (1, 5):
        x = rng.standard_normal((3, C, steps)).astype(np.float32)
        np.testing.assert_array_equal(run(result.model, x), run(model, x))


def test_branches_that_put_the_channels_in_different_places_freeze_them() -> None:
    model = squeeze_if_model(13, else_moves=True)
    analysis = graphprune.analyze(model)
    through = [g for g in analysis.groups if ("w1", 0) in g.dims]
    assert through and not through[0].prunable
    assert any("different places in the branches of If 'squeeze_if'" in r for r in through[0].frozen)
