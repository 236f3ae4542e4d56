"""DeformConv (DCNv1/v2, torchvision's ``deform_conv2d``) and CenterCropPad.

A block as detection and OCR backbones write it: a plain Conv computes the sampling offsets
(and, for DCNv2, a mask through a Sigmoid) from the features, the DeformConv reads the
features at those offsets, a Conv follows. The DeformConv's output channels prune like a
Conv's, and so do its input channels with one offset group; the offset/mask channels never
(they are kernel taps, not features). Checked against the zeroed original in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, relative_difference, run_ort, zeroed_original
from onnx import helper

import graphprune

OPS_UNDER_TEST = ("DeformConv", "CenterCropPad")

C, K = 8, 3


def _dcn(*, mask: bool, offset_group: int = 1, group: int = 1) -> onnx.ModelProto:
    taps = offset_group * K * K
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["f"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f"], ["r"]),
        helper.make_node("Conv", ["r", "w_off", "b_off"], ["offset"], pads=[1, 1, 1, 1]),
    ]
    inputs = ["r", "w1", "offset", "b1"]
    params = {"w0": [C, 3, 3, 3], "b0": [C], "w_off": [2 * taps, C, 3, 3], "b_off": [2 * taps],
              "w1": [C, C // group, K, K], "b1": [C], "w2": [4, C, 1, 1]}
    if mask:
        nodes += [helper.make_node("Conv", ["r", "w_mask", "b_mask"], ["m_logits"], pads=[1, 1, 1, 1]),
                  helper.make_node("Sigmoid", ["m_logits"], ["m"])]
        params |= {"w_mask": [taps, C, 3, 3], "b_mask": [taps]}
        inputs.append("m")
    nodes += [helper.make_node("DeformConv", inputs, ["d"], kernel_shape=[K, K], pads=[1, 1, 1, 1],
                               offset_group=offset_group, group=group),
              helper.make_node("Relu", ["d"], ["dr"]),
              helper.make_node("Conv", ["dr", "w2"], ["y"])]
    model = make_model(nodes, {"x": ["N", 3, 12, 12]}, {"y": None}, params, opset=19)
    for init in model.graph.initializer:  # offsets of a few pixels, not of dozens
        if init.name in ("w_off", "b_off"):
            values = onnx.numpy_helper.to_array(init) * 0.1
            init.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), init.name))
    return model


def _group_of(analysis, name: str, axis: int = 0):
    (group,) = [g for g in analysis.groups if (name, axis) in g.dims]
    return group


def _x(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)}


@pytest.mark.parametrize("mask", [False, True], ids=["dcn-v1", "dcn-v2"])
def test_deform_conv_prunes_its_channels_and_keeps_the_offsets(mask):
    model = _dcn(mask=mask)
    analysis = graphprune.analyze(model)
    by_anchor = {name: _group_of(analysis, name) for name in ("w0", "w1", "w_off")}
    # f feeds the offset conv, the mask conv and the DeformConv: one group, prunable
    assert by_anchor["w0"].prunable and by_anchor["w0"].num_units == C
    assert by_anchor["w1"].prunable and by_anchor["w1"].num_units == C
    assert not by_anchor["w_off"].prunable
    assert "sampling offsets" in " ".join(by_anchor["w_off"].frozen)
    res = graphprune.prune(model, ratio=0.5)
    assert res.report["verification"]["ok"], res.report["verification"]
    shapes = {t.name: list(t.dims) for t in res.model.graph.initializer}
    assert shapes["w1"] == [C // 2, C // 2, K, K] and shapes["w_off"][0] == 2 * K * K
    reference = zeroed_original(model, res.plan)
    for n in (1, 3):
        got = run_ort(res.model, _x(n, n))
        assert relative_difference(run_ort(reference, _x(n, n)), got) < 1e-5
        assert relative_difference(run_ort(model, _x(n, n)), got) > 1e-3


def test_several_offset_groups_keep_the_input_channels():
    """Input channels are split into runs that follow their own offsets: they stay; the
    output channels still prune."""
    model = _dcn(mask=True, offset_group=2)
    analysis = graphprune.analyze(model)
    by_anchor = {name: _group_of(analysis, name) for name in ("w0", "w1")}
    assert not by_anchor["w0"].prunable
    assert "offset groups" in " ".join(by_anchor["w0"].frozen)
    assert by_anchor["w1"].prunable
    res = graphprune.prune(model, ratio=0.5)
    assert res.report["verification"]["ok"]
    assert [list(t.dims) for t in res.model.graph.initializer if t.name == "w1"] == [[C // 2, C, K, K]]


def test_center_crop_pad_passes_channels_through():
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["f"]),
             helper.make_node("CenterCropPad", ["f", "size"], ["c"], axes=[2, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["y"])]
    model = make_model(nodes, {"x": ["N", 3, 12, 12]}, {"y": None},
                       {"w0": [C, 3, 3, 3], "b0": [C], "w1": [4, C, 1, 1], "size": np.array([8, 14], np.int64)},
                       opset=18)
    analysis = graphprune.analyze(model)
    group = _group_of(analysis, "w0")
    assert group.prunable and group.num_units == C
    res = graphprune.prune(model, ratio=0.5)
    assert res.report["verification"]["ok"]
    reference = zeroed_original(model, res.plan)
    assert relative_difference(run_ort(reference, _x(2)), run_ort(res.model, _x(2))) < 1e-5
    assert run_ort(res.model, _x(2))[0].shape == (2, 4, 8, 14)
