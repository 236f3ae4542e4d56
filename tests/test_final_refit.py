"""The final refit: once the reconstruction is kept, it runs again with every calibration
sample (the held-out ones too) and that model is written; the fidelity reported stays the
one measured on samples the measured model never saw (graphprune.pipeline.calibrated)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_calibration_passes import cnn, images, mlp, tokens

import graphprune
from graphprune.errors import UsageError
from graphprune.verify.validate import session as ort_session


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def test_final_refit_uses_every_sample_and_keeps_the_held_out_fidelity():
    calib = {"x": images(48)}
    options = dict(ratio=0.5, round_to=1, criterion="l1", calibration=calib)
    held = graphprune.prune(cnn(), final_refit="off", **options)
    final = graphprune.prune(cnn(), final_refit="on", **options)
    assert final.report["verification"]["ok"]
    # the same rewrite: the same structure, counts and held-out figures
    assert _shapes(final.model) == _shapes(held.model)
    assert final.report["params_after"] == held.report["params_after"]
    for key in ("cosine", "rel_l2"):
        assert final.report["fidelity"][key] == held.report["fidelity"][key]
    assert "final refit" not in str(held.report["fidelity"])
    assert held.report["calibration"]["final_refit"] == {"ran": False, "why": "final_refit off"}
    # ... but other weights: refit on all 48 samples instead of the 38 not held out
    info = final.report["calibration"]["final_refit"]
    assert info["ran"] and info["kept"] and info["samples"] == 48
    assert final.report["calibration"]["used"] == 38 and final.report["calibration"]["held_out"] == 10
    changed = [k for k, v in _weights(final.model).items() if not np.array_equal(v, _weights(held.model)[k])]
    assert changed
    # the written model, in-sample on the held-out samples, is nearer the original than the
    # model that never saw them
    assert info["held_out_in_sample"]["rel_l2"] <= final.report["fidelity"]["rel_l2"]
    assert "measured_before_final_refit" in final.report["fidelity"]
    # and it runs in ONNX Runtime
    out = ort_session(final.model).run(None, {"x": images(2, seed=7)[0]})[0]
    assert out.shape == (1, 5) and np.isfinite(out).all()


def test_final_refit_is_nearer_on_new_data_where_the_fit_is_data_limited():
    """A dense layer refit from few rows: the 20 % held out are a quarter more data, and the
    written model is nearer the original on samples neither fit saw."""
    calib = {"x": tokens(24)}
    options = dict(ratio=0.5, round_to=1, calibration=calib)
    held = graphprune.prune(mlp(), final_refit="off", **options)
    final = graphprune.prune(mlp(), final_refit="on", **options)
    assert final.report["calibration"]["final_refit"]["kept"]
    fresh = tokens(200, seed=9)
    reference, a, b = (ort_session(m) for m in (mlp(), held.model, final.model))
    errors = []
    for model in (a, b):
        diff = [np.linalg.norm(model.run(None, {"x": x})[0] - reference.run(None, {"x": x})[0]) for x in fresh]
        errors.append(float(np.mean(diff)))
    assert errors[1] < errors[0], errors


def test_auto_runs_on_a_small_model_and_says_why_not_elsewhere():
    calib = {"x": images(40)}
    auto = graphprune.prune(cnn(), ratio=0.5, round_to=1, calibration=calib)
    assert auto.report["calibration"]["final_refit"]["ran"]
    none_held = graphprune.prune(cnn(), ratio=0.5, round_to=1, calibration=calib, holdout=0.0)
    assert none_held.report["calibration"]["final_refit"] == {
        "ran": False, "why": "no sample was held out: the reconstruction used every sample"}
    nothing = graphprune.prune(cnn(), ratio=0.5, round_to=1, calibration=calib, reconstruction="none")
    assert nothing.report["calibration"]["final_refit"] == {"ran": False, "why": "reconstruction none reads no samples"}
    plain = graphprune.prune(cnn(), ratio=0.5, round_to=1)
    assert "calibration" not in plain.report


def test_auto_skips_a_reconstruction_estimated_expensive(monkeypatch):
    from graphprune.pipeline import calibrated

    monkeypatch.setattr(calibrated, "FINAL_REFIT_SECONDS", 0.0)
    result = graphprune.prune(cnn(), ratio=0.5, round_to=1, calibration={"x": images(40)})
    info = result.report["calibration"]["final_refit"]
    assert not info["ran"] and "estimated at" in info["why"] and "final_refit on" in info["why"]
    forced = graphprune.prune(cnn(), ratio=0.5, round_to=1, calibration={"x": images(40)}, final_refit="on")
    assert forced.report["calibration"]["final_refit"]["kept"]


def test_auto_skips_after_a_reconstruction_that_took_long(monkeypatch):
    """The estimate counts runs, not least-squares fits (a quantized ResNet-50 at a small input:
    177 s of reconstruction estimated under 30 s, then 175 s more of final refit): the time the
    reconstruction took decides too. Here the threshold sits between the estimate and what
    the reconstruction took."""
    from graphprune.pipeline import calibrated
    from graphprune.planning import search

    monkeypatch.setattr(search, "SEARCH_SECONDS_PER_NODE", 0.0)
    monkeypatch.setattr(search, "SEARCH_SECONDS_PER_MAC", 0.0)
    monkeypatch.setattr(calibrated, "FINAL_REFIT_SECONDS", 1e-6)
    result = graphprune.prune(cnn(), ratio=0.5, round_to=1, calibration={"x": images(40)})
    info = result.report["calibration"]["final_refit"]
    assert not info["ran"] and "the reconstruction took" in info["why"], info


def test_a_budget_prune_refits_its_chosen_allocation_on_every_sample():
    calib = {"x": images(40)}
    options = dict(target_macs=0.5, calibration=calib, search=0, reconstruction="refit")
    held = graphprune.prune(cnn(), final_refit="off", **options)
    final = graphprune.prune(cnn(), final_refit="on", **options)
    assert final.report["budget"]["chosen"] == held.report["budget"]["chosen"]
    assert _shapes(final.model) == _shapes(held.model)
    info = final.report["calibration"]["final_refit"]
    assert info["ran"] and info["samples"] == 40
    if info["kept"]:
        assert any(not np.array_equal(v, _weights(held.model)[k]) for k, v in _weights(final.model).items())


@pytest.mark.parametrize("target", [dict(ratio=0.5, round_to=1), dict(target_macs=0.5, search=0)])
def test_the_final_refit_takes_the_ridges_its_reconstruction_validated(monkeypatch, target):
    """Each layer's ridge is validated once: the final refit of the same rewrite recalls the
    choice (and whether the fit paid) instead of cross-validating again on its new folds."""
    from graphprune.calibration import sequential

    calls: list[int] = []
    validate = sequential.choose_ridge

    def counted(*args, **kwargs):
        calls.append(1)
        return validate(*args, **kwargs)

    monkeypatch.setattr(sequential, "choose_ridge", counted)
    options = dict(**target, calibration={"x": images(40)}, reconstruction="refit")
    held = graphprune.prune(cnn(), final_refit="off", **options)
    validated, calls[:] = len(calls), []
    final = graphprune.prune(cnn(), final_refit="on", **options)
    info = final.report["calibration"]["final_refit"]
    assert validated > 0 and info["ran"] and info["samples"] == 40
    assert len(calls) == validated  # the final refit's layers validated nothing
    assert final.report["calibration"]["passes"]["RefitPass"]["ridge_median"] == \
        held.report["calibration"]["passes"]["RefitPass"]["ridge_median"]
    assert final.report["verification"]["ok"]


def test_usage_errors():
    with pytest.raises(UsageError, match="final_refit"):
        graphprune.prune(cnn(), ratio=0.5, final_refit="on")
    with pytest.raises(UsageError, match="unknown final refit"):
        graphprune.prune(cnn(), ratio=0.5, calibration={"x": images(8)}, final_refit="sometimes")


def test_cli_prints_the_final_refit_and_rejects_it_without_data(tmp_path):
    model, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(cnn(), str(model))
    np.savez(calib, x=images(40))
    run = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(model), "-o", str(tmp_path / "p.onnx"),
                          "--ratio", "0.5", "--calibration", str(calib), "--report", str(tmp_path / "r.json")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "final refit on all 40 samples" in run.stdout
    assert json.loads((tmp_path / "r.json").read_text())["calibration"]["final_refit"]["kept"]
    bad = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(model), "-o", str(tmp_path / "q.onnx"),
                          "--ratio", "0.5", "--final-refit", "on"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--final-refit applies with --calibration only" in bad.stderr
    assert not (tmp_path / "q.onnx").exists()
