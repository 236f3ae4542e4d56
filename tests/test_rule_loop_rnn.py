"""``Loop`` bodies that compute a recurrent cell, lowered to ONNX's RNN/GRU/LSTM
(:mod:`graphprune.rules.loop_rnn`), and ``ReverseSequence`` (:mod:`graphprune.rules.sampling`).

The graphs here are built by hand: a cell written step by step as a ``Loop`` the way an
exporter unrolls nothing (``Gather`` the step, two ``MatMul``, the activation), between
linear layers. Real Keras 3 layers converted by tf2onnx are in ``tests/test_keras_recurrent.py``.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import group_with
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import ir

OPS_UNDER_TEST = ["Loop", "ReverseSequence"]

T, B, IN, H = 5, 2, 6, 8


def _cell_body(act: str, masked: str | None, carried: bool = False) -> onnx.GraphProto:
    """h' = act(x_t @ Wx + h @ Wh + b), scanned; ``masked``: ``"where"``: h' = where(x_t[0] > 0, h', h);
    ``"threshold"``: h' = h' * (x_t[0] < 1e6), a comparison of data that random inputs never trip.
    ``carried`` (as jax2onnx writes a scan): the sequence and the kernel are loop-carried values
    passed on by an Identity, and the kernel is read by a Gemm whose ``C`` is ignored (beta 0)."""
    n = helper.make_node
    nodes = [
        n("Gather", ["xs" if carried else "x", "i"], ["x_t"], axis=0),
        n("Gemm", ["x_t", "wx", "zero_c"], ["xw"], beta=0.0) if carried else n("MatMul", ["x_t", "Wx"], ["xw"]),
        n("MatMul", ["h", "Wh"], ["hw"]),
        n("Add", ["xw", "hw"], ["s"]),
        n("Add", ["s", "b"], ["z"]),
        n(act, ["z"], ["h_next" if not masked else "h_cell"]),
        n("Identity", ["cond"], ["cond_out"]),
    ]
    if masked == "where":  # a step whose first feature is not positive keeps the previous state
        nodes += [n("Slice", ["x_t", "s0", "s1", "s2"], ["x0"]),
                  n("Greater", ["x0", "zero"], ["keep"]),
                  n("Where", ["keep", "h_cell", "h"], ["h_next"])]
    elif masked == "threshold":  # zero the state where the first feature is huge: no random input is
        nodes += [n("Slice", ["x_t", "s0", "s1", "s2"], ["x0"]),
                  n("Less", ["x0", "zero"], ["small"]),
                  n("Cast", ["small"], ["small_f"], to=TensorProto.FLOAT),
                  n("Mul", ["h_cell", "small_f"], ["h_next"])]
    nodes.append(n("Identity", ["h_next"], ["h_scan"]))
    f = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array(1e6 if masked == "threshold" else 0.0, np.float32), "zero")] \
        if masked else []
    passed, passed_out = [], []
    if carried:
        nodes += [n("Identity", ["xs"], ["xs_out"]), n("Identity", ["wx"], ["wx_out"])]
        inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero_c"))
        passed = [helper.make_tensor_value_info("xs", f, [T, B, IN]), helper.make_tensor_value_info("wx", f, [IN, H])]
        passed_out = [helper.make_tensor_value_info("xs_out", f, [T, B, IN]),
                      helper.make_tensor_value_info("wx_out", f, [IN, H])]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("s0", [0]), ("s1", [1]), ("s2", [1]))] \
        if masked else []
    return helper.make_graph(
        nodes, "cell",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h", f, [B, H]), *passed],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_next", f, [B, H]), *passed_out,
         helper.make_tensor_value_info("h_scan", f, [B, H])],
        inits)


def _model(act: str = "Tanh", masked: str | None = None, carried: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x [B, T, IN] -> MatMul W_in -> time-major -> Loop(cell) -> ReverseSequence -> mean (+ last state)
    -> MatMul W_out."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    nodes = [
        n("MatMul", ["inp", "W_in"], ["proj"]),
        n("Transpose", ["proj"], ["x"], perm=[1, 0, 2]),
        helper.make_node("Loop", ["trips", "true", "h0", *(["x", "Wx"] if carried else [])],
                         ["h_last", *(["x_last", "wx_last"] if carried else []), "hs"],
                         body=_cell_body(act, masked, carried)),
        helper.make_node("ReverseSequence", ["hs", "lens"], ["hs_rev"], batch_axis=1, time_axis=0),
        n("ReduceMean", ["hs_rev"], ["pooled"], axes=[0], keepdims=0),
        n("Add", ["pooled", "h_last"], ["both"]),
        n("MatMul", ["both", "W_out"], ["y"]),
    ]
    weights = {
        "W_in": rng.standard_normal((IN, IN)).astype(np.float32) * 0.5,
        "Wx": rng.standard_normal((IN, H)).astype(np.float32) * 0.4,
        "Wh": rng.standard_normal((H, H)).astype(np.float32) * 0.3,
        "b": rng.standard_normal(H).astype(np.float32) * 0.1,
        "h0": np.zeros((B, H), np.float32),
        "W_out": rng.standard_normal((H, 3)).astype(np.float32),
        "trips": np.array(T, np.int64), "true": np.array(True), "lens": np.full(B, T, np.int64),
    }
    graph = helper.make_graph(
        nodes, "loop_rnn", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [B, T, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, 3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"inp": x})[0]


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize(("act", "carried"), [("Tanh", False), ("Relu", False), ("Tanh", True)])
def test_a_loop_computing_a_recurrent_cell_becomes_the_standard_op(act, carried):
    model = _model(act, carried=carried)
    notes: dict = {}
    lowered = ir.prepare(model, notes=notes)
    assert notes["lowered_ops"] == {"Loop": 1}
    assert _ops(lowered)["RNN"] == 1 and "Loop" not in _ops(lowered)
    rnn = next(n for n in lowered.graph.node if n.op_type == "RNN")
    assert [a.decode() for a in helper.get_attribute_value(next(a for a in rnn.attribute if a.name == "activations"))] == [act]
    x = np.random.default_rng(1).standard_normal((B, T, IN)).astype(np.float32)
    np.testing.assert_allclose(_run(lowered, x), _run(model, x), rtol=1e-5, atol=1e-6)


def test_the_lowered_cell_prunes_through_reverse_sequence_and_verifies():
    model = _model()
    result = graphprune.prune(model, ratio=0.5)
    report = result.report
    assert report["verification"]["ok"] and report["normalised"]["lowered_ops"] == {"Loop": 1}
    assert "LSTM/GRU/RNN" in report["normalised"]["lowered_as"]["Loop"]  # what the CLI prints
    rnn = next(n for n in result.model.graph.node if n.op_type == "RNN")
    assert next(a.i for a in rnn.attribute if a.name == "hidden_size") == H // 2
    # the hidden units crossed ReverseSequence to W_out's rows
    w_out = next(t for t in result.model.graph.initializer if t.name == "W_out")
    assert list(w_out.dims) == [H // 2, 3]
    assert not report["unsupported_ops"]
    onnx.checker.check_model(result.model, full_check=True)


def test_reverse_sequence_couples_the_channels_and_freezes_time_and_batch():
    analysis = graphprune.analyze(_model())
    rev = next(n for n in analysis.graph.nodes if n.op == "ReverseSequence")
    spatial = analysis.context.spatial_dims
    for t in (rev.inputs[0], rev.outputs[0]):
        assert (t.name, 0) in spatial and (t.name, 1) in spatial and (t.name, 2) not in spatial
    group = group_with(analysis, "W_out", 0)  # the hidden units, through ReverseSequence
    assert group.prunable and (rev.outputs[0].name, 2) in group.dims


@pytest.mark.parametrize("masked", ["where", "threshold"])
def test_a_masked_cell_stays_a_loop_and_its_groups_freeze(masked):
    model = _model(masked=masked)
    notes: dict = {}
    lowered = ir.prepare(model, notes=notes)
    assert "lowered_ops" not in notes and _ops(lowered)["Loop"] == 1
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["unsupported_ops"] == {"Loop": 1}
    why = {"where": "its body has Where", "threshold": "a comparison of data"}[masked]
    reasons = [r for found in graphprune.analyze(model).context.tensor_freeze.values() for r in found]
    assert any(f"(not a recurrent cell: {why}" in r for r in reasons), reasons


def test_a_wrong_trip_count_is_caught_by_the_check():
    # the Loop runs one step fewer than the sequence has: the scan is shorter than the op's
    model = _model()
    trips = next(t for t in model.graph.initializer if t.name == "trips")
    trips.CopyFrom(numpy_helper.from_array(np.array(T - 1, np.int64), "trips"))
    notes: dict = {}
    lowered = ir.prepare(model, notes=notes)
    assert "lowered_ops" not in notes and _ops(lowered)["Loop"] == 1


def test_analyze_and_prune_say_the_loop_was_lowered(tmp_path, capsys):
    from graphprune.cli import main

    path = tmp_path / "loop_rnn.onnx"
    onnx.save(_model(), path)
    analysis = graphprune.analyze(str(path))
    assert analysis.normalised["lowered_ops"] == {"Loop": 1}
    assert main(["analyze", str(path), "--no-legend"]) == 0
    line = "recurrent layers the exporter wrote as Loops, written as ONNX's LSTM/GRU/RNN: Loop x1"
    assert line in capsys.readouterr().out
    assert main(["prune", str(path), "-o", str(tmp_path / "pruned.onnx")]) == 0
    assert line in capsys.readouterr().out


def _lstm_model() -> onnx.ModelProto:
    """A Keras-style LSTM step (gates i, f, c, o of one product) as a Loop whose initial h and
    c are one tensor (a state graph input read twice)."""
    rng = np.random.default_rng(4)
    n, f = helper.make_node, TensorProto.FLOAT
    body = helper.make_graph(
        [n("Gather", ["x", "i"], ["x_t"], axis=0), n("MatMul", ["x_t", "Wx"], ["xw"]),
         n("MatMul", ["h", "Wh"], ["hw"]), n("Add", ["xw", "hw"], ["s"]), n("Add", ["s", "b"], ["z"]),
         n("Split", ["z"], ["zi", "zf", "zc", "zo"], axis=-1),
         n("Sigmoid", ["zi"], ["gi"]), n("Sigmoid", ["zf"], ["gf"]), n("Tanh", ["zc"], ["gc"]),
         n("Sigmoid", ["zo"], ["go"]), n("Mul", ["gf", "c"], ["fc"]), n("Mul", ["gi", "gc"], ["ic"]),
         n("Add", ["fc", "ic"], ["c_next"]), n("Tanh", ["c_next"], ["tc"]), n("Mul", ["go", "tc"], ["h_next"]),
         n("Identity", ["h_next"], ["h_scan"]), n("Identity", ["cond"], ["cond_out"])],
        "lstm_cell",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h", f, [B, H]), helper.make_tensor_value_info("c", f, [B, H])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_next", f, [B, H]), helper.make_tensor_value_info("c_next", f, [B, H]),
         helper.make_tensor_value_info("h_scan", f, [B, H])])
    weights = {
        "W_in": rng.standard_normal((IN, IN)).astype(np.float32) * 0.5,
        "Wx": rng.standard_normal((IN, 4 * H)).astype(np.float32) * 0.4,
        "Wh": rng.standard_normal((H, 4 * H)).astype(np.float32) * 0.3,
        "b": rng.standard_normal(4 * H).astype(np.float32) * 0.1,
        "W_out": rng.standard_normal((H, 3)).astype(np.float32),
        "trips": np.array(T, np.int64), "true": np.array(True),
    }
    graph = helper.make_graph(
        [n("MatMul", ["inp", "W_in"], ["proj"]), n("Transpose", ["proj"], ["x"], perm=[1, 0, 2]),
         helper.make_node("Loop", ["trips", "true", "state", "state"], ["h_last", "c_last", "hs"], body=body),
         n("ReduceMean", ["hs"], ["pooled"], axes=[0], keepdims=0), n("Add", ["pooled", "c_last"], ["both"]),
         n("MatMul", ["both", "W_out"], ["y"])],
        "loop_lstm",
        [helper.make_tensor_value_info("inp", f, [B, T, IN]), helper.make_tensor_value_info("state", f, [B, H])],
        [helper.make_tensor_value_info("y", f, [B, 3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_an_lstm_whose_initial_h_and_c_are_one_tensor_lowers():
    model = _lstm_model()
    notes: dict = {}
    lowered = ir.prepare(model, notes=notes)
    assert notes["lowered_ops"] == {"Loop": 1} and _ops(lowered)["LSTM"] == 1
    rng = np.random.default_rng(5)
    feeds = {"inp": rng.standard_normal((B, T, IN)).astype(np.float32),
             "state": rng.standard_normal((B, H)).astype(np.float32)}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    np.testing.assert_allclose(run(lowered), run(model), rtol=1e-5, atol=1e-6)
