"""Outputs chosen by rank from scores the graph computes (a CTC recogniser's ``ids =
ArgMax(softmax)`` beside its ``conf = ReduceMax(softmax)``; a g2p model's ids alone): the
fidelity compares the scores too. A recogniser that read nothing reported cosine 0.989 from
its confidence (about 1 on every frame) and 0.575 agreement of its ids (its blank frames), and
the reconstruction was chosen on the confidence; a g2p model's candidates were ranked by the
agreement of ~150 tokens, one token apart."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.calibration import fidelity
from graphprune.calibration.output_kinds import decision_scores

FRAMES, CLASSES = 12, 6


def recogniser(w: np.ndarray, with_conf: bool = True) -> onnx.ModelProto:
    """x[1, T, 8] -> MatMul -> Softmax -> ids (ArgMax, cast to int32) [and conf (ReduceMax)]."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("ArgMax", ["probs"], ["idx"], axis=2, keepdims=0),
             helper.make_node("Cast", ["idx"], ["ids"], to=TensorProto.INT32)]
    outputs = [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, FRAMES])]
    if with_conf:
        nodes.append(helper.make_node("ReduceMax", ["probs"], ["conf"], axes=[2], keepdims=0))
        outputs.append(helper.make_tensor_value_info("conf", TensorProto.FLOAT, [1, FRAMES]))
    graph = helper.make_graph(nodes, "rec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FRAMES, 8])],
                              outputs, [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _feeds(n: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, FRAMES, 8)).astype(np.float32)} for _ in range(n)]


def _weights() -> np.ndarray:
    w = np.random.default_rng(0).standard_normal((8, CLASSES)) * 0.3
    w[:, 0] += 1.0  # class 0 (the blank) wins many frames
    return w


def test_the_scores_behind_the_ids_are_found_through_a_cast():
    assert decision_scores(recogniser(_weights())) == {"probs": (["ids"], 2)}


def test_a_model_that_reads_only_blanks_is_judged_by_its_scores():
    w = _weights()
    blank = w.copy()
    blank[:, 0] += 10.0  # every frame blank: the ids agree wherever the original read a blank
    figures = fidelity.fidelity(recogniser(w), recogniser(blank), _feeds())
    scores = figures["outputs"]["probs"]
    assert scores["scores_of"] == ["ids"] and scores["top1_per"] == "row"
    # the worst cosine is now the scores', below the confidence's (what the report used to lead with)
    assert figures["cosine"] == scores["cosine"] < figures["outputs"]["conf"]["cosine"]
    assert figures["sequence_agreement"] < 0.5  # few lines read as the original's
    assert figures["deciding_rel_l2"] > figures["outputs"]["conf"]["pooled_rel_l2"]


def test_ids_alone_are_ranked_by_how_far_their_scores_moved():
    """Two models whose ids agree equally with the original's: the one whose scores moved less
    decides (the ids' agreement alone tied them)."""
    w = _weights()
    rng = np.random.default_rng(5)
    near, far = w + rng.standard_normal(w.shape) * 0.01, w + rng.standard_normal(w.shape) * 0.05
    original = recogniser(w, with_conf=False)
    a = fidelity.fidelity(original, recogniser(near, with_conf=False), _feeds())
    b = fidelity.fidelity(original, recogniser(far, with_conf=False), _feeds())
    assert a["outputs"]["ids"]["discrete"] and "probs" in a["outputs"]
    assert 0 < fidelity.deciding_rel_l2(a) < fidelity.deciding_rel_l2(b)


def test_scores_that_an_output_shows_are_not_compared_twice():
    w = _weights()
    models = [recogniser(v, with_conf=False) for v in (w, w * 1.1)]
    for model in models:
        model.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, FRAMES, CLASSES]))
    assert decision_scores(models[0]) == {}  # (an output already)
    figures = fidelity.fidelity(*models, _feeds())
    assert list(figures["outputs"]) == ["ids", "probs"] and "scores_of" not in figures["outputs"]["probs"]


def test_the_sensitivity_sweep_sees_the_scores_of_ids():
    """A budget's sweep compares float outputs only: a model whose only output is ids deviated by
    nothing for every group. Its sweep model outputs the scores too, and they deviate."""
    from graphprune.planning.sensitivity import _deviation, _expose_scores

    model = recogniser(_weights(), with_conf=False)
    swept = onnx.ModelProto()
    swept.CopyFrom(model)
    _expose_scores(model, swept.graph)
    assert [o.name for o in swept.graph.output] == ["ids", "probs"]
    rng = np.random.default_rng(1)
    ids, probs = np.array([[1, 2]]), rng.random((1, 2, CLASSES)).astype(np.float32)
    assert _deviation([ids], [ids + 1]) == 0.0  # (what the sweep read before)
    assert _deviation([ids, probs], [ids + 1, probs * 0.5]) > 0.1


def test_codes_chosen_several_moves_back_are_found():
    """GPT-SoVITS's VQ codes: ``ArgMax(-distance)``, then a Reshape to a computed shape, an
    Unsqueeze, a Concat, a Transpose and two Gathers of constant positions before the output.
    The walk stopped at the Reshape (two computed inputs) and the Gathers, so the choices were
    made on the other, untouched float output (every figure 0, "cosine 1") while 72 % of the
    codes changed. It follows the values a node carries (``carries_values``) past these."""
    const = {"axes0": np.array([0], np.int64), "zero": np.array(0, np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"]), helper.make_node("Neg", ["scores"], ["neg"]),
             helper.make_node("ArgMax", ["neg"], ["idx"], axis=-1, keepdims=0),
             helper.make_node("Shape", ["idx"], ["shape"]), helper.make_node("Reshape", ["idx", "shape"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "axes0"], ["u"]), helper.make_node("Concat", ["u"], ["c"], axis=0),
             helper.make_node("Transpose", ["c"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Gather", ["t", "zero"], ["g1"], axis=0),
             helper.make_node("Gather", ["g1", "zero"], ["g2"], axis=0),
             helper.make_node("Unsqueeze", ["g2", "axes0"], ["codes"]),
             helper.make_node("Identity", ["x"], ["features"])]
    inits = [numpy_helper.from_array(v, k) for k, v in const.items()]
    inits.append(numpy_helper.from_array(np.ones((8, CLASSES), np.float32), "w"))
    graph = helper.make_graph(nodes, "vq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FRAMES, 8])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, FRAMES, 8]),
                               helper.make_tensor_value_info("codes", TensorProto.INT64, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert decision_scores(model) == {"neg": (["codes"], -1)}
