"""Heads merged with a dynamic batch, ``[B*H, ...]``, met by a Tile with computed repeats.

DeBERTa-v2/v3 as the TorchScript exporter (and so optimum) writes it: the per-head position
keys ``[H, 2S, D]`` are repeated ``query.size(0) // H`` times to meet the queries' merged
``[B*H]`` axis, and the relative-position lookups ``GatherElements`` run over that merged
axis. Both froze the heads (repeats not constant; index extent unknown). Now the repeats
``size // n`` with ``n`` the tiled axis's size couple input and output by ``m -> m % n``, the
literal ``n`` is rewritten with the new head count, and GatherElements compares a merged
axis by the shape probe.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import group_with, make_model, run_ort
from onnx import helper

import graphprune

OPS_UNDER_TEST = ["Tile", "GatherElements"]

I64 = np.int64


def merged_heads(divisor: int = 4) -> onnx.ModelProto:
    """``x [N, T, 64]``, ``r [8, 64]``: queries ``[N*4, T, 16]``, position keys
    ``[4, 8, 16]`` tiled ``size(q, 0) // divisor`` times, scores ``[N*4, T, 8]`` gathered
    along the positions, back to ``[N, T, 4*8]`` and a MatMul."""
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["p"]),
        helper.make_node("Reshape", ["p", "split_heads"], ["p4"]),
        helper.make_node("Transpose", ["p4"], ["q4"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["q4"], ["q4s"]),
        helper.make_node("Gather", ["q4s", "i2"], ["t"], axis=0),
        helper.make_node("Concat", ["m1", "t", "c16"], ["merge_shape"], axis=0),
        helper.make_node("Reshape", ["q4", "merge_shape"], ["q"]),  # [N*4, T, 16]
        helper.make_node("MatMul", ["r", "Wp"], ["pk"]),
        helper.make_node("Reshape", ["pk", "pos_heads"], ["pk4"]),
        helper.make_node("Transpose", ["pk4"], ["pkh"], perm=[1, 0, 2]),  # [4, 8, 16]
        helper.make_node("Shape", ["q"], ["qs"]),
        helper.make_node("Gather", ["qs", "i0"], ["bh"], axis=0),
        helper.make_node("Div", ["bh", "heads"], ["b"]),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        helper.make_node("Concat", ["b1", "one1", "one1"], ["repeats"], axis=0),
        helper.make_node("Tile", ["pkh", "repeats"], ["pkt"]),  # [N*4, 8, 16]
        helper.make_node("Transpose", ["pkt"], ["pkT"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "pkT"], ["s"]),  # [N*4, T, 8]
        helper.make_node("Gather", ["qs", "i1"], ["t2"], axis=0),
        helper.make_node("Unsqueeze", ["bh", "ax0"], ["bh1"]),
        helper.make_node("Unsqueeze", ["t2", "ax0"], ["t21"]),
        helper.make_node("Concat", ["bh1", "t21", "c8"], ["idx_shape"], axis=0),
        helper.make_node("Expand", ["pos", "idx_shape"], ["idx"]),
        helper.make_node("GatherElements", ["s", "idx"], ["g"], axis=2),
        helper.make_node("Concat", ["m1", "c4", "t21", "c8"], ["unmerge"], axis=0),
        helper.make_node("Reshape", ["g", "unmerge"], ["g4"]),  # [N, 4, T, 8]
        helper.make_node("Transpose", ["g4"], ["gt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["gt", "flat"], ["m"]),  # [N, T, 32]
        helper.make_node("MatMul", ["m", "Wo"], ["y"]),
    ]
    params = {
        "Wq": (64, 64), "Wp": (64, 64), "Wo": (32, 16),
        "split_heads": np.array([0, 0, 4, 16], I64), "pos_heads": np.array([8, 4, 16], I64),
        "m1": np.array([-1], I64), "c16": np.array([16], I64), "c8": np.array([8], I64),
        "i0": np.array(0, I64), "i1": np.array(1, I64), "i2": np.array([2], I64),
        "heads": np.array(divisor, I64), "ax0": np.array([0], I64), "one1": np.array([1], I64),
        "pos": np.array([7, 6, 5, 4, 3, 2, 1, 0], I64).reshape(1, 1, 8),
        "c4": np.array([4], I64), "flat": np.array([0, 0, 32], I64),
    }
    return make_model(nodes, {"x": ("N", "T", 64), "r": (8, 64)}, {"y": None}, params)


def _feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 10 + seq)
    return {"x": rng.standard_normal((batch, seq, 64)).astype(np.float32),
            "r": rng.standard_normal((8, 64)).astype(np.float32)}


def test_heads_merged_with_the_batch_prune_through_tile_and_gather_elements() -> None:
    model = merged_heads()
    analysis = graphprune.analyze(model)
    heads = group_with(analysis, "Wq", 1)
    assert heads.prunable and heads.num_units == 4  # before: frozen by the Tile and the gather
    assert group_with(analysis, "Wp", 1) is heads  # the tiled keys lose the same heads

    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    onnx.checker.check_model(result.model, full_check=True)
    weights = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert weights["Wq"] == (64, 32) and weights["Wp"] == (64, 32) and weights["Wo"] == (16, 16)
    divisor = [t for t in result.model.graph.initializer if t.name.startswith("Div")]
    assert [int(onnx.numpy_helper.to_array(t)) for t in divisor] == [2]  # the head count, rewritten
    assert onnx.numpy_helper.to_array(divisor[0]).shape == ()  # still a scalar
    # batch > 1: the repeats follow the merged axis; each sample as if run alone
    batch = run_ort(result.model, _feeds(3, 5))[0]
    for b in range(3):
        single = {k: (v[b:b + 1] if k == "x" else v) for k, v in _feeds(3, 5).items()}
        np.testing.assert_allclose(run_ort(result.model, single)[0], batch[b:b + 1], rtol=1e-5, atol=1e-5)


def test_a_divisor_that_is_not_the_tiled_size_freezes_the_tile() -> None:
    """``size // 2`` over four heads: not the form understood, the node is frozen."""
    model = merged_heads(divisor=2)
    analysis = graphprune.analyze(model)
    heads = group_with(analysis, "Wp", 1)
    assert not heads.prunable and any("repeats not constant" in r for r in heads.frozen)
