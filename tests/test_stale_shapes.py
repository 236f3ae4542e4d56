"""Declared intermediate shapes that the graph contradicts (stale ``value_info``) are dropped."""

from __future__ import annotations

import onnx
import pytest

import graphprune
from graphprune.cli import main
from graphprune.examples import example_cnn
from graphprune.io.stale_shapes import drop_stale


def with_declared(model: onnx.ModelProto, changes: dict[str, int | str]) -> onnx.ModelProto:
    """``model`` declaring its inferred intermediate shapes, with axis 1 of the named
    tensors changed (a number: contradicts; a symbol: does not)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in inferred.graph.value_info:
        change = changes.get(value.name)
        if isinstance(change, int):
            value.type.tensor_type.shape.dim[1].dim_value += change
        elif isinstance(change, str):
            value.type.tensor_type.shape.dim[1].dim_param = change
    return inferred


def test_a_stale_declaration_no_longer_freezes_the_model(capsys, tmp_path):
    """A file whose ``value_info`` says 35 channels where the Conv computes 32 (ONNX Runtime
    runs it, merging leniently): shape inference stopped at the contradiction, every group
    after it froze ("coupled with an axis of unknown rank"), and nothing was pruned."""
    stale = with_declared(example_cnn(), {"stem1_out": 3, "head20_out": 3})
    for kwargs in ({"ratio": 0.5}, {"ratio": 0.5, "calibration": "random:8"}):
        clean = graphprune.prune(example_cnn(), **kwargs)
        result = graphprune.prune(stale, **kwargs)
        assert result.report["verification"]["ok"]
        assert result.report["normalised"]["stale_shapes_dropped"] == ["stem1_out", "head20_out"]
        assert result.report["groups"]["pruned"] == clean.report["groups"]["pruned"] > 0
        assert result.report["macs_after"] == clean.report["macs_after"]
        onnx.checker.check_model(result.model, full_check=True)
    path = tmp_path / "stale.onnx"
    onnx.save(stale, path)
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5"]) == 0
    assert "stale value_info): stem1_out, head20_out" in capsys.readouterr().out


@pytest.mark.parametrize(("changes", "dropped"), [
    ({"conv2_out": "c"}, []),  # a symbol for a number: no contradiction
    ({"conv2_out": 1, "fc_out": 0}, ["conv2_out"]),
])
def test_only_contradictions_are_dropped(changes, dropped):
    model = with_declared(example_cnn(), changes)
    count = len(model.graph.value_info)
    assert drop_stale(model) == dropped
    assert len(model.graph.value_info) == count - len(dropped)


def test_float_declarations_of_float16_weights_in_a_graph_out_of_order_are_dropped(tmp_path):
    """fracast through a float16 converter (``keep_io_types``): the weights became float16, their
    ``value_info`` still said float, and the input's Cast came last. ONNX Runtime runs it; the
    stale check inferred the unsorted graph (nothing), and the load failed with the checker's
    complaint about graphprune's own weight stubs ("should be stored in _gp_source.onnx")."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal(s).astype(np.float16) for s in ((8, 16), (16, 4)))
    nodes = [helper.make_node("MatMul", ["xh", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["yh"]), helper.make_node("Cast", ["yh"], ["y"], to=1),
             helper.make_node("Cast", ["x"], ["xh"], to=10)]  # the input's Cast last
    graph = helper.make_graph(
        nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
        value_info=[helper.make_tensor_value_info("W1", TensorProto.FLOAT, [8, 16]),
                    helper.make_tensor_value_info("W2", TensorProto.FLOAT, [16, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert sorted(drop_stale(onnx.ModelProto.FromString(model.SerializeToString()))) == ["W1", "W2"]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 1
    assert sorted(result.report["normalised"]["stale_shapes_dropped"]) == ["W1", "W2"]
    onnx.checker.check_model(result.model, full_check=True)
