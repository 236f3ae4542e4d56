"""Sweeps: points in process, in a process pool and as Ray tasks; sweep.json, the plot, the page."""

from __future__ import annotations

import json
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

import graphprune
from graphprune.cli import main
from graphprune.errors import UsageError
from graphprune.examples import example_cnn
from graphprune.sweep import fidelity, run_sweep, sweep_points

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "cnn.onnx"
    onnx.save(example_cnn(), path)
    return path


def check_outputs(folder: Path, data: dict, expected: list[dict]) -> None:
    assert json.loads((folder / "sweep.json").read_text()) == json.loads(json.dumps(data, default=str))
    assert [p["options"] for p in data["points"]] == expected
    for point in data["points"]:
        assert point["ok"], point
        assert point["verification"]["ok"] and point["verification"]["reference"] == "the zeroed original"
        assert 0 < point["params_ratio"] < 1 and 0 < point["macs_ratio"] < 1
        assert point["macs_before"] == data["baseline"]["macs"] > 0
        assert point["latency_ms"] > 0 and point["latency_ratio"] > 0
        assert -1 <= point["fidelity"]["cosine_mean"] <= 1 + 1e-9
        model = folder / point["file"]
        onnx.checker.check_model(str(model), full_check=True)
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    # more pruning, fewer MACs
    by_ratio = sorted((p["options"]["ratio"], p["macs_ratio"]) for p in data["points"]
                      if p["options"]["criterion"] == "l1")
    assert [m for _, m in by_ratio] == sorted((m for _, m in by_ratio), reverse=True)
    svg = ET.parse(folder / "sweep.svg").getroot()
    assert svg.tag == f"{SVG}svg"
    assert len(svg.findall(f".//{SVG}circle")) == 2 * len(data["points"])  # two panels
    page = (folder / "sweep.html").read_text()
    assert "<svg" in page and "<script" not in page


def test_sweep_in_process(cnn, tmp_path):
    points = sweep_points(ratios=[0.25, 0.5], criteria=["l1", "l2"])
    data = run_sweep(cnn, tmp_path / "sweep", points, runs=2, threads=1)
    assert data["engine"] == "in process"
    check_outputs(tmp_path / "sweep", data, points)


def test_sweep_in_a_process_pool_from_the_command_line(cnn, tmp_path, capsys):
    code = main(["sweep", str(cnn), "-o", str(tmp_path / "s"), "--ratios", "0.25,0.5", "--jobs", "2",
                 "--runs", "2", "--threads", "1", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert data["engine"] == "process pool (2 jobs)"
    check_outputs(tmp_path / "s", data, [{"ratio": 0.25, "criterion": "l1"},
                                         {"ratio": 0.5, "criterion": "l1"}])
    assert "l1 r=0.25" in out and "sweep.json" in out
    # the original timed against a copy of itself: the noise the latency ratios carry
    itself = data["latency"]["original_against_itself"]
    assert 0 < itself and f"the original timed against itself: {itself:.3f}x" in out


def test_a_failing_point_is_recorded_and_the_rest_go_on(cnn, tmp_path):
    points = [{"ratio": 0.5, "criterion": "l1"}, {"ratio": 0.5, "criterion": "l1", "keep": ["nothing"]}]
    data = run_sweep(cnn, tmp_path / "s", points, runs=1)
    ok, failed = data["points"]
    assert ok["ok"] and not failed["ok"]
    assert failed["exit_code"] == 2 and "nothing" in failed["error"] and "file" not in failed


def test_bad_sweeps_are_usage_errors(cnn, tmp_path, capsys):
    with pytest.raises(UsageError, match="criterion"):
        sweep_points(ratios=[0.5], criteria=["magic"])
    with pytest.raises(UsageError, match="at least one"):
        sweep_points(ratios=[], criteria=["l1"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        run_sweep(cnn, tmp_path / "file", sweep_points(ratios=[0.5]))
    code = main(["sweep", str(cnn), "-o", str(tmp_path / "s"), "--ratios", "0.5,1.5"])
    assert code == 2
    assert "ratio must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_fidelity_of_a_model_to_itself_is_perfect():
    model = example_cnn()
    result = fidelity(model, model)
    assert result["cosine_mean"] == pytest.approx(1.0) and result["rel_l2_max"] == pytest.approx(0.0)
    assert result["top1_agreement"] == 1.0


@pytest.mark.ray
def test_sweep_as_ray_tasks_on_a_local_instance(cnn, tmp_path, capsys, monkeypatch, request):
    ray = pytest.importorskip("ray")  # in the test extra: CI has it
    # the workers' temporary directory (they inherit TMPDIR); short: Ray's socket paths live there
    scratch = Path(tempfile.mkdtemp(prefix="gpt-"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    # graphprune starts a small local instance (2 CPUs, no dashboard) and stops it
    code = main(["sweep", str(cnn), "-o", str(tmp_path / "r"), "--ratios", "0.25,0.5", "--ray",
                 "--jobs", "2", "--runs", "2", "--threads", "1", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "r" / "sweep.json").read_text())
    assert data["engine"] == "ray (local Ray instance, 2 CPUs)"
    check_outputs(tmp_path / "r", data, [{"ratio": 0.25, "criterion": "l1"},
                                         {"ratio": 0.5, "criterion": "l1"}])
    assert not ray.is_initialized()
    # Ray ends its workers without exit handlers: each point released its weight folder itself
    assert [p.name for p in scratch.iterdir() if p.name.startswith("graphprune-")] == []


def test_points_of_a_model_with_external_data_keep_their_weights_beside_them(cnn, tmp_path):
    """``prune`` writes a model that came with external data the same way; the sweep's points
    were written with their weights inside (icbc's dynamo export)."""
    source = tmp_path / "in" / "m.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(cnn), source, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    data = run_sweep(source, tmp_path / "s", sweep_points(ratios=[0.5]), runs=1)
    point = tmp_path / "s" / data["points"][0]["file"]
    assert (point.parent / f"{point.name}.data").is_file()
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(point, load_external_data=False).graph.initializer)
    onnx.checker.check_model(str(point), full_check=True)


def test_a_sweep_whose_every_point_failed_fails(tmp_path, capsys):
    """A sweep whose only point failed said "wrote ... (1 points)" and exited 0 (ICLabel, before
    its batch was probed). Where every point failed, the command exits as its first point did,
    with one line saying so; the files are still written (they record the failures)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "c")])
    path = tmp_path / "weightless.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code = main(["sweep", str(path), "-o", str(tmp_path / "out"), "--target-macs", "0.5", "--runs", "2", "-q"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "every point failed" in lines[0], err
    points = json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]
    assert len(points) == 1 and not points[0]["ok"] and points[0]["exit_code"] == 2


def test_a_sweep_prunes_compares_and_times_at_the_input_shapes_given(cnn, tmp_path, capsys):
    """``sweep --input-shape``: the sizes reached neither the points' prunes nor their timing (a
    GNN's atom count: the timing ran one atom and failed, advising ``--input-shape``)."""
    code = main(["sweep", str(cnn), "-o", str(tmp_path / "s"), "--ratios", "0.5", "--runs", "2",
                 "--threads", "1", "-q", "--input-shape", "image=3,3,64,64"])
    assert code == 0, capsys.readouterr()
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert data["latency"]["input_shapes"] == {"image": [3, 3, 64, 64]} and data["latency"]["batch"] == 3
    (point,) = data["points"]
    assert point["ok"] and point["fidelity"]["input_shapes"] == {"image": [3, 3, 64, 64]}


def test_a_point_that_missed_its_target_says_so(cnn, tmp_path, capsys):
    """A sweep's table printed a missed target like a met one (sweep.json had ``met: false``,
    ``prune`` prints MISSED): a note under the table names the point."""
    code = main(["sweep", str(cnn), "-o", str(tmp_path / "s"), "--target-macs", "0.95,0.6", "--round-to", "16",
                 "--runs", "1", "-q"])  # (in steps of 16 channels: 0.849 and 0.546 of the MACs)
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    met = {p["label"]: p["report_budget"]["met"] for p in data["points"]}
    missed = [label for label, ok in met.items() if not ok]
    assert missed == ["l1 macs=0.95", "l1 macs=0.6"], met
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert [n.split(" MISSED")[0][len("note: "):] for n in notes] == missed


def test_an_output_of_one_number_gets_no_cosine_but_its_relative_l2(tmp_path, capsys):
    """A regressor's one number per sample: its cosine is its sign (the table said 1.0000 for
    every point where the relative L2 reached 106); the table gives the largest relative L2."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    path = tmp_path / "regressor.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["sweep", str(path), "-o", str(tmp_path / "s"), "--ratios", "0.5", "--runs", "2", "-q"]) == 0
    out = capsys.readouterr().out
    point = json.loads((tmp_path / "s" / "sweep.json").read_text())["points"][0]
    assert point["fidelity"]["cosine_mean"] is None and point["fidelity"]["rel_l2_max"] > 0
    row = next(line for line in out.splitlines() if line.startswith("l1 r=0.5"))
    assert f"{point['fidelity']['rel_l2_max']:.3g}" in row.split()


def test_an_embedding_gets_no_top1_agreement(tmp_path):
    """A 12-number embedding normalised to length 1 (``F.normalize``'s ``ReduceL2`` and ``Div``):
    its arg-max names no class, so the sweep gives it no top-1 (it gave one for a 1280-number
    embedder)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 12)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["e"]),
             helper.make_node("ReduceL2", ["e"], ["length"], axes=[-1], keepdims=1),
             helper.make_node("Div", ["e", "length"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pruned = graphprune.prune(model, ratio=0.5).model
    found = fidelity(model, pruned)
    assert found["top1_agreement"] is None and found["cosine_mean"] is not None
    logits = onnx.ModelProto()
    logits.CopyFrom(model)
    del logits.graph.node[3:]
    logits.graph.output[0].name = "e"
    assert fidelity(logits, graphprune.prune(logits, ratio=0.5).model)["top1_agreement"] is not None


def test_a_calibrated_sweep_reports_its_held_out_fidelity(cnn, tmp_path, capsys):
    """With ``--calibration`` the table gave the figures on 4 random inputs, not the held-out
    samples the points were reconstructed for (a segmenter's best point read cosine 0.19 there
    and 0.991 held out): the held-out figures now, and a point without data keeps the random ones."""
    import numpy as np

    data = tmp_path / "calib.npz"
    np.savez(data, image=np.random.default_rng(0).standard_normal((16, 1, 3, 64, 64)).astype(np.float32))
    code = main(["sweep", str(cnn), "-o", str(tmp_path / "s"), "--ratios", "0.5", "--calibration", str(data),
                 "--runs", "2", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    point = json.loads((tmp_path / "s" / "sweep.json").read_text())["points"][0]
    held = point["report_fidelity"]
    assert point["fidelity"]["inputs"] == f"{held['samples']} held-out calibration samples"
    assert point["fidelity"]["cosine_mean"] == held["cosine"] and point["fidelity"]["rel_l2_max"] == held["rel_l2"]
    assert "the calibration's held-out samples" in out
    plain = fidelity(cnn, str(tmp_path / "s" / point["file"]))
    assert "random inputs" in plain["inputs"]
