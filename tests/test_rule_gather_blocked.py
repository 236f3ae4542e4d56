"""com.microsoft ``GatherBlockQuantized``: an int4 embedding (``MatMulNBitsQuantizer`` with
``Gather`` among the ops to quantize) prunes its features a block at a time, as its float twin
prunes them one by one; its table stays int4. Before, the embedding width was frozen ("no rule
for GatherBlockQuantized"): an int4 DistilBERT with ``--prune-hidden`` kept its hidden size."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune

OPS_UNDER_TEST = ("com.microsoft::GatherBlockQuantized",)


def _embedding_mlp(tmp_path, symmetric: bool = True) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"], axis=0), helper.make_node("MatMul", ["e", "w1"], ["a"]),
         helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])],
        [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
         for name, shape in (("table", (100, 64)), ("w1", (64, 16)), ("w2", (16, 4)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, quant_format=QuantFormat.QOperator,
                                          op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    path = tmp_path / "gbq.onnx"
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    return model, onnx.load(path)


def test_an_int4_embedding_prunes_its_features_in_blocks(tmp_path) -> None:
    float_model, model = _embedding_mlp(tmp_path)
    assert [n.op_type for n in model.graph.node][0] == "GatherBlockQuantized"
    width = next(g for g in graphprune.analyze(model).groups if ("e", 2) in g.dims)
    assert width.prunable and width.num_units == 2  # two blocks of 32 features
    shapes = {"ids": (2, 5)}
    result = graphprune.prune(model, ratio=0.5, input_shapes=shapes)
    twin = graphprune.prune(float_model, ratio=0.5, input_shapes=shapes)
    assert result.report["verification"]["ok"]
    ratio = result.report["params_after"] / result.report["params_before"]
    assert ratio < 0.5 and abs(ratio - twin.report["params_after"] / twin.report["params_before"]) < 0.02
    inits = {i.name: i for i in result.model.graph.initializer}
    table = inits[result.model.graph.node[0].input[0]]
    assert list(table.dims) == [100, 32] and table.data_type == TensorProto.INT4
    assert list(inits[result.model.graph.node[0].input[2]].dims) == [100, 1]
    onnx.checker.check_model(result.model, full_check=True)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"ids": np.array([[1, 2, 3, 4, 99]], np.int64)})[0].shape == (1, 5, 4)


def test_a_packed_table_with_zero_points_stays_frozen_with_the_reason() -> None:
    """A uint8 table (two int4 fields a byte) with zero points reads as 0 only at its zero
    point: its features stay frozen, and the reason says so."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (100, 32), dtype=np.uint8), "table"),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, (100, 2)).astype(np.float32), "scales"),
             numpy_helper.from_array(np.full((100, 1), 0x88, np.uint8), "zeros"),
             numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w1")]
    graph = helper.make_graph(
        [helper.make_node("GatherBlockQuantized", ["table", "ids", "scales", "zeros"], ["e"], domain="com.microsoft",
                          block_size=32, gather_axis=0, quantize_axis=1, bits=4),
         helper.make_node("MatMul", ["e", "w1"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    width = next(g for g in graphprune.analyze(model).groups if ("w1", 0) in g.dims)
    assert not width.prunable and any("a packed one reads as 0 only at its zero point" in why for why in width.frozen), width.frozen


def test_an_asymmetric_uint4_table_prunes_with_its_zero_points(tmp_path) -> None:
    """``MatMulNBitsQuantizer``'s default (asymmetric): a uint4 table with a uint4 zero point per
    row and block. A removed block takes its scales and zero points with it; the zeroed
    original fills it with its zero points (what reads as 0). Before, the width was frozen."""
    float_model, model = _embedding_mlp(tmp_path, symmetric=False)
    inits = {i.name: i for i in model.graph.initializer}
    gbq = model.graph.node[0]
    assert gbq.op_type == "GatherBlockQuantized" and len(gbq.input) == 4
    assert inits[gbq.input[0]].data_type == TensorProto.UINT4 and list(inits[gbq.input[3]].dims) == [100, 2]
    shapes = {"ids": (2, 5)}
    result = graphprune.prune(model, ratio=0.5, input_shapes=shapes)
    twin = graphprune.prune(float_model, ratio=0.5, input_shapes=shapes)
    assert result.report["verification"]["ok"]
    ratio = result.report["params_after"] / result.report["params_before"]
    assert abs(ratio - twin.report["params_after"] / twin.report["params_before"]) < 0.02
    written = {i.name: i for i in result.model.graph.initializer}
    node = result.model.graph.node[0]
    assert list(written[node.input[0]].dims) == [100, 32] and written[node.input[0]].data_type == TensorProto.UINT4
    assert list(written[node.input[2]].dims) == [100, 1] and list(written[node.input[3]].dims) == [100, 1]
    # the kept block is the original's, stored integers, scales and zero points alike
    kept = [b for b in range(2) if np.array_equal(numpy_helper.to_array(written[node.input[0]]),
                                                  numpy_helper.to_array(inits[gbq.input[0]])[:, 32 * b:32 * b + 32])]
    assert len(kept) == 1
    assert np.array_equal(numpy_helper.to_array(written[node.input[3]])[:, 0],
                          numpy_helper.to_array(inits[gbq.input[3]])[:, kept[0]])
    onnx.checker.check_model(result.model, full_check=True)
    ids = np.array([[1, 2, 3, 4, 99]], np.int64)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"ids": ids})[0].shape == (1, 5, 4)
