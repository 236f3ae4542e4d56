"""paddle2onnx declares an open size as -1 (``x: [-1, 3, -1, -1]``) and writes its framework's
intermediate shapes with sizes computed from that -1 (``[-1, 6, 0, 0]`` behind a strided conv).
ONNX inference did the same arithmetic on the -1 input, and ONNX Runtime trusts a declared size:
the final refit of PP-OCR's text-direction classifier runs the pruned model layer by layer at
real sizes and failed to load it ("Incompatible dimensions" at a residual Add), so the model
was written without it. The tool reads a negative size as open; the written model declares
an input's -1 again and leaves an output's open."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io.declared_shapes import open_negative_sizes


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _paddle_like() -> onnx.ModelProto:
    """A strided stem, two 1x1 branches added (a residual), pooling and a linear classifier,
    declared the paddle2onnx way."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    inits = [weight("w0", 16, 3, 3, 3), weight("w1", 24, 16, 1, 1), weight("w2", 16, 24, 1, 1),
             weight("w3", 24, 16, 1, 1), weight("w4", 16, 24, 1, 1), weight("fc", 16, 4),
             numpy_helper.from_array(np.zeros(4, np.float32), "fc_b")]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["stem"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["s"]),
        helper.make_node("Conv", ["s", "w1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["a2"]),
        helper.make_node("Conv", ["a2", "w2"], ["a3"]),
        helper.make_node("Conv", ["s", "w3"], ["b1"]),
        helper.make_node("Relu", ["b1"], ["b2"]),
        helper.make_node("Conv", ["b2", "w4"], ["b3"]),
        helper.make_node("Add", ["a3", "b3"], ["sum"]),
        helper.make_node("GlobalAveragePool", ["sum"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    declared = {"stem": [-1, 16, 0, 0], "s": [-1, 16, 0, 0], "a1": [-1, 24, 0, 0], "a2": [-1, 24, 0, 0],
                "a3": [-1, 16, 0, 0], "b1": [-1, 24, 1, 0], "b2": [-1, 24, 1, 0], "b3": [-1, 16, 1, 0],
                "sum": [-1, 16, 1, 0]}
    graph = helper.make_graph(
        nodes, "paddle_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [-1, 4])], inits,
        value_info=[helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in declared.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle")
    model.ir_version = 6
    return model


def test_negative_sizes_read_as_open():
    model = _paddle_like()
    assert open_negative_sizes(model) == 2 + 9  # the input and the output; nine intermediate shapes
    assert _dims(model.graph.input[0])[0] == "" and _dims(model.graph.input[0])[1] == 3
    assert not model.graph.value_info


def test_the_prepared_model_carries_no_size_computed_from_a_negative_one(tmp_path):
    from graphprune.pipeline.session import Session

    source = tmp_path / "paddle_like.onnx"
    onnx.save(_paddle_like(), source)
    prepared = Session(str(source)).prepared
    shapes = {v.name: _dims(v) for v in prepared.graph.value_info}
    # ONNX inference on x [-1, 3, -1, -1] gave the stem [-1, 16, 0, 0]: (-1 + 2 - 3) / 2 + 1
    assert all(not isinstance(d, int) or d > 0 for dims in shapes.values() for d in dims), shapes


def test_a_calibrated_prune_keeps_its_final_refit_and_the_declared_interface(tmp_path):
    source = tmp_path / "paddle_like.onnx"
    onnx.save(_paddle_like(), source)
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((24, 1, 3, 32, 48)).astype(np.float32)}
    result = graphprune.prune(str(source), ratio=0.3, calibration=data, final_refit="on")
    report = result.report
    assert report["verification"]["ok"]
    final = report["calibration"]["final_refit"]
    assert final["ran"] and final["kept"], final
    out = tmp_path / "pruned.onnx"
    result.save(out)
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert _dims(written.graph.input[0]) == [-1, 3, -1, -1]  # what a caller feeds, as in the file
    assert _dims(written.graph.output[0]) == ["", 4]  # open, as ONNX writes an open size
