"""4-bit weights (opset 21 ``INT4`` through ``DequantizeLinear``, per axis or blocked: what
4-bit QDQ quantizers write for MatMul weights). numpy holds them one element per byte
(ml_dtypes ``int4``); the rewritten model packs them two to a byte again."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune


def _int4_mlp(w1_blocks: int | None, w2_block_axis: int | None) -> onnx.ModelProto:
    """x [4, 16] -> MatMul(DQ(w1 int4 [16, 32])) -> Relu -> MatMul(DQ(w2 int4 [32, 8])).
    ``None``: per-axis scales (axis 1); else ``block_size`` 8 along axis 0 (w1) or
    ``w2_block_axis`` (w2)."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (16, 32), "w2": (32, 8)}
    inits, nodes = [], []
    for name, axis in (("w1", None if w1_blocks is None else 0), ("w2", w2_block_axis)):
        shape = shapes[name]
        q = rng.integers(-8, 8, shape).astype(np.int8)
        inits.append(helper.make_tensor(name, TensorProto.INT4, shape, q.flatten().tolist()))
        if axis is None:
            scale, attrs = rng.random(shape[1]) * 0.1 + 0.01, {"axis": 1}
        else:
            blocked = list(shape)
            blocked[axis] //= 8
            scale, attrs = rng.random(blocked) * 0.1 + 0.01, {"axis": axis, "block_size": 8}
        inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
        nodes.append(helper.make_node("DequantizeLinear", [name, f"{name}_scale"], [name.upper()], **attrs))
    nodes += [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
              helper.make_node("MatMul", ["a", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "int4_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _int4_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.INT4}


@pytest.mark.parametrize("w2_block_axis", [None, 1])
def test_int4_weights_prune_and_stay_packed(w2_block_axis) -> None:
    """The hidden channels prune through per-axis or blocked-along-the-other-axis int4
    weights; the result passes the full checker with packed INT4 weights, runs, and equals
    the original with those channels zeroed (the tool's own exact check)."""
    model = _int4_mlp(w1_blocks=None if w2_block_axis is None else 8, w2_block_axis=w2_block_axis)
    onnx.checker.check_model(model, full_check=True)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]
    onnx.checker.check_model(result.model, full_check=True)
    weights = _int4_weights(result.model)
    assert set(weights) == {"w1", "w2"}
    assert list(weights["w1"].dims) == [16, 16] and list(weights["w2"].dims) == [16, 8]
    assert len(weights["w1"].raw_data or b"") in (0, 128)  # two elements per byte
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    out = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert out[0].shape == (4, 8) and np.isfinite(out[0]).all()


def test_blocks_along_the_pruned_axis_freeze_it_with_the_reason() -> None:
    """w2's scales run in blocks of 8 hidden channels: removing a channel would re-form the
    blocks, so the hidden group is frozen and says why (not dropped from the report)."""
    analysis = graphprune.analyze(_int4_mlp(w1_blocks=8, w2_block_axis=0))
    hidden = [g for g in analysis.groups if g.num_units == 32]
    assert hidden and all(g.frozen for g in hidden)
    assert any("blocked quantization along axis 0" in r for g in hidden for r in g.frozen), hidden


def test_int4_weights_are_refit_on_their_grid() -> None:
    """With calibration the consumer of the pruned channels is refit in float and stored back
    as int4 (within -8..7), its scale grown where needed."""
    model = _int4_mlp(w1_blocks=None, w2_block_axis=None)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(40)]
    result = graphprune.prune(model, ratio=0.5, calibration=feeds)
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["layers"] == 1 and refit["quantized_layers"] == 1, refit
    w2 = numpy_helper.to_array(_int4_weights(result.model)["w2"]).astype(np.int8)
    assert w2.min() >= -8 and w2.max() <= 7
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < fidelity["without_reconstruction"]["rel_l2"], fidelity
