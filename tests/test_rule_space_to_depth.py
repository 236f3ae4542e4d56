"""SpaceToDepth (graphprune/rules/space_to_depth.py): ``Conv 'stem' -> SpaceToDepth -> Conv 'head'``.

The stem makes 4 channels, SpaceToDepth (block 2) stacks the four positions of every 2 x 2
block in front of them (16 channels, half the height and width), the head reads the 16.
Output channel ``oc`` carries stem channel ``oc % 4``: removing a stem channel removes the
four head columns ``c, c+4, c+8, c+12``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
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
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.rules import lookup
from graphprune.rules.scale import ScaleContext

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("SpaceToDepth",)
BLOCK = 2
STEM = 4
OUT = STEM * BLOCK * BLOCK


def model(*, zero: list[int] = ()) -> onnx.ModelProto:
    """``zero``: stem channels that are exactly zero (the Relu keeps them zero)."""
    rng = np.random.default_rng(0)
    w_stem = rng.standard_normal((STEM, 3, 3, 3)).astype(np.float32)
    b_stem = rng.standard_normal(STEM).astype(np.float32)
    w_stem[list(zero)] = 0
    b_stem[list(zero)] = 0
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("SpaceToDepth", ["r"], ["s"], name="s2d", blocksize=BLOCK),
        conv_node("s", "W_head", "y", "B_head", name="head"),
    ]
    params = {"W_stem": w_stem, "B_stem": b_stem, "W_head": (4, OUT, 3, 3), "B_head": (4,)}
    return make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, params)


def test_one_input_channel_owns_every_fourth_output_channel():
    group = group_with(graphprune.analyze(model()), "W_stem", 0)
    assert group.prunable and group.is_exact, group.frozen
    assert group.num_units == STEM
    assert {("W_stem", 0), ("B_stem", 0), ("r", 1), ("s", 1), ("W_head", 1)} <= set(group.dims)
    stem_units = group.unit_of[("W_stem", 0)]
    np.testing.assert_array_equal(group.unit_of[("s", 1)], np.tile(stem_units, BLOCK * BLOCK))
    np.testing.assert_array_equal(group.unit_of[("W_head", 1)], np.tile(stem_units, BLOCK * BLOCK))


def test_prunes_and_matches_the_zeroed_original():
    m = model()
    res = assert_prunes_exactly(m, ratio=0.5, criterion="random", seed=2)
    removed = set(res.plan.groups[0].channels["W_stem"]["0"])
    assert len(removed) == 2
    head_removed = res.plan.groups[0].channels["W_head"]["1"]
    assert sorted(head_removed) == [oc for oc in range(OUT) if oc % STEM in removed]
    assert initializer(res.model, "W_stem").shape == (2, 3, 3, 3)
    assert initializer(res.model, "W_head").shape == (4, OUT // 2, 3, 3)
    kept = [oc for oc in range(OUT) if oc % STEM not in removed]
    np.testing.assert_array_equal(
        initializer(res.model, "W_head"), initializer(m, "W_head")[:, kept]
    )
    assert attr(node(res.model, "s2d"), "blocksize") == BLOCK
    assert run_ort(res.model, default_feeds(m))[0].shape == (1, 4, 4, 4)


def test_lossless_removes_a_zero_channel_and_its_four_copies():
    m = model(zero=[1])
    res = graphprune.prune(m, lossless=True)
    assert res.report["channels"]["removed"] == 1
    assert res.report["verification"]["ok"] is True
    assert initializer(res.model, "W_stem").shape[0] == STEM - 1
    assert initializer(res.model, "W_head").shape[1] == OUT - BLOCK * BLOCK
    feeds = default_feeds(m)
    assert relative_difference(run_ort(m, feeds), run_ort(res.model, feeds)) <= 1e-6


def test_rms_of_an_output_channel_is_its_input_channel():
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model()))
    s2d = next(n for n in graph.nodes if n.op == "SpaceToDepth")
    rms = np.array([1.0, 2.0, 3.0, 4.0])
    out = lookup("", "SpaceToDepth", 17).propagate_rms(s2d, ScaleContext({"r": rms}))
    np.testing.assert_array_equal(out, [rms[oc % STEM] for oc in range(OUT)])


def test_tf2onnx_dilated_convolution_prunes_channels_on_axis_0():
    """tf2onnx writes a dilated convolution as space-to-batch (Transpose -> SpaceToDepth ->
    Transpose), the convolution, then batch-to-space (Transpose -> DepthToSpace -> Transpose):
    between the Transposes the convolution's channels are axis 0 of the block ops, which pass it
    through. Both ops had marked it a batch axis, and the group froze."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), n)
               for n, s in (("w1", (16, 8, 3, 3)), ("b1", (16,)), ("w2", (8, 16, 1, 1)))]
    nodes = [helper.make_node("Transpose", ["x"], ["t0"], perm=[1, 0, 2, 3]),
             helper.make_node("SpaceToDepth", ["t0"], ["s2d"], blocksize=2),
             helper.make_node("Transpose", ["s2d"], ["t1"], perm=[1, 0, 2, 3]),
             helper.make_node("Conv", ["t1", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c1"], ["t2"], perm=[1, 0, 2, 3]),
             helper.make_node("DepthToSpace", ["t2"], ["d2s"], blocksize=2),
             helper.make_node("Transpose", ["d2s"], ["t3"], perm=[1, 0, 2, 3]),
             helper.make_node("Relu", ["t3"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "dilated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    analysis = graphprune.analyze(model)
    group = next(g for g in analysis.groups if ("w1", 0) in g.dims)
    assert group.prunable, group.frozen
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    w1 = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "w1")
    assert w1.shape == (8, 8, 3, 3)
