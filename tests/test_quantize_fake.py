"""Weights quantized at run time (``QuantizeLinear [-> Clip] -> DequantizeLinear`` of a float
constant, as TensorRT-oriented exporters and Brevitas write them) prune, verify and refit;
and a quantized model's prunable share of conv channels is counted per Conv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import conv_node, initializers, make_model, run_ort
from onnx import helper

import graphprune
from graphprune.pipeline.report import prunable_fraction
from graphprune.rules.quantize_fake import fake_quantized


def conv_chain_model(weights: str, zero_point: int = 0, dq_zero_point: int | None = None) -> onnx.ModelProto:
    """``x -> Conv(3->8) -> Relu -> Conv(8->8) -> Relu -> Conv(8->4)``: the stem's and the
    middle conv's 8 output channels prune, the last conv's 4 are the graph output's.
    ``weights``: ``"float"`` (each Conv reads its constant), ``"qdq"`` (an int8 constant
    through ``DequantizeLinear``, as ONNX Runtime's static quantization writes it) or
    ``"qcdq"`` (the float constant through ``QuantizeLinear -> Clip -> DequantizeLinear``,
    as Brevitas exports it) or ``"fake"`` (``QuantizeLinear -> DequantizeLinear`` of the float
    constant, as ModelOpt and pytorch-quantization export for TensorRT); ``zero_point``: the
    quantized forms' zero point (``dq_zero_point``: the dequantize's, default the same)."""
    rng = np.random.default_rng(0)
    shapes = {"W1": (8, 3, 3, 3), "W2": (8, 8, 3, 3), "W3": (4, 8, 3, 3)}
    nodes, params = [], {}
    for name, shape in shapes.items():
        values = rng.normal(size=shape).astype(np.float32)
        if weights == "float":
            params[name] = values
            continue
        params[f"{name}_s"] = np.array(0.05, np.float32)
        params[f"{name}_z"] = np.array(zero_point, np.int8)
        params[f"{name}_dz"] = np.array(zero_point if dq_zero_point is None else dq_zero_point, np.int8)
        if weights == "qdq":
            params[f"{name}_q"] = np.clip(np.round(values / 0.05) + zero_point, -127, 127).astype(np.int8)
        elif weights == "fake":
            params[f"{name}_f"] = values
            nodes.append(helper.make_node("QuantizeLinear", [f"{name}_f", f"{name}_s", f"{name}_z"], [f"{name}_q"]))
        else:
            params[f"{name}_f"] = values
            params[f"{name}_lo"], params[f"{name}_hi"] = np.array(-127, np.int8), np.array(127, np.int8)
            nodes += [helper.make_node("QuantizeLinear", [f"{name}_f", f"{name}_s", f"{name}_z"], [f"{name}_q0"]),
                      helper.make_node("Clip", [f"{name}_q0", f"{name}_lo", f"{name}_hi"], [f"{name}_q"])]
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_dz"], [name]))
    nodes += [conv_node("x", "W1", "a"), helper.make_node("Relu", ["a"], ["ra"]),
              conv_node("ra", "W2", "b"), helper.make_node("Relu", ["b"], ["rb"]),
              conv_node("rb", "W3", "y")]
    return make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, params)


@pytest.mark.parametrize("weights", ["qdq", "qcdq", "fake"])
def test_quantized_convs_count_their_channels_like_float_ones(weights: str) -> None:
    """The prunable share of conv channels of a quantized model was 0 % (it counted the
    channels of stored constants that a Conv reads directly; a quantized Conv reads a
    ``DequantizeLinear``'s output): counted per Conv now, whatever computes its weight."""
    assert prunable_fraction(graphprune.analyze(conv_chain_model("float"))) == 0.8  # 16 of 20
    assert prunable_fraction(graphprune.analyze(conv_chain_model(weights))) == 0.8


@pytest.mark.parametrize("weights", ["qcdq", "fake"])
def test_weights_quantized_at_run_time_prune_and_stay_quantized(weights: str, tmp_path: Path) -> None:
    """A float weight that the graph quantizes itself (``QuantizeLinear [-> Clip] ->
    DequantizeLinear``) takes the roles of its dequantized value: without a bias to
    carry them, such convs were not prunable (no producer in the group). The pruned model
    keeps the quantization chain and matches its zeroed original."""
    model = conv_chain_model(weights)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 2
    assert result.report["verification"]["ok"]
    pruned = result.model
    assert [n.op_type for n in pruned.graph.node].count("QuantizeLinear") == 3
    shapes = {i.name: list(i.dims) for i in pruned.graph.initializer}
    assert shapes["W1_f"] == [4, 3, 3, 3] and shapes["W2_f"] == [4, 4, 3, 3] and shapes["W3_f"] == [4, 4, 3, 3]
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert run_ort(pruned, {"x": x})[0].shape == (1, 4, 8, 8)


@pytest.mark.parametrize("zero_points", [(3, 5), (-128, None)])
def test_a_fake_quantized_weight_whose_zeroing_does_not_zero_it_is_frozen(zero_points) -> None:
    """Zeroing the float weight writes the quantize's zero point, which the dequantize reads
    as 0 only when its own zero point is the same (and a clip keeps it): otherwise the
    groups of that weight freeze, with the reason."""
    zero_point, dq_zero_point = zero_points
    model = conv_chain_model("qcdq", zero_point=zero_point, dq_zero_point=dq_zero_point)
    analysis = graphprune.analyze(model)
    reasons = " ".join(r for g in analysis.groups for r in g.frozen)
    assert not analysis.prunable_groups
    assert ("zero points differ" if dq_zero_point is not None else "clip range excludes") in reasons


def test_the_decoded_weight_is_what_onnx_runtime_computes() -> None:
    """Per-axis uint8 scale and zero point, a clip narrower than the type: the refit's
    reading of the weight matches the chain run in ONNX Runtime."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    params = {"w": w, "s": np.linspace(0.01, 0.03, 6).astype(np.float32),
              "z": np.array([120, 128, 130, 125, 127, 129], np.uint8),
              "lo": np.array(100, np.uint8), "hi": np.array(150, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q0"], axis=0),
             helper.make_node("Clip", ["q0", "lo", "hi"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["wd"], axis=0),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    model = make_model(nodes, {"x": [3, 6]}, {"wd": [6, 4], "y": None}, params)
    graph = gs.import_onnx(model)
    dequantize = next(n for n in graph.nodes if n.op == "DequantizeLinear")
    _, reason, stored = fake_quantized(dequantize)
    assert reason == ""
    expected = run_ort(model, {"x": np.zeros((3, 6), np.float32)})[0]
    np.testing.assert_allclose(stored.decode(), expected, rtol=0, atol=1e-7)
    assert stored.encode(w * 10)[0] > 0  # far outside the clip range: a share is clipped


def test_a_calibrated_prune_refits_weights_quantized_at_run_time() -> None:
    """The refit writes float values into the weight the graph quantizes (it could not write
    them back before: the layers were skipped)."""
    result = graphprune.prune(conv_chain_model("fake"), ratio=0.5, calibration="random:32")
    refit = result.report["pass_stats"]["RefitPass"]
    assert refit["layers"] == 2 and refit["quantized_layers"] == 2
    assert refit["rel_error_after"] < refit["rel_error_before"]
    assert [n.op_type for n in result.model.graph.node].count("QuantizeLinear") == 3


def transposed_mlp_model() -> onnx.ModelProto:
    """``x [4, 16] -> MatMul(Transpose(W1~)) -> Relu -> MatMul(Transpose(W2~))``, each ``W~``
    a per-row int8 fake quantization of a torch-layout ``[out, in]`` float weight: what a
    ``Linear`` with a fake-quantized weight exports as for an input of rank 3."""
    rng = np.random.default_rng(3)
    params, nodes = {}, []
    for name, (out, inp) in {"W1": (32, 16), "W2": (8, 32)}.items():
        params[f"{name}_f"] = rng.normal(size=(out, inp)).astype(np.float32)
        params[f"{name}_s"] = np.full(out, 0.02, np.float32)
        params[f"{name}_z"] = np.zeros(out, np.int8)
        nodes += [helper.make_node("QuantizeLinear", [f"{name}_f", f"{name}_s", f"{name}_z"], [f"{name}_q"], axis=0),
                  helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_d"], axis=0),
                  helper.make_node("Transpose", [f"{name}_d"], [f"{name}_t"], perm=[1, 0])]
    nodes += [helper.make_node("MatMul", ["x", "W1_t"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "W2_t"], ["y"])]
    return make_model(nodes, {"x": [4, 16]}, {"y": None}, params)


def test_a_transposed_fake_quantized_weight_is_scored_and_refit_from_data() -> None:
    """The refit and the data-aware criteria read a stored weight through the ``Transpose``
    that lays it out for a MatMul (before: "its weight is computed in the graph in a way the
    refit cannot write back", and the criterion fell back to a data-free one); the float
    weight keeps its ``[out, in]`` layout, cut along ``out`` for the hidden units."""
    result = graphprune.prune(transposed_mlp_model(), ratio=0.5, calibration="random:64")
    report = result.report
    assert report["verification"]["ok"]
    refit = report["pass_stats"]["RefitPass"]
    assert refit["layers"] >= 1 and not refit.get("skipped")
    assert not any("data-free" in c for c in report["calibration"]["criteria_chosen"])
    shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert shapes["W1_f"] == [16, 16] and shapes["W2_f"] == [8, 16]


def test_the_transposed_reading_is_the_layers_weight() -> None:
    """Decoding through the Transpose gives the weight as the MatMul reads it (ONNX Runtime),
    and storing it back writes the float weight in its own layout."""
    model = transposed_mlp_model()
    graph = gs.import_onnx(model)
    transpose = next(n for n in graph.nodes if n.op == "Transpose")
    from graphprune.rules.registry import stored_weight_of

    stored = stored_weight_of(transpose.outputs[0], 17)
    assert stored is not None and stored.shape == (16, 32) and stored.axis_of(1) == 0
    expected = run_ort(make_model(
        [*[helper.make_node(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs],
                            **n.attrs) for n in graph.nodes if n.outputs[0].name.startswith("W1")]],
        {}, {"W1_t": [16, 32]}, {k: v for k, v in initializers(model).items() if k.startswith("W1")}), {})[0]
    np.testing.assert_allclose(stored.decode(), expected, rtol=0, atol=1e-7)
    stored.encode(np.zeros((16, 32)))
    assert stored.constant.values.shape == (32, 16) and not stored.constant.values.any()


def test_a_float8_fake_quantized_weight_decodes_as_onnx_runtime_computes_and_prunes() -> None:
    """float8 (E4M3FN, opset 21, what FP8 exports for TensorRT write): rounded to the nearest
    float8 and saturated. Before float8 was known, such weights froze (a regression of this
    round's first version: a biased conv of them had pruned through its bias)."""
    rng = np.random.default_rng(4)
    w = (rng.normal(size=(8, 3, 3, 3)) * 40).astype(np.float32)  # some beyond float8's 448 at scale 0.05
    w_zp = helper.make_tensor("z", onnx.TensorProto.FLOAT8E4M3FN, [8], [0.0] * 8)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=0),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["wd"], axis=0),
         helper.make_node("Conv", ["x", "wd"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])],
        "fp8", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("wd", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.full(8, 0.05, np.float32), "s"), w_zp,
         onnx.numpy_helper.from_array(rng.normal(size=(4, 8, 3, 3)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    _, reason, stored = fake_quantized(next(n for n in gs.import_onnx(model).nodes if n.op == "DequantizeLinear"))
    assert reason == ""
    expected = run_ort(model, {"x": np.zeros((1, 3, 6, 6), np.float32)})[1]
    np.testing.assert_allclose(stored.decode(), expected, rtol=0, atol=0)
    pruning = onnx.ModelProto()
    pruning.CopyFrom(model)
    del pruning.graph.output[1]
    result = graphprune.prune(pruning, ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]


def test_a_weight_quantized_with_a_scale_computed_from_itself_prunes_without_a_refit() -> None:
    """``scale = ReduceMax(Abs(W)) / 127`` per output channel, computed in the graph (the
    dynamo exporter leaves it unfolded): zeroing a row of ``W`` gives it a zero scale, and
    what the dequantize writes for it is still 0, so the weight prunes; the refit, which needs
    constant scales to read and write the weight, leaves such a layer as pruned."""
    rng = np.random.default_rng(5)
    params, nodes = {}, []
    for name, shape in {"W1": (8, 3, 3, 3), "W2": (4, 8, 3, 3)}.items():
        params[f"{name}_f"] = rng.normal(size=shape).astype(np.float32)
        params[f"{name}_z"] = np.zeros(shape[0], np.int8)
        nodes += [helper.make_node("Abs", [f"{name}_f"], [f"{name}_abs"]),
                  helper.make_node("ReduceMax", [f"{name}_abs", "axes"], [f"{name}_max"], keepdims=0),
                  helper.make_node("Div", [f"{name}_max", "c127"], [f"{name}_s"]),
                  helper.make_node("QuantizeLinear", [f"{name}_f", f"{name}_s", f"{name}_z"], [f"{name}_q"], axis=0),
                  helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], axis=0)]
    params["axes"], params["c127"] = np.array([1, 2, 3], np.int64), np.array(127.0, np.float32)
    nodes += [conv_node("x", "W1", "a"), helper.make_node("Relu", ["a"], ["r"]), conv_node("r", "W2", "y")]
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, params, opset=18)
    analysis = graphprune.analyze(model)
    assert [g.anchor for g in analysis.prunable_groups] == [("W1_f", 0)]
    result = graphprune.prune(model, ratio=0.5, calibration="random:32")
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 1
    assert any("not refit" in s or "cannot write back" in s
               for s in result.report["pass_stats"]["RefitPass"].get("skipped", []))


def test_sixteen_bit_quantized_weights_are_counted_as_parameters() -> None:
    """ONNX Runtime's 16-bit QDQ (``QuantType.QInt16``) stores int16 weights: they were not
    counted (the parameter count of such a CNN was its scales alone, and a parameter budget
    steered by it meant nothing)."""
    from graphprune.verify.metrics import count_params

    rng = np.random.default_rng(6)
    params, nodes = {}, []
    for name, shape in {"W1": (32, 3, 3, 3), "W2": (32, 32, 3, 3), "W3": (4, 32, 3, 3)}.items():
        params[f"{name}_q"] = rng.integers(-3000, 3000, size=shape).astype(np.int16)
        params[f"{name}_s"] = np.full(shape[0], 1e-4, np.float32)
        params[f"{name}_z"] = np.zeros(shape[0], np.int16)
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], axis=0))
    nodes += [conv_node("x", "W1", "a"), helper.make_node("Relu", ["a"], ["r"]), conv_node("r", "W2", "b"),
              helper.make_node("Relu", ["b"], ["rb"]), conv_node("rb", "W3", "y")]
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, params, opset=21)
    assert count_params(model) == sum(v.size for v in params.values())  # weights, scales, zero points
    result = graphprune.prune(model, target_params=0.6)
    achieved = result.report["params_after"] / result.report["params_before"]
    assert result.report["verification"]["ok"] and abs(achieved - 0.6) <= 0.03
