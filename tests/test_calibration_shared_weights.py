"""Layers that share one weight are refit together.

A detection head applied to every level of a feature pyramid, or the two branches of a
siamese network, read one weight from several nodes. The refit skipped them ("weight is
shared by several nodes"), so the layers right after the pruned channels kept their
weights: on a small pyramid at ratio 0.5 the outputs' cosine to the original stayed at
0.63-0.73 (refit elsewhere) where the joint fit reaches 0.82-0.93. One least-squares
problem over the rows of every reader gives the shared weight; each reader gets the
fitted bias. Readers that feed one another cannot be fit together and are named.
"""

from __future__ import annotations

import numpy as np
from conftest import make_model
from onnx import helper, numpy_helper

import graphprune


def siamese():
    """Two inputs through the same two convolutions (shared ``W1``, ``W2`` and biases)."""
    nodes = []
    for side in ("a", "b"):
        nodes += [
            helper.make_node("Conv", [side, "W1", "B1"], [f"h{side}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"h{side}"], [f"r{side}"]),
            helper.make_node("Conv", [f"r{side}", "W2", "B2"], [f"y{side}"]),
        ]
    params = {"W1": (16, 3, 3, 3), "B1": (16,), "W2": (4, 16, 1, 1), "B2": (4,)}
    return make_model(nodes, {"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}, {"ya": None, "yb": None}, params)


def twice():
    """``y = W_o relu(W relu(W x1))``: one square weight applied twice in a row."""
    nodes = [
        helper.make_node("MatMul", ["x", "W_in"], ["x1"]),
        helper.make_node("Relu", ["x1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r2"]),
        helper.make_node("MatMul", ["r2", "W"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r3"]),
        helper.make_node("MatMul", ["r3", "W_o"], ["y"]),
    ]
    params = {"W_in": (6, 12), "W": (12, 12), "W_o": (12, 3)}
    return make_model(nodes, {"x": ("N", 6)}, {"y": None}, params)


def _feeds(shapes: dict, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(count)]


def test_readers_of_a_shared_weight_are_refit_together() -> None:
    model = siamese()
    calibration = _feeds({"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}, 40)
    result = graphprune.prune(model, ratio=0.5, calibration=calibration)
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert not refit.get("skipped"), refit.get("skipped")
    assert refit["layers"] == 2  # both readers of W2, one fit
    assert refit["rel_error_after"] < refit["rel_error_before"]
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < 0.9 * fidelity["without_reconstruction"]["rel_l2"]
    # the weight is still one constant, read by both convolutions
    pruned = result.model
    readers = [n for n in pruned.graph.node if n.op_type == "Conv" and n.input[1] == "W2"]
    assert len(readers) == 2
    assert sum(1 for init in pruned.graph.initializer if init.name == "W2") == 1


def elman(steps: int = 6, hidden: int = 24, width: int = 4, seed: int = 0):
    """``h_t = tanh(x_t W_x + h_{t-1} W_h)``, ``y = h_T W_o``: one recurrence weight read at every
    step of an unrolled loop (a decoder exported step by step). The states live near a
    6-dimensional subspace, so half of the 24 units carry what the others lose."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((hidden, 6)))[0]
    a = rng.standard_normal((6, 6))
    a *= 0.8 / max(abs(np.linalg.eigvals(a)))
    values = {"W_x": rng.standard_normal((width, 6)) @ basis.T * 0.5, "W_h": basis @ a @ basis.T,
              "W_o": rng.standard_normal((hidden, 3))}
    nodes = [helper.make_node("MatMul", ["x0", "W_x"], ["a0"]), helper.make_node("Tanh", ["a0"], ["h0"])]
    for t in range(1, steps):
        nodes += [helper.make_node("MatMul", [f"x{t}", "W_x"], [f"u{t}"]),
                  helper.make_node("MatMul", [f"h{t - 1}", "W_h"], [f"v{t}"]),
                  helper.make_node("Add", [f"u{t}", f"v{t}"], [f"a{t}"]),
                  helper.make_node("Tanh", [f"a{t}"], [f"h{t}"])]
    nodes.append(helper.make_node("MatMul", [f"h{steps - 1}", "W_o"], ["y"]))
    model = make_model(nodes, {f"x{t}": ("N", width) for t in range(steps)}, {"y": None},
                       {k: v.shape for k, v in values.items()})
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(values[init.name].astype(np.float32), init.name))
    return model


def _steps(count: int, steps: int = 6, seed: int = 0) -> list[dict]:
    return _feeds({f"x{t}": (8, 4) for t in range(steps)}, count, seed)


def test_an_unrolled_recurrence_is_fit_over_its_steps_on_the_original_inputs() -> None:
    """The readers of ``W_h`` read one another's outputs: fit on the pruned model's own steps,
    each fit feeds its error to the next (a trained digits GRU cell unrolled over 8 rows: test
    accuracy 0.99 -> 0.15 at ratio 0.5); they were not refit at all (0.89). One fit over all the
    steps on the original's states, less the removed units, brings it to 0.96. Here the output
    error falls tenfold, and the weight is still one constant read at every step."""
    result = graphprune.prune(elman(), ratio=0.5, calibration=_steps(40))
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    unrolled = refit["unrolled"]
    assert unrolled["layers"] == 5 and "undone" not in unrolled, unrolled
    assert unrolled["output_error"] < 0.2 * unrolled["output_error_without"]
    assert not refit.get("skipped"), refit.get("skipped")
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < 0.3 * fidelity["without_reconstruction"]["rel_l2"]
    readers = [n for n in result.model.graph.node if n.op_type == "MatMul" and n.input[1] == "W_h"]
    assert len(readers) == 5
    assert sum(1 for init in result.model.graph.initializer if init.name == "W_h") == 1


def test_an_unrolled_fit_that_moves_the_outputs_away_is_undone_and_named(monkeypatch) -> None:
    """Kept only where the outputs on the calibration samples come nearer the original: where
    they do not, the steps keep the pruned weight and the report names why."""
    from graphprune.passes import refit as refit_pass

    calls = []

    def error(self, graph) -> float:  # without the fit, with it (in every refit of the run)
        calls.append(graph)
        return 0.1 if len(calls) % 2 else 0.5

    monkeypatch.setattr(refit_pass.RefitPass, "_output_error", error)
    model = elman()
    result = graphprune.prune(model, ratio=0.5, calibration=_steps(40), reconstruction="refit")
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["unrolled"]["undone"] is True
    skipped = " ".join(refit.get("skipped", []))
    assert "read at every step of an unrolled recurrence" in skipped
    # the written W_h is the original's on the kept units: no fit reached it
    new = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    old = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    kept = [j for j in range(24) if any(np.array_equal(old["W_x"][:, j], c) for c in new["W_x"].T)]
    assert len(kept) == new["W_h"].shape[0] < 24
    np.testing.assert_array_equal(new["W_h"], old["W_h"][np.ix_(kept, kept)])


def test_readers_of_a_shared_weight_share_the_fitted_bias() -> None:
    result = graphprune.prune(siamese(), ratio=0.5, calibration=_feeds({"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}, 40))
    readers = [n for n in result.model.graph.node if n.op_type == "Conv" and n.input[1] == "W2"]
    assert len(readers) == 2 and readers[0].input[2] == readers[1].input[2]
    biases = {init.name for init in result.model.graph.initializer}
    assert readers[0].input[2] in biases


def test_readers_of_a_shared_int8_weight_are_refit_together(tmp_path) -> None:
    """ORT's ``quantize_dynamic`` stores a weight read by several layers once, as int8 (OSKut's
    time-distributed dense unrolled into 21 ``MatMulInteger``): the refit skipped every reader
    ("shared by several nodes"), 6 of 192 layers refit, where the float file refits all. Readers
    that decode the same stored constants alike are one fit now, written once on the grid."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(siamese(), tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8)
    model = onnx.load(tmp_path / "int8.onnx")
    shared = [n for n in model.graph.node if n.op_type == "ConvInteger" and n.input[1] == "W2_quantized"]
    assert len(shared) == 2
    result = graphprune.prune(model, ratio=0.5, calibration=_feeds({"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}, 40))
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["layers"] == 2 and not refit.get("skipped"), refit
    assert refit["rel_error_after"] < refit["rel_error_before"]
    fidelity = result.report["fidelity"]
    assert fidelity["rel_l2"] < 0.95 * fidelity["without_reconstruction"]["rel_l2"]
    readers = [n for n in result.model.graph.node if n.op_type == "ConvInteger" and n.input[1] == "W2_quantized"]
    assert len(readers) == 2 and sum(1 for i in result.model.graph.initializer if i.name == "W2_quantized") == 1


def test_a_depthwise_weight_shared_by_stages_in_a_row_is_read_with_its_channels_cut() -> None:
    """Weight-tied stages (one depthwise kernel applied three times in a row, as fracast's
    dilated encoder does): a depthwise weight's input axis holds one channel, so the channels
    removed from the original's input come from the input's own dimension (the first try
    took the weight's and failed to reshape the rows: an internal error)."""
    c = 8
    nodes = [helper.make_node("Conv", ["x", "W_in"], ["s0"])]
    for k in range(3):
        nodes += [helper.make_node("Conv", [f"s{k}", "W_dw", "B_dw"], [f"d{k}"], group=c, pads=[1, 1]),
                  helper.make_node("Tanh", [f"d{k}"], [f"s{k + 1}"])]
    nodes.append(helper.make_node("Conv", ["s3", "W_out"], ["y"]))
    params = {"W_in": (c, 3, 1), "W_dw": (c, 1, 3), "B_dw": (c,), "W_out": (2, c, 1)}
    model = make_model(nodes, {"x": (1, 3, 16)}, {"y": None}, params)
    result = graphprune.prune(model, ratio=0.5, calibration=_feeds({"x": (1, 3, 16)}, 40), reconstruction="refit")
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["unrolled"]["layers"] == 3, refit
    assert not any("W_dw" in line and "positions" in line for line in refit.get("skipped", []))
    assert refit.get("not_refit_positions_differ") is None


def test_an_unrolled_decoder_after_a_recurrent_encoder_is_refit_too() -> None:
    """g2p-en: a GRU encoder (one ONNX recurrent op) hands its last state to a decoder unrolled
    step by step. A model with recurrent ops refit those alone and named the decoder's shared
    weights "not refit"; the decoder's steps are now fit after the encoder, on the original's
    inputs, and kept where the outputs come nearer."""
    model = elman()
    rng = np.random.default_rng(5)
    basis = np.linalg.qr(rng.standard_normal((24, 6)))[0]
    encoder = {"W_e": (basis @ rng.standard_normal((6, 4)) * 0.5)[None], "R_e": (basis @ basis.T * 0.5)[None],
               "shape_h": np.array([-1, 24])}
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.int64 if k == "shape_h" else np.float32), k)
                                   for k, v in encoder.items())
    # h0 = the encoder's last state over the sequence s, instead of tanh(x0 W_x)
    first = [n for n in model.graph.node if n.output[0] in ("a0", "h0")]
    for n in first:
        model.graph.node.remove(n)
    model.graph.node.insert(0, helper.make_node("RNN", ["s", "W_e", "R_e"], ["y_enc", "h_enc"], hidden_size=24))
    model.graph.node.insert(1, helper.make_node("Reshape", ["h_enc", "shape_h"], ["h0"]))
    model.graph.input.append(helper.make_tensor_value_info("s", 1, [5, "N", 4]))
    feeds = [{**f, "s": np.random.default_rng(k).standard_normal((5, 8, 4)).astype(np.float32)}
             for k, f in enumerate(_steps(40))]
    result = graphprune.prune(model, ratio=0.5, calibration=feeds, reconstruction="refit")
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert refit["recurrent"]["recurrences"] == 1 and not refit["recurrent"].get("undone"), refit
    unrolled = refit["unrolled"]
    assert unrolled["layers"] == 5 and "undone" not in unrolled, unrolled
    assert unrolled["output_error"] < 0.5 * unrolled["output_error_without"]


def test_two_shared_weights_reading_one_step_s_state_each_get_the_original_s_input() -> None:
    """A greedy decoder's state ``h_t`` is read by the next step's recurrence ``W_h`` and by the
    output projection ``W_o`` (whose output feeds the next step): two unrolled shares on one
    tensor, each cutting the original's state for itself (a reader once got the copy the one
    before it had cut: right only where the removed channels lay past the cut copy's end)."""
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((24, 6)))[0]
    a = rng.standard_normal((6, 6))
    a *= 0.8 / max(abs(np.linalg.eigvals(a)))
    values = {"W_x": rng.standard_normal((4, 6)) @ basis.T * 0.5, "W_h": basis @ a @ basis.T,
              "W_o": basis @ rng.standard_normal((6, 4)) * 0.5, "W_y": rng.standard_normal((4, 6)) @ basis.T * 0.3}
    nodes = [helper.make_node("MatMul", ["x", "W_x"], ["a0"]), helper.make_node("Tanh", ["a0"], ["h0"]),
             helper.make_node("MatMul", ["h0", "W_o"], ["y0"])]
    for t in range(1, 5):
        nodes += [helper.make_node("MatMul", [f"h{t - 1}", "W_h"], [f"v{t}"]),
                  helper.make_node("MatMul", [f"y{t - 1}", "W_y"], [f"u{t}"]),
                  helper.make_node("Add", [f"u{t}", f"v{t}"], [f"a{t}"]), helper.make_node("Tanh", [f"a{t}"], [f"h{t}"]),
                  helper.make_node("MatMul", [f"h{t}", "W_o"], [f"y{t}"])]
    model = make_model(nodes, {"x": ("N", 4)}, {"y4": None}, {k: v.shape for k, v in values.items()})
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(values[init.name].astype(np.float32), init.name))
    result = graphprune.prune(model, ratio=0.5, calibration=_feeds({"x": (8, 4)}, 40), reconstruction="refit")
    assert result.report["verification"]["ok"] is True
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert "not_refit_positions_differ" not in refit, refit
    assert refit["unrolled"]["layers"] == 4 + 5 + 4, refit  # every reader of W_h, W_o and W_y
