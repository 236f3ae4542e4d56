"""ONNX Runtime's quantized transformer kernels, ``QAttention`` and ``QEmbedLayerNormalization``,
as ``onnxruntime.quantization.quantize_dynamic`` writes them from a model its transformer
optimizer fused (``Attention``, ``EmbedLayerNormalization``): the "optimize, then quantize"
recipe for BERT-like models.

Before their rules, ONNX shape inference stopped at them, every shape after the embedding
was unknown, and nothing in the model pruned ("rank unknown at SkipLayerNormalization"); a
fused ``Attention``'s projection and products were missing from the MACs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

import graphprune
from graphprune.verify.metrics import count_macs

OPS_UNDER_TEST = ["com.microsoft::QAttention", "com.microsoft::QEmbedLayerNormalization"]
HIDDEN, HEADS, FF, VOCAB, SEQ = 32, 4, 64, 50, 8


def _float_bert(rng: np.random.Generator) -> onnx.ModelProto:
    """One fused BERT layer as ONNX Runtime's optimizer writes it: EmbedLayerNormalization,
    Attention, an output projection with SkipLayerNormalization, and a GELU MLP."""
    ms = {"domain": "com.microsoft"}

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    params = {
        "word": w(VOCAB, HIDDEN), "pos": w(SEQ, HIDDEN), "seg": w(2, HIDDEN),
        "g0": 1 + w(HIDDEN, scale=0.1), "b0": w(HIDDEN, scale=0.1),
        "w_qkv": w(HIDDEN, 3 * HIDDEN), "b_qkv": w(3 * HIDDEN, scale=0.1),
        "w_o": w(HIDDEN, HIDDEN), "b_o": w(HIDDEN, scale=0.1),
        "g1": 1 + w(HIDDEN, scale=0.1), "b1": w(HIDDEN, scale=0.1),
        "w_1": w(HIDDEN, FF), "b_1": w(FF, scale=0.1), "w_2": w(FF, HIDDEN),
    }
    nodes = [
        helper.make_node("EmbedLayerNormalization", ["ids", "segments", "word", "pos", "seg", "g0", "b0", "mask"],
                         ["h0", "mask_index"], epsilon=1e-12, **ms),
        helper.make_node("Attention", ["h0", "w_qkv", "b_qkv", "mask_index"], ["att"], num_heads=HEADS, **ms),
        helper.make_node("MatMul", ["att", "w_o"], ["proj"]),
        helper.make_node("SkipLayerNormalization", ["proj", "h0", "g1", "b1", "b_o"], ["h1"], epsilon=1e-12, **ms),
        helper.make_node("MatMul", ["h1", "w_1"], ["up"]),
        helper.make_node("BiasGelu", ["up", "b_1"], ["act"], **ms),
        helper.make_node("MatMul", ["act", "w_2"], ["down"]),
        helper.make_node("Add", ["down", "h1"], ["y"]),
    ]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", "seq"]) for n in ("ids", "segments", "mask")]
    graph = helper.make_graph(nodes, "bert", ints,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [numpy_helper.from_array(v, k) for k, v in params.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _quantized(tmp_path, per_channel: bool) -> onnx.ModelProto:
    source, target = tmp_path / "bert.onnx", tmp_path / "bert_int8.onnx"
    onnx.save(_float_bert(np.random.default_rng(0)), source)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return onnx.load(target)


def _feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 10 + seq)
    return {"ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int32),
            "segments": rng.integers(0, 2, (batch, seq)).astype(np.int32),
            "mask": np.ones((batch, seq), np.int32)}


def _node(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op)


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_bert_prunes_its_heads_and_mlp_and_the_rewrite_is_exact(tmp_path, per_channel: bool) -> None:
    model = _quantized(tmp_path, per_channel)
    ops = {n.op_type for n in model.graph.node}
    assert {"QAttention", "QEmbedLayerNormalization", "MatMulInteger"} <= ops  # what the quantizer wrote
    shapes = {"ids": [1, SEQ], "segments": [1, SEQ], "mask": [1, SEQ]}
    result = graphprune.prune(model, head_ratio=0.5, mlp_ratio=0.5, input_shapes=shapes)  # verified inside
    pruned = result.model
    onnx.checker.check_model(pruned)
    attention = _node(pruned, "QAttention")
    assert _attr(attention, "num_heads") == HEADS // 2
    weights = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    assert weights[attention.input[1]].shape == (HIDDEN, 3 * HIDDEN // 2)
    assert weights[attention.input[2]].shape == (3 * HIDDEN // 2,)
    if per_channel:  # the per-column scale and zero point lost the removed heads' columns too
        assert weights[attention.input[4]].shape == (3 * HIDDEN // 2,)
        assert weights[attention.input[7]].shape == (3 * HIDDEN // 2,)
    assert result.report["verification"]["ok"]
    assert result.report["params_after"] < 0.75 * result.report["params_before"]
    # it runs at other sizes than the ones verified, with its own outputs
    for batch, seq in [(2, 5), (1, SEQ)]:
        out = _run(pruned, _feeds(batch, seq))
        assert out.shape == (batch, seq, HIDDEN) and np.isfinite(out).all()


def test_quantized_bert_lossless_and_calibrated(tmp_path) -> None:
    model = _quantized(tmp_path, per_channel=False)
    shapes = {"ids": [1, SEQ], "segments": [1, SEQ], "mask": [1, SEQ]}
    lossless = graphprune.prune(model, lossless=True, input_shapes=shapes)
    feeds = _feeds(2, SEQ)
    np.testing.assert_array_equal(_run(lossless.model, feeds), _run(model, feeds))
    samples = [_feeds(1, SEQ) | {"ids": np.random.default_rng(k).integers(0, VOCAB, (1, SEQ)).astype(np.int32)}
               for k in range(24)]
    calibrated = graphprune.prune(model, head_ratio=0.5, mlp_ratio=0.5, input_shapes=shapes, calibration=samples)
    assert _attr(_node(calibrated.model, "QAttention"), "num_heads") == HEADS // 2
    assert calibrated.report["fidelity"]["cosine"] > 0.5


def test_fused_attention_counts_its_projection_and_products() -> None:
    """A fused Attention over [B, S, in]: B S in (q + k + v) for the projection and
    B H S S (d_q + d_v) for the two products, as the unfused MatMuls count."""
    model = _float_bert(np.random.default_rng(1))
    batch, seq = 2, 6
    shapes = {"ids": [batch, seq], "segments": [batch, seq], "mask": [batch, seq]}
    total = count_macs(model, input_shapes=shapes)
    matmuls = batch * seq * (HIDDEN * HIDDEN + 2 * HIDDEN * FF)
    attention = batch * seq * HIDDEN * 3 * HIDDEN + batch * seq * seq * 2 * HIDDEN
    assert total == matmuls + attention


def _uint8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, shape).astype(np.uint8)


def _hand_built(rng: np.random.Generator) -> onnx.ModelProto:
    """The two kernels written by hand, as no quantizer writes them: uint8 tables and weights
    with non-zero zero points (per column for the attention's weight), whose removed entries
    the zeroed original sets to their zero point; the hidden features feed a MatMul, so they
    prune when asked."""
    u8 = TensorProto.UINT8
    params = {
        "word": _uint8(rng, VOCAB, HIDDEN), "pos": _uint8(rng, SEQ, HIDDEN), "seg": _uint8(rng, 2, HIDDEN),
        "gamma": _uint8(rng, HIDDEN), "beta": _uint8(rng, HIDDEN),
        "w_qkv": _uint8(rng, HIDDEN, 3 * HIDDEN), "b_qkv": (rng.standard_normal(3 * HIDDEN) * 0.1).astype(np.float32),
        "w_scale": (0.002 + 0.002 * rng.random(3 * HIDDEN)).astype(np.float32),
        "w_zp": rng.integers(100, 156, 3 * HIDDEN).astype(np.uint8),
        "w_head": (rng.standard_normal((HIDDEN, 6)) * 0.3).astype(np.float32),
        "w_out": (rng.standard_normal((HIDDEN, 5)) * 0.3).astype(np.float32),
    }
    scalars = {f"{k}_scale": np.array(0.01, np.float32) for k in ("word", "pos", "seg", "gamma", "beta")}
    zeros = {f"{k}_zp": np.array(z, np.uint8) for k, z in zip(("word", "pos", "seg", "gamma", "beta"),
                                                             (128, 120, 130, 30, 128), strict=True)}
    params |= scalars | zeros
    tables = ["word", "pos", "seg", "gamma", "beta"]
    nodes = [
        helper.make_node("QEmbedLayerNormalization",
                         ["ids", "segments", *tables, "mask", *(f"{k}_scale" for k in tables), *(f"{k}_zp" for k in tables)],
                         ["h", "mask_index"], epsilon=1e-12, domain="com.microsoft"),
        helper.make_node("MatMul", ["h", "w_head"], ["head"]),
        helper.make_node("DynamicQuantizeLinear", ["h"], ["h_q", "h_scale", "h_zp"]),
        helper.make_node("QAttention", ["h_q", "w_qkv", "b_qkv", "h_scale", "w_scale", "mask_index", "h_zp", "w_zp"],
                         ["att"], num_heads=HEADS, domain="com.microsoft"),
        helper.make_node("MatMul", ["att", "w_out"], ["y"]),
    ]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", "seq"]) for n in ("ids", "segments", "mask")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "head")]
    graph = helper.make_graph(nodes, "qbert", ints, outs, [numpy_helper.from_array(v, k) for k, v in params.items()])
    assert u8 == numpy_helper.from_array(params["word"]).data_type
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def test_hand_built_kernels_prune_heads_and_hidden_with_their_zero_points() -> None:
    model = _hand_built(np.random.default_rng(3))
    shapes = {"ids": [1, SEQ], "segments": [1, SEQ], "mask": [1, SEQ]}
    heads = graphprune.prune(model, head_ratio=0.5, input_shapes=shapes)  # verified against the zeroed original
    weights = {i.name: numpy_helper.to_array(i) for i in heads.model.graph.initializer}
    assert _attr(_node(heads.model, "QAttention"), "num_heads") == HEADS // 2
    assert weights["w_zp"].shape == weights["w_scale"].shape == (3 * HIDDEN // 2,)
    hidden = graphprune.prune(model, hidden_ratio=0.5, prune_hidden=True, head_ratio=0, input_shapes=shapes)
    weights = {i.name: numpy_helper.to_array(i) for i in hidden.model.graph.initializer}
    assert weights["word"].shape == (VOCAB, HIDDEN // 2) and weights["gamma"].shape == (HIDDEN // 2,)
    assert weights["w_qkv"].shape == (HIDDEN // 2, 3 * HIDDEN)
    out = _run(hidden.model, _feeds(2, 5))
    assert out.shape == (2, 5, 5) and np.isfinite(out).all()
