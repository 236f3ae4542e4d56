"""Models that hold no weight tensor (graphprune/pipeline/weightless.py).

A LightGBM classifier exported by onnxmltools (TreeEnsembleClassifier + ZipMap, opset 9,
no initializer: its 194 MB of parameters are node attributes) took 255 s and 9.7 GB to be
told "nothing prunable", and was written back converted to opset 13. A model without a
weight tensor is now answered before any preparation: returned unchanged (same opset, the
same bytes), checked to load and run in ONNX Runtime, with the usual report and the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.errors import UsageError
from graphprune.pipeline import weightless

REPO = Path(__file__).resolve().parents[1]
REASON = "nothing prunable: the model holds no weight tensor (its parameters are attributes of "


def _trees(n_trees: int = 3, depth: int = 2, n_features: int = 4, seed: int = 0) -> dict[str, list]:
    """The node lists of ``n_trees`` full binary trees of ``depth`` splits (leaves numbered
    after the splits), as skl2onnx and onnxmltools write them."""
    rng = np.random.default_rng(seed)
    splits, total = 2 ** depth - 1, 2 ** (depth + 1) - 1
    lists: dict[str, list] = {k: [] for k in ("tree", "node", "mode", "feature", "value", "true", "false")}
    for tree in range(n_trees):
        for node in range(total):
            leaf = node >= splits
            lists["tree"].append(tree)
            lists["node"].append(node)
            lists["mode"].append("LEAF" if leaf else "BRANCH_LEQ")
            lists["feature"].append(0 if leaf else int(rng.integers(n_features)))
            lists["value"].append(0.0 if leaf else float(rng.standard_normal()))
            lists["true"].append(0 if leaf else 2 * node + 1)
            lists["false"].append(0 if leaf else 2 * node + 2)
    lists["leaves"] = [(t, n) for t, n in zip(lists["tree"], lists["node"], strict=True) if n >= splits]
    return lists


def _node_attributes(lists: dict[str, list]) -> dict[str, list]:
    return {"nodes_treeids": lists["tree"], "nodes_nodeids": lists["node"], "nodes_modes": lists["mode"],
            "nodes_featureids": lists["feature"], "nodes_values": lists["value"],
            "nodes_truenodeids": lists["true"], "nodes_falsenodeids": lists["false"]}


def tree_classifier(opset: int = 9) -> onnx.ModelProto:
    """onnxmltools' LightGBM classifier: TreeEnsembleClassifier (ai.onnx.ml 1) and ZipMap."""
    lists = _trees()
    rng = np.random.default_rng(1)
    weights = [(t, n, c, float(rng.standard_normal())) for t, n in lists["leaves"] for c in range(3)]
    nodes = [
        helper.make_node("TreeEnsembleClassifier", ["x"], ["label", "probabilities"], domain="ai.onnx.ml",
                         name="LightGbmLGBMClassifier", classlabels_int64s=[0, 1, 2], post_transform="SOFTMAX",
                         class_treeids=[w[0] for w in weights], class_nodeids=[w[1] for w in weights],
                         class_ids=[w[2] for w in weights], class_weights=[w[3] for w in weights],
                         **_node_attributes(lists)),
        helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                         name="ZipMap", classlabels_int64s=[0, 1, 2]),
    ]
    zipped = helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(nodes, "lightgbm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_value_info("output_probability", zipped)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("ai.onnx.ml", 1)],
                              ir_version=7, producer_name="OnnxMLTools")
    onnx.checker.check_model(model, full_check=True)
    return model


def tree_regressor(opset: int = 9, extra: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """skl2onnx's shape of a gradient-boosted regressor: TreeEnsembleRegressor (ai.onnx.ml 3),
    its output scaled by ``Mul`` with a scalar constant (a scalar is no weight tensor);
    ``extra``: initializers to add (a ``Mul`` by the first)."""
    lists = _trees(seed=2)
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("TreeEnsembleRegressor", ["x"], ["raw"], domain="ai.onnx.ml", name="trees",
                              n_targets=1, post_transform="NONE", aggregate_function="SUM",
                              base_values=[0.5], target_ids=[0] * len(lists["leaves"]),
                              target_treeids=[t for t, _ in lists["leaves"]],
                              target_nodeids=[n for _, n in lists["leaves"]],
                              target_weights=[float(v) for v in rng.standard_normal(len(lists["leaves"]))],
                              **_node_attributes(lists)),
             helper.make_node("Constant", [], ["scale"], name="scale",
                              value=numpy_helper.from_array(np.array(2.0, np.float32))),
             helper.make_node("Mul", ["raw", "scale"], ["y" if not extra else "scaled"], name="mul")]
    if extra:
        nodes.append(helper.make_node("Mul", ["scaled", extra[0].name], ["y"], name="mul_extra"))
    graph = helper.make_graph(nodes, "regressor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])], list(extra))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("ai.onnx.ml", 3)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _outputs(model: onnx.ModelProto | bytes | Path, x: np.ndarray) -> list:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# --------------------------------------------------------------------------- the API


@pytest.mark.parametrize("build", [tree_classifier, tree_regressor])
def test_a_model_without_weight_tensors_comes_back_unchanged(build) -> None:
    model = build()
    result = graphprune.prune(model, ratio=0.5)
    report = result.report
    assert result.model.SerializeToString() == model.SerializeToString()
    assert _default_opset(result.model) == 9  # not converted to 13
    assert result.model is not model  # the caller's proto is not handed back
    op = "TreeEnsembleClassifier" if build is tree_classifier else "TreeEnsembleRegressor"
    assert report["nothing_prunable"].startswith(f"{REASON}ai.onnx.ml::{op} (x1))")
    assert report["nothing_prunable"].endswith("the output is the input unchanged")
    assert "normalised" not in report  # nothing was converted or rewritten
    assert report["mode"] == "ratio"
    assert report["params_before"] == report["params_after"]
    assert report["macs_before"] == report["macs_after"] == 0
    assert report["groups"] == {"total": 0, "prunable": 0, "pruned": 0, "frozen": 0, "inexact": 0}
    assert report["channels"] == {"prunable": 0, "removed": 0}
    assert f"ai.onnx.ml::{op}" in report["unsupported_ops"]
    for key in ("prunable_fraction", "frozen", "unprunable", "pinned", "erased_nodes", "kinds", "timings"):
        assert key in report
    verification = report["verification"]
    assert verification["ok"] is True and verification["ort"] is True and verification["unchanged"] is True
    assert verification["reference"].startswith("the original")
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    before, after = _outputs(model, x), _outputs(result.model, x)
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert a == b if isinstance(a, list) else np.array_equal(a, b)


def test_every_mode_answers_without_preparation() -> None:
    model = tree_regressor()
    lossless = graphprune.prune(model, lossless=True).report
    assert lossless["mode"] == "lossless" and lossless["nothing_prunable"].startswith(REASON)
    latency = graphprune.prune(model, target_latency=0.5).report
    assert latency["mode"] == "budget" and latency["budget"]["target"] == "latency"
    assert latency["budget"]["met"] is False and latency["nothing_prunable"].startswith(REASON)
    calibrated = graphprune.prune(model, calibration="random:4")
    assert "calibration data is not needed" in calibrated.report["nothing_prunable"]
    assert "fidelity" not in calibrated.report
    assert _default_opset(calibrated.model) == 9
    heads = graphprune.prune(model, head_ratio=0.25, mlp_ratio=0.5).report
    assert heads["nothing_prunable"].startswith(REASON)
    unchecked = graphprune.prune(model, verify=False)
    assert unchecked.report["verification"] == {"ok": None, "skipped": True}
    replayed = graphprune.prune(model, plan=unchecked.plan).report  # a plan that removes nothing
    assert replayed["nothing_prunable"].startswith(REASON)
    # what cannot be met is a usage error, as on any model without blocks or MACs
    with pytest.raises(UsageError, match="cannot erase 1 residual block: the model has 0"):
        graphprune.prune(model, erase_blocks=1)
    with pytest.raises(UsageError, match="cannot erase 0.5 of the residual blocks: the model has 0"):
        graphprune.prune(model, erase_blocks=0.5)
    for target in ("target_macs", "target_params"):
        with pytest.raises(UsageError, match="has nothing to reduce: the model holds no weight tensor"):
            graphprune.prune(model, **{target: 0.5})
    # the usual argument checks still run
    with pytest.raises(UsageError, match="--keep names nothing in the model: nope"):
        graphprune.prune(model, keep="nope")
    with pytest.raises(UsageError, match="ratio must be in"):
        graphprune.prune(model, ratio=1.5)


def test_analyze_says_why_without_preparation() -> None:
    analysis = graphprune.analyze(tree_classifier())
    assert isinstance(analysis, weightless.WeightlessAnalysis)
    assert analysis.groups == [] and analysis.opset == 9
    assert set(analysis.unsupported) == {"ai.onnx.ml::TreeEnsembleClassifier", "ai.onnx.ml::ZipMap"}
    assert analysis.nothing_prunable.startswith(f"{REASON}ai.onnx.ml::TreeEnsembleClassifier (x1))")
    assert analysis.summary()["groups"] == 0


def test_one_tiny_weight_initializer_goes_the_ordinary_way() -> None:
    """Two numbers make a weight tensor: the ordinary path runs (its opset conversion says so)."""
    model = tree_regressor(extra=[numpy_helper.from_array(np.array([[1.5]], np.float32), "one"),
                                  numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "two")])
    assert weightless.top_level_weight(model.SerializeToString()) is True
    assert weightless.find(model) is None
    report = graphprune.prune(model, ratio=0.5).report
    assert not report.get("nothing_prunable", "").startswith(REASON)
    assert report["normalised"]["opset_converted"] == {"from": 9, "to": 13}


def test_weight_tensors_are_found_wherever_they_are() -> None:
    """Initializers, sparse initializers and ``Constant`` tensors (lists of numbers too), in
    the main graph, in subgraphs and in local functions; scalars, booleans and strings are
    no weights."""
    def model_with(nodes: list, inits: list = (), sparse: list = (), functions: list = ()) -> onnx.ModelProto:
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], list(inits),
                                  sparse_initializer=list(sparse))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                                 functions=list(functions))

    def constant(name: str, **value) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], **value)

    add = helper.make_node("Add", ["x", "c"], ["y"])
    scalar = numpy_helper.from_array(np.array(3.0, np.float32), "c")
    pair = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "c")
    words = helper.make_tensor("w", TensorProto.STRING, [2], [b"a", b"b"])
    flags = numpy_helper.from_array(np.array([True, False]), "f")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0], np.float32)),
                                       numpy_helper.from_array(np.array([1], np.int64)), [2])
    sparse.values.name = "c"
    then = helper.make_graph([constant("t", value_floats=[1.0, 2.0])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    branch = helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=then)
    function = helper.make_function("local", "F", ["a"], ["b"], [constant("k", value_ints=[1, 2]),
                                                                 helper.make_node("Identity", ["a"], ["b"])],
                                    [helper.make_opsetid("", 17)])
    holding = {
        "initializer": model_with([add], [pair]),
        "sparse initializer": model_with([add], sparse=[sparse]),
        "Constant value": model_with([constant("c", value=pair), add]),
        "Constant value_ints": model_with([constant("c", value_ints=[1, 2]), add]),
        "If branch": model_with([branch]),
        "local function": model_with([helper.make_node("F", ["x"], ["y"], domain="local")], functions=[function]),
    }
    free = {
        "scalar initializer": model_with([add], [scalar]),
        "scalar Constant": model_with([constant("c", value=scalar), add]),
        "strings and booleans": model_with([constant("c", value=scalar), add], [words, flags]),
    }
    for what, model in holding.items():
        assert weightless.holds_weight_tensor(model), what
    for what, model in free.items():
        assert not weightless.holds_weight_tensor(model), what
    # the wire reader agrees on the main graph's initializers
    for what in ("initializer", "sparse initializer"):
        assert weightless.top_level_weight(holding[what].SerializeToString()) is True, what
    for what in ("Constant value", "If branch", "scalar initializer", "strings and booleans"):
        model = holding.get(what) or free[what]
        assert weightless.top_level_weight(model.SerializeToString()) is False, what
    assert weightless.top_level_weight(b"\xff\xff") is None


# --------------------------------------------------------------------------- the command line


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "graphprune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_command_line_writes_the_same_bytes_and_says_why(tmp_path) -> None:
    source, out, report_path = tmp_path / "lightgbm.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(tree_classifier(), source)
    done = _run("prune", "-q", str(source), "-o", str(out), "--ratio", "0.5", "--report", str(report_path),
                cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == source.read_bytes()
    assert REASON in done.stdout and "mode: ratio" in done.stdout
    assert "opset 9 converted" not in done.stdout
    report = json.loads(report_path.read_text())
    assert report["nothing_prunable"].startswith(REASON) and report["verification"]["ok"] is True
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    before, after = _outputs(source, x), _outputs(out, x)
    assert np.array_equal(before[0], after[0]) and before[1] == after[1]
    done = _run("analyze", str(source), "--json", cwd=REPO)
    assert done.returncode == 0, done.stderr
    analysis = json.loads(done.stdout)
    assert analysis["nothing_prunable"].startswith(REASON) and analysis["normalised"] == {}
    assert analysis["summary"]["unsupported_ops"] == {"ai.onnx.ml::TreeEnsembleClassifier": 1,
                                                      "ai.onnx.ml::ZipMap": 1}


def test_an_input_that_does_not_run_is_an_input_error(tmp_path) -> None:
    """Sizes that cannot broadcast pass the checker and fail in ONNX Runtime: exit 2, one
    line, no file, as for any input that does not run."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "z"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    source, out = tmp_path / "broken.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), source)
    done = _run("prune", "-q", str(source), "-o", str(out), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("graphprune: error: ")
    assert "the input model does not run in ONNX Runtime" in done.stderr
    assert not out.exists()


def test_a_model_that_imports_only_the_ml_domain_is_answered(tmp_path: Path) -> None:
    """A ``LinearClassifier`` importing only ``ai.onnx.ml`` (onnxruntime's own
    ``datasets/logreg_iris.onnx``) is valid and runs; it was refused as invalid (exit 2:
    "model does not import the default ONNX opset")."""
    classifier = helper.make_node("LinearClassifier", ["x"], ["label", "scores"], domain="ai.onnx.ml",
                                  classlabels_ints=[0, 1, 2], coefficients=[float(v) for v in range(12)],
                                  intercepts=[0.1, 0.2, 0.3], multi_class=1)
    graph = helper.make_graph([classifier], "ml", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [1]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    path, out = tmp_path / "ml.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    done = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out), "--ratio", "0.5"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "nothing prunable" in done.stdout
    x = np.arange(4, dtype=np.float32)[None]
    np.testing.assert_array_equal(_outputs(out, x)[1], _outputs(path, x)[1])
