"""Layers behind a tensor of unknown rank (a Reshape to a target of data-dependent length: the
multilingual Universal Sentence Encoder's tf.ragged front-end) formed no channel group, and
nothing said so: ``analyze`` listed 18 groups and no line about its 16 ``MatMulInteger``
layers, ``prune`` counted 0 MACs, and ``--target-macs`` blamed "no multiply-accumulates
counted". They are now named, by op type with counts, wherever the model's groups are."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune


def behind_an_open_rank() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Reshape", ["x", "newshape"], ["xr"]), helper.make_node("MatMul", ["xr", "W1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "open_rank", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                             helper.make_tensor_value_info("newshape", TensorProto.INT64, ["K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_layers_are_named_in_the_analysis_and_its_command(tmp_path, capsys):
    from graphprune.cli import main

    model = behind_an_open_rank()
    assert graphprune.analyze(model).summary()["unranked_layers"] == {"MatMul": 2}
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["analyze", str(tmp_path / "m.onnx"), "--no-legend"]) == 0
    assert "the rank of their input unknown (give --input-shape, or shapes in the file): MatMul (x2)" \
        in capsys.readouterr().out


def test_a_macs_target_says_why_nothing_is_reduced(tmp_path, capsys):
    """The layers behind the open rank are counted (their sizes from a run at the sizes given:
    6 x 8 x 16 + 6 x 16 x 4; until round 66 they counted nothing and the target was refused as
    having no MACs), and the target is missed with the reason: no group holds them."""
    from graphprune.cli import main

    onnx.save(behind_an_open_rank(), tmp_path / "m.onnx")
    code = main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--target-macs", "0.5",
                 "--input-shape", "x=6,8", "--input-shape", "newshape=2", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["macs_before"] == 6 * 8 * 16 + 6 * 16 * 4 == report["macs_after"]
    assert report["budget"]["met"] is False
    assert "layers left out, the rank of their input unknown: MatMul (x2)" in out
    assert "still computes another function" not in out  # (nothing was removed)
