"""Data-aware criteria: greedy optimal-brain-surgeon removal (``obs``) and the per-group
choice of ``auto`` among the candidates, on real ONNX Runtime statistics."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.planning import data_aware


def duplicated_mlp() -> onnx.ModelProto:
    """MatMul(8->16) Add Relu MatMul(16->5); hidden units 0 and 1 are the same unit, and the
    most important one: a one-shot saliency finds each alone redundant."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    b1 = (rng.standard_normal(16) * 0.1).astype(np.float32)
    w1[:, 1], b1[:2] = w1[:, 0], 1.0
    w2 = rng.standard_normal((16, 5)).astype(np.float32)
    w2[:2] *= 3.0
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="up_bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _removed(criterion: str):
    calib = {"x": np.random.default_rng(1).standard_normal((40, 1, 6, 8)).astype(np.float32)}
    result = graphprune.prune(duplicated_mlp(), ratio=0.5, round_to=1, criterion=criterion, calibration=calib,
                              reconstruction="none")
    (group,) = result.plan.groups
    return set(group.remove), result


def test_greedy_obs_keeps_one_of_two_duplicates():
    one_shot, _ = _removed("reconstruction")
    greedy, _ = _removed("obs")
    assert {0, 1} <= one_shot  # each copy alone looks redundant
    assert len({0, 1} & greedy) == 1  # once one is gone, the other is essential


def test_auto_picks_the_criterion_with_the_least_refit_error():
    auto, result = _removed("auto")
    cal = result.report["calibration"]
    assert cal["criterion"] == "auto" and cal["criteria_chosen"] == {"obs": 1}
    assert len({0, 1} & auto) == 1


def test_removal_error_is_the_least_squares_residual():
    """``removal_error`` equals the residual of an explicit least-squares refit."""
    from graphprune.calibration import runner, stats
    from graphprune.calibration.linear import linear_view
    from graphprune.pipeline.session import Session

    s = Session(duplicated_mlp())
    s.analyze()
    view = next(v for n in s.graph.nodes if (v := linear_view(n, s.opset)) is not None and n.name == "down")
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 6, 8)).astype(np.float32)} for i in range(30)]
    layer = stats.collect(s.prepared, [view], runner.Batches(feeds, [1] * 30, False)).get("down")
    remove = np.array([2, 5, 7])
    got = data_aware.removal_error(view, layer, remove)
    a = np.concatenate([o[0] for o in runner.outputs(_with_output(s.prepared, "a"), feeds)]).reshape(-1, 16)
    w = np.asarray(view.weight.values, dtype=np.float64)  # [16, 5]
    y = a @ w
    keep = np.setdiff1d(np.arange(16), remove)
    ridge = data_aware.GRAM_RIDGE * np.mean(np.square(a).sum(0)) * np.eye(len(keep))
    fit = np.linalg.solve(a[:, keep].T @ a[:, keep] + ridge, a[:, keep].T @ y)
    want = np.sum(np.square(y - a[:, keep] @ fit)) / np.sum(np.square(y))
    assert abs(got - want) < 0.05 * want + 1e-6, (got, want)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out
