"""A model the tool writes carries only shapes ONNX inference gives, never the analysis's.

The analysis refines shapes with two probe sizes (``shape_probe.refine_shapes``): an axis
with the same size at batch 2 and 3 is taken as static. That is right for the analysis
and wrong as a declaration: ``s[:2]`` has 2 rows at batch 2 and 3, and 1 at batch 1. A
prune that rewrote nothing (lossless, no dead channel) used to export those refined
shapes as ``value_info``: here, speech-quality model AECMOS (PyTorch 1.9), whose output is
declared with the wrong rank, the pruned model then failed ONNX shape inference.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ints, make_model, run_ort
from onnx import helper

import graphprune


def batch_slices_model() -> onnx.ModelProto:
    """``x [N, 1, 6] -> MatMul -> Squeeze`` (no axes: rank unknown to ONNX inference) ``->
    Sigmoid -> s``, output ``Concat(2 * s[:2], s[2:])`` declared ``[N]`` (as AECMOS does)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["p"], name="proj"),
        helper.make_node("Squeeze", ["p"], ["q"]),
        helper.make_node("Sigmoid", ["q"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "two", "zero"], ["head"]),
        helper.make_node("Mul", ["head", "scale"], ["scaled"]),
        helper.make_node("Slice", ["s", "two", "end", "zero"], ["tail"]),
        helper.make_node("Concat", ["scaled", "tail"], ["out"], axis=0),
    ]
    params = {"W": (6, 4), "zero": ints(0), "two": ints(2), "end": ints(2**62),
              "scale": np.array(2.0, dtype=np.float32)}
    return make_model(nodes, {"x": ("N", 1, 6)}, {"out": ("N",)}, params, opset=13)


@pytest.mark.parametrize("kwargs", [{"lossless": True}, {"ratio": 0.5}])
def test_the_written_model_declares_no_probe_shape(kwargs: dict) -> None:
    m = batch_slices_model()
    result = graphprune.prune(m, **kwargs)
    assert result.report["verification"]["ok"] is True
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)  # before: "differ in rank: (2) vs (1)"
    bare = onnx.ModelProto()
    bare.CopyFrom(pruned)
    del bare.graph.value_info[:]
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(bare).graph.value_info}
    for value in pruned.graph.value_info:
        assert value == inferred.get(value.name), f"'{value.name}' declared beyond inference"
    for batch in (1, 3):  # the written model runs at any batch, like the original
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 1, 6)).astype(np.float32)}
        np.testing.assert_allclose(run_ort(pruned, feeds)[0], run_ort(m, feeds)[0], rtol=1e-6)
