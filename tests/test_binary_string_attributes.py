"""A STRING attribute that holds binary bytes (the serialized SentencePiece model of a
tokenizer op: the multilingual Universal Sentence Encoder's ``SentencepieceTokenizer``) ended
every command with "internal error: UnicodeDecodeError": graphsurgeon decodes string
attributes as UTF-8. They are read and written back as the bytes they are."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import gs_export

BLOB = bytes([0xBA, 0x00, 0xFF, 0x10]) + b"spm"


def with_binary_strings() -> onnx.ModelProto:
    """An MLP beside a string constant whose elements are not UTF-8 (its length an output)."""
    rng = np.random.default_rng(0)
    table = helper.make_node("Constant", [], ["table"])
    table.attribute.append(helper.make_attribute("value_strings", [BLOB, b"ok", BLOB[::-1]]))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]), table, helper.make_node("Shape", ["table"], ["count"])]
    graph = helper.make_graph(
        nodes, "binary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("count", TensorProto.INT64, [1])],
        [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _strings(model: onnx.ModelProto) -> list[bytes]:
    return [s for n in model.graph.node for a in n.attribute if a.name == "value_strings" for s in a.strings]


def test_binary_attributes_are_read_and_written_as_bytes():
    model = with_binary_strings()
    graph = gs_export.import_onnx(model)
    assert _strings(model) == [BLOB, b"ok", BLOB[::-1]]  # (the model is left as it was)
    assert _strings(gs_export.export_onnx(graph)) == [BLOB, b"ok", BLOB[::-1]]


def test_a_model_with_them_prunes(tmp_path):
    from graphprune.cli import main

    model = with_binary_strings()
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["analyze", str(tmp_path / "m.onnx")]) == 0
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    assert next(t for t in result.model.graph.initializer if t.name == "w1").dims[1] == 8
    outputs = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((2, 8), np.float32)})
    assert outputs[1].tolist() == [3]
