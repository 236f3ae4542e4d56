"""Calibrated refit of recurrent layers (``graphprune/calibration/recurrent.py``): the input
projection ``W x_t + Wb`` of an LSTM/GRU/RNN whose input lost channels is refit by least
squares towards the original's projection, the recurrence of one that lost hidden units on
the original's states, the linear layers after it are refit on its new outputs, and the
whole step is undone where the model's outputs move away. Real ONNX Runtime
runs of small graphs built here."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.calibration import recurrent
from graphprune.rules import registry
from graphprune.tables import calibration_lines
from graphprune.verify import saturation

S, IN, C, H, OUT = 12, 6, 16, 10, 4


def model(op: str = "LSTM", direction: str = "forward", seed: int = 0) -> onnx.ModelProto:
    """MatMul(6->16) Add Relu -> {op}(16->10) -> Y as [S, 1, D*10] -> MatMul(->4)."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if direction == "bidirectional" else 1
    values = {
        "w_in": rng.standard_normal((IN, C)) * 0.5, "b_in": rng.standard_normal(C) * 0.1,
        "W": rng.standard_normal((dirs, gates * H, C)) * 0.3, "R": rng.standard_normal((dirs, gates * H, H)) * 0.1,
        "B": rng.standard_normal((dirs, 2 * gates * H)) * 0.1, "w_out": rng.standard_normal((dirs * H, OUT)) * 0.5,
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items()]
    inits.append(numpy_helper.from_array(np.array([S, 1, dirs * H], np.int64), "shape"))
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["m"]), helper.make_node("Add", ["m", "b_in"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node(op, ["r", "W", "R", "B"], ["y", ""], hidden_size=H, direction=direction),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w_out"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "rec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [S, 1, IN])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [S, 1, OUT])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def sequences(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.standard_normal((n, S, 1, IN)), axis=1) * 0.4).astype(np.float32)


def outputs(m: onnx.ModelProto, feeds: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.stack([sess.run(None, {"x": x})[0] for x in feeds])


def prune(m: onnx.ModelProto):
    return graphprune.prune(m, ratio=0.5, round_to=1, calibration={"x": sequences(64, 1)})


def weight(m: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)


@pytest.mark.parametrize("op,direction", [("LSTM", "forward"), ("GRU", "forward"), ("RNN", "forward"),
                                          ("LSTM", "bidirectional"), ("GRU", "reverse")])
def test_the_input_projection_and_the_recurrence_of_a_recurrent_layer_are_refit(op, direction, monkeypatch):
    """``W`` on the pruned model's inputs; ``R``, of a layer that lost hidden units, on the
    original's previous states less the removed units (a GRU's third gate, which reads
    ``r * h``, keeps its rows)."""
    m = model(op, direction)
    result = prune(m)
    stats = result.report["calibration"]["passes"]["RefitPass"]["recurrent"]
    assert stats["layers"] == 1 and not stats.get("undone")
    assert stats["input_projections"] == 1 and stats["recurrences"] == 1
    assert any(line.startswith("    recurrent: 1 layer(s) refit (1 input projection(s), 1 recurrence(s) on the "
                               "original's states), kept") for line in calibration_lines(result.report["calibration"]))
    assert stats["rel_error_after"] < stats["rel_error_before"]
    assert stats["recurrence_error_after"] < stats["recurrence_error_before"]
    assert stats["output_error"] < stats["output_error_without"]
    monkeypatch.setattr(recurrent, "find_targets", lambda *a, **k: [])
    plain = prune(m)
    assert "recurrent" not in plain.report["calibration"]["passes"]["RefitPass"]
    for name in ("W", "R"):
        assert weight(result.model, name).shape == weight(plain.model, name).shape
        assert not np.allclose(weight(result.model, name), weight(plain.model, name))
    if op == "GRU":  # linear_before_reset 0: the third gate's rows of R read r * h, not h
        hidden = weight(plain.model, "R").shape[2]
        np.testing.assert_array_equal(weight(result.model, "R")[:, 2 * hidden:], weight(plain.model, "R")[:, 2 * hidden:])
    if (op, direction) in (("GRU", "forward"), ("LSTM", "bidirectional")):  # clear margins on held-out data
        test = sequences(40, 9)
        ref = outputs(m, test)
        err = [np.linalg.norm(outputs(r.model, test) - ref) / np.linalg.norm(ref) for r in (result, plain)]
        assert err[0] < 0.95 * err[1]


def redundant(op: str, hidden: int = 12, rank: int = 3, seed: int = 0) -> onnx.ModelProto:
    """``x -> {op}(6->12) -> MatMul(->4)``: the layer reads the model's input, and its states
    move in a 3-dimensional subspace (every gate's rows of ``W`` and ``R`` in it), as a trained
    layer's units carry much of what others do."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    basis = np.linalg.qr(rng.standard_normal((hidden, rank)))[0]
    values = {
        "W": np.concatenate([basis @ rng.standard_normal((rank, IN)) * 0.6 for _ in range(gates)])[None],
        "R": np.concatenate([basis @ rng.standard_normal((rank, rank)) @ basis.T * 0.9 for _ in range(gates)])[None],
        "B": rng.standard_normal((1, 2 * gates * hidden)) * 0.1, "w_out": rng.standard_normal((hidden, OUT)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items()]
    inits.append(numpy_helper.from_array(np.array([S, 1, hidden], np.int64), "shape"))
    nodes = [helper.make_node(op, ["x", "W", "R", "B"], ["y", ""], hidden_size=hidden),
             helper.make_node("Reshape", ["y", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w_out"], ["out"])]
    graph = helper.make_graph(nodes, "rec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [S, 1, IN])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [S, 1, OUT])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,gain", [("RNN", 0.7), ("LSTM", 0.95)])
def test_the_recurrence_of_a_layer_whose_input_is_unchanged_is_refit(op, gain, monkeypatch):
    """A first recurrent layer reads the model's input: only its hidden units go. Its
    recurrence is refit all the same, on the original's states (before: not a target, the
    layer kept the pruned ``R``; fit on its own states, the outputs had moved away), and the
    held-out outputs come nearer the original's (RNN 0.50 -> 0.26, LSTM 0.22 -> 0.19)."""
    m = redundant(op)
    result = prune(m)
    stats = result.report["calibration"]["passes"]["RefitPass"]["recurrent"]
    assert stats["layers"] == 1 and stats["recurrences"] == 1 and "input_projections" not in stats
    assert not stats.get("undone") and stats["output_error"] < stats["output_error_without"]
    monkeypatch.setattr(recurrent, "find_targets", lambda *a, **k: [])
    plain = prune(m)
    np.testing.assert_array_equal(weight(result.model, "W"), weight(plain.model, "W"))
    test = sequences(40, 9)
    ref = outputs(m, test)
    err = [np.linalg.norm(outputs(r.model, test) - ref) / np.linalg.norm(ref) for r in (result, plain)]
    assert err[0] < gain * err[1], err


@pytest.mark.parametrize("direction,per_channel", [("forward", False), ("bidirectional", True)])
def test_the_int8_input_projection_of_a_dynamically_quantized_lstm_is_refit(direction, per_channel, tmp_path, monkeypatch):
    """ONNX Runtime's ``quantize_dynamic`` writes an LSTM as ``DynamicQuantizeLSTM``: int8
    ``W [dirs, input, 4H]`` with a scale and zero point per direction or per gate column. Its
    input projection is refit like a float one's, stored back on its integer grid, and the
    criteria read its decoded ``W`` and ``R`` (before round 56: "weights are stored as integers
    (not refit)", and its units and inputs scored "data-free: no consumer with statistics")."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(model("LSTM", direction), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["LSTM"], per_channel=per_channel)
    m = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in m.graph.node].count("DynamicQuantizeLSTM") == 1
    # verified free of the u8 x s8 kernel's saturating pair sums (on a CPU without VNNI the
    # pruned LSTM differed from the zeroed original by 0.017 where the channels re-paired)
    paired = saturation.paired_tensors(m)
    assert {k for k, v in paired.items() if v == saturation.WEIGHT} == {"W_quantized", "R_quantized"}
    assert sum(v == saturation.SCALE for v in paired.values()) == 2
    result = prune(m)
    assert sum(result.report["calibration"]["criteria_chosen"].values()) == 2
    assert not any("no consumer" in k for k in result.report["calibration"]["criteria_chosen"])
    stats = result.report["calibration"]["passes"]["RefitPass"]["recurrent"]
    assert stats["layers"] == 1 and not stats.get("undone")
    assert stats["rel_error_after"] < 0.7 * stats["rel_error_before"]
    monkeypatch.setattr(recurrent, "find_targets", lambda *a, **k: [])
    plain = prune(m)
    assert "recurrent" not in plain.report["calibration"]["passes"]["RefitPass"]
    refit_w, plain_w = weight(result.model, "W_quantized"), weight(plain.model, "W_quantized")
    assert refit_w.dtype == np.int8 and refit_w.shape == plain_w.shape and not np.array_equal(refit_w, plain_w)
    refit_r = weight(result.model, "R_quantized")
    assert refit_r.dtype == np.int8 and not np.array_equal(refit_r, weight(plain.model, "R_quantized"))
    onnx.checker.check_model(result.model, full_check=True)
    test = sequences(40, 9)
    ref = outputs(m, test)
    err = [np.linalg.norm(outputs(r.model, test) - ref) / np.linalg.norm(ref) for r in (result, plain)]
    assert err[0] < 0.98 * err[1]


def test_a_recurrent_refit_that_moves_the_outputs_away_is_undone(monkeypatch):
    m = model("GRU")
    real = recurrent.refit

    def spoiled(graph, *args, **kwargs):
        stats, changed = real(graph, *args, **kwargs)
        for node in graph.nodes:
            if node.op == "GRU":
                node.inputs[1].values = np.zeros_like(node.inputs[1].values)  # the input ignored
        return stats, changed

    monkeypatch.setattr(recurrent, "refit", spoiled)
    result = prune(m)
    stats = result.report["calibration"]["passes"]["RefitPass"]["recurrent"]
    assert stats["undone"] and stats["output_error"] > stats["output_error_without"]
    assert any("undone, the outputs moved away" in line for line in calibration_lines(result.report["calibration"]))
    monkeypatch.setattr(recurrent, "find_targets", lambda *a, **k: [])
    plain = prune(m)
    test = sequences(8, 9)
    assert np.array_equal(outputs(result.model, test), outputs(plain.model, test))
    assert len(result.model.graph.node) == len(plain.model.graph.node)


def test_a_recurrence_refit_that_moves_the_outputs_away_leaves_the_input_projection_refit(monkeypatch):
    """Where the outputs move away with the recurrences refit, the input projections alone are
    tried: kept where they bring the outputs nearer, ``R`` as pruned."""
    m = model("LSTM")
    real = recurrent.refit

    def spoiled(graph, *args, **kwargs):
        stats, changed = real(graph, *args, **kwargs)
        if kwargs.get("recurrences", True):
            for node in graph.nodes:
                if node.op == "LSTM":
                    node.inputs[2].values = node.inputs[2].values + 2.0  # a recurrence that saturates
        return stats, changed

    monkeypatch.setattr(recurrent, "refit", spoiled)
    result = prune(m)
    stats = result.report["calibration"]["passes"]["RefitPass"]["recurrent"]
    assert stats["recurrences_undone"] and not stats.get("undone") and stats["input_projections"] == 1
    assert "recurrences" not in stats and stats["output_error"] < stats["output_error_without"]
    monkeypatch.setattr(recurrent, "refit", real)
    monkeypatch.setattr(recurrent, "find_targets", lambda *a, **k: [])
    plain = prune(m)
    np.testing.assert_array_equal(weight(result.model, "R"), weight(plain.model, "R"))
    assert not np.allclose(weight(result.model, "W"), weight(plain.model, "W"))


def _rule_answer(node: gs.Node):
    return registry.lookup(node.domain or "", node.op, 17).recurrent(node)


def test_the_rule_says_why_a_recurrent_layer_cannot_be_refit():
    x = gs.Variable("x", np.float32, [S, 1, C])
    w = gs.Constant("W", np.zeros((1, 4 * H, C), np.float32))
    r = gs.Constant("R", np.zeros((1, 4 * H, H), np.float32))
    y = gs.Variable("y", np.float32)
    info = _rule_answer(gs.Node("LSTM", inputs=[x, w, r], outputs=[y], attrs={"hidden_size": H}))
    assert info.gates == 4 and info.hidden == H
    assert "layout" in _rule_answer(gs.Node("LSTM", inputs=[x, w, r], outputs=[y], attrs={"hidden_size": H, "layout": 1}))
    computed = gs.Variable("Wc", np.float32, [1, 4 * H, C])
    info = _rule_answer(gs.Node("LSTM", inputs=[x, computed, r], outputs=[y], attrs={"hidden_size": H}))
    assert "float constants" in info.not_refit
    # its recurrence is still a consumer the criteria read (the dynamo exporter's W)
    views = recurrent.consumer_views(gs.Node("LSTM", name="l", inputs=[x, computed, r], outputs=[y],
                                             attrs={"hidden_size": H}), 17)
    assert [v.weight.name for v in views] == ["R"]
    quantized = gs.Node("DynamicQuantizeLSTM", domain="com.microsoft", inputs=[x, w, r], outputs=[y], attrs={"hidden_size": H})
    assert "not understood" in _rule_answer(quantized).not_refit  # no scale, no zero point


def test_channels_read_only_by_a_recurrent_layer_are_scored_from_data(monkeypatch):
    """The 16 channels before the LSTM have one consumer, its input projection: scored from
    the statistics of the LSTM's input (before round 20: data-free, "no consumer with
    statistics")."""
    from graphprune.planning import data_aware

    chosen = prune(model("LSTM")).report["calibration"]["criteria_chosen"]
    assert data_aware.NO_STATISTICS not in chosen and sum(chosen.values()) == 2
    monkeypatch.setattr(data_aware, "recurrent_consumers", lambda *a, **k: [])
    chosen = prune(model("LSTM")).report["calibration"]["criteria_chosen"]
    assert chosen.get(data_aware.NO_STATISTICS) == 1


def test_a_bidirectional_recurrence_is_read_per_direction():
    """``R`` of a bidirectional layer as a consumer: direction ``d`` reads only its own
    states, so unit ``h`` owns the input channels ``2h`` and ``2h + 1`` (in_block 2) and the
    matrix is block-sparse; ``Y [seq, 2, batch, H]`` is read with those channels."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, [S, 1, C])
    w = gs.Constant("W", rng.standard_normal((2, 4 * H, C)).astype(np.float32))
    r = gs.Constant("R", rng.standard_normal((2, 4 * H, H)).astype(np.float32))
    y = gs.Variable("y", np.float32, [S, 2, 1, H])
    node = gs.Node("LSTM", name="lstm", inputs=[x, w, r], outputs=[y], attrs={"hidden_size": H, "direction": "bidirectional"})
    views = recurrent.consumer_views(node, 17)
    assert [v.weight.name for v in views] == ["W", "R"] and views[0].in_block == 1
    rv = views[1]
    assert rv.in_block == 2 and rv.in_channels() == 2 * H and rv.node.name == "lstm/R"
    m = rv.matrices()[0]
    assert np.allclose(m[:4 * H, 0::2], r.values[0]) and not m[:4 * H, 1::2].any()
    assert np.allclose(m[4 * H:, 1::2], r.values[1]) and not m[4 * H:, 0::2].any()
    states = rng.standard_normal((S, 2, 3, H))
    read = rv.read_data(states)
    assert read.shape == (S, 3, 2 * H) and np.array_equal(read[:, :, 2 * 4 + 1], states[:, 1, :, 4])


def dynamo_bilstm() -> onnx.ModelProto:
    """``Linear(6->128) Relu -> bidirectional LSTM(128->32) -> Linear(64->4)`` through the dynamo
    exporter, weights large enough that its optimizer does not fold the LSTM's ``W``: it stays
    an expression (gates reordered by ``Slice``s, ``Concat``, ``Unsqueeze``, directions stacked
    by ``Concat``)."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(IN, 128)
            self.rnn = torch.nn.LSTM(128, 32, bidirectional=True)
            self.out = torch.nn.Linear(64, OUT)

        def forward(self, x):
            y, _ = self.rnn(torch.relu(self.inp(x)))
            return self.out(y)

    torch.manual_seed(0)
    m = torch.onnx.export(Net().eval(), (torch.from_numpy(sequences(1, 0)[0]),), dynamo=True,
                          verbose=False).model_proto
    assert any(n.op_type == "Concat" for n in m.graph.node)  # the W computed in the graph
    return m


def test_a_dynamo_exported_bidirectional_lstm_is_folded_and_refit():
    """The model is constant-folded before the analysis (``OpRule.computed_parameters``), so the
    criteria read the LSTM's input and its input projection is refit (before: "weights are not
    float constants: not refit", the channels before it scored data-free)."""
    from graphprune.planning import data_aware

    result = prune(dynamo_bilstm())
    passes = result.report["calibration"]["passes"]["RefitPass"]
    assert not any("LSTM" in s for s in passes.get("skipped", []))
    assert passes["recurrent"]["layers"] == 1
    assert data_aware.NO_STATISTICS not in result.report["calibration"]["criteria_chosen"]
    assert result.report["verification"]["ok"]


def test_a_weight_computed_four_nodes_deep_is_zeroed_in_the_reference(monkeypatch):
    """Unfolded, the LSTM's input channels prune exactly; the zeroed original must zero its
    computed ``W``'s removed columns (the input channels keep ``relu(bias)``: their producer's
    bias is not zeroed). The verifier recognised computed weights 3 nodes deep and refused the
    correct rewrite (relative difference 0.24)."""
    from graphprune.io import ir

    monkeypatch.setattr(ir, "_computes_constants", lambda model: False)
    result = graphprune.prune(dynamo_bilstm(), ratio=0.5, round_to=1)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 2
