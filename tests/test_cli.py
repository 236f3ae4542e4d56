"""The command line: analyze, prune, bench, demo; one-line errors, exit codes, no stray files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_node, make_model
from onnx import TensorProto, helper, numpy_helper

from graphprune.cli import main
from graphprune.examples import example_cnn
from graphprune.rules import OpRule, register, unregister

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
        "load", "analysis", "plan", "prune", "verify", "count",
    ]
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "q.onnx", "-q")
    assert code == 0 and err == ""
    monkeypatch.setenv("GRAPHPRUNE_PROGRESS", "0")
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "r.onnx")
    assert code == 0 and err == ""


def test_long_runs_show_progress_in_logs(capsys, models, tmp_path, monkeypatch):
    """Where stderr is no terminal (a pipe, a log, a notebook cell), a run that has taken
    PROGRESS_AFTER seconds prints its stages from then on: a calibrated budget search printed
    nothing for minutes."""
    from graphprune import cli_commands

    monkeypatch.delenv("GRAPHPRUNE_PROGRESS", raising=False)
    monkeypatch.setattr(cli_commands, "PROGRESS_AFTER", 0.0)
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "s.onnx")
    assert code == 0
    assert [line.split()[1] for line in err.splitlines()] == [
        "load", "analysis", "plan", "prune", "verify", "count",
    ]


def test_stage_numbers_never_go_back(capsys, models, tmp_path, monkeypatch):
    """A calibrated prune checks its preparation again after the final refit: that line read
    "[7/11] verify" after "[11/11] final refit". A stage entered again after a later one is
    unnumbered ("[..] verify")."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Constant", [], ["shift"], value=numpy_helper.from_array(np.full(1, 0.5, np.float32))),
             helper.make_node("Add", ["x", "shift"], ["xs"]), helper.make_node("MatMul", ["xs", "W1"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]), helper.make_node("MatMul", ["b", "W2"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (16, 32)), ("W2", (32, 4)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "k.onnx")
    monkeypatch.setenv("GRAPHPRUNE_PROGRESS", "1")
    code, _, err = cli(capsys, "prune", tmp_path / "k.onnx", "-o", tmp_path / "c.onnx", "--ratio", "0.3",
                       "--calibration", "random:24")
    assert code == 0, err
    lines = [line.split(" (+")[0] for line in err.splitlines() if line.startswith("[")]
    assert lines[-3:] == ["[11/11] final refit", "[..] count", "[..] verify"], lines  # (the preparation's check)


def test_budget_search_progress_names_the_allocation(capsys, models, tmp_path, monkeypatch):
    """A calibrated budget measures several allocations, each through prune, verify and
    reconstruction: its stage lines say which allocation they belong to (they read as the
    run's own stages going backwards, every stage line twice), and the run's own stages
    read plainly again after the search."""
    monkeypatch.setenv("GRAPHPRUNE_PROGRESS", "1")
    code, _, err = cli(capsys, "prune", models["cnn"], "-o", tmp_path / "b.onnx", "--target-macs", "0.6",
                       "--calibration", "random:24")
    assert code == 0, err
    stages = [line.split(" ", 1)[1].rsplit(" (+", 1)[0] for line in err.splitlines() if line.startswith("[")]
    assert all(a != b for a, b in zip(stages, stages[1:], strict=False)), stages
    measured = [s for s in stages if s.startswith("allocation ")]
    assert any(s.startswith("allocation 1 (") and s.endswith(": prune") for s in measured), stages
    assert any(s.startswith("allocation 2 (") for s in measured), stages
    last = max(i for i, s in enumerate(stages) if s.startswith("allocation "))
    assert "fidelity" in stages[last + 1:], stages


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


def test_a_file_in_another_format_says_what_it_is(capsys, tmp_path):
    """An ONNX Runtime ``.ort`` file (ORT writes one where the optimised model's path ends in
    .ort) and a zip archive: a one-line usage error that names the format and what to do."""
    import onnxruntime as ort

    source = tmp_path / "cnn.onnx"
    onnx.save(example_cnn(), source)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "cnn.ort")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    code, _, err = cli(capsys, "prune", str(tmp_path / "cnn.ort"), "-o", str(tmp_path / "out.onnx"))
    line = _assert_one_line_error(code, err)
    assert "ONNX Runtime .ort file" in line and "give the .onnx model" in line, line
    import zipfile

    with zipfile.ZipFile(tmp_path / "weights.pt", "w") as archive:
        archive.writestr("archive/data.pkl", b"not a model")
    code, _, err = cli(capsys, "prune", str(tmp_path / "weights.pt"), "-o", str(tmp_path / "out.onnx"))
    assert "graphprune export torch|keras" in _assert_one_line_error(code, err)
    assert not (tmp_path / "out.onnx").exists()


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


def test_input_failing_the_checker_is_named_not_the_pruned_model(capsys, tmp_path):
    """tf2onnx writes MediaPipe's selfie segmenter with HardSwish at opset 13 (HardSwish is
    opset 14): the pruned model failed the checker like its input, and the error blamed the
    rewrite (exit 3). The input is what is wrong: exit 2, no file."""
    nodes = [conv_node("x", "w1", "a", name="c1"),
             helper.make_node("HardSwish", ["a"], ["h"], name="hs"),
             conv_node("h", "w2", "y", name="c2")]
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]},
                       {"w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)}, opset=13, check=False)
    path, out_model = tmp_path / "hs13.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    # the same where calibration or a latency budget runs the input first: these named ONNX
    # Runtime's loader, or graphprune's temporary copy ("cannot load '/tmp/graphprune-...'")
    for extra in ([], ["--calibration", "random:4"], ["--target-latency", "0.6", "--latency-runs", "2"]):
        code, _, err = cli(capsys, "prune", "-q", path, "-o", out_model, *extra)
        line = _assert_one_line_error(code, err)
        assert "the input model fails onnx.checker" in line and "HardSwish" in line, extra
        assert "/tmp" not in line and not out_model.exists()


def test_input_that_does_not_run_is_named_not_the_zeroed_original(capsys, tmp_path):
    """A graph that passes the checker but fails in ONNX Runtime as exported (the
    TorchScript exporter's Cohere attention multiplies tensors that cannot broadcast): the
    error blamed "the zeroed original" (exit 3). The input is what is wrong: exit 2, no file."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["b"]),
             helper.make_node("Reshape", ["b", "shape"], ["y"])]  # 4 values per row into rows of 3
    model = make_model(nodes, {"x": ["N", 8]}, {"y": None},
                       {"W1": (8, 16), "W2": (16, 4), "shape": np.array([-1, 3], np.int64)})
    path, out_model = tmp_path / "broken.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    code, _, err = cli(capsys, "prune", "-q", path, "-o", out_model)
    line = _assert_one_line_error(code, err)
    assert "the input model does not run in ONNX Runtime" in line and "Reshape" in line
    assert not out_model.exists()
    # the same where calibration runs the original first ("the original model does not run")
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((4, 2, 8)).astype(np.float32))
    code, _, err = cli(capsys, "prune", "-q", path, "-o", out_model, "--calibration", calibration)
    line = _assert_one_line_error(code, err)
    assert "the input model does not run in ONNX Runtime" in line
    assert not out_model.exists()


def test_input_that_runs_only_at_sizes_no_probe_tries_asks_for_input_shape(capsys, tmp_path):
    """An open size the model needs to be a multiple of 7 (a KV cache whose last axis must be
    the head size is the real case): no candidate size runs, and the error says at which sizes
    it ran and how to give others; given, the prune goes through."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]), helper.make_node("MatMul", ["a", "W2"], ["y"])]
    model = make_model(nodes, {"x": [1, "L"]}, {"y": None},
                       {"shape": np.array([-1, 7], np.int64), "W1": (7, 16), "W2": (16, 4)})
    path, out_model = tmp_path / "sevens.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    code, _, err = cli(capsys, "prune", "-q", path, "-o", out_model)
    line = _assert_one_line_error(code, err)
    assert "the input model does not run in ONNX Runtime" in line
    assert "run at sizes chosen for the open dimensions: x=1x" in line and "--input-shape NAME=" in line
    assert not out_model.exists()
    code, _, err = cli(capsys, "prune", "-q", path, "-o", out_model, "--input-shape", "x=1,14", "--input-shape", "x=1,21")
    assert "--input-shape given more than once for 'x'" in _assert_one_line_error(code, err)  # (the last one won)
    assert not out_model.exists()
    code, _, _ = cli(capsys, "prune", "-q", path, "-o", out_model, "--input-shape", "x=1,14")
    assert code == 0 and out_model.exists()


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


#: a custom op that mixes the channels (a cumulative sum over them, as a model-local function)
MIXER = helper.make_function(
    "com.example", "Mixer", ["X"], ["Y"],
    [helper.make_node("Constant", [], ["axis"], value_int=1),
     helper.make_node("CumSum", ["X", "axis"], ["Y"])],
    [helper.make_opsetid("", 17)],
)


class LyingMixerRule(OpRule):
    """Wrong on purpose: Mixer mixes the channels."""

    op_types = ("Mixer",)
    domain = "com.example"

    def couple(self, node, ctx):
        ctx.couple_all_axes(node.inputs[0], node.outputs[0])


def test_verification_failure_exits_3_without_a_file(capsys, tmp_path):
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Add", ["a", "shift"], ["s"], name="shift"),
        helper.make_node("Mixer", ["s"], ["b"], name="mixer", domain="com.example"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    model = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, {"x": [1, 3, 6, 6]}, {"y": None},
                         {"W_stem": (8, 3, 3, 3), "W_head": (4, 8, 3, 3), "shift": (8, 1, 1)},
                         extra_opsets={"com.example": 1}, functions=[MIXER]), model)
    out_model = tmp_path / "out.onnx"
    register(LyingMixerRule)
    try:
        code, _, err = cli(capsys, "prune", "-q", model, "-o", out_model)
    finally:
        unregister(LyingMixerRule)
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


# --------------------------------------------------------------------------- help (issue 13)


def _all_parsers(parser, path=("graphprune",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_option_of_every_command_has_help_with_its_default():
    import argparse

    from graphprune.cli import build_parser

    seen = set()
    for path, parser in _all_parsers(build_parser()):
        seen.add(" ".join(path))
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{' '.join(path)} {name}: no help"
            if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
                assert "default" in action.help, f"{' '.join(path)} {name}: default not shown"
    assert {"graphprune prune", "graphprune bench", "graphprune sweep", "graphprune demo",
            "graphprune analyze"} <= seen


@pytest.mark.parametrize("command", ["", "analyze", "prune", "bench", "sweep", "demo"])
def test_help_shows_examples_and_ranges(capsys, command):
    code, out, _ = cli(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert "examples:" in out
    out = " ".join(out.split())  # argparse wraps lines
    if command in ("prune", "demo"):
        assert "in [0, 1)" in out and ("(default: 0.5;" if command == "prune" else "(default: 0.5)") in out
    if command == "bench":
        assert "--threads" in out and "(default: 50)" in out


def test_analyze_explains_its_columns(capsys, models):
    code, out, _ = cli(capsys, "analyze", models["cnn"])
    assert code == 0
    legend = out.split("columns:")[1]
    for word in ("anchor", "':0' is axis 0", "members", "ops", "prunable*", "frozen", "fixed"):
        assert word in legend
    code, out, _ = cli(capsys, "analyze", models["cnn"], "--no-legend")
    assert "columns:" not in out


# --------------------------------------------------------------------------- what verification compared with


def test_prune_summary_says_what_it_compared_with(capsys, models, tmp_path):
    code, out, err = cli(capsys, "prune", "-q", models["cnn"], "-o", tmp_path / "r.onnx")
    assert code == 0, err
    assert "verification: ok against the zeroed original" in out
    assert "another function than the original" in out


def test_erase_blocks_summary_reports_the_real_difference_to_the_original(capsys, models, tmp_path):
    report = tmp_path / "depth.json"
    code, out, err = cli(capsys, "prune", "-q", models["cnn"], "-o", tmp_path / "d.onnx",
                         "--erase-blocks", "1", "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    reference = data["verification"]["reference"]
    assert f"verification: ok against {reference}" in out and "zeroed" in reference
    real = data.get("max_rel_diff_vs_original", (data.get("depth") or {}).get("max_rel_diff_vs_original"))
    assert real is not None and real > 1e-3  # a block is gone: the function really changed
    assert f"differs from the original itself by max rel diff {real:.3g}" in out


# --------------------------------------------------------------------------- --json errors


def test_json_errors_are_json_on_stdout(capsys, models, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    code, out, err = cli(capsys, "prune", bad, "-o", tmp_path / "o.onnx", "--json")
    assert code == 2 and err == ""
    data = json.loads(out)
    assert data["exit_code"] == 2 and data["type"] == "InvalidModelError" and data["error"]
    # argparse's own errors too
    code, out, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "o.onnx", "--ratio", "2",
                         "--json")
    assert code == 2 and err == ""
    assert json.loads(out)["exit_code"] == 2 and "ratio" in json.loads(out)["error"]
    code, out, err = cli(capsys, "analyze", bad, "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2
    assert not (tmp_path / "o.onnx").exists()


def test_tolerance_below_zero_exits_2(capsys, models, tmp_path):
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", tmp_path / "o.onnx",
                       "--tolerance", "-1")
    line = _assert_one_line_error(code, err)
    assert "tolerance" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("option", ["--report", "--save-plan", "--html"])
@pytest.mark.parametrize("bad", ["missing_folder", "a_folder", "the_output"])
def test_bad_side_output_path_exits_2_and_writes_nothing(capsys, models, tmp_path, option, bad):
    out_model = tmp_path / "out.onnx"
    target = {"missing_folder": tmp_path / "no" / "r.json", "a_folder": tmp_path,
              "the_output": out_model}[bad]
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", out_model, option, target)
    line = _assert_one_line_error(code, err)
    assert option in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["-o", "--report", "--html", "--save-plan"])
@pytest.mark.parametrize("bad", ["fifo", "device", "folder_slash", "fifo_data"])
def test_an_output_that_is_no_regular_file_is_refused_and_left_alone(capsys, models, tmp_path, where, bad):
    """Run as root, ``-o /dev/null`` replaced the system's /dev/null with the pruned model (the
    atomic rename replaces whatever is at the target; ``--report /dev/full`` the same), a FIFO
    became a file, and ``-o DIR/sub/`` wrote a file named ``sub``. Each is refused before any
    work, and what is there stays what it was."""
    target = tmp_path / "target"
    if bad == "fifo_data":  # (the weights' file beside -o: found only when the model was saved)
        if where != "-o":
            pytest.skip("-o's companion only")
        target = tmp_path / "out.onnx.data"
        os.mkfifo(target)
    if bad == "fifo":
        os.mkfifo(target)
    elif bad == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(target, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))  # a private /dev/null
    before = os.stat(target).st_mode if target.exists() else None
    value = f"{target}/" if bad == "folder_slash" else str(tmp_path / "out.onnx") if bad == "fifo_data" else str(target)
    out_model = value if where == "-o" else str(tmp_path / "out.onnx")
    extra = [] if where == "-o" else [where, value]
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", out_model, *extra)
    line = _assert_one_line_error(code, err)
    assert ("not a regular file" in line) if bad != "folder_slash" else ("names a folder" in line), line
    assert (os.stat(target).st_mode if target.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ([target.name] if before is not None else [])


@pytest.mark.parametrize("where", ["-o", "--report", "--html", "--save-plan"])
@pytest.mark.parametrize("bad", ["too_long", "refuses_files"])
def test_an_output_the_file_system_refuses_exits_2_before_any_work(capsys, models, tmp_path, where, bad):
    """A name over the file system's limit raised ENAMETOOLONG from ``Path.is_dir`` (exit 1,
    "internal error"; for ``-o`` only after the whole prune), and a folder ``os.access`` calls
    writable that takes no file (root on /proc, a read-only mount) failed after the model was
    written: both are refused up front now."""
    if bad == "refuses_files" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    target = {"too_long": tmp_path / ("r" * 300 + ".json"), "refuses_files": Path("/proc/graphprune.json")}[bad]
    out_model = target if where == "-o" else tmp_path / "out.onnx"
    extra = [] if where == "-o" else [where, target]
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", out_model, *extra)
    line = _assert_one_line_error(code, err)
    assert where in line and ("too long" in line.lower() or "cannot use" in line or "not writable" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    for command in (["sweep", models["small"], "--ratios", "0.3", "-o"], ["demo", "-q", "--output-dir"]):
        code, _, err = cli(capsys, *command, tmp_path / ("d" * 300) if bad == "too_long" else "/proc/graphprune")
        _assert_one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_side_output_failing_after_the_model_takes_the_model_back(capsys, models, tmp_path, monkeypatch):
    """A side output that fails once the model is written (a disk that filled up since the
    check) exits 2 and leaves nothing this call wrote."""
    from graphprune.errors import UsageError
    from graphprune.io import _atomic

    real = _atomic.atomic_write_text

    def failing(path, text):
        if Path(path).suffix == ".html":
            raise UsageError(f"cannot write '{path}': No space left on device")
        real(path, text)

    monkeypatch.setattr(_atomic, "atomic_write_text", failing)
    code, _, err = cli(capsys, "prune", "-q", models["small"], "-o", tmp_path / "out.onnx",
                       "--report", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert "No space left" in _assert_one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bench


def test_bench_writes_no_carriage_returns_into_a_log(capsys, models, monkeypatch):
    """Progress rewritten in place (``\\rtiming k/N``) belongs on a terminal; a log or a pipe got
    it for a 3 s run. There a quick run prints only its table."""
    monkeypatch.delenv("GRAPHPRUNE_PROGRESS", raising=False)
    code, out, err = cli(capsys, "bench", models["small"], "--runs", "3", "--warmup", "0")
    assert code == 0 and "\r" not in err and "timing" not in err, err
    monkeypatch.setenv("GRAPHPRUNE_PROGRESS", "1")  # (asked for: on any stream)
    code, out, err = cli(capsys, "bench", models["small"], "--runs", "3", "--warmup", "0")
    assert code == 0 and "timing 3/3" in err


def test_bench_threads_and_the_batch_that_really_ran(capsys, models):
    # the CNN has an open batch axis, the small model a fixed batch of 1
    code, out, err = cli(capsys, "bench", models["cnn"], models["small"], "--runs", "2",
                         "--warmup", "0", "--batch", "2", "--threads", "1", "--json")
    assert code == 0, err
    cnn, small = json.loads(out)
    assert (cnn["batch"], small["batch"]) == (2, 1)
    assert cnn["threads"] == small["threads"] == 1 and small["requested_batch"] == 2
    code, out, _ = cli(capsys, "bench", models["cnn"], models["small"], "--runs", "2",
                       "--warmup", "0", "--batch", "2", "-q")
    assert f"note: {models['small']} ran batch 1, not 2 (a fixed batch axis" in out
    code, _, err = cli(capsys, "bench", models["cnn"], "--threads", "0")
    _assert_one_line_error(code, err)


# --------------------------------------------------------------------------- demo leaves nothing behind


def test_demo_leaves_no_temporary_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TMPDIR"] = str(scratch)
    for args in (["demo", "--runs", "2", "-q"], ["demo", "--runs", "2", "--json"]):
        done = subprocess.run([sys.executable, "-m", "graphprune", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        if "--json" in args:
            assert json.loads(done.stdout)["files"] == []
        else:
            assert "models not kept" in done.stdout
        # (onnxruntime itself keeps a small '.ses' file in TMPDIR on import: a file, not ours)
        assert [p.name for p in scratch.iterdir() if p.is_dir() or "graphprune" in p.name] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


SLOW_VERIFY = """
import os, sys, time
from pathlib import Path

def patch():
    from graphprune.pipeline import session

    checked = session.Session.verify_against

    def held(self, *args, **kwargs):  # the prune is under way: weights in TMPDIR, output not yet written
        Path(sys.argv[1]).write_text(str(os.getpid()))  # (the process doing the work)
        time.sleep(120)
        return checked(self, *args, **kwargs)

    session.Session.verify_against = held

from graphprune import cli

if os.environ.get("GRAPHPRUNE_TEST_GUARDED"):  # as the console command: the work in a child (imports there)
    from graphprune import crash_guard

    json_mode = "--json" in sys.argv
    raise SystemExit(crash_guard.guarded(lambda: patch() or cli.main(sys.argv[2:]),
                                         lambda message, code: cli._fail(message, code, "Crash", json_mode)))
patch()
raise SystemExit(cli.main(sys.argv[2:]))
"""


def _held_prune(tmp_path, args: list[str], guarded: bool = False) -> subprocess.Popen:
    """``graphprune ARGS`` on the example CNN (``tmp_path / "cnn.onnx"``) with ``TMPDIR`` at
    ``tmp_path / "tmp"``, held in its verification (:data:`SLOW_VERIFY`): the weight folder is
    there and no output is written yet."""
    scratch, model, marker = tmp_path / "tmp", tmp_path / "cnn.onnx", tmp_path / "marker"
    scratch.mkdir()
    onnx.save(example_cnn(), model)
    (tmp_path / "held.py").write_text(SLOW_VERIFY)
    process = subprocess.Popen([sys.executable, str(tmp_path / "held.py"), str(marker), *args],
                               env={**os.environ, "TMPDIR": str(scratch),
                                    **({"GRAPHPRUNE_TEST_GUARDED": "1"} if guarded else {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               # (a suite run in the background of a script inherits SIGINT ignored)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(1200):  # (the marker is created, then its pid written: read it once written)
        if (marker.exists() and marker.read_text().strip()) or process.poll() is not None:
            break
        time.sleep(0.1)
    if not marker.exists() or not marker.read_text().strip():
        process.kill()
        raise AssertionError(process.communicate())
    return process


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize(("json_mode", "guarded"), [(False, False), (True, False), (False, True)])
def test_sigterm_removes_the_weight_folder_and_writes_nothing(tmp_path, json_mode, guarded):
    """(``guarded``: the console command, whose work runs in a child: the signal is passed on.)"""
    scratch, model = tmp_path / "tmp", tmp_path / "cnn.onnx"
    args = ["prune", str(model), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5",
            "--report", str(tmp_path / "report.json"), *(["--json"] if json_mode else [])]
    process = _held_prune(tmp_path, args, guarded)
    try:
        assert any(p.name.startswith("graphprune-") for p in scratch.iterdir())  # the weights are there
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, (out, err)
    if json_mode:
        assert json.loads(out) == {"error": "terminated", "exit_code": 143, "type": "Terminated"}
    else:
        assert err.strip().splitlines()[-1] == "graphprune: error: terminated"
    assert [p.name for p in scratch.iterdir() if p.is_dir() or "graphprune" in p.name] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "held.py", "marker", "tmp"]


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_sigint_to_the_command_alone_stops_the_guarded_work(tmp_path):
    """The guard's parent ignored SIGINT (Ctrl-C reaches the whole process group): one sent to the
    command's process alone (a supervisor's graceful stop, Python's ``send_signal``) let the prune
    finish and write its output, exit 0. It is passed on now; the child acts on the first SIGINT
    only, so Ctrl-C's two (the terminal's and the parent's) still end in one line."""
    scratch = tmp_path / "tmp"
    args = ["prune", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5"]
    process = _held_prune(tmp_path, args, True)
    try:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["graphprune: error: interrupted"], err
    assert [p.name for p in scratch.iterdir() if p.is_dir() or "graphprune" in p.name] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "held.py", "marker", "tmp"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or os.name != "posix", reason="POSIX signals")
def test_a_worker_killed_from_outside_ends_the_command_with_one_line(tmp_path):
    """The out-of-memory killer sends the child doing the work SIGKILL: the command ended with
    exit 137 and nothing said. It says what happened now (and still writes nothing)."""
    args = ["prune", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5"]
    process = _held_prune(tmp_path, args, True)
    worker = int((tmp_path / "marker").read_text())
    try:
        assert worker != process.pid
        os.kill(worker, signal.SIGKILL)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 137, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "killed by SIGKILL" in lines[0] and "memory" in lines[0], err
    assert "nothing was written" in lines[0] and not (tmp_path / "out.onnx").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux processes")
def test_the_guarded_work_ends_with_a_killed_command(tmp_path):
    """SIGKILL cannot be passed on: the child that does the work is killed with the command
    (else it would run to the end and write its output)."""
    process = _held_prune(tmp_path, ["prune", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "out.onnx")], True)
    worker = int((tmp_path / "marker").read_text())
    assert worker != process.pid and Path(f"/proc/{worker}").exists()
    process.kill()
    process.communicate(timeout=60)
    for _ in range(100):
        if not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the worker outlived the command")
    assert not (tmp_path / "out.onnx").exists()


CRASHING = """
import os, signal, sys
from graphprune import cli, command, crash_guard
from graphprune.verify import validate

running = sys.argv.pop(1)  # (the rest is the command line)
real_run = validate.run

def crash(self, *args, **kwargs):  # as ONNX Runtime's segmentation fault on a model it cannot run
    crash_guard.note(running)
    os.kill(os.getpid(), signal.SIGSEGV)

def run(model, feeds, what, *args, **kwargs):  # the model given crashes ONNX Runtime on its own too
    if what == "the model given" and os.environ.get("CRASH_ALONE"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return real_run(model, feeds, what, *args, **kwargs)

def work():  # (imports in the child, as the console command's)
    from graphprune.pipeline import session

    session.Session.verify_against = crash
    return cli.main(sys.argv[1:])

validate.run = run
json_mode = "--json" in sys.argv
raise SystemExit(crash_guard.guarded(work, lambda message, code: cli._fail(message, code, "Crash", json_mode),
                                     command.input_crashes))
"""


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGSEGV"), reason="POSIX processes")
@pytest.mark.parametrize(("running", "code", "says", "alone"), [
    ("running the zeroed original", 2, "the input model does not run in ONNX Runtime", False),
    ("running the pruned model", 3, "the pruned model does not run", False),
    ("in the verify stage", 1, "the process crashed (SIGSEGV) while in the verify stage", False),
    ("in the verify stage", 2, "loading and running the model given on its own: the input model does not run", True),
])
def test_a_crash_in_native_code_is_one_line_and_writes_nothing(tmp_path, running, code, says, alone):
    """ONNX Runtime 1.32 crashes (SIGSEGV) on a model its own QOperator quantizer wrote (a
    ``QLinearMul`` of an empty tensor): the command died with no message, exit 139. Its work now
    runs in a child; the parent says what crashed, on what, exits 2 for the input model, and
    removes what the child left in the temporary directory. A crash that names no model is put
    on the input where the model given crashes ONNX Runtime on its own (``alone``: an fp16
    converter's LSTMs, exit 1 before)."""
    model, out = tmp_path / "cnn.onnx", tmp_path / "out.onnx"
    onnx.save(example_cnn(), model)
    (tmp_path / "crash.py").write_text(CRASHING)
    for json_mode in (False, True):
        done = subprocess.run([sys.executable, str(tmp_path / "crash.py"), running, "prune", str(model), "-o", str(out),
                               *(["--json"] if json_mode else [])],
                              env={**os.environ, "TMPDIR": str(tmp_path), **({"CRASH_ALONE": "1"} if alone else {})},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == code, (done.stdout, done.stderr)
        if json_mode:
            error = json.loads(done.stdout.strip().splitlines()[-1])
            assert error["exit_code"] == code and error["type"] == "Crash" and says in error["error"]
        else:
            line = done.stderr.strip().splitlines()[-1]
            assert line.startswith("graphprune: error: ") and says in line and line.endswith("nothing was written")
        assert not out.exists()
        # the weight folder the child had made is removed by the parent (the child could not)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("graphprune-", "gp-"))]


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="POSIX signals")
def test_the_guarded_command_runs_where_its_caller_ignores_sigchld(tmp_path):
    """A caller that ignores SIGCHLD (some daemons) passes that on: the child was reaped unseen,
    and waiting for it raised ChildProcessError (a traceback, exit 1)."""
    model = tmp_path / "cnn.onnx"
    onnx.save(example_cnn(), model)
    done = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(model), "-o", str(tmp_path / "p.onnx"), "-q"],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))  # noqa: PLW1509
    assert done.returncode == 0 and (tmp_path / "p.onnx").exists(), done.stderr


def test_without_a_process_to_spare_the_guarded_work_runs_in_this_one(monkeypatch):
    from graphprune import crash_guard

    def refused() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refused, raising=False)
    monkeypatch.delenv("GRAPHPRUNE_GUARD", raising=False)
    monkeypatch.setattr(os, "name", "posix")
    assert crash_guard.guarded(lambda: 7, lambda message, code: -1) == 7


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX processes")
def test_the_guarded_command_passes_the_exit_code_and_output_through(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(example_cnn(), model)
    done = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(model), "-o", str(tmp_path / "p.onnx"),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout)["verification"]["ok"] is True, done.stderr
    done = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(tmp_path / "missing.onnx"), "-o",
                           str(tmp_path / "q.onnx")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not Path("/proc/self/stat").exists(), reason="Linux processes")
def test_the_next_run_removes_what_a_killed_one_left(tmp_path):
    """A prune killed outright (SIGKILL: a time limit, the out-of-memory killer) cannot remove
    its weight folder; the next graphprune process in that temporary directory does. Folders
    of a live process, and folders graphprune did not make, stay."""
    from graphprune.io import scratch as scratch_folders

    scratch, model = tmp_path / "tmp", tmp_path / "cnn.onnx"
    env = {**os.environ, "TMPDIR": str(scratch)}
    process = _held_prune(tmp_path, ["prune", str(model), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5"])
    process.kill()
    process.communicate(timeout=60)
    left = [p for p in scratch.iterdir() if p.name.startswith("graphprune-")]
    assert left and all((p / scratch_folders.OWNER).exists() for p in left)
    assert sum(f.stat().st_size for p in left for f in p.iterdir()) > 0  # the model's weights among them
    live = scratch_folders.make("graphprune-", scratch)  # this process': alive
    foreign = scratch / "graphprune-not-ours"
    foreign.mkdir()

    done = subprocess.run([sys.executable, "-m", "graphprune", "analyze", str(model)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # (ONNX Runtime's import writes a '.ses' file there: not a folder)
    assert sorted(p.name for p in scratch.iterdir() if p.is_dir()) == sorted([live.name, foreign.name])
    assert not (tmp_path / "out.onnx").exists()


# --------------------------------------------------------------------------- MODULE:FACTORY from the current folder

MYNETS = '''
import torch


def make_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
'''


@pytest.mark.torch
def test_export_imports_a_module_from_the_current_folder(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    (tmp_path / "mynets.py").write_text(MYNETS)
    (tmp_path / "brokennets.py").write_text("import not_installed_anywhere\n")
    monkeypatch.chdir(tmp_path)
    # a console script's sys.path holds the script's folder, not the current one
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    code, out, err = cli(capsys, "export", "torch", "mynets:make_net", "--input-shape", "1,3,8,8",
                         "--exporter", "torchscript", "-o", "net.onnx")
    assert code == 0, err
    assert (tmp_path / "net.onnx").is_file() and "wrote net.onnx" in out
    sys.modules.pop("mynets", None)

    code, _, err = cli(capsys, "export", "torch", "othernets:make_net", "--input-shape", "1,3,8,8",
                       "-o", "x.onnx")
    line = _assert_one_line_error(code, err)
    assert "othernets" in line and f"current directory {tmp_path}" in line
    code, _, err = cli(capsys, "export", "torch", "brokennets:make_net", "--input-shape", "1,3,8,8",
                       "-o", "x.onnx")
    line = _assert_one_line_error(code, err)
    assert "not_installed_anywhere" in line and "install it" in line
    assert not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------- the real process: pipes, ORT logs


def test_stdout_closed_early_exits_quietly(models):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen([sys.executable, "-m", "graphprune", "analyze", str(models["cnn"])],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head -1` closing its end before the table is written
    _, err = process.communicate(timeout=120)
    assert err.decode() == ""
    assert process.returncode == 141


def _runtime_failure_model(folder: Path) -> Path:
    """Checks and loads, but fails in ONNX Runtime at run time (Reshape to a fed shape)."""
    nodes = [
        conv_node("x", "W1", "a", name="conv1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv_node("r", "W2", "c", name="conv2"),
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="reshape"),
    ]
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None},
                       {"W1": (8, 3, 3, 3), "W2": (4, 8, 3, 3)}, check=False)
    model.graph.input.append(helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [2]))
    path = folder / "runtime_failure.onnx"
    onnx.save(model, path)
    return path


def test_onnx_runtime_log_lines_never_precede_the_error(tmp_path):
    model = _runtime_failure_model(tmp_path)
    for args in (["prune", str(model), "-o", str(tmp_path / "o.onnx")],
                 ["bench", str(model), "--runs", "1", "--warmup", "0", "-q"]):
        done = _run(*args, cwd=tmp_path)
        assert done.returncode in (2, 3), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("graphprune: error: ")
    assert not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------- CUDA


CUDA = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()


@pytest.mark.skipif(CUDA, reason="onnxruntime-gpu with CUDA is installed here")
@pytest.mark.parametrize("command", ["prune", "bench", "demo"])
def test_provider_cuda_without_a_gpu_is_one_line(capsys, models, tmp_path, command):
    args = {"prune": ["prune", "-q", models["small"], "-o", tmp_path / "o.onnx"],
            "bench": ["bench", "-q", models["small"], "--runs", "1"],
            "demo": ["demo", "-q", "--runs", "1"]}[command]
    code, _, err = cli(capsys, *args, "--provider", "cuda")
    line = _assert_one_line_error(code, err)
    assert "onnxruntime-gpu" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_prune_with_cuda_checks_and_times_on_the_gpu(capsys, models, tmp_path):
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, "prune", "-q", models["cnn"], "-o", tmp_path / "o.onnx",
                         "--provider", "cuda", "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["provider_check"]["ok"] and data["provider_check"]["provider"] == "cuda"
    assert data["latency"]["after"]["provider"] == "cuda"
    assert "on cuda: agrees with the CPU run" in out


def test_the_macs_row_names_a_few_input_shapes_and_counts_the_rest():
    """GPT-SoVITS's decoder step has 50 inputs (48 caches): the row named every one, and the
    table was 1,500 characters wide."""
    from graphprune.tables import LABEL_SHAPES, macs_label

    shapes = {"iy": [1, 4], "scalar": [], **{f"past_{k}": [1, 1, 512] for k in range(48)}}
    label = macs_label({"macs_input_shapes": shapes})
    assert label == "MACs at iy=1x4, past_0=1x1x512, past_1=1x1x512 and 46 more inputs" and LABEL_SHAPES == 3
    assert macs_label({"macs_input_shapes": {"x": [1, 3, 8, 8], "s": []}}) == "MACs at x=1x3x8x8"


def test_debug_shows_the_traceback_and_keeps_the_exit_code(capsys, tmp_path):
    """``--debug`` re-raised every error: a usage or input error (2) or a failed verification
    (3) then exited 1, as an internal error does."""
    code = main(["--debug", "prune", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "no such file" in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("extra", [[], ["--html", "page.html"], ["--latency"]])
def test_a_model_with_external_data_is_written_with_external_data_whatever_else_is_asked(capsys, tmp_path, extra):
    """``--html`` (and ``--latency``) read the pruned model into memory to time it, and the
    file was then written with its weights inside (a 10 MB Khmer CRNN: one 9.7 MB .onnx where
    the same prune without ``--html`` wrote 8 KB and a .data file)."""
    path = tmp_path / "ext.onnx"
    onnx.save(example_cnn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    out = tmp_path / "out.onnx"
    extra = [str(tmp_path / e) if e.endswith(".html") else e for e in extra]
    code = main(["prune", str(path), "-o", str(out), "--ratio", "0.5", *(["--latency-runs", "2"] if extra else []),
                 *extra])
    assert code == 0, capsys.readouterr()
    assert (tmp_path / "out.onnx.data").stat().st_size > out.stat().st_size
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("options, said", [
    (["--reconstruction", "refit"], "reconstruction 'refit' needs calibration data"),
    (["--holdout", "0.5"], "--holdout) applies with calibration data"),
    (["--hidden-ratio", "0.3"], "--hidden-ratio) applies with prune_hidden (--prune-hidden)"),
])
def test_options_that_would_be_ignored_are_refused(capsys, models, tmp_path, options, said):
    """``--reconstruction refit`` and ``--holdout`` without calibration data, and ``--hidden-ratio``
    without ``--prune-hidden``, were silently ignored (exit 0, the model written unchanged in the
    last case) where ``--final-refit`` and ``--class-scores`` are refused: exit 2, nothing written."""
    out = tmp_path / "o.onnx"
    code, _, err = cli(capsys, "prune", models["small"], "-o", out, *options)
    assert code == 2 and said in err and not out.exists(), err


@pytest.mark.parametrize("plan, said", [
    ({"version": 1}, "'groups' must be a list"),
    ({"version": 1, "groups": [{"group": 0, "anchor": "w", "size": 8, "remove": "abc"}]}, "'remove' must be a list"),
    ({"version": 1, "groups": [{"group": 0, "anchor": "w", "size": 8, "remove": [1.5, 2]}]}, "unit indices (whole"),
    ({"version": 1, "groups": [], "erase": "n"}, "'erase' must be a list of node names"),
])
def test_a_malformed_plan_is_refused_in_one_line(capsys, models, tmp_path, plan, said):
    """A hand-edited plan whose ``remove`` was a string ended in "internal error: TypeError" (exit 1);
    a unit 1.5 was taken as unit 1, and a plan without ``groups`` replayed as removing nothing."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "o.onnx", "--plan", path)
    assert code == 2 and said in err and "internal error" not in err, err


def test_ctrl_c_while_the_modules_load_ends_in_one_line(capsys, monkeypatch):
    """SIGINT in the first seconds of a run, while onnx and ONNX Runtime load, printed Python's
    traceback of the import under way (the entry point imported them before any handler): the
    entry point (``graphprune.command``) is light and says it in one line, exit 130."""
    from graphprune import command

    class Interrupting:  # the import of graphprune.cli interrupted, as Ctrl-C does
        def find_spec(self, name, path=None, target=None):
            if name == "graphprune.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "graphprune.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["graphprune", "prune", "m.onnx", "-o", "p.onnx"])
    assert command.guarded_main() == 130
    assert capsys.readouterr().err == "graphprune: error: interrupted\n"
    monkeypatch.setattr(sys, "argv", ["graphprune", "analyze", "m.onnx", "--json"])
    assert command.guarded_main() == 130
    assert json.loads(capsys.readouterr().out) == {"error": "interrupted", "exit_code": 130, "type": "KeyboardInterrupt"}


@pytest.mark.parametrize("where", ["build_parser", "parse_args"])
def test_ctrl_c_while_the_parser_is_built_ends_in_one_line(capsys, monkeypatch, where):
    """SIGINT while the parser is built (``sweep``'s options import the API) or reads the
    arguments, in the child that runs the work, printed a 40-60 line traceback."""
    from graphprune import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "build_parser":
        monkeypatch.setattr(cli, "build_parser", interrupted)
    else:
        monkeypatch.setattr(cli._Parser, "parse_args", interrupted)
    assert cli.main(["prune", "m.onnx", "-o", "p.onnx"]) == 130
    assert capsys.readouterr().err == "graphprune: error: interrupted\n"


@pytest.mark.parametrize("when", ["writing the report", "after every file"])
def test_ctrl_c_takes_back_what_was_written_until_the_files_are_all_there(capsys, monkeypatch, models, tmp_path, when):
    """A Ctrl-C in the last moments of a run exited 130 ("nothing was written") with every file
    in place (7 of 24 tries at the end of a run): before the last file is written it takes the
    written ones back; after, the command has done its work and says so, exit 0."""
    from graphprune import cli_commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_commands, "_dump" if when == "writing the report" else "prune_summary", interrupted)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code = main(["prune", str(models["cnn"]), "-o", str(out), "--ratio", "0.5", "--report", str(report), "-q"])
    if when == "writing the report":
        assert code == 130 and not out.exists() and not report.exists()
        assert capsys.readouterr().err == "graphprune: error: interrupted\n"
    else:
        assert code == 0 and out.exists() and report.exists()
        onnx.checker.check_model(str(out), full_check=True)


def test_a_plan_whose_group_size_differs_says_so(capsys, models, tmp_path):
    """A saved plan whose group has another size here was refused with "group '...' not found",
    though the group is there: the message gives both sizes."""
    plan = tmp_path / "plan.json"
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "a.onnx", "--save-plan", plan, "-q")
    assert code == 0, err
    data = json.loads(plan.read_text())
    size = data["groups"][0]["size"]
    data["groups"][0]["size"] = size + 1
    plan.write_text(json.dumps(data))
    code, _, err = cli(capsys, "prune", models["small"], "-o", tmp_path / "b.onnx", "--plan", plan)
    assert code == 2 and f"has {size} units here, the plan says {size + 1}" in err, err


@pytest.mark.parametrize("args, said", [
    (["--lossless", "--criterion", "l2"], "criterion (--criterion) does not apply with lossless mode"),
    (["--lossless", "--round-to", "4"], "round_to (--round-to) does not apply with lossless mode"),
    (["--erase-blocks", "1", "--min-channels", "2"], "min_channels (--min-channels) does not apply with erase_blocks"),
    (["--ratio", "0.5", "--no-verify", "--tolerance", "0.1"], "tolerance (--tolerance) is the verification's"),
    (["--ratio", "0.5", "--latency-runs", "3"], "--latency-runs applies with --latency"),
])
def test_options_that_would_change_nothing_are_refused(capsys, models, tmp_path, args, said):
    """Each of these exited 0 and wrote the model the same command wrote without the option."""
    out = tmp_path / "p.onnx"
    code = main(["prune", str(models["cnn"]), "-o", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_saved_plan_refuses_what_ranks_or_rounds(capsys, models, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["prune", str(models["cnn"]), "-o", str(tmp_path / "a.onnx"), "--ratio", "0.5",
                 "--save-plan", str(plan), "-q"]) == 0
    code = main(["prune", str(models["cnn"]), "-o", str(tmp_path / "b.onnx"), "--plan", str(plan), "--round-to", "4"])
    assert code == 2 and "does not apply with a saved plan" in capsys.readouterr().err


def test_latency_runs_reach_a_latency_target(models, tmp_path):
    report = tmp_path / "r.json"
    assert main(["prune", str(models["cnn"]), "-o", str(tmp_path / "p.onnx"), "--target-latency", "0.9",
                 "--latency-runs", "3", "--threads", "1", "--report", str(report), "-q"]) == 0
    assert "median of 3 " in json.loads(report.read_text())["budget"]["measured_by"]


def test_a_model_that_does_not_run_at_the_sizes_given_says_they_were_given(capsys, tmp_path):
    """A model that runs at batch 1 only (a Reshape to a literal [1, 8]), given ``--input-shape x=2,8``:
    the hint blamed the integer values alone."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["y"])]
    model = make_model(nodes, {"x": ["N", 8]}, {"y": None},
                       {"shape": np.array([1, 8], np.int64), "w1": (8, 16), "w2": (16, 4)}, check=False)
    path = tmp_path / "batch1.onnx"
    onnx.save(model, path)
    code = main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--input-shape", "x=2,8"])
    err = capsys.readouterr().err
    assert code == 2 and "run at the sizes given: x=2x8" in err and len(err.strip().splitlines()) == 1, err
