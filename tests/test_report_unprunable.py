"""A group that is neither frozen nor prunable is still reported.

A group whose channels no weight creates (here the classes of a one-hot encoding, read by a
MatMul: its weight only *consumes* them) cannot be pruned, and nothing froze it. It used to
appear in no section of the report; the MoE experts of a dynamo export were such groups until
their lookup was understood (``tests/test_rule_moe_experts.py``).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune


def one_hot_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Unsqueeze", ["ids", "last"], ["col"]),
             helper.make_node("Equal", ["col", "classes"], ["hit"]),
             helper.make_node("Cast", ["hit"], ["onehot"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["onehot", "W"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["out"])]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.arange(6, dtype=np.int64), "classes"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    graph = helper.make_graph(nodes, "onehot", [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_report_lists_a_group_no_weight_creates(tmp_path) -> None:
    result = graphprune.prune(one_hot_model(), ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["groups"]["pruned"] == 1  # the hidden layer's 8 units
    listed = result.report["unprunable"]
    assert [(g["anchor"], g["size"]) for g in listed] == [("W:0", 6)]
    assert listed[0]["reason"] == "no weight creates these channels"
    path = tmp_path / "onehot.onnx"
    onnx.save(one_hot_model(), str(path))
    out = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(tmp_path / "p.onnx"),
                          "--ratio", "0.5"], capture_output=True, text=True, check=True).stdout
    assert "1 more group(s) neither frozen nor prunable: no weight creates their channels" in out
    analyze = subprocess.run([sys.executable, "-m", "graphprune", "analyze", str(path), "--no-legend"],
                             capture_output=True, text=True, check=True).stdout
    row = next(line for line in analyze.splitlines() if line.split()[1:2] == ["W:0"])
    assert "fixed" in row and "no weight creates these channels" in row
