"""The Olive pass, end to end: `olive run` on examples/olive/ in a folder holding model.onnx."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from graphprune.examples import example_cnn
from graphprune.verify.metrics import count_params

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "olive"


def _olive_run(olive: str, folder: Path) -> None:
    """``olive run`` of the workflow and package config in ``folder``; it must succeed."""
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(
        [olive, "run", "--config", "workflow.json", "--package-config", "package_config.json",
         "--disable_telemetry"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_example_files_name_the_pass_and_the_latency_evaluator():
    workflow = json.loads((EXAMPLE / "workflow.json").read_text())
    package = json.loads((EXAMPLE / "package_config.json").read_text())
    (prune,) = workflow["passes"].values()
    assert prune["type"] in package["passes"]
    assert package["passes"][prune["type"]]["module_path"] == "graphprune.integrations.olive.GraphPrunePass"
    metric = workflow["evaluators"][workflow["evaluator"]]["metrics"][0]
    assert metric["type"] == "latency"
    assert workflow["input_model"]["model_path"] == "model.onnx"


@pytest.mark.olive
def test_olive_run_prunes_model_onnx(tmp_path):
    pytest.importorskip("olive")  # in the test extra: CI has it
    olive = shutil.which("olive")
    assert olive is not None, "olive-ai installs the `olive` command"
    for name in ("workflow.json", "package_config.json"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    original = example_cnn()
    onnx.save(original, tmp_path / "model.onnx")
    _olive_run(olive, tmp_path)
    output = tmp_path / "pruned" / "model.onnx"
    pruned = onnx.load(output)
    onnx.checker.check_model(pruned, full_check=True)
    assert count_params(pruned) < 0.5 * count_params(original)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in original.graph.input]
    config = json.loads((tmp_path / "pruned" / "model_config.json").read_text())
    summary = config["config"]["model_attributes"]["graphprune"]
    assert summary["verification"] == "the zeroed original" and summary["params"][1] < summary["params"][0]
    # the ORT latency evaluator ran on the input model and on the pruned one
    before = json.loads((tmp_path / "pruned" / "input_model_metrics.json").read_text())
    after = json.loads((tmp_path / "pruned" / "metrics.json").read_text())
    assert "latency-avg" in json.dumps(before) and "latency-avg" in json.dumps(after)


@pytest.mark.olive
def test_olive_pass_calibrates_on_random_feeds_to_a_macs_budget(tmp_path):
    """The pass takes calibration (here random synthetic feeds) and a budget instead of ratio."""
    pytest.importorskip("olive")
    olive = shutil.which("olive")
    assert olive is not None
    workflow = json.loads((EXAMPLE / "workflow.json").read_text())
    workflow["passes"] = {"prune": {"type": "GraphPrune", "target_macs": 0.5, "calibration": "random:12"}}
    workflow["evaluate_input_model"] = False
    workflow.pop("evaluator")
    (tmp_path / "workflow.json").write_text(json.dumps(workflow))
    shutil.copy(EXAMPLE / "package_config.json", tmp_path / "package_config.json")
    onnx.save(example_cnn(), tmp_path / "model.onnx")
    _olive_run(olive, tmp_path)
    (report_path,) = tmp_path.rglob("graphprune_report.json")  # beside the pass output (Olive cache)
    report = json.loads(report_path.read_text())
    assert report["calibration"]["source"].startswith("random (12 synthetic feeds")
    assert report["budget"]["target"] == "macs" and abs(report["budget"]["achieved"] - 0.5) <= 0.03
    assert report["verification"]["ok"] and "fidelity" in report
    onnx.checker.check_model(str(tmp_path / "pruned" / "model.onnx"), full_check=True)
