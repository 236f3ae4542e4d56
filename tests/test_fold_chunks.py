"""Weights computed in the graph are folded in chunks (``graphprune/io/folding.py``).

GPT-SoVITS's 307 MB decoder reads 73 weights through ``Transpose`` nodes, its VITS vocoder 87
weight-normalised ones (``W / ReduceL2(W)``). onnx-graphsurgeon folds every such node in one
ONNX Runtime session, which holds the foldable part of the model several times over (the
exported model, its bytes, the session's copy, the results): the preparation peaked at 5x the
decoder's size. Where the large constants that foldable nodes read exceed
``FOLD_CHUNK_BYTES``, rounds that each see one chunk of them fold first. The same nodes fold
to the same values, and the constants one node needs (a weight and its own norm) stay in one
chunk.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import make_model
from onnx import helper

from graphprune.io import folding
from graphprune.pipeline.session import Session


def _computed_weights() -> onnx.ModelProto:
    """Three layers reading their weight through a Transpose, one weight-normalised
    (``g * W / ReduceL2(W)``, its axes a ``Constant`` node), 16 x 16 floats (1 KiB) each."""
    rng = np.random.default_rng(0)
    nodes, params, x = [], {}, "x"
    for k in range(3):
        params[f"w{k}"] = rng.standard_normal((16, 16)).astype(np.float32)
        nodes += [helper.make_node("Transpose", [f"w{k}"], [f"wt{k}"], perm=[1, 0]),
                  helper.make_node("MatMul", [x, f"wt{k}"], [f"h{k}"]), helper.make_node("Relu", [f"h{k}"], [f"r{k}"])]
        x = f"r{k}"
    params.update({"v": rng.standard_normal((16, 16)).astype(np.float32),
                   "g": rng.uniform(0.5, 1.5, (1, 16)).astype(np.float32)})
    # (a Constant node, as exporters write them: the preparation folds the model's constants)
    nodes += [helper.make_node("Constant", [], ["axes"], value=onnx.numpy_helper.from_array(np.array([0], np.int64))),
              helper.make_node("ReduceL2", ["v", "axes"], ["norm"], keepdims=1),
              helper.make_node("Div", ["v", "norm"], ["unit"]), helper.make_node("Mul", ["unit", "g"], ["wn"]),
              helper.make_node("MatMul", [x, "wn"], ["y"])]
    return make_model(nodes, {"x": [2, 16]}, {"y": None}, params, opset=18)


def _prepared(monkeypatch: pytest.MonkeyPatch, chunk: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray], int]:
    monkeypatch.setattr(folding, "_LARGE_BYTES", 1024)
    monkeypatch.setattr(folding, "FOLD_CHUNK_BYTES", chunk)
    rounds = []
    original = folding._fold_once
    monkeypatch.setattr(folding, "_fold_once", lambda graph, **o: rounds.append(1) or original(graph, **o))
    session = Session(_computed_weights())
    graph = session.import_graph()
    values = {t.name: np.asarray(t.values) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    return session.prepared, values, len(rounds)


def test_weights_computed_in_the_graph_fold_in_chunks_to_the_same_values(monkeypatch) -> None:
    whole, whole_values, whole_rounds = _prepared(monkeypatch, 1 << 30)
    chunked, chunked_values, chunked_rounds = _prepared(monkeypatch, 1500)
    # one weight per chunk (v and its norm together) and the round for the rest; the same
    # number of folds happen in each preparation's two passes
    assert chunked_rounds > whole_rounds
    assert [n.op_type for n in chunked.graph.node] == [n.op_type for n in whole.graph.node]
    assert not {"Transpose", "ReduceL2", "Div"} & {n.op_type for n in chunked.graph.node}
    assert chunked_values.keys() == whole_values.keys()
    for name, value in whole_values.items():
        assert np.array_equal(value, chunked_values[name]), name


def test_the_constants_one_node_reads_are_one_chunk(monkeypatch) -> None:
    monkeypatch.setattr(folding, "_LARGE_BYTES", 1024)
    monkeypatch.setattr(folding, "FOLD_CHUNK_BYTES", 1500)
    graph = gs.import_onnx(_computed_weights())
    chunks = [sorted(t.name for t in chunk) for chunk in folding._weight_chunks(graph)]
    assert sorted(chunks) == [["v"], ["w0"], ["w1"], ["w2"]]
    # a node reading two large constants (through a computed one) keeps them together
    a, b = (gs.Constant(n, np.ones((16, 16), np.float32)) for n in ("a", "b"))
    s, t = gs.Variable("s", np.float32, (16, 16)), gs.Variable("t", np.float32, (16, 16))
    two = gs.Graph(nodes=[gs.Node("Neg", inputs=[a], outputs=[s]), gs.Node("Add", inputs=[s, b], outputs=[t])],
                   outputs=[t], opset=18)
    assert [sorted(c.name for c in chunk) for chunk in folding._weight_chunks(two)] == [["a", "b"]]
