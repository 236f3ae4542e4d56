"""An output declared with the size it was traced at, read by the graph too: LORE's table
stage declares ``logic_axis: [batch, 54, 4]`` for its inputs' open number of cells, and its
second transformer reads that output. ONNX's version converter (opset 9) and inference took
the 54 for what the readers see, the size probes ran at other sizes, and the attention behind
it froze ("Reshape not understood"). ONNX Runtime trusts no declared output size: the run
has the number of cells fed. Such a size is read as the open size inference computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import declared_shapes


def traced_model(read_inside: bool = True) -> onnx.ModelProto:
    """opset 9: ``x [B, N, 8] -> MatMul -> head`` (a graph output declared ``[B, 5, 4]``) ``->
    MatMul -> Relu -> MatMul -> Reshape [B, N, 4, 8] (computed from Shape(x)) -> Softmax over
    the 8 -> Reshape [B, N, 32] -> MatMul -> y``; ``read_inside=False``: the rest reads ``x``."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    first = "head" if read_inside else "x"
    w2 = weight("w2", 4 if read_inside else 8, 32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["head"]),
        helper.make_node("MatMul", [first, "w2"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w3"], ["b"]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "zero"], ["bs"], axis=0),
        helper.make_node("Gather", ["xs", "one"], ["ns"], axis=0),
        helper.make_node("Unsqueeze", ["bs"], ["bs1"], axes=[0]),
        helper.make_node("Unsqueeze", ["ns"], ["ns1"], axes=[0]),
        helper.make_node("Concat", ["bs1", "ns1", "tail"], ["shp"], axis=0),
        helper.make_node("Reshape", ["b", "shp"], ["b4"]),
        helper.make_node("Softmax", ["b4"], ["sm"], axis=3),
        helper.make_node("Concat", ["bs1", "ns1", "c32"], ["shp3"], axis=0),
        helper.make_node("Reshape", ["sm", "shp3"], ["b3"]),
        helper.make_node("MatMul", ["b3", "w4"], ["y"]),
    ]
    inits = [weight("w1", 8, 4), w2, weight("w3", 32, 32), weight("w4", 32, 6),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([4, 8], np.int64), "tail"),
             numpy_helper.from_array(np.array([32], np.int64), "c32")]
    graph = helper.make_graph(nodes, "traced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", 8])],
                              [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["B", 5, 4]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_a_traced_output_size_read_inside_does_not_freeze_what_follows() -> None:
    model = traced_model()
    analysis = graphprune.analyze(model)
    group = next(g for g in analysis.groups if ("w3", 1) in g.dims)
    assert group.prunable, group.frozen
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    w3 = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "w3")
    assert w3.shape[1] < 32
    head = next(o for o in result.model.graph.output if o.name == "head")
    assert [d.dim_param or d.dim_value for d in head.type.tensor_type.shape.dim] == ["B", "N", 4]
    for cells in (5, 9):  # the traced size and another
        outputs = run(result.model, np.random.default_rng(cells).standard_normal((1, cells, 8)).astype(np.float32))
        assert outputs[0].shape == (1, cells, 4) and outputs[1].shape == (1, cells, 6)


def test_an_output_nothing_reads_keeps_its_declared_size() -> None:
    model = traced_model(read_inside=False)
    assert declared_shapes.open_traced_output_sizes(model) == 0
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == ["B", 5, 4]
