"""The public API (``graphprune.prune`` / ``graphprune.analyze``), the planner and plans."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from conftest import (
    assert_prunes_exactly,
    conv_node,
    group_with,
    initializer,
    ints,
    make_model,
)
from onnx import helper

import graphprune
from graphprune.errors import GraphPruneError, UsageError, VerificationError
from graphprune.examples import example_cnn
from graphprune.planning.plan import Plan
from graphprune.planning.planner import kept_count
from graphprune.rules import OpRule, register, unregister

HW = 6


def chain(channels: int = 10, *, stem_weight: np.ndarray | None = None) -> onnx.ModelProto:
    """x -> Conv 'stem' (channels) -> Relu -> Conv 'head' -> y: one prunable group."""
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv_node("r", "W_head", "y", name="head"),
    ]
    params = {
        "W_stem": (channels, 3, 3, 3) if stem_weight is None else stem_weight,
        "B_stem": (channels,),
        "W_head": (4, channels, 3, 3),
    }
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params)


def kept(result, name: str = "W_stem", axis: int = 0) -> int:
    return initializer(result.model, name).shape[axis]


# --------------------------------------------------------------------------- planner: counts


@pytest.mark.parametrize(
    ("units", "ratio", "round_to", "min_channels", "expected"),
    [
        (10, 0.5, 1, 1, 5),
        (10, 0.33, 1, 1, 7),  # floor(3.3) = 3 removed
        (10, 0.0, 1, 1, 10),
        (3, 0.5, 1, 1, 2),
        (1, 0.9, 1, 1, 1),  # never the whole group
        (16, 0.5, 8, 1, 8),
        (16, 0.9, 1, 4, 4),  # min_channels
        (3, 0.5, 8, 1, 3),  # round_to larger than the group: keep it whole
    ],
)
def test_kept_count(units, ratio, round_to, min_channels, expected):
    assert kept_count(units, ratio, round_to, min_channels) == expected


@pytest.mark.parametrize(("ratio", "expected"), [(0.5, 5), (0.3, 7), (0.75, 3), (0.99, 1)])
def test_ratio_rounds_down_the_channels_removed(ratio, expected):
    res = assert_prunes_exactly(chain(10), ratio)
    assert kept(res) == expected == kept(res, "W_head", 1)
    assert res.report["channels"] == {"prunable": 10, "removed": 10 - expected}


def test_ratio_zero_removes_nothing():
    m = chain(10)
    res = graphprune.prune(m, ratio=0.0)
    assert res.plan.units_removed == 0 and res.plan.groups == []
    assert kept(res) == 10
    assert res.report["params_after"] == res.report["params_before"]
    assert res.report["verification"]["ok"] is True


@pytest.mark.parametrize(("channels", "round_to"), [(10, 4), (16, 8), (12, 3)])
def test_round_to_keeps_a_multiple(channels, round_to):
    res = assert_prunes_exactly(chain(channels), 0.5, round_to=round_to)
    n = kept(res)
    assert n % round_to == 0 and 0 < n < channels


def test_min_channels_is_a_floor():
    res = assert_prunes_exactly(chain(10), 0.9, min_channels=6)
    assert kept(res) == 6


def test_a_concat_group_never_empties_one_producer():
    rng = np.random.default_rng(0)
    small = (rng.standard_normal((2, 3, 3, 3)) * 1e-3).astype(np.float32)  # l1 would take them
    nodes = [
        conv_node("x", "W_a", "a", name="conv_a"),
        conv_node("x", "W_b", "b", name="conv_b"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        conv_node("cat", "W_head", "y", name="head"),
    ]
    m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None},
                   {"W_a": small, "W_b": (14, 3, 3, 3), "W_head": (4, 16, 3, 3)})
    res = assert_prunes_exactly(m, 0.9)
    assert kept(res, "W_a") >= 1 and kept(res, "W_b") >= 1
    assert kept(res, "W_a") + kept(res, "W_b") == kept(res, "W_head", 1)
    # the tiny producer was preferred: it lost all it could
    assert kept(res, "W_a") == 1


# --------------------------------------------------------------------------- planner: criteria


def _norm_model() -> onnx.ModelProto:
    """Rows whose L1 and L2 orders differ: row 0 = [1,1,1,1] (L1 4, L2 2), row 1 = [3,0,0,0]
    (L1 3, L2 3), rows 2 and 3 large. The head's columns are all equal."""
    w = np.zeros((4, 4, 1, 1), np.float32)
    w[0, :, 0, 0] = 1
    w[1, 0, 0, 0] = 3
    w[2:, :, 0, 0] = 5
    nodes = [
        conv_node("x", "W_stem", "a", name="stem", k=1),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv_node("r", "W_head", "y", name="head", k=1),
    ]
    return make_model(nodes, {"x": [1, 4, HW, HW]}, {"y": None},
                      {"W_stem": w, "W_head": np.ones((2, 4, 1, 1), np.float32)})


def test_l1_and_l2_criteria_rank_by_their_norm():
    m = _norm_model()
    l1 = assert_prunes_exactly(m, 0.25, criterion="l1")
    l2 = assert_prunes_exactly(m, 0.25, criterion="l2")
    assert l1.plan.groups[0].channels["W_stem"]["0"] == [1]
    assert l2.plan.groups[0].channels["W_stem"]["0"] == [0]
    assert l1.plan.meta["criterion"] == "l1" and l2.plan.meta["criterion"] == "l2"


def test_random_criterion_is_seeded():
    m = chain(16)
    first = graphprune.prune(m, ratio=0.5, criterion="random", seed=7)
    again = graphprune.prune(m, ratio=0.5, criterion="random", seed=7)
    other = graphprune.prune(m, ratio=0.5, criterion="random", seed=8)
    assert first.plan.to_dict() == again.plan.to_dict()
    assert first.model.SerializeToString() == again.model.SerializeToString()
    assert first.plan.groups[0].remove != other.plan.groups[0].remove
    assert len(other.plan.groups[0].remove) == 8


def test_l1_is_the_default_and_deterministic():
    m = chain(16)
    a, b = graphprune.prune(m), graphprune.prune(m, ratio=0.5, criterion="l1")
    assert a.plan.to_dict() == b.plan.to_dict()


# --------------------------------------------------------------------------- plans


def test_plan_json_round_trip(tmp_path):
    res = graphprune.prune(example_cnn(), ratio=0.5)
    plan = res.plan
    assert plan.groups and plan.units_removed == res.report["channels"]["removed"]
    data = json.loads(plan.to_json())
    assert data["version"] == 1
    assert Plan.from_dict(data) == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert Plan.load(str(path)) == plan


def test_replaying_a_saved_plan_gives_an_identical_model(tmp_path):
    m = example_cnn()
    first = graphprune.prune(m, ratio=0.5, criterion="random", seed=3)
    path = tmp_path / "plan.json"
    first.plan.save(path)
    from_object = graphprune.prune(m, plan=Plan.load(path))
    from_path = graphprune.prune(m, plan=str(path))
    assert from_object.model.SerializeToString() == first.model.SerializeToString()
    assert from_path.model.SerializeToString() == first.model.SerializeToString()
    assert from_path.plan.to_dict()["groups"] == first.plan.to_dict()["groups"]
    assert from_path.report["mode"] == "plan" and first.report["mode"] == "ratio"


@pytest.mark.parametrize("given", ["ratio", "head_ratio", "mlp_ratio", "hidden_ratio"])
def test_a_ratio_beside_a_saved_plan_is_refused(tmp_path, given):
    """``--plan P --ratio 0.3`` replayed the plan and ignored the ratio (the report's mode said
    "ratio"): the plan says what to remove, so a ratio beside it is a usage error."""
    plan = graphprune.prune(example_cnn(), ratio=0.5).plan
    with pytest.raises(UsageError, match=f"{given} does not apply"):
        graphprune.prune(example_cnn(), plan=plan, **{given: 0.3})


def test_a_plan_for_another_model_is_refused():
    plan = graphprune.prune(example_cnn(), ratio=0.5).plan
    with pytest.raises(UsageError, match="plan does not match"):
        graphprune.prune(chain(10), plan=plan)


def test_a_plan_that_empties_a_group_is_refused():
    m = chain(10)
    plan = graphprune.prune(m, ratio=0.5).plan
    plan.groups[0].remove = list(range(10))
    with pytest.raises(UsageError):
        graphprune.prune(m, plan=plan)


@pytest.mark.parametrize("data", [{"version": 99}, [], {"version": 1, "groups": [{"x": 1}]}])
def test_malformed_plans_are_usage_errors(data):
    with pytest.raises(UsageError):
        Plan.from_dict(data)


def test_unreadable_plan_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such plan file"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError):
        Plan.load(bad)


# --------------------------------------------------------------------------- the API


def test_prune_accepts_a_path_bytes_or_a_model_proto(tmp_path):
    m = chain(10)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    results = [graphprune.prune(src, ratio=0.5) for src in (m, m.SerializeToString(), str(path), path)]
    serialized = {r.model.SerializeToString() for r in results}
    assert len(serialized) == 1


def test_prune_leaves_the_callers_model_alone():
    m = example_cnn()
    before = copy.deepcopy(m)
    graphprune.prune(m, ratio=0.5)
    graphprune.analyze(m)
    assert m == before


@pytest.mark.parametrize("kwargs", [{"target_macs": 0.5}, {"lossless": True}, {"erase_blocks": 1}])
def test_a_ratio_that_would_be_ignored_is_refused(kwargs):
    """``ratio`` with a target, lossless mode or erase_blocks was silently dropped (the prune
    did something else than the caller asked); without ``ratio`` each runs as before."""
    with pytest.raises(UsageError, match="ratio does not apply with"):
        graphprune.prune(example_cnn(), ratio=0.3, **kwargs)
    if "target_macs" not in kwargs:  # per-kind ratios too (scout, round 69: exit 0, ignored)
        for kind in ("head_ratio", "mlp_ratio", "hidden_ratio"):
            with pytest.raises(UsageError, match=f"{kind} does not apply with"):
                graphprune.prune(example_cnn(), **{kind: 0.25}, **kwargs)
    assert graphprune.prune(example_cnn(), **kwargs).report["verification"]["ok"]
    assert graphprune.prune(example_cnn()).report["channels"] == \
        graphprune.prune(example_cnn(), ratio=0.5).report["channels"]  # the default ratio


def test_close_deletes_the_weight_folder_at_once(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(example_cnn(), path)
    # read, then closed: the model stays
    with graphprune.prune(path, ratio=0.5) as read:
        folder = read.store.root
        assert folder.is_dir() and any(folder.iterdir())
        model = read.model
    assert not folder.exists()
    assert read.model is model
    onnx.checker.check_model(model, full_check=True)
    # saved, then closed: the file is complete
    saved = graphprune.prune(path, ratio=0.5)
    folder = saved.store.root
    saved.save(tmp_path / "p.onnx")
    saved.close()
    saved.close()  # twice is harmless
    assert not folder.exists()
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)
    # closed before either: a clear error, not a missing file
    unread = graphprune.prune(path, ratio=0.5)
    unread.close()
    with pytest.raises(UsageError, match="closed before its model was read or saved"):
        _ = unread.model
    with pytest.raises(UsageError, match="closed before"):
        unread.save(tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_example_cnn_prunes_exactly_with_a_full_report():
    m = example_cnn()
    stages = []
    res = assert_prunes_exactly(m, 0.5, progress=stages.append)
    report = res.report
    assert stages == ["load", "analysis", "plan", "prune", "verify", "count"]
    assert report["macs_after"] < 0.5 * report["macs_before"]
    assert report["params_after"] < report["params_before"]
    assert report["groups"]["pruned"] == report["groups"]["prunable"] > 0
    assert report["groups"]["total"] == (
        report["groups"]["prunable"] + report["groups"]["frozen"]
        + sum(1 for g in res.analysis.groups if not g.prunable and not g.is_frozen)
    )
    assert 0 < report["prunable_fraction"] <= 1
    assert {f["reasons"][0] for f in report["frozen"]} >= {"graph input 'image'"}
    assert set(report["timings"]) >= {"load", "analysis", "plan", "prune", "verify", "total"}
    # the stages add up to no more than the whole: the size probe is not counted in the stage it ran in
    stage_times = {k: v for k, v in report["timings"].items() if k != "total"}
    assert sum(stage_times.values()) <= report["timings"]["total"] + 0.01, report["timings"]
    assert report["verification"]["max_rel_diff"] <= 1e-4
    assert json.loads(json.dumps(report)) == report, "the report is plain JSON"


def test_verify_false_skips_the_self_check():
    res = graphprune.prune(chain(10), ratio=0.5, verify=False)
    assert res.report["verification"] == {"ok": None, "skipped": True}
    onnx.checker.check_model(res.model, full_check=True)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_zero_one_is_a_usage_error(ratio):
    with pytest.raises(UsageError, match="ratio") as info:
        graphprune.prune(chain(10), ratio=ratio)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"criterion": "magic"}, "criterion"), ({"round_to": 0}, "round_to"),
     ({"min_channels": 0}, "min_channels")],
)
def test_bad_arguments_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        graphprune.prune(chain(10), **kwargs)


def test_analyze_reports_groups():
    analysis = graphprune.analyze(example_cnn())
    assert analysis.prunable_groups
    assert all(g.num_units >= 2 for g in analysis.prunable_groups)
    assert analysis.frozen_groups
    assert analysis.unsupported == {}


def test_unnamed_nodes_prune():
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Reshape", ["a", "t1"], ["f"]),
        helper.make_node("Gemm", ["f", "Wf"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Reshape", ["hr", "t2"], ["h4"]),
        helper.make_node("Conv", ["h4", "W2"], ["y"], kernel_shape=[1, 1]),
    ]
    params = {"W1": (8, 3, 3, 3), "t1": ints(1, 8 * 16), "Wf": (32, 128),
              "t2": ints(1, 32, 1, 1), "W2": (4, 32, 1, 1)}
    m = make_model(nodes, {"x": [1, 3, 4, 4]}, {"y": None}, params)
    for n in m.graph.node:
        n.name = ""
    assert_prunes_exactly(m)


#: a custom op that mixes the channels (a cumulative sum over them; a model-local function,
#: so ONNX Runtime runs it, and a custom domain, so no built-in rule ever covers it)
MIXER = helper.make_function(
    "com.example", "Mixer", ["X"], ["Y"],
    [helper.make_node("Constant", [], ["axis"], value_int=1),
     helper.make_node("CumSum", ["X", "axis"], ["Y"])],
    [helper.make_opsetid("", 17)],
)


class LyingMixerRule(OpRule):
    """Wrong on purpose: Mixer mixes the channels, this rule says it does not."""

    op_types = ("Mixer",)
    domain = "com.example"

    def couple(self, node, ctx):
        ctx.couple_all_axes(node.inputs[0], node.outputs[0])


def lying_model() -> onnx.ModelProto:
    # the per-channel shift makes a removed channel non-zero in the zeroed original, so the
    # channel mixing shows (a cumulative sum of zeroed channels would hide it)
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Add", ["a", "shift"], ["s"], name="shift"),
        helper.make_node("Mixer", ["s"], ["b"], name="mixer", domain="com.example"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None},
                      {"W_stem": (8, 3, 3, 3), "W_head": (4, 8, 3, 3), "shift": (8, 1, 1)},
                      extra_opsets={"com.example": 1}, functions=[MIXER])


@pytest.fixture
def lying_rule():
    register(LyingMixerRule)
    yield
    unregister(LyingMixerRule)


def test_a_failed_self_check_raises_with_the_result(lying_rule):
    with pytest.raises(VerificationError) as info:
        graphprune.prune(lying_model(), ratio=0.5)
    assert info.value.exit_code == 3
    assert isinstance(info.value, GraphPruneError)
    result = info.value.result
    assert result.report["verification"]["ok"] is False
    assert result.report["verification"]["max_rel_diff"] > 1e-4
    assert group_with(result.analysis, "W_stem", 0).prunable


def test_the_zeroed_original_check_catches_a_wrong_model(monkeypatch):
    """The suite's own checker must fail when the pruned weights are not the kept ones."""
    real_prune = graphprune.prune

    def shuffled(model, **kwargs):
        result = real_prune(model, **kwargs)
        for init in result.model.graph.initializer:
            if init.name == "W_stem":
                values = onnx.numpy_helper.to_array(init)[::-1].copy()
                init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        return result

    monkeypatch.setattr(graphprune, "prune", shuffled)
    with pytest.raises(AssertionError, match="zeroed original"):
        assert_prunes_exactly(chain(10))
