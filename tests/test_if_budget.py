"""MAC counts and budgets of models that keep their network inside ``If`` branches
(streaming voice activity detectors choose a branch by sample rate)."""

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
