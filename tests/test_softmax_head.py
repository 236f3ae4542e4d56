"""Softmax-head distillation (calibration/softmax_head.py, passes/softmax_head.py): the layer
whose output's softmax is a graph output is refit to the original's class distribution."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.calibration import runner
from graphprune.calibration import softmax_head as heads

CLASSES = 40


def _classifier(ending: str) -> onnx.ModelProto:
    """x[n, 16] -> Gemm 48 -> Relu -> Gemm 48 -> Relu -> MatMul + Add (40 classes) -> ``ending``:
    ``softmax`` (the op), ``decomposed`` (ReduceMax, Sub, Exp, ReduceSum, Div: tf2onnx's
    and jax2tf's), ``log_softmax``, ``sigmoid`` (multi-label), or ``logits`` (the graph output
    is the logits)."""
    rng = np.random.default_rng(0)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", (48, 16), 0.5), init("b1", (48,), 0.2), init("w2", (48, 48), 0.25), init("b2", (48,), 0.2),
             init("w3", (48, CLASSES), 0.6), init("b3", (CLASSES,), 0.3),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["m3"], name="head"),
        helper.make_node("Add", ["m3", "b3"], ["logits"], name="head_bias"),
    ]
    out = "logits"
    if ending == "softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
        out = "probs"
    elif ending == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["probs"], name="sigmoid"))
        out = "probs"
    elif ending == "log_softmax":
        nodes.append(helper.make_node("LogSoftmax", ["logits"], ["logp"], name="log_softmax", axis=-1))
        out = "logp"
    elif ending == "decomposed":
        nodes += [
            helper.make_node("ReduceMax", ["logits"], ["top"], name="max", axes=[-1], keepdims=1),
            helper.make_node("Sub", ["logits", "top"], ["shifted"], name="sub"),
            helper.make_node("Exp", ["shifted"], ["e"], name="exp"),
            helper.make_node("ReduceSum", ["e", "axes"], ["total"], name="sum", keepdims=1),
            helper.make_node("Div", ["e", "total"], ["probs"], name="div"),
        ]
        out = "probs"
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 16)).astype(np.float32)


def _cross_entropy(original: onnx.ModelProto, pruned: onnx.ModelProto, log: bool) -> float:
    """Mean cross-entropy of the pruned model's class distribution against the original's
    on fresh inputs."""
    feeds = [{"x": x} for x in _inputs(400, 9)]
    p = np.concatenate([o[0] for o in runner.outputs(original, feeds)]).astype(np.float64)
    q = np.concatenate([o[0] for o in runner.outputs(pruned, feeds)]).astype(np.float64)
    if log:
        p, q = np.exp(p), np.exp(q)
    return float(-(p * np.log(np.maximum(q, 1e-30))).sum(axis=1).mean())


@pytest.mark.parametrize(("ending", "kind"), [("softmax", "softmax"), ("decomposed", "softmax"),
                                               ("log_softmax", "log_softmax")])
def test_the_head_of_a_softmax_output_is_distilled(tmp_path, ending, kind, monkeypatch):
    model = _classifier(ending)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_inputs(512, 1))
    result = graphprune.prune(model, ratio=0.6, calibration=str(calib))
    assert result.report["verification"]["ok"]
    stats = result.report["calibration"]["passes"]["SoftmaxHeadPass"]
    (head,) = stats["heads"]
    assert (head["layer"], head["kind"], head["classes"]) == ("head", kind, CLASSES)
    assert head["written"] and stats["layers"] == 1
    before, after = head["cv_cross_entropy"]
    assert after < before
    onnx.checker.check_model(result.model, full_check=True)

    # what it does, on inputs neither fit saw: the same prune without the distillation is further away
    monkeypatch.setattr(heads, "candidates", lambda graph, opset: [])
    plain = graphprune.prune(model, ratio=0.6, calibration=str(calib))
    assert "heads" not in plain.report["calibration"]["passes"]["SoftmaxHeadPass"]
    log = kind == "log_softmax"
    assert _cross_entropy(model, result.model, log) < _cross_entropy(model, plain.model, log)


def test_the_original_runs_once_for_the_head_of_every_candidate(tmp_path, monkeypatch):
    """Under ``auto`` every candidate (the criteria's plans, the refit, the statistics correction)
    ends with the head's fit, to the same original rows: the original runs for them once (and
    once more for the final refit, on every sample), and the result is the same as with a run
    each."""
    import traceback

    from graphprune.passes.softmax_head import SoftmaxHeadPass
    model = _classifier("softmax")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_inputs(256, 1))
    real, runs = runner.stream, []

    def stream(model, names, feeds, take, **kwargs):
        if kwargs.get("what") == "the original model" and list(names) == ["probs"]:
            if traceback.extract_stack(limit=2)[0].filename.endswith("softmax_head.py"):
                runs.append(len(feeds))
        return real(model, names, feeds, take, **kwargs)

    monkeypatch.setattr(runner, "stream", stream)
    result = graphprune.prune(model, ratio=0.6, calibration=str(calib), reconstruction="auto")
    choice = result.report["calibration"]["reconstruction_choice"]
    assert "stats" in choice["tried"] and isinstance(choice["rel_l2"]["stats"], float), choice
    assert result.report["calibration"]["final_refit"]["kept"]
    assert len(runs) == 2, runs
    monkeypatch.setattr(SoftmaxHeadPass, "_held", lambda self: {})  # (nothing kept: the original runs again)
    runs.clear()
    again = graphprune.prune(model, ratio=0.6, calibration=str(calib), reconstruction="auto")
    assert len(runs) >= 4 and runs.count(runs[-1]) == 1, runs
    for a, b in zip(result.model.graph.initializer, again.model.graph.initializer, strict=True):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_logits_as_the_graph_output_are_left_to_the_least_squares_refit(tmp_path):
    """Nothing in the graph says raw logits are class scores rather than a regression."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_inputs(256, 1))
    result = graphprune.prune(_classifier("logits"), ratio=0.6, calibration=str(calib))
    stats = result.report["calibration"]["passes"]["SoftmaxHeadPass"]
    assert stats["layers"] == 0 and "heads" not in stats
    assert result.report["calibration"]["passes"]["RefitPass"]["layers"] >= 1


def test_logits_named_as_class_scores_are_distilled_to_their_softmax(tmp_path):
    """A classifier exported without its softmax (torchvision's, timm's): ``class_scores``
    names the output, and its layer is fitted to the original's softmax."""
    model = _classifier("logits")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_inputs(512, 1))
    result = graphprune.prune(model, ratio=0.6, calibration=str(calib), class_scores="logits")
    (head,) = result.report["calibration"]["passes"]["SoftmaxHeadPass"]["heads"]
    assert (head["layer"], head["kind"], head["written"]) == ("head", "logits", True)
    plain = graphprune.prune(model, ratio=0.6, calibration=str(calib))
    softmax = _classifier("softmax")  # the same weights: the softmax of the logits of each
    as_probs = []
    for m in (result.model, plain.model):
        probs = onnx.ModelProto()
        probs.CopyFrom(m)
        probs.graph.output[0].name = "raw"
        for node in probs.graph.node:
            node.output[:] = ["raw" if o == "logits" else o for o in node.output]
        probs.graph.node.append(helper.make_node("Softmax", ["raw"], ["probs"], axis=-1))
        probs.graph.output[0].name = "probs"
        as_probs.append(probs)
    assert _cross_entropy(softmax, as_probs[0], False) < _cross_entropy(softmax, as_probs[1], False)


def test_class_scores_must_name_a_graph_output(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_inputs(64, 1))
    with pytest.raises(graphprune.UsageError, match="'scores' is not a graph output"):
        graphprune.prune(_classifier("logits"), ratio=0.6, calibration=str(calib), class_scores=["scores"])
    with pytest.raises(graphprune.UsageError, match="needs calibration data"):
        graphprune.prune(_classifier("logits"), ratio=0.6, class_scores=["logits"])


def test_class_scores_on_the_command_line(tmp_path, capsys):
    from graphprune.cli import main

    source, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "p.onnx"
    onnx.save(_classifier("logits"), source)
    np.savez(calib, x=_inputs(512, 1))
    assert main(["prune", str(source), "-o", str(out), "--ratio", "0.6", "--calibration", str(calib),
                 "--class-scores", "logits"]) == 0
    assert "head 'head' -> logits 'logits'" in capsys.readouterr().out
    assert main(["prune", str(source), "-o", str(tmp_path / "q.onnx"), "--calibration", str(calib),
                 "--class-scores", "nope"]) == 2
    assert "'nope' is not a graph output" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_a_softmax_over_another_axis_is_not_taken_for_the_head():
    """The numbers confirm the head: a softmax over the rows (axis 0) is not the classes'."""
    model = _classifier("softmax")
    for node in model.graph.node:
        if node.op_type == "Softmax":
            node.attribute[0].i = 0
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    (head,) = heads.candidates(graph, 17)
    z, out = runner.outputs(_with_outputs(model, ["m3"]), [{"x": _inputs(8, 3)[:, 0]}])[0]
    assert not heads.confirm(head, out, z)  # (the output first: ``out`` is m3's, ``z`` the graph output's)
    assert not heads.confirm(head, z, out)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def test_the_active_class_restriction_computes_the_full_cross_entropy():
    """Classes no row gives ``ACTIVE`` probability keep their weights; the normaliser and the
    cross-entropy still count them exactly."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((300, 12)), np.ones((300, 1))], axis=1)
    theta0 = rng.standard_normal((13, 500)) * 0.3
    theta0[-1, 50:] -= 15.0  # 450 classes far below: inactive
    teacher = theta0 + rng.standard_normal(theta0.shape) * 0.2
    z = x @ teacher
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    offset = np.zeros((1, 500))
    problem = heads.Problem(x, p, theta0, offset)
    assert 2 <= problem.active.sum() < 500
    rows = np.arange(300)
    ce, top = problem.cross_entropy(rows, problem.theta0)
    logits = x @ theta0
    logq = logits - logits.max(1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(1, keepdims=True))
    assert ce == pytest.approx(float(-(p * logq).sum(1).mean()), rel=1e-9)
    assert top == pytest.approx(float(np.mean(logq.argmax(1) == p.argmax(1))))
    fitted = problem.fit(rows, 0.01, fixed_bias=False)
    assert problem.cross_entropy(rows, fitted)[0] < ce


def _segmenter() -> onnx.ModelProto:
    """x[n, 3, 8, 8] -> Conv 3x3 (24) -> Relu -> Conv 3x3 (24) -> Relu -> Conv 1x1 (6 classes,
    bias) -> Softmax over the channels (axis 1): a per-pixel classifier."""
    rng = np.random.default_rng(1)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", (24, 3, 3, 3), 0.4), init("w2", (24, 24, 3, 3), 0.15), init("w3", (6, 24, 1, 1), 0.6),
             init("b3", (6,), 0.3)]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["logits"], name="classify"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "segmenter", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 6, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_per_pixel_softmax_over_the_channels_of_a_convolution(tmp_path):
    """Every pixel is a row: the 1x1 convolution before a softmax over axis 1 is the head."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((64, 1, 3, 8, 8)).astype(np.float32))
    result = graphprune.prune(_segmenter(), ratio=0.6, calibration=str(calib))
    assert result.report["verification"]["ok"]
    (head,) = result.report["calibration"]["passes"]["SoftmaxHeadPass"]["heads"]
    assert (head["layer"], head["classes"]) == ("classify", 6)
    assert head["rows"] > 51 * 8  # positions of every held-in sample, not one row per sample
    onnx.checker.check_model(result.model, full_check=True)


def test_a_sigmoid_head_is_fitted_class_by_class(tmp_path, monkeypatch):
    """A multi-label output (a pitch tracker's bins, a wake-word score): each class an
    independent binary cross-entropy to the original's probability."""
    model = _classifier("sigmoid")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_inputs(512, 1))
    result = graphprune.prune(model, ratio=0.6, calibration=str(calib))
    (head,) = result.report["calibration"]["passes"]["SoftmaxHeadPass"]["heads"]
    assert (head["layer"], head["kind"], head["written"]) == ("head", "sigmoid", True)
    assert head["cv_cross_entropy"][1] < head["cv_cross_entropy"][0]
    monkeypatch.setattr(heads, "candidates", lambda graph, opset: [])
    plain = graphprune.prune(model, ratio=0.6, calibration=str(calib))

    def bce(pruned: onnx.ModelProto) -> float:
        feeds = [{"x": x} for x in _inputs(400, 9)]
        p = np.concatenate([o[0] for o in runner.outputs(model, feeds)]).astype(np.float64)
        q = np.clip(np.concatenate([o[0] for o in runner.outputs(pruned, feeds)]).astype(np.float64), 1e-7, 1 - 1e-7)
        return float(-(p * np.log(q) + (1 - p) * np.log(1 - q)).sum(axis=1).mean())

    assert bce(result.model) < bce(plain.model)
