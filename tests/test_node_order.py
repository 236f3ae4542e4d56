"""Node order: rewrites keep the order the graph came in (``graphprune.io.order``).

Found on a TF.js BlazePose export (tf2onnx): a lossless prune that removed nothing failed its
own check (relative difference 5e-4 on the segmentation output) because the rewrite reordered
the nodes (onnx-graphsurgeon sorts by depth) and wrote the inferred shapes, and ONNX Runtime's
NCHWc layout optimizer decides from both. The order is now kept, a lossless prune writes the
intermediate shapes its original declares and no others (the written BlazePose computes what its
original does, bit for bit), and a difference within the model's own float noise (the output with
and without ORT's graph optimizations) passes, output by output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from conftest import conv_node, make_model
from onnx import helper
from test_real_defects import decomposed_layernorm_model

import graphprune
from graphprune.io.order import toposort_model
from graphprune.pipeline.session import Session


def two_branch_model() -> onnx.ModelProto:
    """Two conv branches written one after the other (a depth sort interleaves them)."""
    nodes = [
        conv_node("x", "wa1", "a1", "ba1"), helper.make_node("Relu", ["a1"], ["a2"], name="a_relu"),
        conv_node("a2", "wa3", "a3", "ba3"), helper.make_node("Relu", ["a3"], ["a4"], name="a_relu2"),
        conv_node("x", "wb1", "b1", "bb1"), helper.make_node("Relu", ["b1"], ["b2"], name="b_relu"),
        conv_node("b2", "wb3", "b3", "bb3"),
        helper.make_node("Add", ["a4", "b3"], ["y"], name="join"),
    ]
    params = {"wa1": [16, 3, 3, 3], "ba1": [16], "wa3": [4, 16, 3, 3], "ba3": [4],
              "wb1": [16, 3, 3, 3], "bb1": [16], "wb3": [4, 16, 3, 3], "bb3": [4]}
    return make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, params)


def names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node]


def test_a_sorted_graph_keeps_its_order() -> None:
    model = two_branch_model()
    graph = toposort_model(gs.import_onnx(model))
    assert [n.name for n in graph.nodes] == names(model)


def test_a_node_put_last_runs_where_its_first_consumer_did() -> None:
    """A pass appends a node whose output an earlier node now reads: it moves to just
    before that consumer, and the nodes that do not depend on it keep their places."""
    graph = gs.import_onnx(two_branch_model())
    by_name = {n.name: n for n in graph.nodes}
    a2 = by_name["a_relu"].outputs[0]
    scaled = gs.Variable("scaled", dtype=np.float32)
    scale = gs.Node("Mul", "scale", inputs=[a2, gs.Constant("two", np.array(2, np.float32))], outputs=[scaled])
    by_name["a3"].inputs[0] = scaled
    graph.nodes.append(scale)
    toposort_model(graph)
    assert [n.name for n in graph.nodes] == ["a1", "a_relu", "scale", "a3", "a_relu2", "b1", "b_relu", "b3", "join"]
    onnx.checker.check_model(gs.export_onnx(graph), full_check=True)


def test_a_branch_reading_an_outer_value_runs_after_its_producer() -> None:
    """An ``If`` whose branch reads a value of the main graph goes after that value's producer,
    though nothing in its own inputs says so."""
    inner = helper.make_graph([helper.make_node("Relu", ["h"], ["r"], name="inner")], "then", [],
                              [helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["n"], name="inner_neg")], "else", [],
                              [helper.make_tensor_value_info("n", onnx.TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=inner, else_branch=other),
             helper.make_node("Sigmoid", ["x"], ["h"], name="producer")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
                                           helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ordered = gs.export_onnx(toposort_model(gs.import_onnx(model)))
    assert names(ordered) == ["producer", "branch"]
    onnx.checker.check_model(ordered, full_check=True)


def test_prunes_keep_the_order_of_the_nodes_they_keep() -> None:
    model = two_branch_model()
    assert not model.graph.value_info
    lossless = graphprune.prune(model, lossless=True)
    assert names(lossless.model) == names(model)
    assert not lossless.model.graph.value_info  # no shapes the original did not declare
    pruned = graphprune.prune(model, ratio=0.5)
    kept = names(pruned.model)
    assert pruned.report["channels"]["removed"] > 0
    assert kept == [n for n in names(model) if n in kept]


def test_one_outputs_float_noise_does_not_excuse_another() -> None:
    """Each output is held to its own noise: a decomposed LayerNorm (ORT fuses it when it
    optimizes: another summation order) has some, a Relu of the input has none, and a
    difference in the Relu's output is not excused by the LayerNorm's rounding."""
    model = decomposed_layernorm_model()
    model.graph.node.append(helper.make_node("Relu", ["x"], ["exact"], name="exact"))
    model.graph.output.append(helper.make_tensor_value_info("exact", onnx.TensorProto.FLOAT, [4, 16, 64]))
    session = Session(model)

    def verdict(noisy_diff: float, exact_diff: float) -> dict:
        return session.within_float_noise(session.prepared, {
            "ok": False, "samples": 1, "tolerance": 1e-12, "max_abs_diff": max(noisy_diff, exact_diff),
            "max_rel_diff": max(noisy_diff, exact_diff),
            "per_output": [{"max_abs_diff": noisy_diff, "scale": 1.0}, {"max_abs_diff": exact_diff, "scale": 1.0}]})

    noise = verdict(1.0, 0.0)["float_noise"]  # the LayerNorm output's own noise (rejected: 1.0 is far above)
    assert 0 < noise < 1e-3
    assert verdict(noise, 0.0)["ok"] is True
    assert verdict(noise, noise)["ok"] is False  # the Relu computes the same either way: no excuse
