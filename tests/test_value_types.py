"""Graphs from ONNX's own operator test cases that the preparation or the export broke.

Found by running every node test case of the ``onnx`` wheel (its inputs after the first made
initializers) through a lossless and a ratio-0.5 prune and comparing the result with ONNX
Runtime on the case's inputs:

* ONNX's ``AffineGrid`` function, expanded: ``Range(0, W, 1)`` where ``W`` is a one-element 1-D
  slice of the size (the op wants a scalar). ONNX Runtime runs it while ``W``'s shape is
  unknown; the prepared graph declared the shape and ONNX Runtime refused it (exit 3: "a
  defect of graphprune's preparation"). And the exported subgraphs declared outer-scope tensors,
  so a 3-D grid was checked against the 2-D branch that never runs for it.
* string constants: graphsurgeon writes every array as raw data, which strings have no form of
  (an internal error).
* a sequence of tensors of different shapes as an output: blamed on the input ("does not run").
* a type attribute (``Optional``'s): an internal error in the export; now a one-line refusal.
* with calibration samples (round 46, ``--calibration``): a scalar input made 1-D, and a sequence
  output read by the fidelity run with ``np.asarray``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import conv_node
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.cli import main
from graphprune.errors import InvalidModelError


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _affine_grid_cases() -> list:
    node_cases = pytest.importorskip("onnx.backend.test.case.node")
    try:
        from onnx.backend.test.case.node.affinegrid import AffineGrid
    except ImportError:
        pytest.skip("this onnx has no AffineGrid test cases")
    for export in (AffineGrid.export_2d_no_reference_evaluator, AffineGrid.export_3d_no_reference_evaluator):
        try:  # importing the module may have registered them already
            export()
        except ValueError:
            pass
    cases = [c for c in node_cases._NodeTestCases if c.name.startswith("test_affine_grid") and c.name.endswith("_expanded")]
    assert len(cases) >= 2
    return cases


@pytest.mark.parametrize("lossless", [True, False])
def test_affine_grid_function_with_a_constant_size(lossless: bool) -> None:
    for case in _affine_grid_cases():
        (theta, size), (expected,) = case.data_sets[0]
        model = onnx.ModelProto()
        model.CopyFrom(case.model)
        model.graph.initializer.append(numpy_helper.from_array(size, model.graph.input[1].name))
        feeds = {model.graph.input[0].name: theta}
        result = graphprune.prune(model, **({"lossless": True} if lossless else {"ratio": 0.5}))
        assert result.report["verification"]["ok"], (case.name, result.report["verification"])
        assert result.report["verification"]["preparation"]["ok"], case.name
        (got,) = _run(result.model, feeds)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=case.name)


def _with_convs(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 18) -> onnx.ModelProto:
    """``nodes`` beside two prunable convolutions of a float input ``x``."""
    rng = np.random.default_rng(0)
    convs = [conv_node("x", "W1", "a", name="conv1"), helper.make_node("Relu", ["a"], ["r"]),
             conv_node("r", "W2", "y", name="conv2")]
    weights = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "W1"),
               numpy_helper.from_array(rng.standard_normal((4, 16, 3, 3)).astype(np.float32), "W2")]
    graph = helper.make_graph(
        [*convs, *nodes], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]), *inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]), *outputs], [*weights, *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("lossless", [True, False])
def test_string_constants(lossless: bool) -> None:
    words = numpy_helper.from_array(np.array(["a", "bc", "d"], dtype=object), "words")
    model = _with_convs([helper.make_node("Equal", ["s", "words"], ["same"])],
                        [helper.make_tensor_value_info("s", TensorProto.STRING, [3])],
                        [helper.make_tensor_value_info("same", TensorProto.BOOL, [3])], [words], opset=19)
    result = graphprune.prune(model, **({"lossless": True} if lossless else {"ratio": 0.5}))
    assert result.report["verification"]["ok"]
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32), "s": np.array(["a", "x", "d"], dtype=object)}
    assert _run(result.model, feeds)[1].tolist() == [True, False, True]
    written = next(t for t in result.model.graph.initializer if t.name == "words")
    assert written.data_type == TensorProto.STRING and list(written.string_data) == [b"a", b"bc", b"d"]


def test_sequence_of_tensors_of_several_shapes() -> None:
    """``SplitToSequence`` into parts of 1 and 2 rows: an output ONNX Runtime returns as a list
    of arrays that numpy cannot stack."""
    model = _with_convs(
        [helper.make_node("SplitToSequence", ["t", "parts"], ["seq"], axis=0)],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 2], np.int64), "parts")])
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.model.graph.output[1].type.HasField("sequence_type")
    parts = _run(result.model, {"x": np.ones((1, 3, 8, 8), np.float32), "t": np.arange(6, dtype=np.float32).reshape(3, 2)})[1]
    assert [p.shape for p in parts] == [(1, 2), (2, 2)]


def _calibration(extra: dict[str, object], count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), **extra} for _ in range(count)]


def test_calibrated_prune_of_a_sequence_output() -> None:
    """The same model with calibration samples (``bench/onnx_node_cases.py --calibration``): the
    fidelity run read the sequence output with ``np.asarray`` (an internal error)."""
    model = _with_convs(
        [helper.make_node("SplitToSequence", ["t", "parts"], ["seq"], axis=0)],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 2], np.int64), "parts")])
    result = graphprune.prune(model, ratio=0.5, calibration=_calibration({"t": np.ones((3, 2), np.float32)}))
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 1
    assert result.report["fidelity"]["outputs"]["seq"]["cosine"] == pytest.approx(1.0)


def test_calibrated_prune_of_a_scalar_input() -> None:
    """A scalar input (``Einsum("->")``, ONNX's ``test_einsum_scalar``) in calibration samples:
    ``np.ascontiguousarray`` made it 1-D, and the original did not run on the samples (exit 3)."""
    model = _with_convs(
        [helper.make_node("Einsum", ["gain"], ["g"], equation="->")],
        [helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("g", TensorProto.FLOAT, [])], [], opset=12)
    result = graphprune.prune(model, ratio=0.5, calibration=_calibration({"gain": np.array(2.5, np.float32)}))
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 1
    assert result.report["fidelity"]["outputs"]["g"]["rel_l2"] == pytest.approx(0.0)


def _optional_branches(typed: bool) -> onnx.ModelProto:
    """An ``If`` whose branches return an optional sequence; with ``typed`` the empty one is
    ``Optional`` with a ``type`` attribute (ONNX's ``test_if_opt``)."""
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))

    def branch(name: str, empty: bool) -> onnx.GraphProto:
        out = helper.make_value_info(f"o_{name}", helper.make_optional_type_proto(seq_type))
        if empty:
            nodes = [helper.make_node("Optional", [], [f"o_{name}"], type=seq_type)]
        else:
            nodes = [helper.make_node("SequenceConstruct", ["v"], [f"q_{name}"]),
                     helper.make_node("Optional", [f"q_{name}"], [f"o_{name}"])]
        return helper.make_graph(nodes, name, [], [out])

    model = _with_convs(
        [helper.make_node("If", ["c"], ["o"], then_branch=branch("then", typed), else_branch=branch("else", False))],
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_value_info("o", helper.make_optional_type_proto(seq_type))],
        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "v")])
    return model


def test_type_attribute_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _optional_branches(typed=True)
    with pytest.raises(InvalidModelError, match="type attribute 'type'.*optional values are not supported"):
        graphprune.prune(model, lossless=True)
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, path)
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5"]) == 2
    assert "optional values are not supported" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_optional_branch_outputs_keep_their_type() -> None:
    """Branches returning ``Optional(sequence)`` (no type attribute): their outputs are written
    with the type they had (graphsurgeon cannot write an optional; it failed here)."""
    result = graphprune.prune(_optional_branches(typed=False), ratio=0.5)
    assert result.report["verification"]["ok"]
    branch = next(n for n in result.model.graph.node if n.op_type == "If").attribute[0].g
    assert branch.output[0].type.HasField("optional_type")
