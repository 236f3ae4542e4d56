"""The preparation check (:mod:`graphprune.verify.preparation`).

A rewrite is checked against the zeroed *prepared* original. A preparation that changed what
the model computes (round 43's sliced ``Shape`` folded as the whole shape; round 42's cast
elision) passed that check exactly. The prepared graph is now run against the graph as
loaded: a defect planted in the preparation (other values, another output shape, a graph that
does not run, which was blamed on the input with exit 2) fails the verification (exit 3, nothing
written), and a faithful preparation is reported as checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_node, make_model
from onnx import helper, numpy_helper

import graphprune
from graphprune.cli import main
from graphprune.errors import VerificationError
from graphprune.io import ir
from graphprune.pipeline import session as session_module


def _cnn(constant_node: bool = True) -> onnx.ModelProto:
    """Three convolutions; with ``constant_node`` a scale given by a Constant node, which the
    preparation makes an initializer (the prepared graph is another graph)."""
    scale = numpy_helper.from_array(np.array(2.0, np.float32))
    nodes = [
        conv_node("x", "W1", "a0" if constant_node else "a", "B1", name="conv1"),
        *([helper.make_node("Constant", [], ["two"], value=scale, name="two"),
           helper.make_node("Mul", ["a0", "two"], ["a"], name="scale")] if constant_node else []),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv_node("r", "W2", "b", "B2", name="conv2"),
        helper.make_node("Relu", ["b"], ["s"], name="relu2"),
        conv_node("s", "W3", "y", name="conv3"),
    ]
    return make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None},
                      {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (8, 8, 3, 3), "B2": (8,), "W3": (4, 8, 3, 3)})


def _relu_as_abs(graph: onnx.GraphProto) -> None:
    """Abs where the model has Relu: equal on every value a ReLU passes, zero-preserving and
    channel-separable like it, so every pruning rule reads the graph as before."""
    for node in graph.node:
        if node.op_type == "Relu":
            node.op_type = "Abs"


def _flatten_output(graph: onnx.GraphProto) -> None:
    """The output flattened to one row: another output shape (as the sliced-``Shape`` fold did)."""
    out = graph.output[0]
    producer = next(n for n in graph.node if out.name in n.output)
    producer.output[list(producer.output).index(out.name)] = "unflat"
    graph.initializer.append(numpy_helper.from_array(np.array([1, -1]), "flat_shape"))
    graph.node.append(helper.make_node("Reshape", ["unflat", "flat_shape"], [out.name], name="planted_flatten"))
    out.type.tensor_type.ClearField("shape")


def _unrunnable_output(graph: onnx.GraphProto) -> None:
    """The output reshaped to a size it does not have: the prepared graph does not run. Before,
    that was blamed on the input (exit 2, "the input model does not run")."""
    out = graph.output[0]
    producer = next(n for n in graph.node if out.name in n.output)
    producer.output[list(producer.output).index(out.name)] = "unshaped"
    graph.initializer.append(numpy_helper.from_array(np.array([7]), "bad_shape"))
    graph.node.append(helper.make_node("Reshape", ["unshaped", "bad_shape"], [out.name], name="planted_reshape"))
    out.type.tensor_type.ClearField("shape")


@pytest.fixture(params=[_relu_as_abs, _flatten_output, _unrunnable_output], ids=["values", "shapes", "runs"])
def defective_preparation(request, monkeypatch):
    real = ir.prepare

    def prepare(model, *args, **kwargs):
        prepared = real(model, *args, **kwargs)
        request.param(prepared.graph)
        return prepared

    monkeypatch.setattr(session_module.ir, "prepare", prepare)
    return request.param


def test_a_faithful_preparation_is_checked():
    report = graphprune.prune(_cnn(), ratio=0.5).report
    check = report["verification"]["preparation"]
    assert check["checked"] and check["ok"] and not check.get("identical"), check
    assert check["max_rel_diff"] <= check["tolerance"]


def test_a_preparation_that_changed_no_node_is_not_run_again():
    check = graphprune.prune(_cnn(constant_node=False), ratio=0.5).report["verification"]["preparation"]
    assert check == {"checked": True, "ok": True, "identical": True}


def test_a_defect_of_the_preparation_fails_the_verification(defective_preparation):
    with pytest.raises(VerificationError, match="prepared graph does not compute what the model as loaded"):
        graphprune.prune(_cnn(), ratio=0.5)


def test_the_cli_exits_3_and_writes_nothing(defective_preparation, tmp_path: Path, capsys):
    source, target = tmp_path / "cnn.onnx", tmp_path / "pruned.onnx"
    onnx.save(_cnn(), source)
    code = main(["prune", str(source), "-o", str(target), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert code == 3 and "preparation" in err, err
    assert not target.exists()


def test_without_verification_nothing_is_checked(defective_preparation):
    report = graphprune.prune(_cnn(), ratio=0.5, verify=False).report
    assert report["verification"].get("skipped") and "preparation" not in report["verification"]


def test_the_cli_table_and_the_html_report_say_what_was_compared(tmp_path: Path, capsys):
    source, target, page = tmp_path / "cnn.onnx", tmp_path / "pruned.onnx", tmp_path / "report.html"
    onnx.save(_cnn(), source)
    assert main(["prune", str(source), "-o", str(target), "--ratio", "0.5", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "model as loaded" in x)
    assert "preparation changed no node" in line or "computes what the model as loaded computes" in line
    assert "model as loaded" in page.read_text()


def test_a_loaded_graph_that_does_not_run_as_it_is_is_reported_unchecked(monkeypatch):
    """Some exporters' graphs run only once prepared: that is no defect of the preparation,
    and the report says the comparison was not made, and why."""
    from graphprune.errors import VerificationError as Failed
    from graphprune.verify import preparation

    real = preparation.validate.run_many

    def run_many(model, feeds, what, *args, **kwargs):
        if what == preparation.AS_LOADED:
            raise Failed(f"{what} does not run in ONNX Runtime: planted")
        return real(model, feeds, what, *args, **kwargs)

    monkeypatch.setattr(preparation.validate, "run_many", run_many)
    check = graphprune.prune(_cnn(), ratio=0.5).report["verification"]["preparation"]
    assert check == {"checked": False, "why": "the model as loaded does not run in ONNX Runtime: planted"}


def _opset9_cnn() -> onnx.ModelProto:
    """Conv, BatchNormalization, ReLU, Upsample (opset 9, below the version the tool converts to)."""
    rng = np.random.default_rng(0)
    arrays = {"W1": rng.standard_normal((8, 3, 3, 3)), "s": rng.uniform(0.5, 1.5, 8), "b": rng.standard_normal(8),
              "m": rng.standard_normal(8) * 0.1, "v": rng.uniform(0.5, 1.5, 8), "W2": rng.standard_normal((4, 8, 3, 3)),
              "scales": np.array([1, 1, 2, 2])}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Upsample", ["r1", "scales"], ["u"], mode="nearest"),
             helper.make_node("Conv", ["u", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    return model


def test_a_converted_model_is_checked_against_the_graph_before_conversion(monkeypatch):
    report = graphprune.prune(_opset9_cnn(), ratio=0.5).report
    assert report["normalised"]["opset_converted"] == {"from": 9, "to": 13}
    check = report["verification"]["preparation"]
    assert check["checked"] and check["ok"] and not check.get("identical"), check

    real = session_module.model_io.upgrade_opset

    def converter_with_a_defect(model, version):
        converted = real(model, version)
        _relu_as_abs(converted.graph)
        return converted

    monkeypatch.setattr(session_module.model_io, "upgrade_opset", converter_with_a_defect)
    with pytest.raises(VerificationError, match="prepared graph does not compute"):
        graphprune.prune(_opset9_cnn(), ratio=0.5)
