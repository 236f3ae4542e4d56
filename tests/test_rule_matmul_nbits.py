"""com.microsoft ``MatMulNBits`` (graphprune/rules/integer_matmul.py), as ONNX Runtime's own
4-bit quantizer (``MatMulNBitsQuantizer``) writes it for an MLP's MatMuls: the channel groups
through it are mapped and reported frozen with the reason, not lost from the report."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("com.microsoft::MatMulNBits",)


def float_mlp(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x [4, 64] -> MatMul W1 [64, 128] -> Relu -> MatMul W2 [128, 64] (float weights, for ONNX
    Runtime's 4-bit quantizer: tests/test_quantize_int4.py uses it too)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((128, 64)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _nbits_mlp() -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(float_mlp(), block_size=32)
    quantizer.process()
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits"]
    return model


def test_groups_through_matmulnbits_are_reported_frozen_with_the_reason() -> None:
    analysis = graphprune.analyze(_nbits_mlp())
    hidden = [g for g in analysis.groups if g.num_units == 128]
    assert len(hidden) == 1 and hidden[0].frozen
    assert any("quantized in blocks of 32 at MatMulNBits" in r for r in hidden[0].frozen), hidden[0].frozen
    result = graphprune.prune(_nbits_mlp(), ratio=0.5)
    assert result.report["groups"]["frozen"] == 2 and result.report["groups"]["pruned"] == 0
    assert result.report["verification"]["ok"]


def test_rows_of_a_hand_built_matmulnbits_feeding_a_float_layer_are_frozen() -> None:
    """``MatMulNBits`` rows (its output channels) read by a float MatMul: the group is the
    packed weight's rows and the float weight's inputs, frozen (its scales are flattened
    across rows and blocks); the model prunes nothing and stays valid."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (32, 2, 16)).astype(np.uint8), "B"),
             numpy_helper.from_array((rng.random(64) * 0.01).astype(np.float32), "scales"),
             numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "scales"], ["h"], domain="com.microsoft",
                              K=64, N=32, bits=4, block_size=32),
             helper.make_node("Relu", ["h"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["y"])]
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    analysis = graphprune.analyze(model)
    rows = [g for g in analysis.groups if g.num_units == 32]
    assert len(rows) == 1 and any("scales flattened across rows and blocks" in r for r in rows[0].frozen)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 0 and result.report["verification"]["ok"]
