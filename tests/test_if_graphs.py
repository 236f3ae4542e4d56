"""MAC counts, budgets and calibration of models that keep their network inside ``If``
branches (streaming voice activity detectors choose a branch by sample rate)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.verify.metrics import count_macs


def conv(x: str, w: str, y: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=f"conv_{y}", pads=[1, 1, 1, 1])


def if_model(size: int | str = 8) -> onnx.ModelProto:
    """``x0 = Conv1x1(x)`` (3 -> 3 channels) in the main graph, then ``If(flag)``: the then
    branch ``Conv3x3(3 -> 16) -> Relu -> Conv3x3(16 -> 4)``, the else branch the same with 8
    channels; every weight random (nothing is zero). ``size``: height and width of ``x``
    (a name: left open)."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def branch(tag: str, width: int) -> onnx.GraphProto:
        nodes = [conv("x0", f"w1{tag}", f"a{tag}"), helper.make_node("Relu", [f"a{tag}"], [f"r{tag}"]),
                 conv(f"r{tag}", f"w2{tag}", f"y{tag}")]
        return helper.make_graph(nodes, f"branch{tag}", [],
                                 [helper.make_tensor_value_info(f"y{tag}", TensorProto.FLOAT, None)],
                                 [weight(f"w1{tag}", (width, 3, 3, 3)), weight(f"w2{tag}", (4, width, 3, 3))])

    spatial = [size, size]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w0"], ["x0"], name="conv0"),
         helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("a", 16),
                          else_branch=branch("b", 8))],
        "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, *spatial])], [weight("w0", (3, 3, 1, 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def expected_macs(size: int) -> int:
    """The main conv plus the costlier (then) branch, by hand."""
    positions = size * size
    main = 3 * positions * 3
    then = 16 * positions * 27 + 4 * positions * 16 * 9
    return main + then


@pytest.mark.parametrize("size", [8, 16])
def test_an_if_counts_its_costlier_branch_at_the_sizes_given(size: int) -> None:
    open_model = if_model("side")
    assert count_macs(open_model, input_shapes={"x": [1, 3, size, size]}) == expected_macs(size)
    inferred = onnx.shape_inference.infer_shapes(if_model(size))  # (as the pipeline counts)
    assert count_macs(inferred) == expected_macs(size)


def run(model: onnx.ModelProto, flag: bool, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"flag": np.array(flag), "x": x})[0]


def test_a_macs_target_prunes_each_branch_to_the_fraction_and_is_met() -> None:
    model = if_model(8)
    result = graphprune.prune(model, target_macs=0.5)
    report = result.report
    assert report["verification"]["ok"] is True
    assert [b["branch"] for b in report["branches"]["pruned"]] == ["then_branch", "else_branch"]
    budget = report["budget"]
    assert budget["met"] is True, budget
    assert "costlier branch" in budget["measured_by"]
    infer = onnx.shape_inference.infer_shapes
    fraction = count_macs(infer(result.model)) / count_macs(infer(model))
    assert abs(fraction - 0.5) <= 0.03 and abs(budget["achieved"] - fraction) < 1e-3, (fraction, budget)
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for flag in (True, False):  # both branches still run and keep the output's shape
        assert run(result.model, flag, x).shape == run(model, flag, x).shape == (1, 4, 8, 8)


def unprunable_branch_model() -> onnx.ModelProto:
    """``x0 = Conv1x1(Relu(Conv1x1(x)))`` (3 -> 32 -> 3 channels: one prunable group) in the
    main graph, then ``If(flag)`` whose branches are one ``Conv3x3(3 -> 4)`` each (nothing to
    prune: its input is the If's outer value, its output the model's)."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph([conv("x0", f"w{tag}", f"y{tag}")], f"branch{tag}", [],
                                 [helper.make_tensor_value_info(f"y{tag}", TensorProto.FLOAT, None)],
                                 [weight(f"w{tag}", (4, 3, 3, 3))])

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "wa"], ["a"], name="conva"), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Conv", ["r", "wb"], ["x0"], name="convb"),
         helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("t"), else_branch=branch("e"))],
        "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight("wa", (32, 3, 1, 1)), weight("wb", (3, 32, 1, 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_what_the_branches_cannot_remove_is_taken_from_the_main_graph() -> None:
    """The branches hold 6,912 of 19,200 MACs and nothing prunable: to reach half of the
    whole, the main graph goes to (9,600 - 6,912) / 12,288 = 0.22 of its own cost."""
    model = unprunable_branch_model()
    result = graphprune.prune(model, target_macs=0.5)
    report = result.report
    assert report["verification"]["ok"] is True
    budget = report["budget"]
    first = budget["branches_first"]
    assert first["cost_before"] == first["cost_with_pruned_branches"] == 19200
    assert first["main_graph_cost"] == 12288 and abs(first["main_graph_goal"] - 2688 / 12288) < 1e-3
    assert budget["met"] is True, budget
    infer = onnx.shape_inference.infer_shapes
    fraction = count_macs(infer(result.model)) / count_macs(infer(model))
    assert abs(fraction - 0.5) <= 0.03, fraction
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for flag in (True, False):
        assert run(result.model, flag, x).shape == (1, 4, 8, 8)


def test_a_target_the_branches_keep_out_of_reach_says_why() -> None:
    """At 0.2 of the MACs the main graph would have to go below nothing (the branches keep
    6,912 of 19,200): the target is missed, and the CLI says why (the legacy Silero VAD, its
    LSTM inside the If, said "MISSED" and nothing more, with ``reached_by_width: true``)."""
    from graphprune.tables import budget_lines

    budget = graphprune.prune(unprunable_branch_model(), target_macs=0.2).report["budget"]
    assert budget["met"] is False and budget["branches_first"]["main_graph_cost"] == 12288
    assert any("each If branch was pruned to the target on its own" in line for line in budget_lines(budget))
    # branches without cost (DeBERTa's weight-free relative-position Ifs) are not what stands in the way
    weightless = {**budget, "branches_first": {**budget["branches_first"], "main_graph_cost": 19200,
                                               "cost_before": 19200}}
    assert not any("each If branch" in line for line in budget_lines(weightless))


def test_a_branch_without_operators_is_reported_as_such() -> None:
    """torchvision's detectors export ``If(numel == 0)`` whose then branch is one
    ``Constant`` (an empty result); once folded, the branch has no node: the report says
    so, instead of the checker's complaint about a model without nodes, and the other
    branch prunes."""
    model = if_model(8)
    empty = numpy_helper.from_array(np.zeros((1, 4, 8, 8), np.float32), "nothing")
    then = next(a for a in model.graph.node[1].attribute if a.name == "then_branch")
    then.g.CopyFrom(helper.make_graph([], "empty", [], [helper.make_tensor_value_info("nothing", TensorProto.FLOAT, None)],
                                      [empty]))  # (as graphprune's preparation folds it)
    onnx.checker.check_model(model, full_check=True)
    result = graphprune.prune(model, ratio=0.5)
    branches = result.report["branches"]
    assert [b["branch"] for b in branches["pruned"]] == ["else_branch"]
    assert branches["skipped"] == ["If 'if' then_branch: no operators (it returns a constant or an outer value)"]
    assert result.report["verification"]["ok"] is True
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert not run(result.model, True, x).any() and run(result.model, False, x).shape == (1, 4, 8, 8)


def calibration(flags: list[bool], count: int = 24) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"flag": np.array(flags[i % len(flags)]), "x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
            for i in range(count)]


def test_calibration_prunes_each_branch_with_the_samples_that_take_it() -> None:
    """Every sample takes the then branch: it is pruned with their values of the outer
    ``x0`` (and refit), the else branch, which no sample takes, is left as it is (and still
    computes what it did, bit for bit); the whole model's fidelity is measured."""
    model = if_model(8)
    result = graphprune.prune(model, ratio=0.5, calibration=calibration([True]))
    report = result.report
    assert report["verification"]["ok"] is True
    pruned = report["branches"]["pruned"]
    assert [b["branch"] for b in pruned] == ["then_branch"], report["branches"]
    assert pruned[0]["fidelity"]["samples"] > 0 and 0 < pruned[0]["fidelity"]["cosine"] <= 1
    from graphprune.tables import prune_summary

    assert "then_branch: 8 units removed" in prune_summary(report), prune_summary(report)
    assert "its own held-out fidelity on" in prune_summary(report)
    assert any("else_branch: 0 of 24 calibration samples take this branch" in s
               for s in report["branches"]["skipped"]), report["branches"]["skipped"]
    assert report["fidelity"]["samples"] > 0 and report["fidelity"]["cosine"] > 0.5
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, False, x), run(model, False, x))
    assert run(result.model, True, x).shape == (1, 4, 8, 8)
    sizes = {a.name: sum(int(np.prod(t.dims)) for t in a.g.initializer)
             for n in result.model.graph.node if n.op_type == "If" for a in n.attribute}
    assert sizes["then_branch"] < 16 * 27 + 4 * 16 * 9 and sizes["else_branch"] == 8 * 27 + 4 * 8 * 9


def test_calibration_reaches_both_branches_when_samples_take_both() -> None:
    model = if_model(8)
    result = graphprune.prune(model, ratio=0.5, calibration=calibration([True, False]))
    report = result.report
    assert report["verification"]["ok"] is True
    assert sorted(b["branch"] for b in report["branches"]["pruned"]) == ["else_branch", "then_branch"]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for flag in (True, False):
        assert run(result.model, flag, x).shape == (1, 4, 8, 8)


def test_a_calibrated_budget_counts_the_branches_its_data_takes() -> None:
    """Every sample takes the then branch: it is pruned to half of its cost with them and
    the budget is judged on it (the else branch, which no sample takes and which stays whole,
    is not what this data runs)."""
    model = if_model(8)
    result = graphprune.prune(model, target_macs=0.5, calibration=calibration([True]))
    report = result.report
    assert report["verification"]["ok"] is True
    assert [b["branch"] for b in report["branches"]["pruned"]] == ["then_branch"]
    budget = report["budget"]
    assert budget["met"] is True, budget
    then_macs = 3 * 64 * 3 + 16 * 64 * 27 + 4 * 64 * 16 * 9  # main conv + the then branch
    assert report["macs_before"] == then_macs
    infer = onnx.shape_inference.infer_shapes
    taken = {"if": {"then_branch"}}
    fraction = count_macs(infer(result.model), taken=taken) / count_macs(infer(model), taken=taken)
    assert abs(fraction - 0.5) <= 0.03 and abs(budget["achieved"] - fraction) < 1e-3, (fraction, budget)
    assert report["fidelity"]["samples"] > 0
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, False, x), run(model, False, x))


def mode_switch_model() -> onnx.ModelProto:
    """A silero-like mode switch: ``If(Equal(mode, 2))`` over an int64 scalar ``mode``; the
    then branch reshapes the signal ``x`` ``[1, n]`` to ``[1, 8, 64]`` (it runs only at
    n = 512), the else branch to ``[1, 8, 32]`` (n = 256); each then ``Conv1d(8 -> 16) ->
    Relu -> Conv1d(16 -> 4)``. A random 0 or 1 for ``mode`` takes the else branch."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def branch(tag: str, length: int) -> onnx.GraphProto:
        nodes = [helper.make_node("Reshape", ["x", f"s{tag}"], [f"f{tag}"]),
                 helper.make_node("Conv", [f"f{tag}", f"w1{tag}"], [f"a{tag}"], name=f"c1{tag}", pads=[1, 1]),
                 helper.make_node("Relu", [f"a{tag}"], [f"r{tag}"]),
                 helper.make_node("Conv", [f"r{tag}", f"w2{tag}"], [f"y{tag}"], name=f"c2{tag}", pads=[1, 1])]
        return helper.make_graph(nodes, f"branch{tag}", [],
                                 [helper.make_tensor_value_info(f"y{tag}", TensorProto.FLOAT, None)],
                                 [numpy_helper.from_array(np.array([1, 8, length], np.int64), f"s{tag}"),
                                  weight(f"w1{tag}", (16, 8, 3)), weight(f"w2{tag}", (4, 16, 3))])

    graph = helper.make_graph(
        [helper.make_node("Equal", ["mode", "two"], ["is_two"]),
         helper.make_node("If", ["is_two"], ["y"], name="if", then_branch=branch("t", 64),
                          else_branch=branch("e", 32))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"]),
              helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "length"])],
        [numpy_helper.from_array(np.array(2, np.int64), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run_mode(model: onnx.ModelProto, mode: int, n: int) -> np.ndarray:
    x = np.random.default_rng(3).standard_normal((1, n)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "mode": np.array(mode, np.int64)})[0]


def test_a_mode_switch_is_fed_the_value_the_graph_tests_for() -> None:
    """Verification feeds ``mode`` the 2 the graph compares it with (a random 0 or 1 takes
    the else branch, which does not run on the 512 samples given), and the else branch,
    which does not run at the given size, is pruned at sizes of its own."""
    from graphprune.calibration.synthetic import tested_values
    from graphprune.io import ir

    model = mode_switch_model()
    assert tested_values(ir.import_graph(model), 17) == {"mode": [2]}
    result = graphprune.prune(model, ratio=0.5, input_shapes={"x": [1, 512]})
    report = result.report
    assert report["verification"]["ok"] is True
    assert sorted(b["branch"] for b in report["branches"]["pruned"]) == ["else_branch", "then_branch"]
    onnx.checker.check_model(result.model, full_check=True)
    assert run_mode(result.model, 2, 512).shape == run_mode(model, 2, 512).shape == (1, 4, 64)
    assert run_mode(result.model, 0, 256).shape == run_mode(model, 0, 256).shape == (1, 4, 32)
    # the then branch at 512 samples: (16 x 8 + 4 x 16) x 3 taps x 64 positions
    assert report["macs_before"] == (16 * 8 + 4 * 16) * 3 * 64


def test_synthetic_calibration_feeds_a_mode_switch_the_tested_value() -> None:
    model = mode_switch_model()
    result = graphprune.prune(model, ratio=0.5, input_shapes={"x": [1, 512]}, calibration="random:16")
    report = result.report
    assert report["verification"]["ok"] is True
    assert "mode [] = 2" in report["calibration"]["source"], report["calibration"]
    assert [b["branch"] for b in report["branches"]["pruned"]] == ["then_branch"]
    assert report["fidelity"]["samples"] > 0


def test_timing_chooses_the_tested_value_and_sizes_the_model_runs_at(tmp_path) -> None:
    """The guessed feed (``x [1, 8]``, ``mode`` 0 or 1) does not run: timing feeds ``mode`` the
    tested 2 and sizes ``x`` where the model runs (before: ``InvalidModelError``), or at the
    given sizes; at sizes where no branch runs it says to give them."""
    from graphprune.errors import InvalidModelError
    from graphprune.verify.timing import time_models

    model = mode_switch_model()
    path = tmp_path / "switch.onnx"
    onnx.save(model, path)
    for given in (None, {"x": [1, 512]}, {"x": [1, 256]}):
        (result,) = time_models([path], warmup=1, runs=2, input_shapes=given)
        assert result.median_ms > 0
    with pytest.raises(InvalidModelError, match="--input-shape"):
        time_models([path], warmup=1, runs=2, input_shapes={"x": [1, 100]})


def test_cli_prune_with_latency_on_a_model_that_needs_chosen_inputs(tmp_path) -> None:
    """``prune --latency`` times at the sizes the MACs were counted at, with the mode switch
    at its tested value (before: exit 2 after a successful prune, and no output written)."""
    import json

    from graphprune.cli import main

    source, out, report = tmp_path / "switch.onnx", tmp_path / "small.onnx", tmp_path / "report.json"
    onnx.save(mode_switch_model(), source)
    code = main(["prune", str(source), "-o", str(out), "--input-shape", "x=1,512", "--latency",
                 "--latency-runs", "3", "--report", str(report), "-q"])
    assert code == 0 and out.is_file()
    latency = json.loads(report.read_text())["latency"]
    assert latency["before"]["median_ms"] > 0 and latency["after"]["median_ms"] > 0
    assert main(["bench", str(source), str(out), "--runs", "2", "--warmup", "1", "-q"]) == 0


def normalising_branch_model() -> onnx.ModelProto:
    """``If(flag)``, each branch ``Conv3x3(3 -> 16) -> Relu -> Conv1x1(16 -> 16) ->
    ReduceMean over the channels``: the second conv's 16 outputs can only be cut across the
    mean (an inexact group, checked apart from the exact ones), the first conv's exactly."""
    rng = np.random.default_rng(3)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def branch(tag: str) -> onnx.GraphProto:
        nodes = [conv("x", f"w1{tag}", f"a{tag}"), helper.make_node("Relu", [f"a{tag}"], [f"r{tag}"]),
                 helper.make_node("Conv", [f"r{tag}", f"w2{tag}"], [f"c{tag}"], name=f"pw{tag}"),
                 helper.make_node("ReduceMean", [f"c{tag}"], [f"y{tag}"], axes=[1], keepdims=1)]
        return helper.make_graph(nodes, f"branch{tag}", [],
                                 [helper.make_tensor_value_info(f"y{tag}", TensorProto.FLOAT, None)],
                                 [weight(f"w1{tag}", (16, 3, 3, 3)), weight(f"w2{tag}", (16, 16, 1, 1))])

    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("t"), else_branch=branch("e"))],
        "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_branches_with_an_inexact_group_stay_pruned_and_say_so() -> None:
    """The whole model's self-check cannot compare a branch cut across a normalisation with
    its zeroed self (it failed, and every branch was put back as it was); it takes such a
    branch as pruned, its exact groups having been checked in its own self-check."""
    from graphprune.tables import branch_lines

    model = normalising_branch_model()
    result = graphprune.prune(model, ratio=0.5)
    report = result.report
    assert report["verification"]["ok"] is True
    pruned = report["branches"]["pruned"]
    assert len(pruned) == 2 and all(b["inexact_groups"] == 1 for b in pruned), report["branches"]
    assert all(b["params_after"] < b["params_before"] for b in pruned)
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for flag in (True, False):
        assert run(result.model, flag, x).shape == (1, 1, 8, 8)
    assert any("1 group(s) cut across a normalisation" in line for line in branch_lines(report["branches"]))


def test_a_branch_of_one_value_per_sample_is_told_without_a_cosine() -> None:
    """openWakeWord's 'hey jarvis' head (one score per sample, in an If branch): its branch's
    held-out cosine is None, and the table crashed on it (exit 1 after the model was written)."""
    from graphprune.tables import branch_lines

    branch = {"if": "If_32", "branch": "then_branch", "units_removed": 32, "params_before": 102850,
              "params_after": 76370, "fidelity": {"samples": 14, "cosine": None, "rel_l2": 3.454}}
    (line,) = branch_lines({"pruned": [branch]})
    assert "held-out fidelity on 14 samples: rel-L2 3.454" in line and "cosine" not in line
    branch["fidelity"].update(cosine=0.98)
    assert "cosine 0.98, rel-L2 3.454" in branch_lines({"pruned": [branch]})[0]
