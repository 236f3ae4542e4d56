"""A weight read as it is and through a transformation that folds: no second copy.

The dynamo exporter ties a word embedding to the output decoder as one table that a
``Gather`` (the lookup) and a ``Transpose`` -> ``MatMul`` (the decoder) read. Constant
folding in the preparation turned the ``Transpose`` into a second, transposed table beside
the original (which the ``Gather`` still reads), so every prune, even a lossless one, wrote
a model with more parameters than it was given (rxnmapper's ALBERT: 735.57k -> 811.22k).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import ir
from graphprune.verify.metrics import count_params
from tests.conftest import run_ort

VOCAB, HIDDEN, INNER, SEQ = 40, 16, 32, 6


def _tied_model() -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(W_in) + b -> Relu -> MatMul(W_out) -> MatMul(Transpose(E)).
    ``b`` comes from a ``Constant`` node, as exporters write constants (what makes the
    preparation fold)."""
    rng = np.random.default_rng(0)
    weights = {
        "E": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "W_in": rng.standard_normal((HIDDEN, INNER)).astype(np.float32),
        "W_out": rng.standard_normal((INNER, HIDDEN)).astype(np.float32),
    }
    bias = numpy_helper.from_array(rng.standard_normal(INNER).astype(np.float32), "b_value")
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embedding"),
        helper.make_node("MatMul", ["emb", "W_in"], ["h0"], name="fc_in"),
        helper.make_node("Constant", [], ["b"], name="bias_constant", value=bias),
        helper.make_node("Add", ["h0", "b"], ["h1"], name="fc_in_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "W_out"], ["h3"], name="fc_out"),
        helper.make_node("Transpose", ["E"], ["E_t"], name="decoder_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "E_t"], ["logits"], name="decoder"),
    ]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQ, VOCAB])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, (1, SEQ), dtype=np.int64)}


def _float_initializers(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


def test_preparation_keeps_one_tied_table():
    model = _tied_model()
    prepared = ir.prepare(model)
    tables = {name: dims for name, dims in _float_initializers(prepared).items()
              if VOCAB in dims and HIDDEN in dims}
    assert tables == {"E": (VOCAB, HIDDEN)}, tables  # no transposed [HIDDEN, VOCAB] copy
    assert count_params(prepared) <= count_params(model)
    feeds = _feeds()
    np.testing.assert_array_equal(run_ort(prepared, feeds)[0], run_ort(model, feeds)[0])


def test_lossless_prune_does_not_grow_the_model():
    model = _tied_model()
    result = graphprune.prune(model, lossless=True)
    report = result.report
    assert report["params_before"] == count_params(model)
    assert report["params_after"] <= report["params_before"], report["params_after"]
    assert count_params(result.model) <= count_params(model)
    onnx.checker.check_model(result.model, full_check=True)
    for seed in range(2):
        feeds = _feeds(seed)
        np.testing.assert_allclose(run_ort(result.model, feeds)[0], run_ort(model, feeds)[0],
                                   rtol=1e-5, atol=1e-5)


def test_ratio_prune_cuts_the_tied_table_once_and_consistently():
    model = _tied_model()
    result = graphprune.prune(model, ratio=0.5)
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert result.report["params_after"] <= result.report["params_before"]
    assert count_params(pruned) <= count_params(model)
    feeds = _feeds()
    logits = run_ort(pruned, feeds)[0]
    assert logits.shape == (1, SEQ, VOCAB) and np.all(np.isfinite(logits))
    # one table, read by the lookup and (transposed) by the decoder; its hidden axis, shared
    # by both readers, pruned (or kept) as one
    tables = [(name, dims) for name, dims in _float_initializers(pruned).items() if VOCAB in dims]
    assert len(tables) == 1, tables
    name, dims = tables[0]
    readers = {n.op_type for n in pruned.graph.node if name in n.input}
    assert readers == {"Gather", "Transpose"}, readers
    assert dims[0] == VOCAB and dims[1] <= HIDDEN
    w_out = {t.name: tuple(t.dims) for t in pruned.graph.initializer}["W_out"]
    assert w_out[1] == dims[1]  # the decoder's input channels are the table's hidden channels
