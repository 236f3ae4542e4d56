"""A tf2onnx attention computes its heads on ``[batch * heads, S, d]``: with an open batch the
analysis labels that axis at its probe size (two elements per head at batch 2), and a MACs
budget counted at batch 1 modelled the attention products as removed twice (0 MACs left
at half the heads): g2p-id's BERT planned 0.500 and landed at 0.541 (MISSED). The cost model
now removes the labelled share of such an axis."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune

S, D, H = 16, 64, 8


def merged_attention() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    d = D // H
    inits = [numpy_helper.from_array((rng.standard_normal((D, D)) * 0.1).astype(np.float32), f"w{t}") for t in "qkvo"]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
        ("zero", [0]), ("heads", [H]), ("tail4", [S, H, d]), ("tail3", [S, d]), ("tail_out", [S, D]))]
    nodes = [helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Slice", ["xs", "zero", "one"], ["b"]),
             helper.make_node("Mul", ["b", "heads"], ["bh"]),
             helper.make_node("Concat", ["b", "tail4"], ["shp4"], axis=0),
             helper.make_node("Concat", ["bh", "tail3"], ["shp3"], axis=0),
             helper.make_node("Concat", ["b", "tail_out"], ["shp_out"], axis=0)]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    for t in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{t}"], [t]),
                  helper.make_node("Reshape", [t, "shp4"], [f"{t}4"]),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"{t}t", "shp3"], [f"{t}3"])]  # [B*H, S, d]
    nodes += [helper.make_node("Transpose", ["k3"], ["kT"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q3", "kT"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v3"], ["ctx"]),
              helper.make_node("Reshape", ["ctx", "shp4_back"], ["ctx4"]),
              helper.make_node("Transpose", ["ctx4"], ["ctxt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctxt", "shp_out"], ["merged"]),
              helper.make_node("MatMul", ["merged", "wo"], ["y"])]
    nodes.insert(6, helper.make_node("Concat", ["b", "back_tail"], ["shp4_back"], axis=0))
    inits.append(numpy_helper.from_array(np.array([H, S, d], np.int64), "back_tail"))
    graph = helper.make_graph(nodes, "merged", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", S, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", S, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_macs_budget_on_heads_merged_with_an_open_batch_lands_where_it_planned():
    result = graphprune.prune(merged_attention(), target_macs=0.5, input_shapes={"x": [1, S, D]})
    budget = result.report["budget"]
    assert result.report["verification"]["ok"]
    assert any(w["kind"] == "head" and w["kept"] < w["units"] for w in budget["widths"])
    assert abs(budget["achieved"] - 0.5) <= 0.03 and budget["met"]
    assert abs(budget["achieved"] - budget["modelled_fraction"]) <= 0.01
