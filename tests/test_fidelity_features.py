"""An embedding is not class scores. A sentence encoder's mean-pooled ``[1, 384]`` output
(paraphrase-MiniLM-L3) was reported with a ``top1_agreement`` of 0.75: the arg-max of an
embedding names no class. An output computed from a normalisation (LayerNorm, BatchNorm, L2)
with no linear layer after it scores no class; a classifier's head after a LayerNorm does."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.calibration.fidelity import fidelity
from graphprune.calibration.output_kinds import feature_outputs


def _encoder(with_head: bool) -> onnx.ModelProto:
    """tokens [1, 6, 8] -> MatMul -> LayerNorm -> mask -> mean pool -> [1, 8]
    (and, ``with_head``, a linear classifier [1, 5] after the pooled vector)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "head"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("Unsqueeze", ["mask", "axes_last"], ["m3"]),
        helper.make_node("Mul", ["n", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axes"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes_last"))
    outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 8])]
    if with_head:
        nodes.append(helper.make_node("MatMul", ["pooled", "head"], ["logits"]))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 6])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 6, 8)).astype(np.float32),
             "mask": np.ones((1, 6), np.float32)} for _ in range(n)]


def _moved(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with its first weight perturbed: a pruned stand-in whose outputs differ."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    w = numpy_helper.to_array(out.graph.initializer[0])
    out.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        (w + 0.5 * np.random.default_rng(2).standard_normal(w.shape)).astype(np.float32), out.graph.initializer[0].name))
    return out


def test_a_pooled_embedding_reports_no_top1_agreement():
    model = _encoder(with_head=False)
    assert feature_outputs(model) == {"pooled"}
    report = fidelity(model, _moved(model), _feeds(8))
    entry = report["outputs"]["pooled"]
    assert "top1_agreement" not in entry and report["top1_agreement"] is None
    assert entry["cosine"] is not None and entry["cosine"] < 1.0


def test_a_classifier_head_after_the_norm_still_scores_classes():
    model = _encoder(with_head=True)
    assert feature_outputs(model) == set()
    report = fidelity(model, _moved(model), _feeds(8))
    assert report["outputs"]["logits"]["top1_agreement"] is not None
    assert report["top1_agreement"] == report["outputs"]["logits"]["top1_agreement"]


@pytest.mark.torch
def test_an_embedding_normalised_by_torch_reports_no_top1_agreement(tmp_path):
    """``F.normalize`` exports as ``ReduceL2 -> Clip -> Expand -> Div``, no normalisation op: its
    unit rows say it (:func:`~graphprune.calibration.output_kinds.unit_rows`); a softmax's rows,
    of length under 1, and a classifier's logits stay scores."""
    torch = pytest.importorskip("torch")
    from graphprune.calibration.output_kinds import unit_rows

    class Embedder(torch.nn.Module):
        def __init__(self, normalise: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body, self.normalise = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                            torch.nn.Linear(16, 12)), normalise

        def forward(self, x):
            y = self.body(x)
            return torch.nn.functional.normalize(y, dim=-1) if self.normalise else y

    feeds = [{"x": f["x"][:, 0]} for f in _feeds(8)]
    models = {}
    for normalise in (True, False):
        path = tmp_path / f"{normalise}.onnx"
        torch.onnx.export(Embedder(normalise).eval(), (torch.zeros(1, 8),), str(path), input_names=["x"],
                          output_names=["y"], dynamo=False)
        models[normalise] = onnx.load(str(path))
    assert {n.op_type for n in models[True].graph.node} >= {"ReduceL2", "Div"}
    assert feature_outputs(models[True]) == set()  # (no op of the registry's that normalises)
    report = fidelity(models[True], _moved(models[True]), feeds)
    assert "top1_agreement" not in report["outputs"]["y"] and report["outputs"]["y"]["cosine"] < 1.0
    assert "top1_agreement" in fidelity(models[False], _moved(models[False]), feeds)["outputs"]["y"]
    rng = np.random.default_rng(3)
    probabilities = [[_softmax(rng.standard_normal((1, 12)) * 9)] for _ in range(4)]  # (confident: near 1)
    assert unit_rows(["p"], probabilities) == set()
    # all >= 0 but not summing to 1: an embedding after a ReLU
    assert unit_rows(["e"], [[v[0] / np.linalg.norm(v[0])] for v in probabilities]) == {"e"}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_a_sequence_of_class_probabilities_gets_a_top1_agreement_per_position():
    """A CTC recogniser's ``[1, T, classes]`` softmax had only a cosine (0.985 where 9.5 % of
    the decoded strings changed): each position's class is now compared."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(0)
    original = [[_softmax(3 * rng.standard_normal((1, 40, 50))).astype(np.float32)] for _ in range(6)]
    flipped = []
    for (y,) in original:
        p = y.copy()
        p[0, :10] = p[0, :10, ::-1]  # the first 10 of 40 positions answer another class
        flipped.append([p])
    entry = compare_outputs(["probs"], original, flipped)["outputs"]["probs"]
    assert entry["top1_per"] == "row"
    assert 0.70 <= entry["top1_agreement"] <= 0.80  # 30 of 40 positions, give or take a tie


def test_rows_of_log_probabilities_get_a_top1_agreement_per_row():
    """A beam decoder's ``[beams, 160]`` log-softmax read cosine 0.999 where 31 % of the
    decoded names changed: the scores of impossible tokens (about -20) are most of its size.
    Each row's next token is compared."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(3)
    original = [[np.log(_softmax(4 * rng.standard_normal((8, 160)))).astype(np.float32)] for _ in range(6)]
    flipped = []
    for (y,) in original:
        p = y.copy()
        p[:2] = p[:2, ::-1]  # two of the eight beams choose another token
        flipped.append([p])
    entry = compare_outputs(["logprobs"], original, flipped)["outputs"]["logprobs"]
    assert entry["top1_per"] == "row" and 0.70 <= entry["top1_agreement"] <= 0.80
    assert entry["cosine"] > entry["top1_agreement"]
    logits = [[4 * rng.standard_normal((8, 160)).astype(np.float32)] for _ in range(6)]  # not normalised:
    assert "top1_agreement" not in compare_outputs(["x"], logits, logits)["outputs"]["x"]  # nothing says classes


def _tagger(head: bool) -> onnx.ModelProto:
    """tokens [1, 6, 8] -> MatMul + bias -> Relu -> (``head``: MatMul + bias, 4 classes per
    position; else a LayerNorm: per-position features)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w_out"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b_out"),
             numpy_helper.from_array(np.ones(8, np.float32), "gamma")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"])]
    if head:
        nodes += [helper.make_node("MatMul", ["r", "w_out"], ["m"]), helper.make_node("Add", ["m", "b_out"], ["y"])]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])
    else:
        nodes.append(helper.make_node("LayerNormalization", ["r", "gamma"], ["y"], axis=-1))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])
    graph = helper.make_graph(nodes, "tagger", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
                              [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_per_position_logits_of_a_dense_head_get_a_top1_agreement_per_row():
    """A diacritiser's ``[1, T, 15]`` logits from a dense layer (no softmax) read cosine 0.964
    where 24 % of the diacritics changed, with no top-1: each position's class is compared now.
    Per-position features (a normalisation last) still get none."""
    from graphprune.calibration.output_kinds import logit_rows

    feeds = [{"x": f["x"]} for f in _feeds(6)]
    model = _tagger(head=True)
    assert logit_rows(model) == {"y"}
    entry = fidelity(model, _moved(model), feeds)["outputs"]["y"]
    assert entry["top1_per"] == "row" and 0.0 < entry["top1_agreement"] < 1.0
    assert fidelity(model, model, feeds)["outputs"]["y"]["top1_agreement"] == 1.0
    aliased = _tagger(head=True)  # paddle2onnx writes an Identity between the head and the output
    aliased.graph.node.append(helper.make_node("Identity", ["y"], ["fetch"]))
    aliased.graph.output[0].name = "fetch"
    assert logit_rows(aliased) == {"fetch"}
    features = _tagger(head=False)
    assert logit_rows(features) == set()
    mask = _tagger(head=True)  # a sigmoid after the head: per-unit gains (a mask), no classes
    mask.graph.node.append(helper.make_node("Sigmoid", ["y"], ["gains"]))
    mask.graph.output[0].name = "gains"
    assert logit_rows(mask) == set()
    assert "top1_agreement" not in fidelity(features, _moved(features), feeds)["outputs"]["y"]


def test_a_detector_output_mixing_pixels_and_scores_gets_a_balanced_cosine():
    """YOLOv8's ``[1, 4 + C, anchors]``: boxes in pixels beside class scores in [0, 1]. The
    cosine read 0.999 where most detections were gone; the balanced cosine counts each channel
    alike."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(1)
    original, pruned = [], []
    for _ in range(4):
        boxes = rng.uniform(0, 640, (1, 4, 300)).astype(np.float32)
        scores = np.zeros((1, 3, 300), np.float32)
        scores[0, rng.integers(0, 3, 12), rng.integers(0, 300, 12)] = 0.9
        original.append([np.concatenate([boxes, scores], axis=1)])
        lost = np.zeros_like(scores)
        lost[0, rng.integers(0, 3, 12), rng.integers(0, 300, 12)] = 0.9  # other anchors
        pruned.append([np.concatenate([boxes, lost], axis=1)])
    result = compare_outputs(["det"], original, pruned)
    assert result["outputs"]["det"]["cosine"] > 0.999
    assert result["balanced_cosine"] < 0.8
    plain = compare_outputs(["det"], [[o[0][:, :4]] for o in original], [[p[0][:, :4]] for p in pruned])
    assert "balanced_cosine" not in plain["outputs"]["det"]  # channels of one size: the cosine says it
    assert "balanced_rel_l2" not in plain


def test_the_deciding_figure_of_a_detector_counts_its_score_channel():
    """A budget chose among allocations by the pooled relative L2, which a YOLOv8's box
    coordinates (hundreds of pixels) decide: it took the one that kept the boxes and lost the
    scores (27 % of captcha gaps found instead of 100 %). Per channel, the scores count."""
    from graphprune.calibration.fidelity import compare_outputs, deciding_rel_l2

    rng = np.random.default_rng(2)
    original, boxes_moved, scores_lost = [], [], []
    for _ in range(4):
        boxes = rng.uniform(0, 640, (1, 4, 300)).astype(np.float32)
        scores = np.zeros((1, 1, 300), np.float32)
        scores[0, 0, rng.integers(0, 300, 12)] = 0.9
        original.append([np.concatenate([boxes, scores], axis=1)])
        shifted = boxes + rng.normal(0, 8, boxes.shape).astype(np.float32)  # boxes a few pixels off
        boxes_moved.append([np.concatenate([shifted, scores], axis=1)])
        scores_lost.append([np.concatenate([boxes + 1, 0.2 * scores], axis=1)])  # detections gone
    moved, lost = compare_outputs(["det"], original, boxes_moved), compare_outputs(["det"], original, scores_lost)
    assert lost["pooled_rel_l2"] < moved["pooled_rel_l2"]  # the pooled figure prefers losing the scores
    assert deciding_rel_l2(lost) > deciding_rel_l2(moved) == moved["balanced_rel_l2"]
    from graphprune.pipeline.candidates import _score  # the budget's candidates are ranked by it

    assert _score(["det"], original, scores_lost)[1] == deciding_rel_l2(lost)


def test_the_deciding_figure_of_several_outputs_is_their_geometric_mean():
    """swift-f0 (a pitch tracker: pitch in Hz, and a confidence in [0, 1]) at --ratio 0.3 with
    calibration: the pitch is arbitrary on unvoiced frames, so its relative L2 sits near 1
    however good the model (refit 1.19, none 0.98), and the worst output decided. The model
    without reconstruction, whose confidence had fallen to 1e-5 (relative L2 1.0: never voiced
    again, voicing F1 0), was kept over the refit (confidence 0.15: F1 0.93). Each output's
    relative improvement now counts; an output that fell to nothing is named."""
    from graphprune.calibration.fidelity import compare_outputs, deciding_rel_l2

    rng = np.random.default_rng(4)
    original, refit, dead = [], [], []
    for _ in range(5):
        pitch, confidence = rng.uniform(50, 500, (1, 200)), rng.uniform(0, 1, (1, 200))
        original.append([pitch, confidence])
        refit.append([rng.uniform(0, 1000, (1, 200)), confidence + rng.normal(0, 0.08, (1, 200))])
        dead.append([pitch + rng.normal(0, 200, (1, 200)), 1e-5 * confidence])
    good, bad = compare_outputs(["pitch", "confidence"], original, refit), compare_outputs(
        ["pitch", "confidence"], original, dead)
    assert good["pooled_rel_l2"] > bad["pooled_rel_l2"]  # the worst output prefers the dead model
    assert deciding_rel_l2(good) < deciding_rel_l2(bad)
    assert deciding_rel_l2(good) == good["deciding_rel_l2"] == pytest.approx(np.sqrt(
        good["outputs"]["pitch"]["pooled_rel_l2"] * good["outputs"]["confidence"]["pooled_rel_l2"]), abs=1e-5)
    assert bad["collapsed_outputs"] == ["confidence"] and "collapsed_outputs" not in good
    one = compare_outputs(["confidence"], [o[1:] for o in original], [o[1:] for o in refit])
    assert "deciding_rel_l2" not in one and deciding_rel_l2(one) == one["pooled_rel_l2"]  # one output: its own


def test_a_detector_that_lost_its_few_positive_anchors_is_named():
    """BlazeFace: a sigmoid score per 896 anchors, a face lighting up a few. A pruned detector
    that finds no face kept 892 of 896 anchors on the same side of 0.5 (threshold agreement
    0.9955, the same as one that still found them). The share of the original's positives kept
    says so, and an output under POSITIVES_KEPT is named."""
    from graphprune.calibration.fidelity import compare_outputs
    from graphprune.tables import prune_summary

    rng = np.random.default_rng(5)
    original, working, dead = [], [], []
    for _ in range(6):
        scores = rng.uniform(0, 0.2, (1, 896, 1))  # (BlazeFace's: one score per anchor)
        scores[0, rng.choice(896, 4, replace=False), 0] = rng.uniform(0.8, 1.0, 4)
        original.append([scores])
        working.append([np.clip(scores + rng.normal(0, 0.02, scores.shape), 0, 1)])
        dead.append([scores * 0.3])
    good, bad = compare_outputs(["scores"], original, working), compare_outputs(["scores"], original, dead)
    assert bad["outputs"]["scores"]["threshold_agreement"] > 0.99  # (what it read before)
    assert good["outputs"]["scores"]["positives_kept"] == 1.0 and "positives_lost" not in good
    assert bad["outputs"]["scores"]["positives_kept"] == 0.0 and bad["positives_lost"] == {"scores": 0.0}
    report = {"fidelity": bad, "timings": {}, "params_before": 1, "params_after": 1, "macs_before": 1, "macs_after": 1}
    assert any("warning: scores keeps 0% of the original's decisions above 0.5" in line
               for line in prune_summary(report).splitlines())


def _binary_classifier(noise: float) -> onnx.ModelProto:
    """x [1, 16] -> Gemm [16, 2] (class 0 favoured by a bias of 6) -> Softmax: p(class 1), the
    one a threshold reads, is small on every sample. ``noise``: added to the weight."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 2)).astype(np.float32) * 0.2
    w += noise * np.random.default_rng(5).standard_normal(w.shape).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["prob"], axis=-1)],
        "binary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([6.0, 0.0], np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_dominant_class_hides_nothing_from_the_rank_correlation():
    """open_nsfw's two classes: cosine and top-1 read 1.0 while the minority class's
    probability ranked new photos unlike the original's. The samples' order of each of a few
    scores is compared (Spearman over the held-out samples)."""
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(40)]
    original = _binary_classifier(0.0)
    report = fidelity(original, _binary_classifier(0.4), feeds)
    assert report["cosine"] > 0.999 and report["top1_agreement"] == 1.0
    assert report["rank_correlation"] < 0.3
    assert fidelity(original, _binary_classifier(0.02), feeds)["rank_correlation"] > 0.95
    assert fidelity(original, original, feeds)["rank_correlation"] == 1.0
    assert "rank_correlation" not in fidelity(original, original, feeds[:4])  # too few samples


def test_wide_outputs_get_a_rank_correlation_only_of_the_classes_given():
    """An output of more than a few numbers per sample is not compared number by number (an
    embedding gets none); a row of many class scores is, over the classes the original gives
    the held-out samples (a malware classifier's 26 classes, every sample "benign": how
    the benign score ranks the samples)."""
    from graphprune.calibration.fidelity import FEW_SCORES, compare_outputs

    rng = np.random.default_rng(7)
    wide = [[rng.standard_normal((2, FEW_SCORES + 1)).astype(np.float32)] for _ in range(10)]
    few = [[y[0][:1, :FEW_SCORES]] for y in wide]
    assert "rank_correlation" not in compare_outputs(["y"], wide, wide)["outputs"]["y"]
    assert compare_outputs(["y"], few, few)["outputs"]["y"]["rank_correlation"] == 1.0
    logits = [rng.standard_normal((1, 26)).astype(np.float32) for _ in range(12)]
    for y in logits:
        y[0, 6] += 10.0  # every sample is class 6
    shuffled = [logits[k].copy() for k in range(12)]
    order = rng.permutation(12)
    for k in range(12):
        shuffled[k][0, 6] = logits[order[k]][0, 6]  # class 6's score ranks the samples anew
    same = compare_outputs(["logits"], [[y] for y in logits], [[y] for y in logits])["outputs"]["logits"]
    moved = compare_outputs(["logits"], [[y] for y in logits], [[y] for y in shuffled])["outputs"]["logits"]
    assert same["rank_correlation"] == 1.0 and same["top1_agreement"] == 1.0
    assert moved["top1_agreement"] == 1.0 and moved["rank_correlation"] < 0.6
    # ... and the report says that every held-out sample was one class
    assert same["top1_one_class"] == 6
    mixed = [[rng.standard_normal((1, 26)).astype(np.float32)] for _ in range(12)]
    assert "top1_one_class" not in compare_outputs(["logits"], mixed, mixed)["outputs"]["logits"]


def test_a_calibrated_prune_reports_the_per_position_top1_of_its_logits():
    """Through the pipeline, where the original's weights live in the session's weight store
    (the dense head's constants are read from there)."""
    import graphprune

    rng = np.random.default_rng(4)
    result = graphprune.prune(_tagger(head=True), ratio=0.5, round_to=1,
                              calibration={"x": rng.standard_normal((24, 1, 6, 8)).astype(np.float32)})
    entry = result.report["fidelity"]["outputs"]["y"]
    assert entry["top1_per"] == "row" and 0.0 < entry["top1_agreement"] <= 1.0


def test_the_head_of_a_dynamic_int8_tagger_is_read_from_external_data(tmp_path):
    """``quantize_dynamic`` writes the head as ``MatMulInteger`` rescaled to float; whether it
    is a dense layer depends on its constants, which the pipeline keeps in files of its
    weight store: the last nodes' constants are read from there."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from graphprune.calibration.output_kinds import logit_rows

    onnx.save(_tagger(head=True), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert "MatMulInteger" in {n.op_type for n in quantized.graph.node}
    assert logit_rows(quantized) == {"y"}
    store = tmp_path / "store"
    store.mkdir()
    onnx.save(quantized, store / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    stubs = onnx.load(store / "m.onnx", load_external_data=False)
    assert logit_rows(stubs, store) == {"y"}
    assert logit_rows(stubs) == set()  # (nothing read: no class, as before)


def test_a_heat_map_on_an_offset_gets_a_centred_cosine():
    """A sigmoid importance map sits around 0.5 with a spread of 0.15: its cosine measures the
    offset (0.997 where the map's pattern kept a correlation of 0.43 with the original's). The
    centred cosine (Pearson) measures the pattern; outputs around 0 get none."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(5)
    original, pruned = [], []
    for _ in range(4):
        pattern = rng.standard_normal((1, 1, 32, 32))
        other = rng.standard_normal((1, 1, 32, 32))
        original.append([(0.5 + 0.15 * pattern).astype(np.float32)])
        pruned.append([(0.5 + 0.15 * (0.4 * pattern + 0.9 * other)).astype(np.float32)])
    entry = compare_outputs(["map"], original, pruned)["outputs"]["map"]
    assert entry["cosine"] > 0.95 and entry["centred_cosine"] < 0.6
    centred = compare_outputs(["map"], [[o[0] - 0.5] for o in original], [[p[0] - 0.5] for p in pruned])
    assert "centred_cosine" not in centred["outputs"]["map"] and centred["outputs"]["map"]["cosine"] < 0.6


def test_ratings_on_a_scale_are_no_class_scores_and_get_a_centred_cosine():
    """DNSMOS's [SIG, BAK, OVRL] opinion scores, each about 1-5: read as three classes, the
    report gave a top-1 agreement (that pointed the wrong way) and a cosine of 0.997 where the
    ratings' correlation with the original's had fallen to 0.69. A few numbers per sample that
    each sit far from 0 against how they vary over the samples are ratings: no top-1, and a
    cosine of both models' numbers less the original's mean over the samples."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(8)
    base = np.array([3.3, 3.8, 2.9])
    quality = rng.standard_normal((40, 1)) * 0.4
    original = [[(base + q + 0.1 * rng.standard_normal(3))[None].astype(np.float32)] for q in quality]
    drift = [[(base + 0.3 * q + 0.4 * rng.standard_normal((1, 3)) - 0.2).astype(np.float32)] for q in quality]
    entry = compare_outputs(["mos"], original, drift)["outputs"]["mos"]
    assert entry["cosine"] > 0.98 and entry["centred_cosine"] < 0.5, entry
    assert not any(key.startswith("top1") for key in entry), entry
    same = compare_outputs(["mos"], original, original)["outputs"]["mos"]
    assert same["centred_cosine"] == 1.0
    # class logits cross 0, or vary over the samples about as much as they sit away from it
    for offset, spread in ((np.array([1.0, 0.0, -1.0]), 2.0), (np.array([6.0, 5.0, 7.0]), 2.0)):
        logits = [[(rng.standard_normal((1, 3)) * spread + offset).astype(np.float32)] for _ in range(40)]
        entry = compare_outputs(["logits"], logits, logits)["outputs"]["logits"]
        assert entry["top1_agreement"] == 1.0 and "centred_cosine" not in entry
    # too few samples to tell: read as before
    assert "top1_agreement" in compare_outputs(["mos"], original[:4], drift[:4])["outputs"]["mos"]


def test_a_detector_whose_class_scores_all_fell_is_told_so():
    """NudeNet's YOLOv8n ``[1, 4 + 18, 2100]``: box coordinates in pixels beside class scores in
    [0, 1]. Pruned without reconstruction it found no box on 150 images while its held-out cosine
    read 0.990 (the boxes decide it); the class channels' decisions at 0.5 are counted: 0 kept."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(9)
    original, dead, fine = [], [], []
    for _ in range(6):
        boxes = rng.uniform(0, 320, (1, 4, 50))
        scores = rng.uniform(0, 0.2, (1, 3, 50))
        scores[0, rng.integers(0, 3), rng.integers(0, 50, 4)] = 0.9  # a few anchors see an object
        y = np.concatenate([boxes, scores], axis=1).astype(np.float32)
        original.append([y])
        dead.append([np.concatenate([boxes * 1.01, scores * 0.3], axis=1).astype(np.float32)])
        fine.append([np.concatenate([boxes * 1.01, scores * 0.95], axis=1).astype(np.float32)])
    lost = compare_outputs(["output0"], original, dead)
    assert lost["cosine"] > 0.99 and lost["outputs"]["output0"]["positives_kept"] == 0.0
    assert lost["positives_lost"] == {"output0": 0.0}
    kept = compare_outputs(["output0"], original, fine)
    assert kept["outputs"]["output0"]["positives_kept"] == 1.0 and "positives_lost" not in kept


def test_few_agreeing_samples_give_a_lower_bound_and_the_classes_they_cover() -> None:
    """A direction classifier's 13 held-out lines all agreed (top-1 1.000) while 8 % of other
    lines flipped; a file-type classifier's held-out files covered 30 of its 214 classes."""
    from graphprune.calibration.fidelity import compare_outputs, lower_bound

    assert abs(lower_bound(1.0, 13) - 0.772) < 1e-3 and lower_bound(0.5, 1000) > 0.46
    rng = np.random.default_rng(0)
    original = [[np.eye(5, dtype=np.float32)[[i % 3]] + 0.01 * rng.standard_normal((1, 5)).astype(np.float32)]
                for i in range(13)]
    figures = compare_outputs(["p"], original, [[o[0] * 1.01] for o in original])["outputs"]["p"]
    assert figures["top1_agreement"] == 1.0 and figures["top1_lower_bound"] == 0.7719
    assert figures["top1_classes_seen"] == "3 of 5"


def test_a_recogniser_line_reads_the_same_when_its_characters_move_a_frame() -> None:
    """Per-position agreement of a CTC output (0.91) said little about lines (27 % the same):
    the whole sequence, repeats merged and the blank dropped, is compared per sample."""
    from graphprune.calibration.fidelity import compare_outputs

    def line(classes: list[int]) -> np.ndarray:
        probs = np.full((1, len(classes), 6), 0.02, dtype=np.float32)
        probs[0, np.arange(len(classes)), classes] = 0.9
        return probs

    blank = [0] * 10
    original = line([0, 3, 3, 0, 0, 4, 0, 0, 0, 0]), line(blank[:4] + [5] + blank[5:])
    moved = line([0, 0, 3, 0, 0, 4, 4, 0, 0, 0])  # the same characters, a frame later
    changed = line(blank[:4] + [2] + blank[5:])  # another character
    figures = compare_outputs(["probs"], [[o] for o in original], [[moved], [changed]])["outputs"]["probs"]
    assert figures["top1_per"] == "row" and figures["top1_agreement"] == 0.85
    assert figures["sequence_agreement"] == 0.5 and figures["sequence_collapsed"] is True


def test_an_original_that_is_not_finite_on_the_held_out_samples_is_said_so():
    """A diffusion U-Net takes the log of its noise level; ``--calibration random`` fed it
    negative ones, and its outputs were NaN: a 50 % prune read cosine 1 and relative L2 0 on
    those samples, with a note that gave another reason. NaN on every sample leaves no figure;
    on some, the note says on how many."""
    from graphprune.calibration.fidelity import compare_outputs, deciding_rel_l2

    rng = np.random.default_rng(5)
    finite = [[rng.standard_normal((1, 8)).astype(np.float32)] for _ in range(4)]
    nan = [[np.full((1, 8), np.nan, np.float32)] for _ in range(4)]
    pruned = [[rng.standard_normal((1, 8)).astype(np.float32)] for _ in range(4)]
    everywhere = compare_outputs(["y"], nan, pruned)
    assert everywhere["cosine"] is None and deciding_rel_l2(everywhere) is None
    assert everywhere["outputs"]["y"]["original_not_finite"] == 4 and "on 4 of the 4" in everywhere["note"]
    some = compare_outputs(["y"], nan[:2] + finite[2:], pruned)
    assert "on 2 of the 4" in some["note"] and some["cosine"] is not None
    assert "note" not in compare_outputs(["y"], finite, pruned) or "NaN" not in compare_outputs(["y"], finite, pruned)["note"]


def test_outputs_beside_a_softmax_are_not_class_scores() -> None:
    """An MTCNN O-Net answers box offsets ``[1, 4]``, landmarks ``[1, 10]`` and a face / non-face
    softmax ``[1, 2]``: the offsets' and landmarks' arg-max was read as a class (top-level
    ``top1_agreement`` 0.33 where the classifier agreed on every sample). Alone, a raw ``[1, 4]``
    output still reads as class scores."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(0)

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max())
        return (e / e.sum()).astype(np.float32)

    original = [[rng.standard_normal((1, 4)).astype(np.float32), rng.standard_normal((1, 10)).astype(np.float32),
                 softmax(rng.standard_normal((1, 2)))] for _ in range(6)]
    pruned = [[b + rng.standard_normal(b.shape).astype(np.float32), m[::-1].copy(), p] for b, m, p in original]
    score = compare_outputs(["box", "landmarks", "prob"], original, pruned)
    assert "top1_agreement" not in score["outputs"]["box"] and "top1_agreement" not in score["outputs"]["landmarks"]
    assert score["outputs"]["prob"]["top1_agreement"] == 1.0 == score["top1_agreement"]
    alone = compare_outputs(["box"], [[o[0]] for o in original], [[p[0]] for p in pruned])
    assert "top1_agreement" in alone["outputs"]["box"]


def test_independent_yes_no_probabilities_are_no_one_of_n_choice():
    """A multi-label head (six sigmoids: toxic, insult, ...; rows in [0, 1] that do not sum to
    1) read top-1 agreement 1.0, "1 of 6 classes seen", while a flag's F1 fell to 0.79: each
    label is its own decision at 0.5 (``threshold_agreement``), not an arg-max. A softmax beside
    it keeps its top-1 agreement."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(6)
    original, pruned = [], []
    for i in range(6):
        labels = np.clip(rng.uniform(0.0, 0.3, (1, 6)) + (0.6 if i % 3 == 0 else 0.0) * np.eye(6)[[1]], 0, 1)
        flipped = labels.copy()
        flipped[0, 1] = 0.4 if i == 0 else labels[0, 1]  # one insult flag lost
        logits = rng.normal(size=(1, 3))
        soft = np.exp(logits) / np.exp(logits).sum()
        original.append([labels.astype(np.float32), soft.astype(np.float32)])
        pruned.append([flipped.astype(np.float32), soft.astype(np.float32)])
    out = compare_outputs(["labels", "classes"], original, pruned)["outputs"]
    assert "top1_agreement" not in out["labels"] and out["labels"]["threshold_agreement"] == pytest.approx(35 / 36)
    assert out["classes"]["top1_agreement"] == 1.0


def test_an_output_the_prune_does_not_reach_decides_nothing():
    """XFeat's keypoint output was left exactly as it was: at the floor it pulled the deciding
    geometric mean to 0.036 while the two outputs the prune changed were 0.21 off."""
    from graphprune.calibration.fidelity import compare_outputs

    rng = np.random.default_rng(7)
    original, pruned = [], []
    for _ in range(4):
        a, b, c = (rng.normal(size=(1, 64)).astype(np.float32) for _ in range(3))
        original.append([a, b, c])
        pruned.append([a + 0.2 * rng.normal(size=a.shape).astype(np.float32),
                       b + 0.2 * rng.normal(size=b.shape).astype(np.float32), c.copy()])
    figures = compare_outputs(["descriptors", "heat", "keypoints"], original, pruned)
    changed = [figures["outputs"][n]["pooled_rel_l2"] for n in ("descriptors", "heat")]
    assert figures["outputs"]["keypoints"]["pooled_rel_l2"] == 0.0
    assert figures["deciding_rel_l2"] == pytest.approx(float(np.sqrt(changed[0] * changed[1])), abs=2e-6)


def _quantized_softmax(classes: int = 64) -> onnx.ModelProto:
    """x [1, 8] -> MatMul -> Softmax -> QuantizeLinear (uint8, steps of 1/255) -> DequantizeLinear:
    a softmax whose rows, quantized, sum to 1 only within rounding."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(3 * rng.standard_normal((8, classes)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["p"], axis=-1),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qsoftmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_quantized_softmax_is_read_as_class_probabilities():
    """A 256-class tempo softmax quantized to 8 bits summed to 0.961-0.996 per row: it was read as
    independent yes / no probabilities (no top-1, a warning about its few "positives"). Its
    values lie on one grid: rows may miss 1 by half a step per class."""
    from graphprune.calibration.output_kinds import quantized_sum_error, rows_of_probabilities

    model = _quantized_softmax()
    feeds = [{"x": np.random.default_rng(k).standard_normal((1, 8)).astype(np.float32)} for k in range(12)]
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [session.run(None, f)[0] for f in feeds]
    assert any(abs(o.sum() - 1) > 1e-3 for o in outputs)  # (rounding: the plain check refuses them)
    atol = quantized_sum_error(outputs)
    assert 1e-3 < atol <= 0.5 * 64 / 255 + 1e-6
    assert all(rows_of_probabilities(o, several=False, atol=atol) for o in outputs)
    assert quantized_sum_error([np.random.default_rng(0).random((1, 64))]) == 1e-3  # floats: on no grid
    entry = fidelity(model, _moved(model), feeds)["outputs"]["y"]
    assert "top1_agreement" in entry and "positives_kept" not in entry, entry


def test_no_held_out_sample_is_said_not_left_blank():
    """One calibration sample holds none out: the report said ``samples: 0`` and nothing else."""
    model = _tagger(head=True)
    report = fidelity(model, _moved(model), [])
    assert report["samples"] == 0 and report["cosine"] is None and "no held-out sample" in report["note"]


def test_a_label_per_token_is_compared_row_for_row_not_as_ctc_frames():
    """A tagger's ``[1, T, tags]`` for its ids ``[1, T]`` (Baidu's LAC, a BIO tagger): its
    commonest tag was dropped as a CTC blank and repeated tags merged before the sentences were
    compared. An output with a row per token of an integer input compares every row."""
    from graphprune.calibration.output_kinds import token_rows

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "table"),
             numpy_helper.from_array(np.array([4.0, 0, 0, 0], np.float32), "b")]  # (tag 0 the commonest)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "tagger", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"ids": rng.integers(0, 20, (1, t)).astype(np.int64)} for t in (6, 9, 7, 12)]
    assert token_rows(["y"], feeds, [[np.zeros((1, int(f["ids"].shape[1]), 4))] for f in feeds]) == {"y"}
    assert token_rows(["y"], feeds, [[np.zeros((1, 5, 4))] for _ in feeds]) == set()  # (rows of another length)
    entry = fidelity(model, _moved(model), feeds)["outputs"]["y"]
    assert "sequence_agreement" in entry and "sequence_collapsed" not in entry, entry


def test_outputs_with_no_rows_compare_without_an_error_or_a_warning():
    """g2p-fa's greedy decoder in a ``Loop`` run for 0 steps on every calibration sample: an
    output ``[0, batch, 33]``, where the sequence agreement took the arg-max of no counts (an
    internal error) after numpy's "Mean of empty slice" warnings."""
    import warnings

    from graphprune.calibration import fidelity

    empty = [[np.zeros((0, 1, 33), np.float32)] for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fidelity.compare_outputs(["logits"], empty, [[a.copy() for a in r] for r in empty], logits={"logits"})
        assert fidelity.sequence_agreement(empty[0][0], empty[0][0]) == (True, False)
        assert fidelity.row_agreement(empty[0][0], np.zeros((2, 1, 33))) == 0.0
    assert result["rel_l2"] == 0.0
