"""Resampling across ONNX's version converter (:mod:`graphprune.io.converter_semantics`).

``Upsample`` (opsets 7-9) and opset-10 ``Resize`` map coordinates asymmetrically and floor
the nearest pixel when upsampling (ONNX Runtime's opset-10 ``Resize`` rounds up when it
shrinks); the converter's opset-13 ``Resize`` defaulted to ``half_pixel``. The preparation
check found it on PyTorch opset-9 exports: a bilinear upsampling moved by 0.04 on values of
0.39, and every prune of such a model failed with "the prepared graph does not compute what
the model as loaded computes". Each case below compares ONNX Runtime on the model as given
with the converted model, and a pruned model with its original.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io.model_io import upgrade_opset


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _resampler(opset: int, op: str, mode: str, scales: list[float]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(scales, np.float32), "scales")]
    graph = helper.make_graph([helper.make_node(op, ["x", "scales"], ["y"], mode=mode)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4 if opset < 10 else 5
    return model


@pytest.mark.parametrize(("opset", "op", "mode", "scales"), [
    (9, "Upsample", "linear", [1, 1, 2.5, 1.5]),
    (9, "Upsample", "nearest", [1, 1, 1.7, 2.3]),
    (9, "Upsample", "nearest", [1, 1, 2, 3]),
    (10, "Resize", "linear", [1, 1, 2.5, 1.5]),
    (10, "Resize", "linear", [1, 1, 0.5, 0.6]),
    (10, "Resize", "nearest", [1, 1, 2, 3]),
    (10, "Resize", "nearest", [1, 1, 0.5, 0.6]),
])
def test_the_converted_resize_computes_what_the_legacy_op_did(opset, op, mode, scales):
    model = _resampler(opset, op, mode, scales)
    x = np.random.default_rng(0).random((1, 2, 7, 9)).astype(np.float32)
    converted = upgrade_opset(model, 13)
    assert converted.opset_import[0].version == 13
    np.testing.assert_array_equal(_run(converted, x), _run(model, x))


def _upsampling_cnn() -> onnx.ModelProto:
    """Conv, ReLU, bilinear Upsample x2 (opset 9, as PyTorch's opset-9 export writes
    ``F.interpolate(..., mode="bilinear")``), Conv."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W1", (8, 3, 3, 3)), ("B1", (8,)), ("W2", (4, 8, 3, 3)))]
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Upsample", ["r", "scales"], ["u"], mode="linear"),
             helper.make_node("Conv", ["u", "W2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    return model


def test_an_opset9_upsampling_model_prunes_and_keeps_its_function():
    model = _upsampling_cnn()
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    lossless = graphprune.prune(model, lossless=True)
    np.testing.assert_allclose(_run(lossless.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
    pruned = graphprune.prune(model, ratio=0.5)
    check = pruned.report["verification"]["preparation"]
    assert check["checked"] and check["ok"] and check["max_rel_diff"] <= 1e-6, check
    assert pruned.report["params_after"] < pruned.report["params_before"]


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_an_opset9_hardmax_keeps_its_flattened_axes(axis):
    """Below opset 13 Hardmax takes the maximum over every axis from ``axis`` on (its input
    flattened to 2-D); the converter's opset-13 Hardmax reads one axis (a difference of 1)."""
    graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"], axis=axis)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    x = np.random.default_rng(axis).standard_normal((2, 3, 4, 5)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    converted = upgrade_opset(model, 13)
    out = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, session.run(None, {"x": x})[0])
    assert [n.op_type for n in model.graph.node] == ["Hardmax"]  # the caller's model is left alone


def test_an_opset9_classifier_with_a_hardmax_prunes_and_passes_the_check():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W1", (8, 3, 3, 3)), ("W2", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["b"]), helper.make_node("Hardmax", ["b"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    pruned = graphprune.prune(model, ratio=0.5)
    check = pruned.report["verification"]["preparation"]
    assert check["checked"] and check["ok"], check
    assert pruned.report["params_after"] < pruned.report["params_before"]


def _scan8(wrapped: bool) -> onnx.ModelProto:
    """A running sum by ``Scan`` at opset 8 (batch axis first); ``wrapped``: behind element-wise
    nodes on both sides, as a float16 conversion's casts put it."""
    body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "next"], ["sum_out"]),
         helper.make_node("Identity", ["sum_out"], ["scan_out"])], "body",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("sum_in", "next")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("sum_out", "scan_out")])
    if wrapped:
        nodes = [helper.make_node("Relu", ["initial"], ["i"]), helper.make_node("Relu", ["x"], ["xr"]),
                 helper.make_node("Scan", ["", "i", "xr"], ["s", "t"], num_scan_inputs=1, body=body),
                 helper.make_node("Relu", ["s"], ["y"]), helper.make_node("Relu", ["t"], ["z"])]
    else:
        nodes = [helper.make_node("Scan", ["", "initial", "x"], ["y", "z"], num_scan_inputs=1, body=body)]
    # a weight on the sum: a model without any would come back unchanged, never converted
    # (graphprune.pipeline.weightless)
    next(n for n in nodes if n.output[0] == "y").output[0] = "y_unscaled"
    nodes.append(helper.make_node("Mul", ["y_unscaled", "scale"], ["y"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("initial", TensorProto.FLOAT, [1, 2]),
                     helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 2])],
        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])


def test_a_conversion_that_changes_the_inputs_is_refused() -> None:
    """``Scan`` below opset 9 has a batch axis; ONNX's version converter drops it from the graph's
    inputs, so the converted model would not take the user's inputs. Refused (exit 2), not
    pruned into a model of another interface."""
    from graphprune.errors import InvalidModelError

    with pytest.raises(InvalidModelError, match="version converter changes the graph's 'initial' from 1x2 to 2"):
        graphprune.prune(_scan8(wrapped=False), lossless=True)


def test_a_conversion_that_breaks_the_model_is_the_converters_fault(tmp_path) -> None:
    """The same ``Scan``-8 behind element-wise nodes: the graph's inputs keep their shapes, but
    the converted ``Scan`` does not run. That is the version converter's doing, not graphprune's
    preparation: a one-line refusal, exit 2 (it was "a defect of graphprune's preparation",
    exit 3)."""
    import subprocess
    import sys

    from graphprune.errors import InvalidModelError

    model = _scan8(wrapped=True)
    with pytest.raises(InvalidModelError, match="version converter does not convert this model from opset 8 to 13"):
        graphprune.prune(model, lossless=True)
    path, out = tmp_path / "scan8.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(path))
    run = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out), "--lossless"],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "export the model at opset 13 or later" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not out.exists()
