"""4-bit weights (opset 21 ``INT4`` through ``DequantizeLinear``, per axis or blocked: what
4-bit QDQ quantizers write for MatMul weights). numpy holds them one element per byte
(ml_dtypes ``int4``); the rewritten model packs them two to a byte again."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune


def _int4_mlp(w1_blocks: int | None, w2_block_axis: int | None) -> onnx.ModelProto:
    """x [4, 16] -> MatMul(DQ(w1 int4 [16, 32])) -> Relu -> MatMul(DQ(w2 int4 [32, 8])).
    ``None``: per-axis scales (axis 1); else ``block_size`` 8 along axis 0 (w1) or
    ``w2_block_axis`` (w2)."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (16, 32), "w2": (32, 8)}
    inits, nodes = [], []
    for name, axis in (("w1", None if w1_blocks is None else 0), ("w2", w2_block_axis)):
        shape = shapes[name]
        q = rng.integers(-8, 8, shape).astype(np.int8)
        inits.append(helper.make_tensor(name, TensorProto.INT4, shape, q.flatten().tolist()))
        if axis is None:
            scale, attrs = rng.random(shape[1]) * 0.1 + 0.01, {"axis": 1}
        else:
            blocked = list(shape)
            blocked[axis] //= 8
            scale, attrs = rng.random(blocked) * 0.1 + 0.01, {"axis": axis, "block_size": 8}
        inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
        nodes.append(helper.make_node("DequantizeLinear", [name, f"{name}_scale"], [name.upper()], **attrs))
    nodes += [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
              helper.make_node("MatMul", ["a", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "int4_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _int4_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer if i.data_type in (TensorProto.INT4, TensorProto.UINT4)}


@pytest.mark.parametrize("w2_block_axis", [None, 1])
def test_int4_weights_prune_and_stay_packed(w2_block_axis) -> None:
    """The hidden channels prune through per-axis or blocked-along-the-other-axis int4
    weights; the result passes the full checker with packed INT4 weights, runs, and equals
    the original with those channels zeroed (the tool's own exact check)."""
    model = _int4_mlp(w1_blocks=None if w2_block_axis is None else 8, w2_block_axis=w2_block_axis)
    onnx.checker.check_model(model, full_check=True)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]
    onnx.checker.check_model(result.model, full_check=True)
    weights = _int4_weights(result.model)
    assert set(weights) == {"w1", "w2"}
    assert list(weights["w1"].dims) == [16, 16] and list(weights["w2"].dims) == [16, 8]
    assert len(weights["w1"].raw_data or b"") in (0, 128)  # two elements per byte
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    out = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert out[0].shape == (4, 8) and np.isfinite(out[0]).all()


def test_blocks_along_the_pruned_axis_are_removed_whole() -> None:
    """w2's scales run in blocks of 8 hidden channels: the hidden group's units are the
    blocks (4 of 8 channels), a prune removes whole blocks (w2's rows and one scale row per
    block, w1's columns with their per-channel scales) and equals the zeroed original."""
    model = _int4_mlp(w1_blocks=8, w2_block_axis=0)
    analysis = graphprune.analyze(model)
    hidden = [g for g in analysis.groups if any(d == ("w2", 0) for d in g.dims)]
    assert len(hidden) == 1 and not hidden[0].frozen and hidden[0].num_units == 4, hidden
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]
    onnx.checker.check_model(result.model, full_check=True)
    inits = {i.name: i for i in result.model.graph.initializer}
    assert list(inits["w2"].dims) == [16, 8] and list(inits["w2_scale"].dims) == [2, 8]
    assert list(inits["w1"].dims) == [16, 16] and list(inits["w1_scale"].dims) == [2, 16]


def test_blocks_that_do_not_tile_the_axis_freeze_it_with_the_reason() -> None:
    """A block size that does not divide the blocked axis (a last, partial block): the map
    between the blocks and the channels does not hold, the group is frozen and says so."""
    model = _int4_mlp(w1_blocks=8, w2_block_axis=0)
    for node in model.graph.node:
        if node.input[0] == "w2":
            for attr in node.attribute:
                if attr.name == "block_size":
                    attr.i = 5  # 32 channels in blocks of 5: 7 blocks, the last one partial
    scale = next(i for i in model.graph.initializer if i.name == "w2_scale")
    scale.CopyFrom(numpy_helper.from_array(np.full((7, 8), 0.05, np.float32), "w2_scale"))
    analysis = graphprune.analyze(model)
    hidden = [g for g in analysis.groups if any(d == ("w2", 0) for d in g.dims)]
    assert len(hidden) == 1 and hidden[0].frozen
    assert any("digit map" in r for r in hidden[0].frozen), hidden[0].frozen


def test_int4_weights_are_refit_on_their_grid() -> None:
    """With calibration the consumer of the pruned channels is refit in float and stored back
    as int4 (within -8..7), its scale grown where needed."""
    model = _int4_mlp(w1_blocks=None, w2_block_axis=None)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(40)]
    result = graphprune.prune(model, ratio=0.5, calibration=feeds)
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["layers"] == 1 and refit["quantized_layers"] == 1, refit
    w2 = numpy_helper.to_array(_int4_weights(result.model)["w2"]).astype(np.int8)
    assert w2.min() >= -8 and w2.max() <= 7
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"], fidelity


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnxruntime_4bit_qdq_mlp_prunes_whole_blocks(symmetric: bool) -> None:
    """ONNX Runtime's own 4-bit quantizer in QDQ format (``MatMulNBitsQuantizer``, blocks of
    32 along each weight's input axis; asymmetric, its default, with a zero point per block):
    the hidden channels prune in whole blocks of the second weight, verified against the
    zeroed original (removed entries at their block's zero point)."""
    model = _ort_qdq_mlp(symmetric)
    assert [n.op_type for n in model.graph.node].count("DequantizeLinear") == 2 and _int4_weights(model)
    hidden = [g for g in graphprune.analyze(model).groups if g.num_units == 4]
    assert len(hidden) == 1 and not hidden[0].frozen
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]
    assert result.report["params_after"] < 0.6 * result.report["params_before"]


def _ort_qdq_mlp(symmetric: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    from onnxruntime.quantization.quant_utils import QuantFormat
    from test_rule_matmul_nbits import float_mlp

    config = nbits.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, quant_format=QuantFormat.QDQ)
    quantizer = nbits.MatMulNBitsQuantizer(float_mlp(opset=21, seed=3), algo_config=config)
    quantizer.process()
    return quantizer.model.model


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_blocked_weight_decodes_and_re_encodes_as_onnxruntime_reads_it(symmetric: bool) -> None:
    """A blocked DequantizeLinear's stored weight: the decoding is what ONNX Runtime computes
    with it, and new values stored on fresh block scales (zero points where the node has
    them; ONNX Runtime's symmetric quantizer writes negative scales) run as decoded, near the
    values given."""
    from graphprune.io import ir
    from graphprune.rules.quantize_blocked import BlockDequantized, blocked_dequantized

    model = _ort_qdq_mlp(symmetric)
    graph = ir.import_graph(model)
    first, second = (blocked_dequantized(n) for n in graph.nodes if n.op == "DequantizeLinear")
    assert isinstance(first, BlockDequantized) and (first.zero_tensor is None) == symmetric
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)

    options = ort.SessionOptions()  # as written: ORT would fuse DequantizeLinear + MatMul into
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # an 8-bit-input kernel

    def check() -> None:
        want = np.maximum(x @ first.decode(), 0) @ second.decode()
        got = ort.InferenceSession(ir.export_graph(graph, model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    check()
    values = np.random.default_rng(5).standard_normal(first.shape) * 0.3
    first.encode_fit(values, None)
    check()
    decoded = first.decode().astype(np.float64)
    step = np.abs(values).reshape(-1, 32, values.shape[1]).max(axis=1) / 7  # blocks of 32 along axis 0
    error = np.abs(decoded - values).reshape(-1, 32, values.shape[1]).max(axis=1)
    assert np.all(error <= 0.51 * step + 1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_4bit_weights_are_refit_on_fresh_block_scales(symmetric: bool) -> None:
    """ONNX Runtime's 4-bit QDQ MLP (blocks of 32 along each weight's input axis) with
    calibration: the second weight is refit (it was left as pruned before) and stays a
    blocked int4 weight; on held-out samples the refit brings the outputs nearer."""
    model = _ort_qdq_mlp(symmetric)
    rng = np.random.default_rng(5)
    basis = rng.standard_normal((6, 64)).astype(np.float32)
    feeds = [{"x": (rng.standard_normal((4, 6)) @ basis).astype(np.float32)} for _ in range(64)]
    result = graphprune.prune(model, ratio=0.25, calibration=feeds)
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["quantized_layers"] >= 1, refit
    onnx.checker.check_model(result.model, full_check=True)
    weights = _int4_weights(result.model)  # (and, asymmetric, their zero points)
    dequantized = [n.input[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantized) == 2 and all(name in weights for name in dequantized)
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < 0.5 * fidelity["without_reconstruction"]["rel_l2"], fidelity
