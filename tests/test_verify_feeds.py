"""Verification on the calibration samples where the model does not run on generated inputs.

Verification feeds random inputs; an integer input is fed 0s and 1s. A model that reads such an
input as a shape (``Expand``'s target, here) does not run on them, and the prune failed with
"the input model does not run" although the user's calibration samples run it: a false claim
and a dead end. Now verification switches to those samples and says so; without samples the
error names the integer inputs that were guessed and how to give real ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_node, make_model
from onnx import TensorProto, helper

import graphprune
from graphprune.cli import main
from graphprune.errors import InvalidModelError

TARGET = np.array([2, 4, 8, 8], np.int64)  # the Expand's target: batch 1 -> 2


def _expanding_cnn() -> onnx.ModelProto:
    """Two convolutions whose output is broadcast to the batch an int64 input ``target`` gives."""
    nodes = [
        conv_node("x", "W1", "a", "B1", name="conv1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv_node("r", "W2", "b", "B2", name="conv2"),
        helper.make_node("Expand", ["b", "target"], ["y"], name="expand"),
    ]
    model = make_model(nodes, {"x": [1, 3, 8, 8], "target": [4]}, {"y": [2, 4, 8, 8]},
                       {"W1": (16, 3, 3, 3), "B1": (16,), "W2": (4, 16, 3, 3), "B2": (4,)}, check=False)
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "target": TARGET.copy()}
            for _ in range(count)]


def test_generated_inputs_do_not_run_it() -> None:
    """The premise: the model fails on 0/1 targets and runs on the real one."""
    import onnxruntime as ort

    session = ort.InferenceSession(_expanding_cnn().SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, _samples(1)[0])[0].shape == (2, 4, 8, 8)
    with pytest.raises(Exception, match="(?i)expand"):
        session.run(None, {"x": _samples(1)[0]["x"], "target": np.array([1, 0, 1, 1], np.int64)})


def test_calibrated_prune_verifies_on_the_samples() -> None:
    result = graphprune.prune(_expanding_cnn(), ratio=0.5, calibration=_samples())
    verification = result.report["verification"]
    assert verification["ok"], verification
    assert verification["feeds"].startswith("calibration samples (the original does not run on generated inputs")
    assert verification["preparation"]["ok"]
    assert result.report["groups"]["pruned"] == 1
    # the pruned model is smaller and runs on the user's inputs
    weights = {t.name: t for t in result.model.graph.initializer}
    assert weights["W1"].dims[0] < 16
    import onnxruntime as ort

    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, _samples(1)[0])[0].shape == (2, 4, 8, 8)


def test_cli_says_which_inputs_it_verified_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "p.onnx"
    onnx.save(_expanding_cnn(), model)
    samples = _samples()
    np.savez(calib, **{name: np.stack([s[name] for s in samples]) for name in ("x", "target")})
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.5", "--calibration", str(calib)]) == 0
    printed = capsys.readouterr().out
    assert "calibration samples)" in printed and "inputs: calibration samples" in printed
    assert out.exists()


def test_without_samples_the_error_names_the_guessed_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(_expanding_cnn(), model)
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "integer inputs were fed random 0s and 1s: target" in error and "--calibration" in error
    assert not out.exists()
    with pytest.raises(InvalidModelError, match="target"):
        graphprune.prune(_expanding_cnn(), ratio=0.5)


def test_samples_that_do_not_run_it_either_keep_the_input_blamed() -> None:
    """A model that fails on the generated inputs and on the samples is still the input's fault
    (exit 2), not a verification failure. The samples' target cannot broadcast the output."""
    bad = [{**s, "target": np.array([2, 4, 8, 8], np.int64)} for s in _samples()]
    model = _expanding_cnn()
    # a second Expand reads the target against another shape: runs on no target but all-ones
    model.graph.node.append(helper.make_node("Expand", ["x", "target"], ["z"], name="expand_x"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    with pytest.raises(InvalidModelError, match="does not run"):
        graphprune.prune(model, ratio=0.5, calibration=bad)


def _cumsum() -> onnx.ModelProto:
    """A cumulative sum along the axis an int64 input names: 0 runs on the 1-D input, 1 does not."""
    graph = helper.make_graph(
        [helper.make_node("CumSum", ["x", "axis"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5]), helper.make_tensor_value_info("axis", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_input_is_blamed_on_whichever_feed_failed() -> None:
    """A comparison runs on two feeds; where the second one fails (a random axis out of range),
    the input is blamed for that feed (exit 2). Before, only the first was tried, it ran, and the
    failure was reported as a failed check (exit 3: "the original does not run")."""
    from graphprune.pipeline.blame import input_fault
    from graphprune.pipeline.session import Session

    session = Session(_cumsum())
    x = np.arange(5, dtype=np.float32)
    good, bad = {"x": x, "axis": np.array(0)}, {"x": x, "axis": np.array(1)}
    assert input_fault(session, [good]) is None
    fault = input_fault(session, [good, bad])
    assert isinstance(fault, InvalidModelError) and "does not run" in str(fault)


def test_timing_runs_on_a_sample_where_generated_inputs_fail(tmp_path: Path) -> None:
    """``time_models(data=...)``: timed on the given feed where the first model does not run on
    generated ones; without it, the one-line error as before."""
    from graphprune.verify.timing import time_models

    model = _expanding_cnn()
    with pytest.raises(InvalidModelError, match="failed to run"):
        time_models([model, model], warmup=0, runs=2)
    timed = time_models([model, model], warmup=0, runs=2, data=_samples(1)[0])
    assert len(timed) == 2 and all(t.median_ms > 0 for t in timed)


def test_cli_latency_with_samples(tmp_path: Path) -> None:
    """``--latency`` (and ``--target-latency``) with calibration samples on a model that does
    not run on generated inputs: timed on a sample (before: "ONNX Runtime failed to run")."""
    import json

    model, calib, out, report = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(_expanding_cnn(), model)
    samples = _samples()
    np.savez(calib, **{name: np.stack([s[name] for s in samples]) for name in ("x", "target")})
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.5", "--calibration", str(calib),
                 "--latency", "--latency-runs", "3", "--report", str(report), "-q"]) == 0
    assert json.loads(report.read_text())["latency"]["after"]["median_ms"] > 0
    assert main(["prune", str(model), "-o", str(out), "--target-latency", "0.9", "--calibration", str(calib),
                 "--latency-runs", "3", "-q"]) == 0


def _length_model() -> onnx.ModelProto:
    """A sequence ``x`` [1, 6] and its ``length``, read as the end of a ``Range`` whose positions
    are stacked under ``x`` and added to it: runs only where ``length`` is the sequence length
    (6), not on 0 or 1."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("one", TensorProto.INT64, [], [1]), helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("row", TensorProto.INT64, [2], [1, -1]),
             onnx.numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "W1"),
             onnx.numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Range", ["zero", "length", "one"], ["positions"]),
             helper.make_node("Cast", ["positions"], ["p"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["p", "row"], ["p_row"]),
             helper.make_node("Concat", ["x", "p_row"], ["both"], axis=0),  # fails where length is 1
             helper.make_node("Add", ["x", "p_row"], ["shifted"]),  # where it is 0
             helper.make_node("Concat", ["both", "shifted"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6]),
                                           helper.make_tensor_value_info("length", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_without_samples_inputs_named_like_a_length_are_fed_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No calibration data, and the model does not run on a random 0 or 1 ``length``: verification
    moves to inputs generated by their names (the sequence length for ``length``) and says so,
    and ``--latency`` times on them. Before: exit 2, "the input model does not run"."""
    import json

    import onnxruntime as ort

    session = ort.InferenceSession(_length_model().SerializeToString(), providers=["CPUExecutionProvider"])
    for wrong in (0, 1):
        with pytest.raises(Exception):  # noqa: B017 - ORT's own error types
            session.run(None, {"x": np.ones((1, 6), np.float32), "length": np.array(wrong, np.int64)})
    result = graphprune.prune(_length_model(), ratio=0.5)
    verification = result.report["verification"]
    assert verification["ok"] and verification["preparation"]["ok"], verification
    assert verification["feeds"].startswith("inputs generated by their names and the tables they index (")
    assert "length [] = 6" in verification["feeds"]
    assert result.verification_feeds and int(result.verification_feeds[0]["length"]) == 6
    assert {t.name: list(t.dims) for t in result.model.graph.initializer}["W1"] == [6, 4]
    model, out, report = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(_length_model(), model)
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.5", "--latency", "--latency-runs", "3",
                 "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "inputs generated by name)" in printed and "inputs: inputs generated by their names" in printed
    assert json.loads(report.read_text())["latency"]["after"]["median_ms"] > 0
