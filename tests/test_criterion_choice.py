"""A calibrated ratio prune weighs the whole plans of ``auto``, ``wanda`` and the data-free
criterion on the held-out samples (graphprune.pipeline.criterion_choice), on real ORT runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx

import graphprune
from graphprune.pipeline import criterion_choice
from tests.test_calibration_criteria import duplicated_mlp


def _calib(count: int = 40) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((count, 1, 6, 8)).astype(np.float32)}


def _prune(**options):
    return graphprune.prune(duplicated_mlp(), ratio=0.5, round_to=1, calibration=_calib(options.pop("count", 40)),
                            **options)


def test_the_nearest_whole_plan_is_kept_where_nothing_compensates():
    """Without a reconstruction, obs's choice per group (the error a refit leaves) is not the
    nearest whole model: the data-free l1 plan is, and it is the one written."""
    result = _prune(reconstruction="none")
    cal = result.report["calibration"]
    weighed = cal["criterion_choice"]
    errors = {k: v["error"] for k, v in weighed["held_out"].items()}
    assert weighed["compared"] and weighed["samples"] == 8 and set(errors) == {"auto", "wanda", "l1"}
    assert weighed["kept"] == min(errors, key=errors.get) == "l1" and errors["auto"] > errors["l1"]
    assert weighed["confidence"] >= criterion_choice.CONFIDENCE  # (nearer on most resamples of the 8)
    assert weighed["auto_per_group"] == {"obs": 1}  # (what auto alone would have applied)
    assert cal["criterion"] == "l1" and cal["criteria_chosen"] is None
    assert result.plan.meta["criterion"] == "l1"
    # the plan written is the data-free criterion's, and its held-out figure the one compared
    named = _prune(reconstruction="none", criterion="l1")
    assert [g.remove for g in result.plan.groups] == [g.remove for g in named.plan.groups]
    assert "criterion_choice" not in named.report["calibration"]
    wanda = _prune(reconstruction="none", criterion="wanda").report["calibration"]
    assert wanda["criterion_choice"] == {"compared": False, "why": "criterion 'wanda' asked for"}
    assert result.report["fidelity"]["pooled_rel_l2"] == errors["l1"]
    assert result.report["verification"]["ok"]


def test_not_weighed_without_enough_held_out_samples_or_time(monkeypatch):
    few = _prune(count=20).report["calibration"]["criterion_choice"]
    assert few == {"compared": False, "why": "4 held-out calibration samples; the comparison needs 8 "
                                             "(more samples or a larger --holdout)"}
    monkeypatch.setattr(criterion_choice, "CRITERION_SECONDS", 0.0)
    costly = _prune().report["calibration"]
    assert not costly["criterion_choice"]["compared"] and "estimated at" in costly["criterion_choice"]["why"]
    assert costly["criterion"] == "auto" and costly["criteria_chosen"] == {"obs": 1}


def test_cli_says_which_plan_was_nearest(tmp_path):
    model, out, report = tmp_path / "mlp.onnx", tmp_path / "small.onnx", tmp_path / "report.json"
    onnx.save(duplicated_mlp(), str(model))
    np.savez(tmp_path / "calib.npz", **_calib())
    done = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(model), "-o", str(out), "--ratio", "0.5",
                           "--round-to", "1", "--calibration", str(tmp_path / "calib.npz"), "--reconstruction", "none",
                           "--report", str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("calibration:"))
    assert "criterion l1, the nearest plan (held-out relative L2: auto " in line and ", wanda " in line, line

    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(report.read_text(), parse_constant=strict)
    assert data["calibration"]["criterion_choice"]["kept"] == "l1"


def test_another_plan_needs_most_resamples_of_the_held_out_samples():
    """auto is left only for a plan nearer on most bootstrap draws: not for one sample's luck."""
    rng = np.random.default_rng(0)
    size = rng.uniform(1, 2, (10, 2))
    auto = (0.2 * size, size)
    assert criterion_choice.nearer_share((0.1 * size, size), auto) == 1.0
    assert criterion_choice.nearer_share(auto, auto) == 0.0
    lucky = 0.2 * size
    lucky[3] = 0.0  # nearer on one sample of ten, as near on the rest
    share = criterion_choice.nearer_share((lucky, size), auto)
    assert 0.5 < share < criterion_choice.CONFIDENCE
    assert criterion_choice.nearer_share(None, auto) is None


def test_a_budget_measures_its_allocation_with_each_criterions_units():
    """A calibrated budget measures the allocation it chose with wanda's and l1's units at the same
    widths; without a reconstruction l1's are nearer, as for the ratio prune, and are written."""
    result = graphprune.prune(duplicated_mlp(), target_macs=0.5, round_to=1, calibration=_calib(),
                              reconstruction="none")
    cal, budget = result.report["calibration"], result.report["budget"]
    weighed = cal["criterion_choice"]
    assert weighed["compared"] and weighed["kept"] == "l1" and weighed["confidence"] >= criterion_choice.CONFIDENCE
    labels = [row["allocation"] for row in budget["candidates"]]
    assert f"{weighed['allocation']} (wanda)" in labels and f"{weighed['allocation']} (l1)" in labels
    assert cal["criterion"] == "l1" and weighed["auto_per_group"] == {"obs": 1}
    ratio = _prune(reconstruction="none", criterion="l1")
    assert [g.remove for g in result.plan.groups] == [g.remove for g in ratio.plan.groups]  # (the same widths here)
    assert result.report["fidelity"]["pooled_rel_l2"] == weighed["held_out"]["l1"]["error"]
    assert result.report["verification"]["ok"] and abs(budget["achieved"] - 0.5) <= 0.03
