"""Calibrated reconstruction of quantized (QDQ) weights: a ``DequantizeLinear`` of integer
constants is a stored weight (``OpRule.stored_weight``) that the refit reads as floats, fits
in float and stores back on the weight's own quantization grid (a per-channel scale grows
where the new values would not fit; a bias quantized with that scale follows)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.calibration.linear import linear_view
from graphprune.rules.quantize import dequantized


def _float_convnet() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {"w1": rng.standard_normal((16, 3, 3, 3)) * 0.3, "b1": rng.standard_normal(16) * 0.1,
             "w2": rng.standard_normal((24, 16, 3, 3)) * 0.1, "b2": rng.standard_normal(24) * 0.1,
             "w3": rng.standard_normal((8, 24, 1, 1)) * 0.2, "b3": rng.standard_normal(8) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"])]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _float_mlp() -> onnx.ModelProto:
    """tests/test_rule_quantize.py's three-layer MLP with its weights scaled to unit-ish outputs."""
    from test_rule_quantize import _float_mlp as unit_mlp

    model = unit_mlp()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(0.15), init.name))
    return model


def _qdq(model: onnx.ModelProto, samples: np.ndarray, tmp_path) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({"x": s} for s in samples[:8])

        def get_next(self):
            return next(self.feeds, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return onnx.load(dst)


def _int_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits}


@pytest.mark.parametrize("build, shape", [(_float_mlp, (4, 32)), (_float_convnet, (1, 3, 8, 8))])
def test_qdq_weights_are_refit_and_stay_quantized(build, shape, tmp_path) -> None:
    rng = np.random.default_rng(7)
    samples = rng.standard_normal((40, *shape)).astype(np.float32)
    model = _qdq(build(), samples, tmp_path)
    before = _int_weights(model)
    result = graphprune.prune(model, ratio=0.5, calibration={"x": samples})
    report = result.report
    assert report["verification"]["ok"]
    refit = report["calibration"]["passes"]["RefitPass"]
    assert refit["layers"] >= 2 and refit["quantized_layers"] == refit["layers"], refit
    assert refit["clipped_max"] == 0.0
    onnx.checker.check_model(result.model, full_check=True)
    after = _int_weights(result.model)
    # every weight is still an integer constant read through a DequantizeLinear, none is float
    assert set(after) and all(v.dtype == before[k].dtype for k, v in after.items() if k in before)
    assert not any(n.op_type in ("Conv", "MatMul") and n.input[1] in {i.name for i in result.model.graph.initializer}
                   for n in result.model.graph.node)
    # and every refit bias is its int32 constant re-encoded, read through its DequantizeLinear (a float
    # bias in its place left the layer out of ORT's QLinearConv fusion)
    inits = {i.name: i for i in result.model.graph.initializer}
    biases = [n.input[2] for n in result.model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert not any(b in inits for b in biases), biases
    from graphprune.tables import calibration_lines

    assert any("stored back quantized" in line for line in calibration_lines(report["calibration"]))
    fidelity = report["fidelity"]
    # held-out samples: the refit brings the deployed (integer-kernel) outputs nearer the original's
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"], fidelity


def test_a_grown_weight_scale_carries_its_bias_scale_along() -> None:
    """A refit value beyond the int8 range grows its channel's scale; the int32 bias whose
    scale is input scale x weight scale is re-encoded on the grown scale, keeping its value."""
    w = gs.Constant("w", np.array([[[[10]]], [[[-20]]]], dtype=np.int8))  # [2, 1, 1, 1]
    ws = gs.Constant("ws", np.array([0.1, 0.05], dtype=np.float32))
    b = gs.Constant("b", np.array([100, -40], dtype=np.int32))
    bs = gs.Constant("bs", np.array([0.01, 0.005], dtype=np.float32))
    x, wf, bf, y = (gs.Variable(n, dtype=np.float32) for n in ("x", "wf", "bf", "y"))
    nodes = [gs.Node("DequantizeLinear", "dw", inputs=[w, ws], outputs=[wf], attrs={"axis": 0}),
             gs.Node("DequantizeLinear", "db", inputs=[b, bs], outputs=[bf], attrs={"axis": 0}),
             gs.Node("Conv", "conv", inputs=[x, wf, bf], outputs=[y])]
    gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17)
    view = linear_view(nodes[2], 17)
    assert view is not None and view.stored is not None and view.bias_stored is not None
    np.testing.assert_allclose(view.bias_values(), [1.0, -0.2], rtol=1e-6)
    clipped = view.store(np.array([[[100.0], [2.0]]]))  # channel 0 needs 100 / 0.1 = 1000 steps
    assert clipped == 0.0
    np.testing.assert_allclose(view.weight_values().reshape(-1), [100.0, 2.0], rtol=0.01)
    assert np.asarray(ws.values)[0] > 0.7 and np.asarray(ws.values)[1] == np.float32(0.05)
    step = np.asarray(bs.values, dtype=np.float64)
    assert step[0] > 0.07 and step[1] == np.float32(0.005) and np.asarray(b.values).dtype == np.int32
    # the same value, to within half a step of the grown grid
    assert np.all(np.abs(view.bias_values() - [1.0, -0.2]) <= step / 2 + 1e-7)
    assert dequantized(nodes[0]) is not None and dequantized(gs.Node("DequantizeLinear", inputs=[x, ws], outputs=[wf])) is None


def test_a_rejected_encoding_leaves_the_scale_as_it_was() -> None:
    """A candidate that grows the scale and is then rejected restores the constants, scale
    included; the next candidate, which fits the old range, is stored on the graph's grid."""
    w = gs.Constant("w", np.array([[[[10]]], [[[-20]]]], dtype=np.int8))
    ws = gs.Constant("ws", np.array(0.1, dtype=np.float32))
    x, wf, y = (gs.Variable(n, dtype=np.float32) for n in ("x", "wf", "y"))
    nodes = [gs.Node("DequantizeLinear", "dw", inputs=[w, ws], outputs=[wf]),
             gs.Node("Conv", "conv", inputs=[x, wf], outputs=[y])]
    gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17)
    view = linear_view(nodes[1], 17)
    assert view.store(np.array([[[100.0], [2.0]]]), accept=lambda stored: False) is None
    assert np.asarray(ws.values) == np.float32(0.1) and float(view.stored.scale) == np.float32(0.1)
    assert view.store(np.array([[[3.0], [-2.0]]])) == 0.0
    decoded = (np.asarray(w.values).astype(np.float64) * np.asarray(ws.values)).reshape(-1)
    np.testing.assert_allclose(decoded, [3.0, -2.0], rtol=1e-6)


def test_int8_weights_stored_as_cast_times_scale_are_refit() -> None:
    """``Mul(Cast(int8), scale)`` (an exporter's weight-only int8) is a stored weight too."""
    from test_rule_quantize import cast_scaled_weights_model

    samples = np.random.default_rng(2).standard_normal((40, 4, 32)).astype(np.float32)
    result = graphprune.prune(cast_scaled_weights_model(), ratio=0.5, calibration={"x": samples})
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["quantized_layers"] >= 1, refit
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert weights["q2"].dtype == np.int8 and weights["q2"].shape == (32, 16)
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"], fidelity


def _dynamic(model: onnx.ModelProto, tmp_path, **options) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "float.onnx", tmp_path / "dynamic.onnx"
    onnx.save(model, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, **options)
    return onnx.load(dst)


@pytest.mark.parametrize("build, shape, op", [(_float_mlp, (4, 32), "MatMulInteger"),
                                              (_float_convnet, (1, 3, 8, 8), "ConvInteger")])
def test_dynamic_quantized_layers_are_refit_as_the_float_layers_they_stand_for(build, shape, op, tmp_path) -> None:
    """``DynamicQuantizeLinear -> MatMulInteger / ConvInteger -> Cast -> Mul(scales)`` is the
    float layer ``x -> x W`` from the quantized tensor's float input to the rescaled output
    (``OpRule.rescaled_linear``): fit in float, stored back on the int8 grid."""
    model = _dynamic(build(), tmp_path)
    assert any(n.op_type == op for n in model.graph.node)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    samples = np.random.default_rng(4).standard_normal((40, *shape)).astype(np.float32)
    result = graphprune.prune(model, ratio=0.5, calibration={"x": samples})
    assert result.report["verification"]["ok"]
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["layers"] >= 2 and refit["quantized_layers"] == refit["layers"], refit
    onnx.checker.check_model(result.model, full_check=True)
    after = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    quantized = [n.input[1] for n in result.model.graph.node if n.op_type == op]
    assert quantized and all(after[w].dtype == before[w].dtype == np.int8 for w in quantized)
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"], fidelity


def _float_residual_tcn() -> onnx.ModelProto:
    """A temporal conv net: ``x + relu(conv_d(x))`` at dilations 1, 2, 4 between two 1x1 convs
    (PyTorch's default initialisation), so each refit layer reads what the one before wrote."""
    rng = np.random.default_rng(3)

    def uniform(*shape):
        bound = 1.0 / np.sqrt(np.prod(shape[1:]))
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    inits = {"wi": uniform(32, 8, 1), "bi": uniform(32, 8)[:, 0], "wo": uniform(2, 32, 1), "bo": uniform(2, 32)[:, 0]}
    nodes = [helper.make_node("Conv", ["x", "wi", "bi"], ["h0"])]
    for i, d in enumerate((1, 2, 4)):
        inits[f"w{i}"], inits[f"b{i}"] = uniform(32, 32, 3), uniform(32, 96)[:, 0]
        nodes += [helper.make_node("Conv", [f"h{i}", f"w{i}", f"b{i}"], [f"c{i}"], pads=[d, d], dilations=[d]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
                  helper.make_node("Add", [f"h{i}", f"r{i}"], [f"h{i + 1}"])]
    nodes.append(helper.make_node("Conv", ["h3", "wo", "bo"], ["y"]))
    graph = helper.make_graph(
        nodes, "tcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 50])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_chain_of_dynamic_quantized_refits_reads_the_grown_scales(tmp_path) -> None:
    """Refit weights that outgrow their int8 range grow the weight's scale, which the op's
    run-time rescaling (``Mul(x_scale, w_scale)``) reads: the next layer's inputs must be taken
    from the graph with the grown scale (they were read from a cache computed with the old one,
    and a rejected candidate left its grown step behind for the next), else every later refit
    fits inputs the model never computes: held-out cosine 0.07 where no reconstruction gives
    0.89 and the float model's refit 0.98."""
    samples = np.random.default_rng(8).standard_normal((48, 1, 8, 50)).astype(np.float32)
    runs = {}
    for label, model in (("dynamic", _dynamic(_float_residual_tcn(), tmp_path)), ("float", _float_residual_tcn())):
        report = graphprune.prune(model, ratio=0.5, calibration={"x": samples}).report
        assert report["verification"]["ok"]
        runs[label] = report
    refit = runs["dynamic"]["calibration"]["passes"]["RefitPass"]
    assert refit["quantized_layers"] == refit["layers"] >= 4, refit
    dynamic, float_ = runs["dynamic"]["fidelity"], runs["float"]["fidelity"]
    assert dynamic["rel_l2"] < 0.6 * dynamic["without_reconstruction"]["rel_l2"], dynamic
    assert dynamic["cosine"] > float_["cosine"] - 0.03, (dynamic, float_)


def test_a_refit_bias_joins_the_exporters_bias_add() -> None:
    """``MatMul`` then ``Add(b)`` (how exporters write a dense layer): the refit's bias is
    added into ``b`` instead of a second ``Add`` after the MatMul (the last MatMul, with no
    bias of its own, gets one)."""
    samples = np.random.default_rng(5).standard_normal((40, 4, 32)).astype(np.float32)
    model = _float_mlp()
    refit = graphprune.prune(model, ratio=0.5, calibration={"x": samples})
    plain = graphprune.prune(model, ratio=0.5, calibration={"x": samples}, reconstruction="none")
    assert refit.report["calibration"]["passes"]["RefitPass"]["layers"] >= 2

    def adds(m: onnx.ModelProto) -> int:
        return sum(n.op_type == "Add" for n in m.graph.node)

    assert adds(refit.model) - adds(plain.model) <= 1
    before = {i.name: numpy_helper.to_array(i) for i in plain.model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in refit.model.graph.initializer}
    assert not np.allclose(before["b2"], after["b2"])  # the refit's bias went into b2
    fidelity = refit.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"]


def _old_dynamic_convnet() -> onnx.ModelProto:
    """Two convs the way older ``quantize_dynamic`` wrote them: the float bias quantized at
    run time with the input's scale and added in the integer domain,
    ``(ConvInteger(x_q, W_q, x_zp) + Cast(Floor(b / (x_s w_s)))) * (x_s w_s)``."""
    rng = np.random.default_rng(3)
    nodes, inits = [], []
    x = "x"
    for k, (cin, cout) in enumerate(((3, 16), (16, 8))):
        w = rng.standard_normal((cout, cin, 3, 3)) * 0.3
        w_scale = float(np.abs(w).max() / 127)
        inits += [numpy_helper.from_array(np.round(w / w_scale).astype(np.int8), f"w{k}_q"),
                  numpy_helper.from_array(np.array(w_scale, np.float32), f"w{k}_s"),
                  numpy_helper.from_array((rng.standard_normal(cout) * 0.2).astype(np.float32), f"b{k}"),
                  numpy_helper.from_array(np.array([1, cout, 1, 1], np.int64), f"b{k}_shape")]
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [f"x{k}_q", f"x{k}_s", f"x{k}_zp"]),
            helper.make_node("Mul", [f"x{k}_s", f"w{k}_s"], [f"s{k}"]),
            helper.make_node("Mul", [f"x{k}_s", f"w{k}_s"], [f"bs{k}"]),
            helper.make_node("Div", [f"b{k}", f"bs{k}"], [f"bd{k}"]),
            helper.make_node("Floor", [f"bd{k}"], [f"bf{k}"]),
            helper.make_node("Cast", [f"bf{k}"], [f"bi{k}"], to=TensorProto.INT32),
            helper.make_node("Reshape", [f"bi{k}", f"b{k}_shape"], [f"br{k}"]),
            helper.make_node("ConvInteger", [f"x{k}_q", f"w{k}_q", f"x{k}_zp"], [f"c{k}"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", [f"c{k}", f"br{k}"], [f"cb{k}"]),
            helper.make_node("Cast", [f"cb{k}"], [f"cf{k}"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"cf{k}", f"s{k}"], [f"y{k}"]),
        ]
        if k == 0:
            nodes.append(helper.make_node("Relu", ["y0"], ["r0"]))
            x = "r0"
    graph = helper.make_graph(
        nodes, "old_dynamic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_bias_added_in_the_integer_domain_is_refit_as_a_float_bias() -> None:
    model = _old_dynamic_convnet()
    onnx.checker.check_model(model, full_check=True)
    samples = np.random.default_rng(6).standard_normal((40, 1, 3, 8, 8)).astype(np.float32)
    result = graphprune.prune(model, ratio=0.5, calibration={"x": samples})
    assert result.report["verification"]["ok"]
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["layers"] == 1 and refit["quantized_layers"] == 1, refit  # the second conv
    after = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert after["w1_q"].dtype == np.int8 and after["w1_q"].shape == (8, 8, 3, 3)
    assert after["b1"].dtype == np.float32 and not any(n.op_type == "Add" and "gp_bias" in n.name
                                                        for n in result.model.graph.node)
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"], fidelity


def _float_concat_mlp() -> onnx.ModelProto:
    """NeRF-style: the input concatenated to hidden features, so the concat's group has units
    pinned by the graph input (``posenc_nerf`` of ``bench/architecture_patterns.py``)."""
    rng = np.random.default_rng(2)
    inits = {"w1": rng.standard_normal((3, 32)) * 0.5, "b1": rng.standard_normal(32) * 0.1,
             "w2": rng.standard_normal((35, 24)) * 0.2, "b2": rng.standard_normal(24) * 0.1,
             "w3": rng.standard_normal((24, 4)) * 0.2}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Concat", ["x", "r1"], ["cat"], axis=1),
             helper.make_node("MatMul", ["cat", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"])]
    graph = helper.make_graph(
        nodes, "concat_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("fmt", ["qdq", "dynamic"])
def test_calibrated_budget_sweeps_quantized_weights(fmt, tmp_path) -> None:
    """The calibrated budget's sensitivity sweep multiplies each group's weights by a unit
    mask: a QDQ model's weights are int8 constants, so the sweep masks their dequantized
    floats (placed after the ``DequantizeLinear``); where nothing can be masked (the integer
    weights of ``MatMulInteger``), the group goes unmeasured. The mask of a group with pinned
    units (a 1 appended by a ``Concat``) was made even then and read an input that was never
    added: ORT refused the sweep model and the prune stopped."""
    samples = np.random.default_rng(0).standard_normal((40, 16, 3)).astype(np.float32)
    model = (_qdq(_float_concat_mlp(), samples, tmp_path) if fmt == "qdq"
             else _dynamic(_float_concat_mlp(), tmp_path))
    analysis = graphprune.analyze(model)
    assert any(g.pinned_units for g in analysis.prunable_groups)
    result = graphprune.prune(model, target_macs=0.6, calibration=[{"x": s} for s in samples])
    assert result.report["verification"]["ok"]
    budget = result.report["budget"]
    assert budget["met"]
    if fmt == "qdq":
        assert budget["sensitivity"]["groups_measured"] == budget["sensitivity"]["groups"] > 0


def test_a_grouped_conv_integer_prunes_position_by_position_as_its_float_conv(tmp_path) -> None:
    """``quantize_dynamic`` keeps a grouped Conv's ``group`` on its ``ConvInteger``: where tying by
    conv group leaves nothing to prune (two groups read the graph input), the float conv prunes
    the same positions in every group (DeepFilterNet3's 64 -> 10 grouped convs); the integer one
    did not (its rule said no), so the int8 copy pruned less (MACs 0.652x against 0.586x)."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((10, 4, 3, 3)), "b1": rng.standard_normal(10),
             "w2": rng.standard_normal((4, 10, 1, 1)), "b2": rng.standard_normal(4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Conv", ["r1", "w2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    quantized = _dynamic(model, tmp_path)
    assert any(n.op_type == "ConvInteger" and any(a.name == "group" and a.i == 2 for a in n.attribute)
               for n in quantized.graph.node)
    float_units = [g.num_units for g in graphprune.analyze(model).groups if g.prunable]
    assert [g.num_units for g in graphprune.analyze(quantized).groups if g.prunable] == float_units == [5]
    for kwargs in ({"ratio": 0.5}, {"ratio": 0.5, "calibration": "random:8"}):
        result = graphprune.prune(quantized, **kwargs)
        assert result.report["verification"]["ok"] and result.report["macs_after"] == 0.6 * result.report["macs_before"]


def test_a_bias_given_to_a_qdq_layer_that_had_none_is_int32_read_through_its_dequantize(tmp_path) -> None:
    """A QDQ conv without a bias (BatchNorm after it, folded by the quantizer) gets one from the
    refit: as a float constant it took the layer out of ONNX Runtime's ``QLinearConv`` fusion (the
    optimised model computed otherwise than the unoptimised one: 4e-3 on a spindle detector). It
    is int32 on the step input scale x weight scale, read through a ``DequantizeLinear``."""
    import onnxruntime as ort

    model = _float_convnet()
    conv2 = model.graph.node[2]
    del conv2.input[2]  # (b2 stays an unused initializer: the quantizer drops it)
    rng = np.random.default_rng(7)
    samples = rng.standard_normal((40, 1, 3, 8, 8)).astype(np.float32)
    quantized = _qdq(model, samples, tmp_path)
    result = graphprune.prune(quantized, ratio=0.5, calibration={"x": samples})
    assert result.report["verification"]["ok"]
    graph = result.model.graph
    inits = {i.name: i for i in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}
    conv = next(n for n in graph.node if n.op_type == "Conv" and n.input[1].startswith("w2"))
    assert len(conv.input) > 2 and conv.input[2] not in inits
    dequantize = made[conv.input[2]]
    assert dequantize.op_type == "DequantizeLinear" and inits[dequantize.input[0]].data_type == TensorProto.INT32

    def fused(m: onnx.ModelProto, name: str) -> list[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}_optimised.onnx")
        onnx.save(m, tmp_path / f"{name}.onnx")
        ort.InferenceSession(str(tmp_path / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(tmp_path / f"{name}_optimised.onnx").graph.node]

    before, after = fused(quantized, "quantized"), fused(result.model, "pruned")
    assert after.count("QLinearConv") == before.count("QLinearConv") >= 2, (before, after)
