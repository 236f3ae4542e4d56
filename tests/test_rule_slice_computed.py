"""Slice with bounds computed at run time: the sliced axis freezes, the other axes do not.

Rotary embeddings split the head dimension in halves with ``x[..., : x.shape[-1] // 2]``;
the TorchScript exporter writes the bound as ``Div(Gather(Shape(x), 3), 2)``, not as a
constant, when the other axes of ``x`` are dynamic. That froze the whole Slice, and with it
the attention heads (GPT-NeoX exported by TorchScript had no prunable head). Now only the
sliced axis and the dimensions the bounds are read from freeze; a bound read from another
tensor's dimension freezes that dimension, so its size cannot change under the Slice.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import group_with, make_model, run_ort
from onnx import helper

import graphprune

OPS_UNDER_TEST = ["Slice"]

I64 = np.int64


def rotary_heads(bound: str = "head_size", axes: bool = True) -> onnx.ModelProto:
    """``x [N, T, 64] -> MatMul -> heads [N, 4, T, 16] -> rotate_half -> MatMul -> y``; the
    half is ``Shape(bound_from)[3] // 2``."""
    slice_inputs = ["q", "zero", "half"] + (["ax3"] if axes else [])
    tail_inputs = ["q", "half", "big"] + (["ax3"] if axes else [])
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["p"]),
        # the head size computed as in TorchScript exports (``C // heads``): shape inference
        # leaves it unknown, so nothing folds the bound to a constant (ONNX Runtime's probe
        # gives the analysis the sizes)
        helper.make_node("Shape", ["p"], ["ps"]),
        helper.make_node("Slice", ["ps", "zero", "two1"], ["lead"]),
        helper.make_node("Slice", ["ps", "two1", "three1"], ["width"]),
        helper.make_node("Div", ["width", "four1"], ["head_size"]),
        helper.make_node("Concat", ["lead", "four1", "head_size"], ["heads_shape"], axis=0),
        helper.make_node("Reshape", ["p", "heads_shape"], ["p4"]),
        helper.make_node("Transpose", ["p4"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["q"], ["qs"]),
        *([helper.make_node("Gather", ["qs", "three"], ["d"], axis=0),
           helper.make_node("Div", ["d", "two"], ["h"])] if bound == "head_size" else
          # (shape * 1)[1] * 2: the number of heads (4) times 2, computed at run time
          [helper.make_node("Mul", ["qs", "ones"], ["qs1"]),
           helper.make_node("Gather", ["qs1", "one"], ["d"], axis=0),
           helper.make_node("Mul", ["d", "two"], ["h"])]),
        helper.make_node("Unsqueeze", ["h", "ax0"], ["half"]),
        helper.make_node("Slice", slice_inputs, ["q1"], name="first_half"),
        helper.make_node("Slice", tail_inputs, ["q2"], name="second_half"),
        helper.make_node("Neg", ["q2"], ["n2"]),
        helper.make_node("Concat", ["n2", "q1"], ["rot"], axis=3 if axes else 0),
        helper.make_node("Add", ["q", "rot"], ["r"]),
        helper.make_node("Transpose", ["r"], ["r4"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["r4", "flat_shape"], ["m"]),
        helper.make_node("MatMul", ["m", "Wo"], ["y"]),
    ]
    params = {
        "Wq": (64, 64), "Wo": (64, 32),
        "two1": np.array([2], I64), "three1": np.array([3], I64), "four1": np.array([4], I64), "flat_shape": np.array([0, 0, 64], I64),
        "three": np.array(3, I64), "one": np.array(1, I64), "ones": np.ones(4, I64), "two": np.array(2, I64), "ax0": np.array([0], I64),
        "zero": np.array([0], I64), "big": np.array([2**62], I64), "ax3": np.array([3], I64),
    }
    inputs = {"x": ("N", "T", 64)}
    return make_model(nodes, inputs, {"y": None}, params)


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)}


def test_heads_prune_past_a_slice_with_computed_bounds() -> None:
    model = rotary_heads()
    analysis = graphprune.analyze(model)
    heads = group_with(analysis, "Wq", 1)
    assert heads.prunable and heads.num_units == 4  # before: frozen, "bounds not constant"

    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    onnx.checker.check_model(result.model, full_check=True)
    wq = next(t for t in result.model.graph.initializer if t.name == "Wq")
    assert tuple(wq.dims) == (64, 32)  # two of four heads of 16
    out = run_ort(result.model, {"x": np.ones((1, 3, 64), np.float32)})[0]
    assert out.shape == (1, 3, 32)


def test_a_bound_read_from_a_prunable_dimension_freezes_it() -> None:
    """Bounds computed from the number of heads: cutting heads would move where the Slice
    cuts the head size, which the rewrite cannot follow (the bound is not a constant it can
    rewrite). The heads are frozen with the reason; the rewrite stays exact."""
    model = rotary_heads(bound="heads")
    analysis = graphprune.analyze(model)
    heads = group_with(analysis, "Wq", 1)
    assert not heads.prunable and "computed at run time" in " ".join(heads.frozen)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True


def test_without_axes_the_first_axes_are_sliced() -> None:
    """No ``axes`` input: a Slice cuts its first ``len(starts)`` axes (here the batch); the
    heads pass through and prune."""
    model = rotary_heads(axes=False)
    analysis = graphprune.analyze(model)
    assert group_with(analysis, "Wq", 1).prunable
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    assert run_ort(result.model, _feeds())[0].shape == run_ort(model, _feeds())[0].shape


def flipped_transposed_conv() -> onnx.ModelProto:
    """``Conv(3->8) Relu ConvTranspose(8->6, k2 s2) Relu Conv(6->2)`` where the transposed
    convolution's weight is computed as jax2onnx writes it: the HWIO kernel flipped along its
    spatial axes by a ``Slice`` with step -1, then transposed to IOHW."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Slice", ["K", "fs", "fe", "fa", "fstep"], ["Kflip"]),
        helper.make_node("Transpose", ["Kflip"], ["Kt"], perm=[2, 3, 0, 1]),
        helper.make_node("ConvTranspose", ["r1", "Kt"], ["u"], strides=[2, 2]),
        helper.make_node("Add", ["u", "Bu"], ["ub"]),
        helper.make_node("Relu", ["ub"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3"], ["y"]),
    ]
    params = {
        "W1": (8, 3, 3, 3), "B1": (8,), "K": (2, 2, 8, 6), "Bu": np.zeros((1, 6, 1, 1), np.float32) + 0.1,
        "W3": (2, 6, 1, 1),
        "fs": np.array([-1, -1], I64), "fe": np.array([-(2**62), -(2**62)], I64),
        "fa": np.array([0, 1], I64), "fstep": np.array([-1, -1], I64),
    }
    return make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, params)


def test_a_weight_flipped_by_a_slice_keeps_its_channel_roles():
    """The sliced (spatial) axes freeze; the kernel's channel axes still produce and consume
    the transposed convolution's channels (before: its 6 output channels had no producer,
    not prunable and no reason given)."""
    model = flipped_transposed_conv()
    analysis = graphprune.analyze(model)
    outputs = group_with(analysis, "K", 3)
    assert outputs.prunable and outputs.roles.get(("K", 3)) == "producer"
    assert group_with(analysis, "K", 2).prunable
    assert not group_with(analysis, "K", 0).prunable  # the flipped kernel height
    result = graphprune.prune(model, ratio=0.5, round_to=1)
    assert result.report["verification"]["ok"]
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["K"] == [2, 2, 4, 3]
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert run_ort(result.model, {"x": x})[0].shape == (1, 2, 16, 16)
