"""Keras 3 recurrent layers, which tf2onnx writes as a ``Loop``, lowered to ONNX's LSTM/GRU/RNN
(:mod:`graphprune.rules.loop_rnn`) and pruned like the standard ops.

Every model here is a real Keras model converted by tf2onnx (the frontend, or tf2onnx itself
for an open sequence length); the lowering is checked against the ``Loop`` in ONNX Runtime.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

tf = pytest.importorskip("tensorflow")
tf2onnx = pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")

from graphprune.frontends import tensorflow as gtf  # noqa: E402

import graphprune  # noqa: E402
from graphprune.io import ir  # noqa: E402

pytestmark = pytest.mark.tf

layers = keras.layers


def _model(kind: str, steps: int | None = 8, **options) -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((steps, 6), name="x")
    mask = options.pop("mask", False)
    bidirectional = options.pop("bidirectional", False)
    layer = {"gru": layers.GRU, "lstm": layers.LSTM, "rnn": layers.SimpleRNN}[kind](12, **options)
    x = layers.Masking(0.0)(inp) if mask else inp
    y = (layers.Bidirectional(layer) if bidirectional else layer)(x)
    if len(y.shape) == 3:
        y = layers.GlobalAveragePooling1D()(y)
    return keras.Model(inp, layers.Dense(3, name="logits")(y))


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


CASES = {
    "gru": ("gru", {}),
    "gru_sequences_no_reset_after": ("gru", {"return_sequences": True, "reset_after": False}),
    "gru_relu": ("gru", {"activation": "relu"}),
    "lstm_backwards": ("lstm", {"go_backwards": True}),
    "lstm_bidirectional": ("lstm", {"bidirectional": True, "return_sequences": True}),
    "simple_rnn": ("rnn", {}),
    # with dropout Keras computes each gate's products apart (Split/Slice parts of one kernel)
    "lstm_dropout": ("lstm", {"dropout": 0.1, "recurrent_dropout": 0.2}),
    "gru_dropout": ("gru", {"recurrent_dropout": 0.2, "return_sequences": True}),
    # Keras's hard sigmoid, relu6(x + 3) / 6 (a Clip in the body): ONNX's HardSigmoid(1/6, 0.5)
    "lstm_hard_sigmoid_gates": ("lstm", {"recurrent_activation": "hard_sigmoid"}),
    "rnn_hard_sigmoid": ("rnn", {"activation": "hard_sigmoid"}),
}
#: the activations each case lowers with (the others: sigmoid gates and tanh)
HARD = {"lstm_hard_sigmoid_gates": [b"HardSigmoid", b"Tanh", b"Tanh"], "rnn_hard_sigmoid": [b"HardSigmoid"]}
EXPECTED = {"gru": "GRU", "lstm": "LSTM", "rnn": "RNN"}


@pytest.fixture(scope="module")
def converted():
    return {name: gtf.to_onnx(_model(kind, **dict(options))) for name, (kind, options) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_keras_loop_lowers_to_the_standard_op_with_the_same_outputs(converted, case):
    proto = converted[case]
    loops = _ops(proto)["Loop"]
    assert loops >= 1  # what tf2onnx writes for Keras 3 (the premise of the lowering)
    notes: dict = {}
    lowered = ir.prepare(proto, notes=notes)
    ops = _ops(lowered)
    assert notes["lowered_ops"] == {"Loop": loops}
    assert "Loop" not in ops and ops[EXPECTED[CASES[case][0]]] == loops
    if case in HARD:
        cell = next(n for n in lowered.graph.node if n.op_type == EXPECTED[CASES[case][0]])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in cell.attribute}
        assert attrs["activations"] == HARD[case] and np.allclose(attrs["activation_alpha"], 1 / 6)
    x = np.random.default_rng(1).standard_normal((1, 8, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(lowered, x), _run(proto, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["gru", "lstm_bidirectional", "simple_rnn", "lstm_hard_sigmoid_gates"])
def test_keras_recurrent_hidden_units_prune_and_verify(converted, case):
    proto = converted[case]
    result = graphprune.prune(proto, ratio=0.5)
    report = result.report
    assert report["verification"]["ok"]
    assert report["normalised"]["lowered_ops"]["Loop"] >= 1
    assert report["params_after"] < 0.5 * report["params_before"]  # the hidden units went
    op = EXPECTED[CASES[case][0]]
    sizes = [a.i for n in result.model.graph.node if n.op_type == op for a in n.attribute if a.name == "hidden_size"]
    assert sizes and sum(sizes) == 6 * len(sizes)  # half of every layer's 12 (one group when concatenated)
    onnx.checker.check_model(result.model, full_check=True)


def test_open_sequence_length_lowers_and_matches_at_every_length():
    model = _model("gru", steps=None, return_sequences=True)
    spec = tf.TensorSpec([None, None, 6], tf.float32, name="x")

    @tf.function(input_signature=[spec])
    def function(x):
        return {"logits": model(x, training=False)}

    proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=17)
    assert _ops(proto)["Loop"] == 1
    lowered = ir.prepare(proto)
    assert _ops(lowered)["GRU"] == 1 and "Loop" not in _ops(lowered)
    rng = np.random.default_rng(2)
    for steps in (1, 4, 13):  # the check ran at two other lengths
        x = rng.standard_normal((2, steps, 6)).astype(np.float32)
        np.testing.assert_allclose(_run(lowered, x), _run(proto, x), rtol=1e-5, atol=1e-6)
    result = graphprune.prune(proto, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["params_after"] < result.report["params_before"]


def test_a_masked_sequence_stays_a_loop_and_freezes():
    # Masking makes the body keep the previous state where a step is masked: not the op
    proto = gtf.to_onnx(_model("gru", mask=True))
    assert _ops(proto)["Loop"] == 1
    notes: dict = {}
    lowered = ir.prepare(proto, notes=notes)
    assert "lowered_ops" not in notes and _ops(lowered)["Loop"] == 1
    result = graphprune.prune(proto, ratio=0.5)
    assert result.report["verification"]["ok"]
    assert "Loop" in result.report["unsupported_ops"]
    assert "no rule for Loop (not a recurrent cell: its body has Not)" in result.report["nothing_prunable"]


def test_a_read_loop_output_that_the_lowering_cannot_write_keeps_the_loop(converted):
    # the final loop counter as a graph output: the standard op has no such output
    proto = onnx.ModelProto()
    proto.CopyFrom(converted["gru"])
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    proto.graph.output.append(onnx.helper.make_tensor_value_info(loop.output[0], onnx.TensorProto.INT32, []))
    counter_type = next(t.data_type for t in proto.graph.initializer if t.name == loop.input[2])
    proto.graph.output[-1].type.tensor_type.elem_type = counter_type
    lowered = ir.prepare(proto)
    assert _ops(lowered)["Loop"] == 1 and "GRU" not in _ops(lowered)
    x = np.random.default_rng(3).standard_normal((1, 8, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(lowered, x), _run(proto, x), rtol=1e-6)


def test_a_cell_the_standard_op_does_not_compute_is_not_lowered(monkeypatch, converted):
    # the check, not the shape of the body, decides: with the gates' order wrong, no candidate
    # computes the Loop's function, and it stays
    from graphprune.rules import loop_rnn

    monkeypatch.setattr(loop_rnn, "_LSTM_ORDER", (0, 1, 2, 3))
    notes: dict = {}
    lowered = ir.prepare(converted["lstm_backwards"], notes=notes)
    assert "lowered_ops" not in notes and _ops(lowered)["Loop"] == 1


def test_lossless_of_a_keras_lstm_writes_its_loop_as_it_came(converted):
    """Nothing to remove: the model as it came, not its preparation (the ``Loop`` written as
    ONNX's ``LSTM`` held 5 % more parameters and differed from it by rounding), with the
    original's figures."""
    proto = converted["lstm_backwards"]
    result = graphprune.prune(proto, lossless=True)
    assert result.report["lossless"]["unchanged"]
    assert _ops(result.model) == _ops(proto)
    assert result.report["params_after"] == result.report["params_before"]
    x = np.random.default_rng(0).standard_normal((1, 8, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(result.model, x), _run(proto, x))


@pytest.mark.parametrize("how", [{"ratio": 0.0}, {"ratio": 0.5, "keep": "all"}])
def test_a_ratio_prune_that_removes_nothing_writes_the_loop_as_it_came(converted, how):
    """The scout's code2vec: every group kept (``--keep``), "nothing prunable", and the file
    written was its preparation (two ``Loop`` LSTMs as ONNX ``LSTM``s: larger, not bit for bit)."""
    proto = converted["lstm_backwards"]
    keep = ()
    if how.get("keep") == "all":
        analysis = graphprune.analyze(proto)
        keep = sorted({g.anchor[0] for g in analysis.groups})
    result = graphprune.prune(proto, ratio=how["ratio"], keep=keep)
    assert result.report["unchanged"] and result.plan.units_removed == 0
    assert _ops(result.model) == _ops(proto)
    assert result.report["params_after"] == result.report["params_before"]
    x = np.random.default_rng(0).standard_normal((1, 8, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(result.model, x), _run(proto, x))
