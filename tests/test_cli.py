"""The command line: analyze, prune, bench, demo; one-line errors, exit codes, no stray files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_node, make_model
from onnx import helper

from graphprune.cli import main
from graphprune.examples import example_cnn
from graphprune.rules import OpRule, lookup, register, unregister

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``graphprune ARGS`` in-process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse exits on usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    cnn = folder / "cnn.onnx"
    onnx.save(example_cnn(), cnn)
    small = folder / "small.onnx"
    nodes = [
        conv_node("x", "W1", "a", "B1", name="conv1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv_node("r", "W2", "y", name="conv2"),
    ]
    onnx.save(
        make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None},
                   {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 3, 3)}),
        small,
    )
    return {"cnn": cnn, "small": small}


# --------------------------------------------------------------------------- analyze


def test_analyze_prints_a_groups_table(capsys, models):
    code, out, err = cli(capsys, "analyze", models["cnn"])
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == ["group", "anchor", "units", "members", "ops", "status", "reason"]
    assert "prunable" in out and "frozen" in out
    assert "graph input 'image'" in out
    assert "channel groups:" in out


def test_analyze_json(capsys, models):
    code, out, _ = cli(capsys, "analyze", models["cnn"], "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"summary", "groups", "prunable_fraction", "unsupported"}
    summary = data["summary"]
    assert summary["groups"] == len(data["groups"])
    assert summary["prunable"] == sum(g["prunable"] for g in data["groups"]) > 0
    assert all({"id", "anchor", "size", "frozen", "prunable"} <= set(g) for g in data["groups"])
    assert 0 < data["prunable_fraction"] <= 1


# --------------------------------------------------------------------------- prune


def test_prune_writes_model_report_and_plan_and_the_plan_replays(capsys, models, tmp_path):
    out_model, report, plan = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "plan.json"
    code, out, err = cli(
        capsys, "prune", models["cnn"], "-o", out_model, "--ratio", "0.5", "--criterion", "random",
        "--seed", "5", "--report", report, "--save-plan", plan,
    )
    assert code == 0, err
    assert f"wrote {out_model}" in out and "verification: ok" in out
    pruned = onnx.load(out_model)
    onnx.checker.check_model(pruned, full_check=True)
    data = json.loads(report.read_text())
    assert data["verification"]["ok"] is True
    assert data["params_after"] < data["params_before"]
    saved = json.loads(plan.read_text())
    assert saved["version"] == 1 and saved["groups"]

    replayed = tmp_path / "replayed.onnx"
    code, _, err = cli(capsys, "prune", models["cnn"], "-o", replayed, "--plan", plan, "-q")
    assert code == 0, err
    assert onnx.load(replayed).SerializeToString() == pruned.SerializeToString()


def test_prune_json_report(capsys, models, tmp_path):
    out_model = tmp_path / "out.onnx"
    code, out, err = cli(capsys, "prune", models["small"], "-o", out_model, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["output"] == str(out_model)
    assert data["channels"] == {"prunable": 8, "removed": 4}
    assert err == "", "--json prints no progress"


def test_prune_shows_progress_on_stderr(capsys, models, tmp_path, monkeypatch):
    # progress is shown on a terminal (forced here), never in pipes and logs by default
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "n.onnx")
    assert code == 0 and err == ""
    monkeypatch.setenv("GRAPHPRUNE_PROGRESS", "1")
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "o.onnx")
    assert code == 0
    assert [line.split()[1] for line in err.splitlines()] == [
        "load", "analysis", "plan", "prune", "verify",
    ]
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "q.onnx", "-q")
    assert code == 0 and err == ""


# --------------------------------------------------------------------------- bench, demo


def test_bench_table_and_json(capsys, models):
    code, out, err = cli(capsys, "bench", models["cnn"], models["small"], "--runs", "3",
                         "--warmup", "1", "-q")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["model", "median", "ms"]
    assert any("cnn" in line for line in lines) and any("small" in line for line in lines)

    code, out, err = cli(capsys, "bench", models["cnn"], models["small"], "--runs", "3",
                         "--warmup", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data) == 2
    for entry in data:
        assert entry["runs"] == 3 and entry["median_ms"] > 0 and entry["p90_ms"] >= entry["median_ms"]


def test_demo_json(capsys, tmp_path):
    code, out, err = cli(capsys, "demo", "--json", "--runs", "3", "--output-dir", tmp_path)
    assert code == 0, err
    data = json.loads(out)
    assert data["verification"]["ok"] is True
    assert data["macs_after"] < data["macs_before"]
    assert len(data["latency_ms"]) == 2
    assert all(Path(f).is_file() for f in data["files"])


def test_demo_table(capsys, tmp_path):
    code, out, _ = cli(capsys, "demo", "--runs", "2", "-q", "--output-dir", tmp_path)
    assert code == 0
    assert "params" in out and "MACs" in out and "ORT CPU latency" in out
    assert "verification: ok" in out


# --------------------------------------------------------------------------- bad input


def _assert_one_line_error(code: int, err: str, *, exit_code: int = 2) -> str:
    assert code == exit_code, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("graphprune: error: ")
    return lines[0]


def _external_data_model(folder: Path) -> Path:
    path = folder / "ext.onnx"
    onnx.save(example_cnn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    (folder / "ext.data").unlink()
    return path


def _not_onnx(folder: Path, cnn: Path) -> Path:
    path = folder / "notes.onnx"
    path.write_text("hello, not a model\n")
    return path


def _truncated(folder: Path, cnn: Path) -> Path:
    path = folder / "cut.onnx"
    path.write_bytes(cnn.read_bytes()[:3000])
    return path


BAD_MODELS = {
    "not_onnx": _not_onnx,
    "truncated": _truncated,
    "missing_external_data": lambda folder, cnn: _external_data_model(folder),
    "missing_file": lambda folder, cnn: folder / "nowhere.onnx",
}


@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_bad_model_is_one_line_exit_2_and_no_file(capsys, models, tmp_path, kind):
    bad = BAD_MODELS[kind](tmp_path, models["cnn"])
    out_model = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "prune", "-q", bad, "-o", out_model)
    _assert_one_line_error(code, err)
    assert not out_model.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []
    code, _, err = cli(capsys, "analyze", bad)
    _assert_one_line_error(code, err)


def test_bad_model_error_is_the_last_line_with_progress_on(capsys, models, tmp_path):
    bad = BAD_MODELS["not_onnx"](tmp_path, models["cnn"])
    code, _, err = cli(capsys, "prune", bad, "-o", tmp_path / "out.onnx")
    assert code == 2
    lines = err.splitlines()
    assert lines[-1].startswith("graphprune: error: ")
    assert all(line.startswith("[") for line in lines[:-1]), "only progress before the error"


@pytest.mark.parametrize("spelling", ["same", "dotdot"])
def test_output_path_equal_to_input_is_refused(capsys, models, tmp_path, spelling):
    folder = tmp_path / "dir"
    folder.mkdir()
    model = folder / "m.onnx"
    model.write_bytes(models["small"].read_bytes())
    before = model.read_bytes()
    output = str(model) if spelling == "same" else f"{folder}/../dir/m.onnx"
    code, _, err = cli(capsys, "prune", "-q", model, "-o", output)
    line = _assert_one_line_error(code, err)
    assert "input" in line
    assert model.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]


def test_output_path_equal_to_input_relative_spelling(capsys, models, tmp_path, monkeypatch):
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "m.onnx").write_bytes(models["small"].read_bytes())
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "prune", "-q", "dir/m.onnx", "-o", "./dir/../dir/m.onnx")
    _assert_one_line_error(code, err)
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("ratio", ["1.5", "1", "-0.1", "half"])
def test_ratio_outside_zero_one_is_one_line(capsys, models, tmp_path, ratio):
    out_model = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", out_model, "--ratio", ratio)
    _assert_one_line_error(code, err)
    assert not out_model.exists()


@pytest.mark.parametrize("ratio", ["1.5", "1", "-0.1", "half"])
def test_ratio_outside_zero_one_fails_without_a_file(capsys, models, tmp_path, ratio):
    out_model = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", out_model, "--ratio", ratio)
    assert code == 2
    assert "ratio" in err.splitlines()[-1]
    assert not out_model.exists()


def test_unknown_criterion_is_one_line(capsys, models, tmp_path):
    out_model = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", out_model,
                       "--criterion", "magic")
    line = _assert_one_line_error(code, err)
    assert "magic" in line
    assert not out_model.exists()


def test_missing_output_folder_is_one_line(capsys, models, tmp_path):
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", tmp_path / "no" / "o.onnx")
    _assert_one_line_error(code, err)


def test_bad_plan_file_is_one_line(capsys, models, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 99}')
    out_model = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", out_model, "--plan", plan)
    _assert_one_line_error(code, err)
    assert not out_model.exists()


class LyingCumSumRule(OpRule):
    """Wrong on purpose: CumSum over channels mixes them."""

    op_types = ("CumSum",)

    def couple(self, node, ctx):
        ctx.couple_all_axes(node.inputs[0], node.outputs[0])


def test_verification_failure_exits_3_without_a_file(capsys, tmp_path):
    if lookup("", "CumSum", 17) is not None:
        pytest.skip("graphprune now has a built-in CumSum rule")
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Add", ["a", "shift"], ["s"], name="shift"),
        helper.make_node("CumSum", ["s", "axis"], ["b"], name="cumsum"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    model = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, {"x": [1, 3, 6, 6]}, {"y": None},
                         {"W_stem": (8, 3, 3, 3), "W_head": (4, 8, 3, 3), "shift": (8, 1, 1),
                          "axis": np.array(1, np.int64)}), model)
    out_model = tmp_path / "out.onnx"
    register(LyingCumSumRule)
    try:
        code, _, err = cli(capsys, "prune", "-q", model, "-o", out_model)
    finally:
        unregister(LyingCumSumRule)
    _assert_one_line_error(code, err, exit_code=3)
    assert not out_model.exists()


# --------------------------------------------------------------------------- the real process


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "graphprune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_graphprune_from_the_repository_root(models, tmp_path):
    out_model = tmp_path / "out.onnx"
    done = _run("prune", "-q", str(models["small"]), "-o", str(out_model), "--json", cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["verification"]["ok"] is True
    assert out_model.is_file()


def test_python_m_graphprune_bad_input_exit_code(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    done = _run("prune", "-q", str(text), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("graphprune: error: ")
    assert done.stdout == ""
    assert not (tmp_path / "out.onnx").exists()
