"""What a node reads through its subgraphs (``graphprune.io.graph_reads``), on a real
``If`` whose branch reads an outer value and names that only the branch defines."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

from graphprune.io.graph_reads import (
    all_reads,
    node_reads,
    outer_reads,
    reads_of,
    rename_reads,
    subgraphs_of,
)
from graphprune.io.order import needed_nodes


def _model() -> onnx.ModelProto:
    out = h.make_tensor_value_info
    then_g = h.make_graph([h.make_node("Add", ["r", "local"], ["t"])], "then", [], [out("t", T.FLOAT, [1, 4])],
                          [h.make_tensor("local", T.FLOAT, [1], [1.0])])
    # the inner Loop body reads "s" (made outside the If) and its own "i"/"cond"
    body = h.make_graph([h.make_node("Identity", ["cond"], ["cond_out"]), h.make_node("Mul", ["v", "s"], ["v_out"])],
                        "body", [out("i", T.INT64, []), out("cond", T.BOOL, []), out("v", T.FLOAT, [1, 4])],
                        [out("cond_out", T.BOOL, []), out("v_out", T.FLOAT, [1, 4])])
    else_g = h.make_graph([h.make_node("Loop", ["n", "", "r"], ["e"], body=body)], "else", [],
                          [out("e", T.FLOAT, [1, 4])])
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Sigmoid", ["x"], ["s"]),
             h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = h.make_graph(nodes, "g", [out("x", T.FLOAT, [1, 4]), out("c", T.BOOL, []), out("n", T.INT64, [])],
                         [out("y", T.FLOAT, [1, 4])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_node_reads_include_outer_names_of_nested_subgraphs_only():
    model = _model()
    onnx.checker.check_model(model, full_check=True)
    if_node = model.graph.node[2]
    assert len(subgraphs_of(if_node)) == 2
    assert node_reads(if_node) == {"c", "r", "n", "s"}  # not "local", "t", "v", "cond", "i", "e"
    branches = {g.name: g for g in subgraphs_of(if_node)}
    assert outer_reads(branches["else"]) == {"n", "r", "s"}
    assert outer_reads(branches["then"]) == {"r"}
    assert reads_of(model.graph.node) == {"x", "c", "r", "n", "s"}
    assert {"local", "v", "cond", "r", "s", "n"} <= all_reads(model.graph)
    # the If depends on both producers through its branches
    assert needed_nodes(model.graph, ["y"]) == [0, 1, 2]


def test_rename_reads_reaches_nested_bodies_and_the_model_still_runs():
    model = _model()
    model.graph.node[1].output[0] = "s2"
    rename_reads(model.graph, {"s": "s2"})
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[-1.0, 0.0, 1.0, 2.0]], np.float32)
    (y,) = session.run(None, {"x": x, "c": np.array(False), "n": np.array(2, np.int64)})
    sig = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(y, np.maximum(x, 0) * sig * sig, rtol=1e-6)
