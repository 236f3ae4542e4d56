"""Calibrated pruning end to end on small real graphs: criteria, reconstruction passes,
fidelity, the API and the command line (real ONNX Runtime sessions throughout)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from graphprune.passes.base import PassContext, PassManager
from graphprune.passes.bias_compensation import BiasCompensationPass
from graphprune.passes.prune_channels import PruneChannelsPass, removed_elements
from graphprune.passes.refit import RefitPass
from graphprune.passes.stats_correction import StatsCorrectionPass
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.calibration import runner
from graphprune.calibration.data import load_calibration
from graphprune.errors import UsageError
from graphprune.io import ir
from graphprune.pipeline.session import Session
from graphprune.planning.planner import plan_ratio
from graphprune.verify.validate import session as ort_session


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(np.float32), name)


def cnn(seed: int = 0, depthwise: bool = False) -> onnx.ModelProto:
    """Conv(3->16) Relu Conv(16->16) Relu [depthwise Conv] Conv(16->8) Relu GAP Flatten Gemm(8->5)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.standard_normal((16, 3, 3, 3)) * 0.4), _init("b1", rng.standard_normal(16) * 0.1),
        _init("w2", rng.standard_normal((16, 16, 3, 3)) * 0.15), _init("b2", rng.standard_normal(16) * 0.1),
        _init("w3", rng.standard_normal((8, 16, 1, 1)) * 0.3), _init("b3", rng.standard_normal(8) * 0.1),
        _init("wf", rng.standard_normal((5, 8)) * 0.5), _init("bf", rng.standard_normal(5) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
    ]
    last = "r2"
    if depthwise:
        inits += [_init("wd", rng.standard_normal((16, 1, 3, 3)) * 0.4), _init("bd", rng.standard_normal(16) * 0.1)]
        nodes += [helper.make_node("Conv", ["r2", "wd", "bd"], ["cd"], name="dw", group=16, pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["cd"], ["rd"], name="relud")]
        last = "rd"
    nodes += [
        helper.make_node("Conv", [last, "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp(*, relu: bool = True, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.standard_normal((8, 16))), _init("b1", rng.standard_normal(16)),
             _init("w2", rng.standard_normal((16, 5)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="up_bias")]
    nodes.append(helper.make_node("Relu" if relu else "Identity", ["hb"], ["a"], name="act"))
    nodes.append(helper.make_node("MatMul", ["a", "w2"], ["y"], name="down"))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def images(count: int = 40, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 3, 8, 8)).astype(np.float32)


def tokens(count: int = 40, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((count, 1, 6, 8)) + 0.5).astype(np.float32)


# ---------------------------------------------------------------------- API
def test_refit_restores_the_function():
    calib = {"x": images()}
    plain = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1", calibration=calib,
                             reconstruction="none")
    refit = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1", calibration=calib)
    assert refit.report["verification"]["ok"]  # the structural rewrite is still exact
    assert plain.report["params_after"] == refit.report["params_after"]
    assert refit.report["fidelity"]["rel_l2"] < 0.6 * plain.report["fidelity"]["rel_l2"]
    cal = refit.report["calibration"]
    assert cal["samples"] == 40 and cal["held_out"] == 8 and cal["used"] == 32
    passes = cal["passes"]["RefitPass"]
    assert passes["layers"] == 3 and passes["rel_error_after"] < passes["rel_error_before"]
    # (this random network's five scores each keep one sign with a spread of a fifth of their offset
    # or less, every sample the same class: values on a scale, followed by their centred cosine)
    logits = refit.report["fidelity"]["outputs"]["logits"]
    assert "top1_agreement" not in logits and 0 < logits["centred_cosine"] < logits["cosine"]
    # the report measures the same pruned model before the refit on the same held-out samples
    without = refit.report["fidelity"]["without_reconstruction"]
    assert without["rel_l2"] == plain.report["fidelity"]["rel_l2"]
    assert without["cosine"] == plain.report["fidelity"]["cosine"]
    assert "warning" not in refit.report["fidelity"] and "without_reconstruction" not in plain.report["fidelity"]


def test_a_layer_too_large_to_refit_is_bias_compensated(monkeypatch):
    """A consumer with more inputs (channels x kernel) than the refit's Gram can hold
    (CREPE's 1,024-channel conv with 64 taps: K = 65,537, 69 GB) is bias-compensated
    instead, says so in the report, and the others are still refit."""
    from graphprune.calibration import refit_targets

    calib = {"x": images()}
    options = dict(ratio=0.5, round_to=1, criterion="l1", calibration=calib)
    plain = graphprune.prune(cnn(), reconstruction="none", **options)
    monkeypatch.setattr(refit_targets, "MAX_REFIT_INPUTS", 40)  # conv2 keeps 8 x 9 = 72 inputs
    result = graphprune.prune(cnn(), **options)
    assert result.report["verification"]["ok"]
    passes = result.report["calibration"]["passes"]
    refit, bias = passes["RefitPass"], passes["BiasCompensationPass"]
    assert any(s.startswith("conv2: 72 inputs per output") and "bias-compensated" in s
               for s in refit["skipped"]), refit
    assert bias["layers"] == 1 and refit["layers"] == 2  # conv3 and fc still refit
    assert result.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]


def test_refit_is_exact_when_the_removed_units_are_linear_in_the_kept_ones():
    """A linear MLP with 16 hidden units of rank 8: any 8 kept units span the rest."""
    result = graphprune.prune(mlp(relu=False), ratio=0.25, round_to=1, calibration={"x": tokens()})
    assert result.report["channels"]["removed"] == 4
    assert result.report["fidelity"]["rel_l2"] < 1e-3
    assert result.report["fidelity"]["cosine"] > 0.99999


def test_without_calibration_nothing_changes():
    plain = graphprune.prune(cnn(), ratio=0.5, round_to=1)
    explicit = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1")
    assert "calibration" not in plain.report and "fidelity" not in plain.report
    assert plain.plan.to_dict()["groups"] == explicit.plan.to_dict()["groups"]
    assert plain.model.SerializeToString() == explicit.model.SerializeToString()


def test_data_aware_criterion_drops_dead_channels():
    """Channels 0-3 of conv1 never fire (large negative bias) but have the largest weights:
    l1 keeps them, the activation criterion removes them."""
    model = cnn()
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    b1 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w1[:4] *= 5
    b1[:4] = -100.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(b1, "b1"))
    calib = {"x": images()}
    anchor = "b1:0"
    for criterion, dead_removed in (("l1", False), ("activation", True), ("wanda", True),
                                    ("flap", True), ("reconstruction", True)):
        res = graphprune.prune(model, ratio=0.25, round_to=1, criterion=criterion, calibration=calib)
        removed = next(g.remove for g in res.plan.groups if g.anchor == anchor)
        assert (set(removed) == {0, 1, 2, 3}) is dead_removed, criterion
    assert res.report["calibration"]["criterion"] == "reconstruction"
    auto = graphprune.prune(model, ratio=0.25, round_to=1, calibration=calib)
    assert auto.report["calibration"]["criterion_requested"] == "auto"


@pytest.mark.parametrize("reconstruction", ["stats", "bias"])
def test_other_reconstructions_help(reconstruction):
    calib = {"x": images()}
    plain = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1", calibration=calib,
                             reconstruction="none")
    fixed = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1", calibration=calib,
                             reconstruction=reconstruction)
    assert fixed.report["fidelity"]["rel_l2"] < plain.report["fidelity"]["rel_l2"]
    assert fixed.report["calibration"]["passes"]


def test_depthwise_consumer_is_refit_per_group():
    res = graphprune.prune(cnn(depthwise=True), ratio=0.5, round_to=1, criterion="l1",
                           calibration={"x": images()})
    assert res.report["verification"]["ok"]
    assert res.report["calibration"]["passes"]["RefitPass"]["layers"] == 4
    ort_session(res.model).run(None, {"x": images(1)[0]})


def decoder(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->16) Relu ConvTranspose(16->12, k2 s2) Relu ConvTranspose(12->8, k3 s2 p1 op1)
    Relu Conv(8->2): a segmentation head's up-sampling path (paddle2onnx text detectors)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.standard_normal((16, 3, 3, 3)) * 0.4), _init("b1", rng.standard_normal(16) * 0.1),
        _init("u1", rng.standard_normal((16, 12, 2, 2)) * 0.3), _init("c1", rng.standard_normal(12) * 0.1),
        _init("u2", rng.standard_normal((12, 8, 3, 3)) * 0.2), _init("c2", rng.standard_normal(8) * 0.1),
        _init("w3", rng.standard_normal((2, 8, 1, 1)) * 0.5),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="relu1"),
        helper.make_node("ConvTranspose", ["ra", "u1", "c1"], ["b"], name="up1", strides=[2, 2]),
        helper.make_node("Relu", ["b"], ["rb"], name="relu2"),
        helper.make_node("ConvTranspose", ["rb", "u2", "c2"], ["c"], name="up2", strides=[2, 2],
                         pads=[1, 1, 1, 1], output_padding=[1, 1]),
        helper.make_node("Relu", ["c"], ["rc"], name="relu3"),
        helper.make_node("Conv", ["rc", "w3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 24, 24])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_transpose_layers_are_scored_and_refit():
    calib = {"x": np.random.default_rng(3).standard_normal((40, 1, 3, 6, 6)).astype(np.float32)}
    plain = graphprune.prune(decoder(), ratio=0.5, round_to=1, criterion="l1", calibration=calib,
                             reconstruction="none")
    refit = graphprune.prune(decoder(), ratio=0.5, round_to=1, criterion="l1", calibration=calib)
    assert refit.report["verification"]["ok"]
    assert plain.report["channels"] == refit.report["channels"] and refit.report["channels"]["removed"] == 18
    passes = refit.report["calibration"]["passes"]["RefitPass"]
    assert passes["layers"] == 3 and "skipped" not in passes  # up1, up2 and head
    assert refit.report["fidelity"]["rel_l2"] < 0.8 * plain.report["fidelity"]["rel_l2"]
    # the data-aware criteria read the transposed convolutions as consumers too
    auto = graphprune.prune(decoder(), ratio=0.5, round_to=1, calibration=calib)
    # (auto's own choice per group, also where another criterion's whole plan was kept)
    chosen = auto.report["calibration"]["criterion_choice"].get("auto_per_group") or auto.report["calibration"][
        "criteria_chosen"]
    assert chosen and not any("data-free" in name for name in chosen), chosen
    y = ort_session(auto.model).run(None, {"x": calib["x"][0]})[0]
    assert y.shape == (1, 2, 24, 24)


def test_bad_options():
    with pytest.raises(UsageError, match="unknown reconstruction"):
        graphprune.prune(cnn(), calibration={"x": images()}, reconstruction="magic")
    with pytest.raises(UsageError, match="unknown criterion 'wanda2'"):
        graphprune.prune(cnn(), calibration={"x": images()}, criterion="wanda2")
    with pytest.raises(UsageError, match="criterion 'wanda' reads activations: it needs calibration data"):
        graphprune.prune(cnn(), criterion="wanda")  # data-aware needs calibration (it was "unknown")
    with pytest.raises(UsageError, match="lossless"):
        graphprune.prune(cnn(), lossless=True, calibration={"x": images()})


# ---------------------------------------------------------------------- passes
def _pruned_session(model: onnx.ModelProto, ratio: float = 0.5):
    s = Session(model)
    analysis = s.analyze()
    plan = plan_ratio(analysis, ratio=ratio, round_to=1)
    s.apply([PruneChannelsPass(analysis, plan)])
    return s, analysis, plan


def _layer_output(model: onnx.ModelProto, name: str, feeds, data_dir=None) -> np.ndarray:
    out: list[np.ndarray] = []
    runner.stream(model, [name], feeds, lambda _i, _n, v: out.append(v), data_dir=data_dir)
    return np.concatenate([v.reshape(-1, v.shape[-1]) for v in out])


def test_bias_compensation_keeps_the_mean_output():
    model = mlp()
    s, analysis, plan = _pruned_session(model)
    calib = load_calibration({"x": tokens()}, s.prepared, holdout=0.0)
    batches = runner.Batches(calib.samples, [1] * calib.total, False)
    from graphprune.calibration import stats
    from graphprune.calibration.linear import linear_view

    original = ir.import_graph(s.prepared, getattr(s, "store", None))
    down = linear_view(next(n for n in original.nodes if n.name == "down"), s.opset)
    data_dir = s.store.root if getattr(s, "store", None) else None
    layer_stats = stats.collect(s.prepared, [down], batches, gram=False, data_dir=data_dir)
    removed = removed_elements(analysis, plan)
    ctx = PassContext(opset=s.opset)
    manager = PassManager([BiasCompensationPass(original, layer_stats, removed)])
    assert manager.run(s.graph, ctx).modified
    assert not manager.run(s.graph, ctx).modified  # a second run changes nothing
    pruned = s.export()
    data_dir = s.store.root if getattr(s, "store", None) else None
    mean_o = _layer_output(s.prepared, "y", calib.samples, data_dir).mean(0)
    mean_p = _layer_output(pruned, "y", calib.samples, data_dir).mean(0)
    np.testing.assert_allclose(mean_p, mean_o, rtol=1e-4, atol=1e-4)


def test_stats_correction_matches_channel_moments():
    model = cnn()
    s, analysis, plan = _pruned_session(model)
    calib = load_calibration({"x": images()}, s.prepared, holdout=0.0)
    data_dir = s.store.root if getattr(s, "store", None) else None
    batches = runner.batches(s.prepared, calib.samples, 8, data_dir)
    removed = removed_elements(analysis, plan)
    ctx = PassContext(opset=s.opset)
    result = PassManager([StatsCorrectionPass(s.prepared, batches, removed, store=s.store)]).run(s.graph, ctx)
    assert result.modified and ctx.stats["StatsCorrectionPass"]["layers"] == 3
    pruned = s.export()
    # conv2 is the first wave: its kept channels now have the original's moments exactly
    kept = np.setdiff1d(np.arange(16), removed[("w2", 0)])
    feeds = calib.samples
    orig = _moments(s.prepared, "c2", feeds, data_dir)
    new = _moments(pruned, "c2", feeds, data_dir)
    np.testing.assert_allclose(new[0], orig[0][kept], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(new[1], orig[1][kept], rtol=1e-3, atol=1e-4)


def _moments(model, name, feeds, data_dir):
    out: list[np.ndarray] = []
    runner.stream(model, [name], feeds, lambda _i, _n, v: out.append(v), data_dir=data_dir)
    values = np.moveaxis(np.concatenate(out), 1, -1).reshape(-1, out[0].shape[1]).astype(np.float64)
    return values.mean(0), values.var(0)


def test_refit_pass_contract():
    s, analysis, plan = _pruned_session(cnn())
    calib = load_calibration({"x": images()}, s.prepared)
    batches = runner.batches(s.prepared, calib.samples, 8, s.store.root if getattr(s, "store", None) else None)
    refit = RefitPass(s.prepared, batches, removed_elements(analysis, plan), store=s.store)
    assert "RefitPass(samples=32" in repr(refit)
    ctx = PassContext(opset=s.opset, debug=True)
    manager = PassManager([refit])
    assert manager.run(s.graph, ctx).modified
    assert not manager.run(s.graph, ctx).modified
    onnx.checker.check_model(s.export(), full_check=True)


# ---------------------------------------------------------------------- command line
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphprune", *args], capture_output=True, text=True)


def test_cli_calibration(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(cnn(), str(model))
    np.savez(tmp_path / "calib.npz", x=images())
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    done = _cli("prune", str(model), "-o", str(out), "--ratio", "0.5", "--round-to", "1",
                "--calibration", str(tmp_path / "calib.npz"), "--report", str(report))
    assert done.returncode == 0, done.stderr
    assert "fidelity" in done.stdout and "centred_cosine" in done.stdout  # (see test_refit_restores_the_function)
    assert "without_reconstruction.rel_l2" in done.stdout and "calibration: 32 samples used, 8 held out" in done.stdout
    data = json.loads(report.read_text())
    assert data["calibration"]["criterion"] == "auto"
    assert sum(data["calibration"]["criteria_chosen"].values()) == 3  # one choice per pruned group
    assert data["calibration"]["held_out"] == 8 and data["fidelity"]["samples"] == 8
    assert data["verification"]["ok"]
    ort_session(onnx.load(str(out))).run(None, {"x": images(1)[0]})


def test_cli_bad_calibration_files(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(cnn(), str(model))
    np.savez(tmp_path / "wrong.npz", image=images())
    np.savez(tmp_path / "rank.npz", x=images()[:, 0])
    (tmp_path / "junk.npz").write_text("junk")
    out = tmp_path / "small.onnx"
    for name, message in (("wrong.npz", "calibration array 'image' is not a graph input"),
                          ("rank.npz", "calibration input 'x' has rank 4; expected 5"),
                          ("junk.npz", "cannot read calibration file"),
                          ("missing.npz", "no such calibration file")):
        done = _cli("prune", str(model), "-o", str(out), "--calibration", str(tmp_path / name))
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr
        assert not out.exists()


def test_ridge_path_errors_equal_explicit_solves():
    """The cross-validation errors of every ridge candidate, from one eigen-decomposition,
    equal those of an explicit solve per candidate (also with nearly collinear inputs)."""
    from graphprune.calibration import ridge
    from graphprune.calibration.ridge import RidgePath

    rng = np.random.default_rng(0)
    k, og = 30, 5

    def fold(rows: int):
        x = rng.standard_normal((rows, k)) + 0.5
        x[:, 3] = 0.999 * x[:, 2]
        y = 2 * x[:, :og] + 0.3 * rng.standard_normal((rows, og)) + 1
        xt = np.concatenate([x, np.ones((rows, 1))], 1)
        return xt.T @ xt, xt.T @ y, float(np.square(y).sum())

    (g0, c0, _), (g1, c1, y1) = fold(50), fold(60)
    anchor = rng.standard_normal((k + 1, og))
    path = RidgePath(g0, c0, anchor, g1, c1, y1)
    for lam in (1e-6, 1e-3, 0.1, 1.0, 100.0):
        want = ridge.fit_error(g1, c1, y1, ridge.fit(g0, c0, anchor, lam))
        assert abs(path.error(lam) - want) <= 1e-9 * abs(want), (lam, path.error(lam), want)


def test_a_reconstruction_that_fits_the_held_out_samples_worse_is_undone():
    """Held-out samples unlike the ones fitted (here: blank images, where the refit's
    compensated biases are all that is left): the reconstructed model is further from the
    original on them than the model without reconstruction, so that one is the result, and
    the report says what was undone and by how much."""
    from graphprune.calibration.data import holdout_indices
    from graphprune.tables import calibration_lines

    x = images()
    x[holdout_indices(len(x), 0.2)] = 0.0
    kept = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1", calibration={"x": x})
    plain = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1", calibration={"x": x},
                             reconstruction="none")
    report, fid = kept.report, kept.report["fidelity"]
    assert report["verification"]["ok"]
    assert fid["reconstruction_reverted"] and report["calibration"]["reconstruction_reverted"]
    assert fid["rel_l2"] == plain.report["fidelity"]["rel_l2"] < fid["with_reconstruction"]["rel_l2"]
    assert "written without it" in fid["warning"] and "without_reconstruction" not in fid
    assert report["params_after"] == plain.report["params_after"]
    weights = {i.name: numpy_helper.to_array(i) for i in plain.model.graph.initializer}
    for init in kept.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), weights[init.name])
    assert any(line.startswith("  undone:") for line in calibration_lines(report["calibration"]))
    # nor is it reconstructed again on every sample (the final refit)
    assert report["calibration"]["final_refit"]["ran"] is False
    assert "undone" in report["calibration"]["final_refit"]["why"]
    onnx.checker.check_model(kept.model, full_check=True)


def test_a_budget_candidate_whose_reconstruction_does_worse_is_taken_without_it():
    """The budget's choice by measurement judges each candidate with and without its
    reconstruction on the held-out samples and keeps the nearer: blank held-out images make
    the refit's biases all that is left, so the chosen allocation comes without reconstruction,
    as a budget prune with ``reconstruction="none"`` gives it."""
    from graphprune.calibration.data import holdout_indices
    from graphprune.tables import calibration_lines

    x = images()
    x[holdout_indices(len(x), 0.2)] = 0.0
    kept = graphprune.prune(cnn(), target_macs=0.5, calibration={"x": x})
    plain = graphprune.prune(cnn(), target_macs=0.5, calibration={"x": x}, reconstruction="none")
    report = kept.report
    assert report["verification"]["ok"] and report["budget"]["met"]
    chosen = next(c for c in report["budget"]["candidates"] if c["allocation"] == report["budget"]["chosen"])
    assert chosen["reconstruction_reverted"]["pooled_rel_l2"] > chosen["pooled_rel_l2"]
    assert report["fidelity"]["reconstruction_reverted"] and report["calibration"]["reconstruction_reverted"]
    assert report["fidelity"]["rel_l2"] == plain.report["fidelity"]["rel_l2"]
    weights = {i.name: numpy_helper.to_array(i) for i in plain.model.graph.initializer}
    for init in kept.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), weights[init.name])
    assert any(line.startswith("  undone:") for line in calibration_lines(report["calibration"]))
