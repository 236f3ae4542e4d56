"""Ops ONNX Runtime registers in the ONNX domain itself (graphprune/io/ort_schemas.py):
``SimplifiedLayerNormalization`` (RMSNorm, what ``onnxruntime_genai``'s model builder writes
for every LLM) and ``LayerNormalization`` before opset 17 (ONNX Runtime's transformer
optimizer). ONNX Runtime runs these models; ``onnx.checker`` refused them, and so did
graphprune's check of the pruned model ("the input model fails onnx.checker")."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune


def _normed_mlp(op: str, opset: int) -> onnx.ModelProto:
    """x [2, 5, 32] -> op(scale) over the last axis -> MatMul [32, 64] -> Relu -> MatMul [64, 32]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(32)).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W2")]
    norm_inputs = ["x", "scale"]
    if op == "LayerNormalization":
        inits.append(numpy_helper.from_array(np.zeros(32, np.float32), "bias"))
        norm_inputs.append("bias")
    nodes = [helper.make_node(op, norm_inputs, ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "normed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("op, opset", [("SimplifiedLayerNormalization", 17), ("SimplifiedLayerNormalization", 22),
                                       ("LayerNormalization", 13)])
def test_models_with_onnxruntime_ops_in_the_onnx_domain_are_checked_and_pruned(op: str, opset: int, tmp_path) -> None:
    model = _normed_mlp(op, opset)
    x = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})  # ONNX Runtime runs it
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, path)
    result = graphprune.prune(str(path), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] >= 1
    result.save(out)
    onnx.checker.check_model(model)  # graphprune registered the schema (its I/O did)
    onnx.checker.check_model(str(out))
    pruned = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert pruned.shape == (2, 5, 32)
    widths = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert widths["W1"][1] == 32  # the hidden layer lost half its neurons


def test_onnx_own_layer_normalization_schema_is_kept() -> None:
    from onnx import defs

    import graphprune.io  # noqa: F401  (registers the schemas)

    assert defs.get_schema("LayerNormalization", 17, "").since_version == 17
    assert defs.get_schema("LayerNormalization", 13, "").since_version == 1  # ONNX Runtime's


def _genai_block() -> onnx.ModelProto:
    """One decoder layer as ONNX Runtime's LLM builder writes it: RMSNorm in the ONNX domain,
    a packed query/key/value projection into ``GroupQueryAttention`` with a KV cache as graph
    inputs and outputs, a SwiGLU MLP, residual additions."""
    rng = np.random.default_rng(2)
    d, heads, kv_heads, hd, inner = 32, 4, 2, 8, 64

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [numpy_helper.from_array(np.ones(d, np.float32), "g1"), numpy_helper.from_array(np.ones(d, np.float32), "g2"),
             w("Wqkv", d, (heads + 2 * kv_heads) * hd), w("Wo", heads * hd, d), w("Wg", d, inner), w("Wu", d, inner),
             w("Wd", inner, d), numpy_helper.from_array(np.array([4], np.int32), "seqlens_k"),
             numpy_helper.from_array(np.array(5, np.int32), "total")]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "g1"], ["n1"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n1", "Wqkv"], ["qkv"]),
             helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"],
                              ["attn", "present_key", "present_value"], domain="com.microsoft",
                              num_heads=heads, kv_num_heads=kv_heads),
             helper.make_node("MatMul", ["attn", "Wo"], ["o"]), helper.make_node("Add", ["x", "o"], ["r1"]),
             helper.make_node("SimplifiedLayerNormalization", ["r1", "g2"], ["n2"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n2", "Wg"], ["gate"]), helper.make_node("Sigmoid", ["gate"], ["sg"]),
             helper.make_node("Mul", ["gate", "sg"], ["act"]), helper.make_node("MatMul", ["n2", "Wu"], ["up"]),
             helper.make_node("Mul", ["act", "up"], ["h"]), helper.make_node("MatMul", ["h", "Wd"], ["down"]),
             helper.make_node("Add", ["r1", "down"], ["y"])]
    cache = [1, kv_heads, 0, hd]
    graph = helper.make_graph(
        nodes, "genai_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, d]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, d]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def test_a_builder_llm_layer_is_a_transformer_its_mlp_prunes_and_its_residual_stream_stays() -> None:
    """The packed projection leaves the heads unmapped (frozen), but they mark the model a
    transformer: the MLP is pruned at ``--ratio``, the RMS-normalised residual stream (inexact)
    only when asked, as in every other transformer. Before, the model counted as a CNN and its
    residual stream was cut at the ratio too."""
    from graphprune.analysis.targets import classify_groups

    model = _genai_block()
    analysis = graphprune.analyze(model)
    kinds = classify_groups(analysis)
    by_dim = {p: kinds[g.id] for g in analysis.groups for p in g.params}
    assert by_dim[("Wd", 0)] == "mlp" and by_dim[("g1", 0)] == "hidden", by_dim
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    widths = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert widths["Wd"] == [32, 32] and widths["g1"] == [32]  # MLP halved, residual stream kept


# --------------------------------------------------------------------------- symbolic shapes
def _shape_of(model: onnx.ModelProto, name: str) -> list | None:
    for value in model.graph.value_info:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    return None


def test_contrib_shapes_read_past_a_weight_in_the_store(tmp_path) -> None:
    """ONNX Runtime's symbolic inference reads the values of every constant input of an
    ``Add``; a bias held in the weight store (a model loaded from a file) raised there and
    lost every contrib-op shape of the model. External values now count as unknown."""
    from graphprune.pipeline.session import Session

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 2048)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(2048).astype(np.float32), "b1"),  # 8 KB: stored
             numpy_helper.from_array(rng.standard_normal((2048, 32)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("QuickGelu", ["hb"], ["a"], domain="com.microsoft", alpha=1.702),
             helper.make_node("MatMul", ["a", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert _shape_of(Session(str(path)).prepared, "a") == [2, 5, 2048]
    result = graphprune.prune(str(path), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 1


def test_contrib_shapes_keep_what_was_found_before_a_node_the_inference_cannot_read(tmp_path) -> None:
    """An ``If`` whose branch output has no type stops ONNX Runtime's symbolic inference
    (ONNX Runtime itself runs it); the shapes it found before are kept: the opset-13
    LayerNormalization over the hidden layer (which ONNX inference does not know) has its
    rank, and the hidden layer prunes (ONNX Runtime's saved openWakeWord classifier)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "W1"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(64)).astype(np.float32), "scale"),
             numpy_helper.from_array(np.zeros(64, np.float32), "bias"),
             numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.array([16, 2, 2], np.int64), "square"),
             numpy_helper.from_array(np.array([2, 32], np.int64), "flat")]
    # com.microsoft::Inverse: ONNX Runtime runs it, its symbolic inference has no handler
    untyped = onnx.ValueInfoProto(name="branch_out")
    then = helper.make_graph([helper.make_node("Reshape", ["y", "square"], ["m"]),
                              helper.make_node("Inverse", ["m"], ["inv"], domain="com.microsoft"),
                              helper.make_node("Reshape", ["inv", "flat"], ["branch_out"])], "then", [], [untyped])
    other = helper.make_graph([helper.make_node("Neg", ["y"], ["branch_out"])], "else", [], [untyped])
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "scale", "bias"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["a"]), helper.make_node("MatMul", ["a", "W2"], ["y"]),
             helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["z"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "normed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})  # ONNX Runtime runs it
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = graphprune.prune(str(path), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] >= 1
    widths = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert widths["W1"][1] == 32  # the hidden layer lost half its neurons, through the norm
