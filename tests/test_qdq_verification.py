"""A QDQ model is verified unoptimised (QuantizeLinear / DequantizeLinear as the ONNX standard
computes them), where a layer's float sum, summed in another order once it has fewer channels,
can land a hair across a rounding boundary: one quantization step, and the steps add up over
the layers (a per-channel QDQ waifu2x CUNet: 0.027 relative, exit 3). ONNX Runtime deploys the
model optimised, its QDQ pairs fused into integer kernels whose sums are exact: where the two
models agree there, the rewrite is right, and that comparison is the verdict. Here: a QDQ model
and the same model with the channels of its hidden layers permuted (the same function)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.verify import validate

C, LAYERS = 32, 8


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rng = np.random.default_rng(0)
    nodes, inits, prev, cin = [], [], "x", 3
    for i in range(LAYERS):
        inits += [numpy_helper.from_array((rng.standard_normal((C, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(C)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", C
    inits.append(numpy_helper.from_array((rng.standard_normal((3, C, 3, 3)) / np.sqrt(C * 9)).astype(np.float32), f"w{LAYERS}"))
    nodes.append(helper.make_node("Conv", [prev, f"w{LAYERS}"], ["y"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])], inits)
    folder = tmp_path_factory.mktemp("qdq")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), folder / "f.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(folder / "f.onnx"), str(folder / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return onnx.load(folder / "q.onnx")


def _permuted(model: onnx.ModelProto, change: float = 0.0) -> onnx.ModelProto:
    """The hidden layers' channels permuted (weights, per-channel scales, biases; the next
    layer's input channels alike); ``change``: one int8 weight moved by that much too."""
    model = copy.deepcopy(model)
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(1)

    def put(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    for i in range(LAYERS - 1):
        order = rng.permutation(C)
        for name in (f"w{i}_quantized", f"w{i}_scale", f"w{i}_zero_point", f"b{i}_quantized", f"b{i}_quantized_scale",
                     f"b{i}_quantized_zero_point"):
            array = numpy_helper.to_array(inits[name])
            put(name, array[order] if array.ndim and array.shape[0] == C else array)
        put(f"w{i + 1}_quantized", numpy_helper.to_array(inits[f"w{i + 1}_quantized"])[:, order])
    if change:
        weight = numpy_helper.to_array(inits["w3_quantized"]).copy()
        weight[0] = np.clip(weight[0].astype(np.int32) + int(change), -127, 127).astype(np.int8)
        put("w3_quantized", weight)
    return model


def test_a_qdq_model_that_computes_the_same_function_verifies(qdq_model):
    feeds = [{"x": np.random.default_rng(k).standard_normal((1, 3, 32, 32)).astype(np.float32)} for k in range(2)]
    result = validate.compare(_permuted(qdq_model), qdq_model, feeds, what="the original", tolerance=1e-3,
                              emulate_quantization=True)
    assert result["ok"] and result["max_rel_diff"] == 0, result
    # (unoptimised, the permuted sums round apart on this machine or they do not)
    assert result["compared"].startswith(("optimised, as ONNX Runtime deploys them", "unoptimised")), result

    wrong = validate.compare(_permuted(qdq_model, change=40), qdq_model, feeds, what="the original",
                             tolerance=1e-3, emulate_quantization=True)
    assert not wrong["ok"] and wrong["max_rel_diff"] > 1e-2, wrong
