"""DepthToSpace (graphprune/rules/depth_to_space.py): ``Conv 'stem' -> DepthToSpace -> Conv 'head'``.

The stem makes 16 channels, DepthToSpace (block 2) turns them into 4 channels of twice the
height and width, the head reads those 4. One output channel owns 4 stem channels: in DCR
mode channels ``c, c+4, c+8, c+12``, in CRD mode ``4c .. 4c+3``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import (
    assert_prunes_exactly,
    attr,
    conv_node,
    default_feeds,
    group_with,
    initializer,
    make_model,
    node,
    relative_difference,
    run_ort,
)
from onnx import helper

import graphprune
from graphprune.rules import lookup
from graphprune.rules.scale import ScaleContext

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("DepthToSpace",)
BLOCK = 2
OUT = 4  # channels after DepthToSpace
STEM = OUT * BLOCK * BLOCK


def owners(mode: str, channel: int) -> list[int]:
    """The stem channels that DepthToSpace moves into output ``channel``."""
    if mode == "DCR":
        return [k * OUT + channel for k in range(BLOCK * BLOCK)]
    return [channel * BLOCK * BLOCK + k for k in range(BLOCK * BLOCK)]


def model(mode: str | None, *, zero: list[int] = (), opset: int = 17) -> onnx.ModelProto:
    """``mode`` None: no attribute (DCR by default). ``zero``: stem channels that are
    exactly zero (for lossless pruning; the Relu keeps them zero)."""
    rng = np.random.default_rng(0)
    w_stem = rng.standard_normal((STEM, 3, 3, 3)).astype(np.float32)
    b_stem = rng.standard_normal(STEM).astype(np.float32)
    w_stem[list(zero)] = 0
    b_stem[list(zero)] = 0
    attrs = {"blocksize": BLOCK} | ({"mode": mode} if mode else {})
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("DepthToSpace", ["r"], ["d"], name="d2s", **attrs),
        conv_node("d", "W_head", "y", "B_head", name="head"),
    ]
    params = {"W_stem": w_stem, "B_stem": b_stem, "W_head": (4, OUT, 3, 3), "B_head": (4,)}
    return make_model(nodes, {"x": [1, 3, 4, 4]}, {"y": None}, params, opset=opset)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_one_output_channel_owns_a_block_of_input_channels(mode):
    group = group_with(graphprune.analyze(model(mode)), "W_stem", 0)
    assert group.prunable and group.is_exact, group.frozen
    assert group.num_units == OUT
    assert {("W_stem", 0), ("B_stem", 0), ("a", 1), ("d", 1), ("W_head", 1)} <= set(group.dims)
    units = group.unit_of[("a", 1)]
    for channel in range(OUT):
        assert len({int(units[c]) for c in owners(mode, channel)}) == 1
    assert len(set(units.tolist())) == OUT
    expected = [units[owners(mode, channel)[0]] for channel in range(OUT)]
    np.testing.assert_array_equal(group.unit_of[("d", 1)], expected)


@pytest.mark.parametrize("mode", ["DCR", "CRD", None], ids=["DCR", "CRD", "default"])
def test_prunes_whole_blocks_and_matches_the_zeroed_original(mode):
    m = model(mode)
    res = assert_prunes_exactly(m, ratio=0.5, criterion="random", seed=1)
    removed = sorted(res.plan.groups[0].channels["W_stem"]["0"])
    head_removed = res.plan.groups[0].channels["W_head"]["1"]
    assert len(head_removed) == 2
    assert removed == sorted(c for ch in head_removed for c in owners(mode or "DCR", ch))
    assert initializer(res.model, "W_stem").shape == (STEM // 2, 3, 3, 3)
    assert initializer(res.model, "W_head").shape == (4, OUT // 2, 3, 3)
    kept = [c for c in range(STEM) if c not in removed]
    np.testing.assert_array_equal(initializer(res.model, "W_stem"), initializer(m, "W_stem")[kept])
    d2s = node(res.model, "d2s")
    assert attr(d2s, "blocksize") == BLOCK
    feeds = default_feeds(m)
    assert run_ort(res.model, feeds)[0].shape == (1, 4, 8, 8)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_lossless_removes_a_block_whose_channels_are_zero(mode):
    m = model(mode, zero=owners(mode, 1))
    res = graphprune.prune(m, lossless=True)
    assert res.report["channels"]["removed"] == 1
    assert res.report["verification"]["ok"] is True
    assert initializer(res.model, "W_stem").shape[0] == STEM - BLOCK * BLOCK
    assert initializer(res.model, "W_head").shape[1] == OUT - 1
    feeds = default_feeds(m)
    assert relative_difference(run_ort(m, feeds), run_ort(res.model, feeds)) <= 1e-6


def test_lossless_keeps_a_block_that_is_only_partly_zero():
    # in DCR mode stem channels 4..7 belong to four different output channels
    res = graphprune.prune(model("DCR", zero=owners("CRD", 1)), lossless=True)
    assert res.report["channels"]["removed"] == 0
    assert initializer(res.model, "W_stem").shape[0] == STEM


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_rms_of_an_output_channel_is_the_mean_energy_of_its_block(mode):
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model(mode)))
    d2s = next(n for n in graph.nodes if n.op == "DepthToSpace")
    rms = np.arange(1.0, STEM + 1)
    out = lookup("", "DepthToSpace", 17).propagate_rms(d2s, ScaleContext({"r": rms}))
    expected = [np.sqrt(np.mean(rms[owners(mode, c)] ** 2)) for c in range(OUT)]
    np.testing.assert_allclose(out, expected)
