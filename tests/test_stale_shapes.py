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
