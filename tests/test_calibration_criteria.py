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


def _removed(criterion: str, reconstruction: str = "none"):
    calib = {"x": np.random.default_rng(1).standard_normal((40, 1, 6, 8)).astype(np.float32)}
    result = graphprune.prune(duplicated_mlp(), ratio=0.5, round_to=1, criterion=criterion, calibration=calib,
                              reconstruction=reconstruction)
    (group,) = result.plan.groups
    return set(group.remove), result


def test_greedy_obs_keeps_one_of_two_duplicates():
    one_shot, _ = _removed("reconstruction")
    greedy, _ = _removed("obs")
    assert {0, 1} <= one_shot  # each copy alone looks redundant
    assert len({0, 1} & greedy) == 1  # once one is gone, the other is essential


def test_auto_picks_the_criterion_with_the_least_refit_error():
    auto, result = _removed("auto", reconstruction="auto")  # (obs's saliency is the error left after a refit)
    cal = result.report["calibration"]
    assert cal["criterion"] == "auto" and cal["criteria_chosen"] == {"obs": 1}
    assert len({0, 1} & auto) == 1
    # its whole plan was weighed against wanda's and l1's, refit the same way, and was the nearest
    weighed = cal["criterion_choice"]
    assert weighed["compared"] and weighed["kept"] == "auto"
    errors = {k: v["error"] for k, v in weighed["held_out"].items()}
    assert set(errors) == {"auto", "wanda", "l1"} and errors["auto"] == min(errors.values())


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


def test_greedy_on_compressed_rows_matches_the_full_rows(monkeypatch):
    """A conv consumer has more weight rows (outputs x kernel offsets) than input channels:
    the greedy runs on a square factor with the same column inner products and must give
    the scores of the full rows."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 24))
    x[:, 1] = x[:, 0] + 0.01 * x[:, 2]
    hinv = np.linalg.inv(x.T @ x / 200 + 1e-2 * np.eye(24))
    w = rng.standard_normal((90, 24))
    labels = np.repeat(np.arange(12), 2)
    for units in (np.arange(24), labels):
        fast = data_aware._greedy(w, hinv, units)
        monkeypatch.setattr(data_aware, "compressed", lambda m: m)
        full = data_aware._greedy(w, hinv, units)
        monkeypatch.undo()
        np.testing.assert_allclose(fast, full, rtol=2e-3)
        assert data_aware.compressed(w).shape == (24, 24)


def test_channel_sums_and_rows_of_nchw_match_a_moved_channel_axis():
    from graphprune.calibration.linear import _gather
    from graphprune.calibration.stats import channel_sums

    x = np.random.default_rng(4).standard_normal((3, 5, 4, 6)).astype(np.float32) + 2.0
    moved = np.moveaxis(x, 1, -1).reshape(-1, 5).astype(np.float64)
    total, squares = channel_sums(x, 1)
    np.testing.assert_allclose(total, moved.sum(0), rtol=1e-5)
    np.testing.assert_allclose(squares, np.square(moved).sum(0), rtol=1e-5)
    rows = np.array([0, 7, 23, 24, 71])
    np.testing.assert_array_equal(_gather(x, rows), moved[rows].astype(np.float32))


def test_one_column_greedy_matches_the_explicit_downdates():
    """The greedy over single columns keeps ``H`` and ``w^T w`` as rank-one corrections; it
    must remove the same columns, with the same scores, as explicit full-matrix downdates."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((150, 30))
    x[:, 3] = x[:, 4] - 0.02 * x[:, 7]
    hinv = np.linalg.inv(x.T @ x / 150 + 1e-2 * np.eye(30))
    w = rng.standard_normal((12, 30))
    lazy = data_aware._greedy(w, hinv, np.arange(30))
    explicit = data_aware._greedy_units(w, hinv, [np.array([i]) for i in range(30)], 30)
    np.testing.assert_allclose(lazy, explicit, rtol=1e-3)
    order = np.argsort(lazy, kind="stable")
    assert len({3, 4} & set(order[:15])) == 1  # one of the near-duplicates goes, not both
