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
