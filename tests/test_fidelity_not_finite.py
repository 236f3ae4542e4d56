"""A pruned model whose outputs are NaN or infinite where the original's are finite is the worst
there is: no reconstruction or candidate may win with it (a NaN bias makes every output NaN; read
as zeros, that scored relative L2 1, nearer than an honest prune further off)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
from test_calibration_passes import cnn, images

import graphprune
from graphprune.calibration import bias as bias_mod
from graphprune.calibration import sequential
from graphprune.calibration.fidelity import compare_outputs, deciding_rel_l2
from graphprune.tables import _level_and_peak_warnings, prune_summary


def test_non_finite_outputs_rank_below_any_finite_error():
    rng = np.random.default_rng(0)
    original = [[rng.standard_normal((1, 10)).astype(np.float32)] for _ in range(6)]
    far = [[-y[0]] for y in original]  # relative L2 2: the sign flipped
    broken = [[np.full_like(y[0], np.nan)] for y in original[:5]] + [original[5]]
    far_figures, broken_figures = compare_outputs(["y"], original, far), compare_outputs(["y"], original, broken)
    assert math.isclose(deciding_rel_l2(far_figures), 2.0, rel_tol=1e-6)
    assert broken_figures["pruned_not_finite"] == 5 and broken_figures["outputs"]["y"]["pruned_not_finite"] == 5
    assert deciding_rel_l2(broken_figures) == math.inf > deciding_rel_l2(far_figures)
    assert "pruned_not_finite" not in far_figures
    assert any("NaN or infinite" in line for line in _level_and_peak_warnings(broken_figures))
    assert not any("NaN or infinite" in line for line in _level_and_peak_warnings(far_figures))
    # NaN where the original is NaN too is no breakage (an input outside the model's domain)
    both = [[np.where(np.arange(10) < 3, np.nan, y[0]).astype(np.float32)] for y in original]
    assert "pruned_not_finite" not in compare_outputs(["y"], both, both)
    # nor has an output the original answers with NaN a top-1 agreement (the arg-max of NaN is entry 0)
    nan = [[np.full((1, 10), np.nan, np.float32)] for _ in range(6)]
    assert "top1_agreement" not in compare_outputs(["y"], nan, far)["outputs"]["y"]
    masked = [[np.where(np.arange(10) < 2, -np.inf, y[0]).astype(np.float32)] for y in original]
    assert "top1_agreement" in compare_outputs(["y"], masked, masked)["outputs"]["y"]  # (-inf: a masked score)


def test_a_reconstruction_that_writes_nan_biases_is_undone(monkeypatch):
    """The statistics correction's biases turned NaN (round 71: one NaN calibration pixel did it):
    the model written is the one without it, the warning says why, and the JSON report holds no
    infinity."""
    write = bias_mod.write_bias

    def nan_bias(graph, view, values, names):  # (the fault injected: every bias it writes is NaN)
        return write(graph, view, np.full_like(values, np.nan), names)

    monkeypatch.setattr(sequential, "write_bias", nan_bias)
    x = images()
    result = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1", calibration={"x": x},
                              reconstruction="stats", final_refit="off")
    plain = graphprune.prune(cnn(), ratio=0.5, round_to=1, criterion="l1", calibration={"x": x},
                             reconstruction="none")
    fid = result.report["fidelity"]
    assert fid["reconstruction_reverted"] and "NaN or infinite" in fid["warning"], fid.get("warning")
    assert fid["with_reconstruction"]["rel_l2"] is not None and "pruned_not_finite" not in fid
    assert fid["rel_l2"] == plain.report["fidelity"]["rel_l2"]
    for init in result.model.graph.initializer:
        assert np.isfinite(onnx.numpy_helper.to_array(init)).all(), init.name
    json.loads(json.dumps(result.report, default=str), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert "NaN or infinite" in prune_summary(result.report)
