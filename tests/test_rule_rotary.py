"""RotaryEmbedding (ONNX opset 23 and com.microsoft) and shapes an exporter joins once for
every layer.

torch's dynamo exporter at opset 23 writes a LLaMA-style model with ONNX ``Attention``,
``RMSNormalization`` and ``RotaryEmbedding``; without a rule for the last, every head and
MLP group it touched was frozen ("no rule for RotaryEmbedding"), and ``--head-ratio`` pruned
nothing. The same export computes the grouped-query ``Expand`` target
``[1, num_kv_heads, n_rep, seq, head_size]`` once and feeds it to every layer, so the layers'
heads were one group (its literal ``num_kv_heads`` sets the head axis of every ``Expand``).
Each test model runs in ONNX Runtime, and every prune is verified against its zeroed original.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.pipeline.session import Session

OPS_UNDER_TEST = ["RotaryEmbedding", "com.microsoft::RotaryEmbedding"]

C, H, HKV, D = 32, 4, 2, 8  # hidden, query heads, KV heads, head size
MAX_POS = 64


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _gqa_model(layers: int = 2, *, rank3: bool = False) -> onnx.ModelProto:
    """``layers`` residual attention blocks: q/k/v projections, rotary embeddings on q and k
    (4-D ``[B, H, S, D]``; ``rank3``: 3-D ``[B, S, H*D]`` with ``num_heads``, before the
    heads are split), KV heads repeated by ``Unsqueeze -> Expand -> Reshape`` with ONE
    computed ``Expand`` target for all layers, ONNX ``Attention``, an output projection.
    The caches are computed from ``inv_freq`` and the positions (3-D ``[B, S, D/2]``)."""
    rng = np.random.default_rng(0)
    inits = [
        _const("inv_freq", (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)),
        _const("one", np.array([1], np.int64)),
        _const("kvh", np.array([HKV], np.int64)),
        _const("rep", np.array([H // HKV], np.int64)),
        _const("dim", np.array([D], np.int64)),
        _const("ax2", np.array([2], np.int64)),
        _const("ax_last", np.array([-1], np.int64)),
        _const("q4", np.array([1, -1, H, D], np.int64)),
        _const("kv4", np.array([1, -1, HKV, D], np.int64)),
        _const("rep4", np.array([1, H, -1, D], np.int64)),
        _const("merge", np.array([1, -1, H * D], np.int64)),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["seq"], start=1, end=2),
        helper.make_node("Concat", ["one", "kvh", "rep", "seq", "dim"], ["expand_to"], axis=0),  # shared
        helper.make_node("Cast", ["pos"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "ax_last"], ["pos_u"]),
        helper.make_node("Mul", ["pos_u", "inv_freq"], ["angles"]),
        helper.make_node("Cos", ["angles"], ["cos"]),
        helper.make_node("Sin", ["angles"], ["sin"]),
    ]
    h = "x"
    for i in range(layers):
        for name, width in (("wq", H * D), ("wk", HKV * D), ("wv", HKV * D)):
            inits.append(_const(f"{name}{i}", (rng.standard_normal((C, width)) / np.sqrt(C)).astype(np.float32)))
        inits.append(_const(f"wo{i}", (rng.standard_normal((H * D, C)) / np.sqrt(H * D)).astype(np.float32)))
        p = f"l{i}_"
        nodes += [helper.make_node("MatMul", [h, f"{w}{i}"], [p + w]) for w in ("wq", "wk", "wv")]
        heads = {}
        for w, count, shape in (("wq", H, "q4"), ("wk", HKV, "kv4"), ("wv", HKV, "kv4")):
            rotated = w != "wv"
            src = p + w
            if rotated and rank3:
                nodes.append(helper.make_node("RotaryEmbedding", [src, "cos", "sin"], [src + "_rot"], num_heads=count))
                src += "_rot"
            nodes += [helper.make_node("Reshape", [src, shape], [src + "_4"]),
                      helper.make_node("Transpose", [src + "_4"], [src + "_t"], perm=[0, 2, 1, 3])]
            src += "_t"
            if rotated and not rank3:
                nodes.append(helper.make_node("RotaryEmbedding", [src, "cos", "sin"], [src + "_rot"], num_heads=count))
                src += "_rot"
            heads[w] = src
        for w in ("wk", "wv"):
            src = heads[w]
            nodes += [helper.make_node("Unsqueeze", [src, "ax2"], [src + "_u"]),
                      helper.make_node("Expand", [src + "_u", "expand_to"], [src + "_e"]),
                      helper.make_node("Reshape", [src + "_e", "rep4"], [src + "_r"])]
            heads[w] = src + "_r"
        nodes += [
            helper.make_node("Attention", [heads["wq"], heads["wk"], heads["wv"]], [p + "att"]),
            helper.make_node("Transpose", [p + "att"], [p + "att_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "att_t", "merge"], [p + "att_m"]),
            helper.make_node("MatMul", [p + "att_m", f"wo{i}"], [p + "o"]),
            helper.make_node("Add", [h, p + "o"], [p + "res"]),
        ]
        h = p + "res"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(
        nodes, "gqa",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", C]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _ms_model() -> onnx.ModelProto:
    """com.microsoft ``RotaryEmbedding`` on a 3-D query ``[B, S, H*D]`` with position ids
    into 2-D caches, then heads split and summed per head into the output projection."""
    rng = np.random.default_rng(1)
    angles = np.arange(MAX_POS)[:, None] * (1.0 / 10000 ** (np.arange(0, D, 2) / D))[None]
    inits = [
        _const("wq", (rng.standard_normal((C, H * D)) / np.sqrt(C)).astype(np.float32)),
        _const("wo", (rng.standard_normal((H * D, C)) / np.sqrt(H * D)).astype(np.float32)),
        _const("cos", np.cos(angles).astype(np.float32)),
        _const("sin", np.sin(angles).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("RotaryEmbedding", ["q", "pos", "cos", "sin"], ["q_rot"], domain="com.microsoft", num_heads=H),
        helper.make_node("Relu", ["q_rot"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "ms_rotary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", C]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", C])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _feed(seq: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((1, seq, C)).astype(np.float32),
            "pos": np.arange(seq, dtype=np.int64)[None]}


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _head_groups(model: onnx.ModelProto) -> list:
    from graphprune.analysis import targets

    analysis = Session(model).analyze()
    kinds = targets.classify_groups(analysis)
    return [g for g in analysis.groups if kinds.get(g.id) == "head"]


@pytest.mark.parametrize("rank3", [False, True], ids=["4d", "3d"])
def test_rotary_heads_prune_per_layer(rank3: bool) -> None:
    model = _gqa_model(rank3=rank3)
    _run(model, _feed())
    heads = _head_groups(model)
    # one group per layer (the shared Expand target no longer ties them), a unit is one KV head
    assert len(heads) == 2 and all(g.prunable and g.num_units == HKV for g in heads), [g.summary() for g in heads]

    result = graphprune.prune(model, head_ratio=0.5, mlp_ratio=0.0)
    assert result.report["verification"]["ok"], result.report["verification"]
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert _run(pruned, _feed(9)).shape == (1, 9, C)
    widths = {i.name: numpy_helper.to_array(i).shape for i in pruned.graph.initializer}
    for layer in range(2):
        assert widths[f"wq{layer}"] == (C, H * D // 2) and widths[f"wk{layer}"] == (C, HKV * D // 2)
    rotary = [n for n in pruned.graph.node if n.op_type == "RotaryEmbedding"]
    assert sorted(helper.get_attribute_value(a) for n in rotary for a in n.attribute if a.name == "num_heads") == [1, 1, 2, 2]
    # the caches' columns (inv_freq) are never cut, whatever the ratio
    frozen = [f for f in result.report["frozen"] if f["anchor"].startswith("inv_freq")]
    assert frozen and "rotary position table" in frozen[0]["reasons"][0]
    assert widths["inv_freq"] == (D // 2,)


def test_a_lossless_prune_keeps_one_expand_target() -> None:
    """The per-reader copies of the joined shape are merged again where they stayed equal."""
    model = _gqa_model()
    result = graphprune.prune(model, lossless=True)
    assert len(result.model.graph.node) == len(model.graph.node)
    assert sum(n.op_type == "Concat" for n in result.model.graph.node) == 1
    np.testing.assert_array_equal(_run(result.model, _feed()), _run(model, _feed()))


def test_layers_that_prune_alike_share_their_expand_target_again() -> None:
    result = graphprune.prune(_gqa_model(), ratio=0.5)
    assert result.report["verification"]["ok"]
    concats = [n for n in result.model.graph.node if n.op_type == "Concat"]
    assert len(concats) == 1  # both layers kept one KV head: one target again


def test_microsoft_rotary_3d_heads() -> None:
    model = _ms_model()
    reference = _run(model, _feed())
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"], result.report["verification"]
    node = next(n for n in result.model.graph.node if n.op_type == "RotaryEmbedding")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "num_heads")) == H // 2
    widths = {i.name: numpy_helper.to_array(i).shape for i in result.model.graph.initializer}
    assert widths["wq"] == (C, H * D // 2) and widths["cos"] == (MAX_POS, D // 2)
    assert _run(result.model, _feed()).shape == reference.shape
    # position ids are fed within the cache's rows (synthetic calibration, verification)
    from graphprune.calibration.synthetic import index_bounds
    from graphprune.io.ir import import_graph

    assert index_bounds(import_graph(model), 17) == {"pos": MAX_POS}
