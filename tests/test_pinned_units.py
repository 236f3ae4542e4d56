"""Units bound by a freeze inside a group that still prunes (pinned elements).

A freeze says a dimension keeps its size; it binds only the units that dimension's elements
belong to. A fused projection whose key/value part cannot be cut (multi-query attention:
one key/value head for all query heads, gpt_bigcode and Falcon) used to freeze its query
heads too, being one group with them; a Concat with a kept input froze the other inputs.
Now the bound elements carry label -1 (no unit), the other units prune, and the reasons are
reported under ``pinned``. Every planner (ratio, global budget, calibrated criteria and the
refit) sees only the units that can go.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import group_with, make_model, run_ort
from onnx import helper

import graphprune

I64 = np.int64


def multi_query(select: str = "split") -> onnx.ModelProto:
    """``x [N, T, 64]``: one projection to 4 query heads of 16 and one key and one value
    head, attention with the key/value head shared by every query head, a MatMul out.
    ``select="split"``: Split [64, 16, 16] (gpt_bigcode); ``"gather"``: the projection as
    ``[N, T, 6, 16]``, queries ``[..., :4, :]`` by Slice, key ``[..., [4], :]`` and value
    ``[..., [-1], :]`` by Gather (Falcon, TorchScript); ``"gathernd"``: the fused axis moved
    first and the key and value picked by GatherND ``[[4]]``, ``[[-1]]`` (Falcon, dynamo)."""
    if select == "split":
        head = [
            helper.make_node("Split", ["p", "split"], ["q", "k", "v"], axis=2),
            helper.make_node("Reshape", ["q", "heads"], ["q3"]),  # [N, T, 4, 16]
            helper.make_node("Unsqueeze", ["k", "ax2"], ["k3"]),  # [N, T, 1, 16]
            helper.make_node("Unsqueeze", ["v", "ax2"], ["v3"]),
        ]
        params = {"split": np.array([64, 16, 16], I64), "heads": np.array([0, 0, 4, 16], I64),
                  "ax2": np.array([2], I64)}
    elif select == "gathernd":  # the dynamo exporter's Falcon: the fused axis first, GatherND
        head = [
            helper.make_node("Reshape", ["p", "fused"], ["p6"]),
            helper.make_node("Transpose", ["p6"], ["pt"], perm=[2, 0, 1, 3]),  # [6, N, T, 16]
            helper.make_node("Slice", ["pt", "s0", "s4", "ax0"], ["qt"]),
            helper.make_node("Transpose", ["qt"], ["q3"], perm=[1, 2, 0, 3]),
            helper.make_node("GatherND", ["pt", "i4"], ["kt"]),  # [1, N, T, 16]
            helper.make_node("Transpose", ["kt"], ["k3"], perm=[1, 2, 0, 3]),
            helper.make_node("GatherND", ["pt", "im1"], ["vt"]),
            helper.make_node("Transpose", ["vt"], ["v3"], perm=[1, 2, 0, 3]),
        ]
        params = {"fused": np.array([0, 0, 6, 16], I64), "s0": np.array([0], I64),
                  "s4": np.array([4], I64), "ax0": np.array([0], I64),
                  "i4": np.array([[4]], I64), "im1": np.array([[-1]], I64)}
    else:
        head = [
            helper.make_node("Reshape", ["p", "fused"], ["p6"]),  # [N, T, 6, 16]
            helper.make_node("Slice", ["p6", "s0", "s4", "ax2"], ["q3"]),
            helper.make_node("Gather", ["p6", "i4"], ["k3"], axis=2),
            helper.make_node("Gather", ["p6", "im1"], ["v3"], axis=2),
        ]
        params = {"fused": np.array([0, 0, 6, 16], I64), "s0": np.array([0], I64),
                  "s4": np.array([4], I64), "ax2": np.array([2], I64),
                  "i4": np.array([4], I64), "im1": np.array([-1], I64)}
    nodes = [
        helper.make_node("MatMul", ["x", "Wqkv"], ["p"]),
        *head,
        helper.make_node("Transpose", ["q3"], ["qh"], perm=[0, 2, 1, 3]),  # [N, 4, T, 16]
        helper.make_node("Transpose", ["k3"], ["kh"], perm=[0, 2, 3, 1]),  # [N, 1, 16, T]
        helper.make_node("Transpose", ["v3"], ["vh"], perm=[0, 2, 1, 3]),  # [N, 1, T, 16]
        helper.make_node("MatMul", ["qh", "kh"], ["s"]),
        helper.make_node("Softmax", ["s"], ["a"], axis=-1),
        helper.make_node("MatMul", ["a", "vh"], ["o"]),  # [N, 4, T, 16]
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "flat"], ["m"]),
        helper.make_node("MatMul", ["m", "Wo"], ["y"]),
    ]
    params.update({"Wqkv": (64, 96), "Wo": (64, 32), "flat": np.array([0, 0, 64], I64)})
    return make_model(nodes, {"x": ("N", "T", 64)}, {"y": None}, params)


def _feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 7, 64)).astype(np.float32)}


@pytest.mark.parametrize("select", ["split", "gather", "gathernd"])
def test_query_heads_prune_beside_a_pinned_key_value_head(select: str) -> None:
    model = multi_query(select)
    analysis = graphprune.analyze(model)
    heads = group_with(analysis, "Wqkv", 1)
    assert heads.prunable and heads.num_units == 4  # before: the whole projection frozen
    assert heads.pinned_units == (32 if select == "split" else 2) and heads.pinned
    labels = heads.unit_of[("Wqkv", 1)]
    assert (labels[64:] == -1).all() and sorted(set(labels[:64].tolist())) == [0, 1, 2, 3]

    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    onnx.checker.check_model(result.model, full_check=True)
    weights = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert weights["Wqkv"] == (64, 64) and weights["Wo"] == (32, 32)  # two query heads of 16 gone
    assert result.report["pinned"] and result.report["pinned"][0]["prunable_units"] == 4
    assert run_ort(result.model, _feeds(1))[0].shape == (1, 7, 32)


def test_pinned_units_under_a_budget_and_with_calibration() -> None:
    """The global allocation and the calibrated criteria (greedy OBS over the output
    projection's columns, refit) with elements in no unit."""
    model = multi_query("split")
    budget = graphprune.prune(model, target_macs=0.8)
    assert budget.report["verification"]["ok"] is True
    weights = {t.name: tuple(t.dims) for t in budget.model.graph.initializer}
    # whole query heads went, the key/value columns stayed (the rest is the query part Wo reads)
    assert weights["Wqkv"][1] < 96 and (96 - weights["Wqkv"][1]) % 16 == 0
    assert weights["Wqkv"][1] - 32 == weights["Wo"][0]
    calibrated = graphprune.prune(model, ratio=0.5, calibration=[_feeds(s) for s in range(24)])
    assert calibrated.report["verification"]["ok"] is True
    weights = {t.name: tuple(t.dims) for t in calibrated.model.graph.initializer}
    assert weights["Wqkv"] == (64, 64)
    assert calibrated.report["calibration"]["criteria_chosen"]  # a data-aware criterion scored it
    assert np.isfinite(calibrated.report["fidelity"]["cosine"])
