"""Ops whose output size depends on their input values (``NonZero``, ``Compress``, ``Unique``,
``NonMaxSuppression``), as detectors use them after their heads: a score threshold, then
non-maximum suppression. The backbone before them prunes; the axes they compare freeze with
the reason; ``Compress`` along an axis passes the other axes through. The structural check
says when an output had no element to compare, checks it on the calibration samples then,
and accepts one box more or fewer after a selection only where the models agree on most
further inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from conftest import assert_prunes_exactly, make_model, zeroed_original
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.analysis import analyze_graph
from graphprune.io.ir import import_graph
from graphprune.pipeline import selections
from graphprune.pipeline.session import Session
from graphprune.tables import verification_lines

OPS_UNDER_TEST = ("NonZero", "Compress", "Unique", "NonMaxSuppression")


def _compress_mlp() -> onnx.ModelProto:
    """``x [6, 8] -> MatMul [8, 16] -> Relu -> Compress(rows whose input sums > 0) -> MatMul
    [16, 4]``: the hidden axis passes the row selection."""
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["keep"]),
             helper.make_node("Compress", ["r", "keep"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "w_out"], ["y"])]
    return make_model(nodes, {"x": [6, 8]}, {"y": ["m", 4]},
                      {"w_in": [8, 16], "w_out": [16, 4], "axes": np.array([1], np.int64),
                       "zero": np.array(0.0, np.float32)})


def test_compress_along_an_axis_passes_the_other_axes() -> None:
    model = _compress_mlp()
    result = assert_prunes_exactly(model)
    kept = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert kept["w_in"] == [8, 8] and kept["w_out"] == [8, 4]


def _detector(*, selection: str, score_bias: float = 0.0) -> onnx.ModelProto:
    """``x [1, 3, 8, 8] -> Conv (16) -> Relu`` (the backbone: prunes), then a box head (4
    maps) and a score head (1 map, Sigmoid) over the 64 positions, then the boxes chosen by
    ``NonMaxSuppression`` or by ``NonZero(score > 0.5)``, or the ``Unique`` box values."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["f"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["f"], ["r"]),
             helper.make_node("Conv", ["r", "w_box"], ["box_map"]),
             helper.make_node("Reshape", ["box_map", "box_shape"], ["box_rows"]),
             helper.make_node("Transpose", ["box_rows"], ["boxes"], perm=[0, 2, 1]),  # [1, 64, 4]
             helper.make_node("Conv", ["r", "w_cls", "b_cls"], ["logit_map"]),
             helper.make_node("Sigmoid", ["logit_map"], ["score_map"]),
             helper.make_node("Reshape", ["score_map", "score_shape"], ["scores"]),  # [1, 1, 64]
             helper.make_node("Reshape", ["boxes", "flat_boxes"], ["box_list"])]  # [64, 4]
    params = {"w1": [16, 3, 3, 3], "b1": [16], "w_box": [4, 16, 1, 1], "w_cls": [1, 16, 1, 1],
              "b_cls": np.array([score_bias], np.float32),
              "box_shape": np.array([1, 4, 64], np.int64), "score_shape": np.array([1, 1, 64], np.int64),
              "flat_boxes": np.array([64, 4], np.int64)}
    if selection == "NonMaxSuppression":
        nodes += [helper.make_node("NonMaxSuppression", ["boxes", "scores", "most", "iou", "least"], ["picked"]),
                  helper.make_node("Gather", ["picked", "two"], ["index"], axis=1),  # [M]
                  helper.make_node("Gather", ["box_list", "index"], ["y"], axis=0)]
        params |= {"most": np.array([10], np.int64), "iou": np.array([0.5], np.float32),
                   "least": np.array([0.3], np.float32), "two": np.array(2, np.int64)}
    elif selection == "NonZero":
        nodes += [helper.make_node("Reshape", ["scores", "flat"], ["score_list"]),
                  helper.make_node("Greater", ["score_list", "half"], ["passed"]),
                  helper.make_node("NonZero", ["passed"], ["where"]),
                  helper.make_node("Squeeze", ["where", "zero_axis"], ["index"]),
                  helper.make_node("Gather", ["box_list", "index"], ["y"], axis=0)]
        params |= {"flat": np.array([64], np.int64), "half": np.array(0.5, np.float32),
                   "zero_axis": np.array([0], np.int64)}
    else:
        nodes += [helper.make_node("Unique", ["box_list"], ["y"], sorted=1)]
    return make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, params, opset=17)


def test_the_backbone_before_a_selection_by_value_prunes_and_the_selection_freezes() -> None:
    for selection in ("NonMaxSuppression", "NonZero", "Unique"):
        model = _detector(selection=selection)
        analysis = analyze_graph(import_graph(model), opset=17)
        frozen = [g for g in analysis.groups if g.is_frozen]
        if selection != "NonZero":  # (its input is a comparison of one score map: no channel)
            assert any(f"positions chosen by value at {selection}" in r for g in frozen for r in g.frozen), selection
        assert not analysis.unsupported, analysis.unsupported
        result = graphprune.prune(model, ratio=0.5)
        assert result.report["verification"]["ok"] is True, (selection, result.report["verification"])
        assert dict((t.name, list(t.dims)) for t in result.model.graph.initializer)["w1"] == [8, 3, 3, 3]


def test_an_output_without_elements_is_reported_and_checked_on_the_calibration_samples() -> None:
    """On random inputs no score of this detector passes 0.5 (its score head is biased low):
    the check compares an empty output and says so. Given samples on which scores pass, the
    check runs on those, and the boxes are compared."""
    model = _detector(selection="NonZero", score_bias=-10.0)
    for name, values in (("w1", np.abs), ("w_cls", lambda w: np.full_like(w, 0.01))):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        tensor.CopyFrom(onnx.numpy_helper.from_array(values(onnx.numpy_helper.to_array(tensor)), name))
    # random inputs (of magnitude 1) leave every score near sigmoid(-10 + 0.01 * sum of the
    # features); the samples' large values push some of them past 0.5
    rng = np.random.default_rng(0)
    bright = [{"x": (40.0 * rng.random((1, 3, 8, 8))).astype(np.float32)} for _ in range(8)]

    blind = graphprune.prune(model, ratio=0.5)
    verification = blind.report["verification"]
    assert verification["ok"] is True and verification["empty_outputs"] == ["y"], verification
    lines = verification_lines(blind.report)
    assert any("outputs with no element on any input compared: y" in line for line in lines), lines

    seen = graphprune.prune(model, ratio=0.5, calibration=bright, reconstruction="none")
    verification = seen.report["verification"]
    assert verification["ok"] is True and "empty_outputs" not in verification, verification
    assert verification["feeds"].endswith(" calibration samples (on random inputs y had no element)")


def test_one_box_more_after_a_selection_is_accepted_where_further_inputs_agree() -> None:
    """NonMaxSuppression keeps one box more in the pruned model on the first input (rounding
    moved a score across the threshold): the shapes differ there. The models are compared on
    three further inputs; agreement passes (and says so), a wrong rewrite does not."""
    model = _detector(selection="NonMaxSuppression")
    w_cls = next(t for t in model.graph.initializer if t.name == "w_cls")  # scores well apart:
    w_cls.CopyFrom(onnx.numpy_helper.from_array(0.02 * onnx.numpy_helper.to_array(w_cls), "w_cls"))
    # (saturated at 1.0 they tie, and rounding reorders the ties on most inputs)
    result = graphprune.prune(model, ratio=0.5)
    session = Session(model)
    zeroed, unzeroed = zeroed_original(model, result.plan), model
    flipped = {"ok": False, "reference": "the zeroed original", "error": "pruned model output shapes differ",
               "shapes_differ": [0]}
    accepted = selections.within_selection_flips(session, result.model, zeroed, flipped, 1e-4)
    assert accepted["ok"] is True and accepted["selection_agreement"] == "3/3", accepted
    assert "NonMaxSuppression" in accepted["scale"] and "error" not in accepted
    assert accepted["max_rel_diff"] <= 1e-4 and accepted["samples"] == 3
    wrong = selections.within_selection_flips(session, result.model, unzeroed, flipped, 1e-4)
    assert wrong["ok"] is False and wrong["selection_agreement"] == "0/3"


def test_unique_and_nonzero_of_a_value_freeze_whatever_they_read() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["a"]), helper.make_node("NonZero", ["a"], ["where"]),
             helper.make_node("Cast", ["where"], ["y"], to=TensorProto.FLOAT)]
    model = make_model(nodes, {"x": [2, 8]}, {"y": None}, {"w_in": [8, 16]})
    analysis = analyze_graph(import_graph(model), opset=17)
    (group,) = [g for g in analysis.groups if ("w_in", 1) in g.params]
    assert any("positions chosen by value at NonZero" in r for r in group.frozen), group.frozen


def test_the_size_names_shape_inference_invents_stay_out_of_what_ort_reads() -> None:
    """ONNX Runtime folds shape computations on the equalities that inference's ``unk__N``
    names state (``[Shape(a)[0], Shape(a)[1]]`` -> ``[0, -1]``, which it cannot apply to a
    tensor without elements: torchvision's Faster R-CNN with no region proposal ran as
    exported and failed with inferred shapes). The returned model carries none; the prepared
    graph keeps them (the analysis reads them) and hands ORT a file without them."""
    from graphprune.io import declared_shapes

    model = _detector(selection="NonZero")
    session = Session(model)

    def invented(m: onnx.ModelProto) -> int:
        return sum(d.dim_param.startswith("unk__") for v in m.graph.value_info for d in v.type.tensor_type.shape.dim)

    before = invented(session.prepared)
    assert before > 0  # (NonZero's count, and what is gathered with it)
    written = onnx.load(str(session.path_of(session.prepared)), load_external_data=False)
    assert invented(written) == 0 and invented(session.prepared) == before
    with declared_shapes.invented_cleared(session.prepared) as cleared:
        assert invented(cleared) == 0
    assert invented(session.prepared) == before
    result = graphprune.prune(model, ratio=0.5)
    assert invented(result.model) == 0 and result.model.graph.value_info


def test_size_names_the_users_file_gives_stay_in_the_written_model(tmp_path) -> None:
    """ONNX Runtime's symbolic inference and Optimum write ``unk__N`` into the file's own
    ``value_info``; with them ORT proves a residual ``Add``'s inputs equal in shape and fuses it
    with the LayerNormalization after it. Cleared, the fusion was lost and a lossless int8
    DeBERTa's logits moved by 1.4 % under ORT's default optimisations."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Reshape", ["a", "s"], ["r"]), helper.make_node("Add", ["r", "x"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    dims = ["unk__1", "unk__2", 16]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        [numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w"),
         numpy_helper.from_array(np.ones(16, np.float32), "g"), numpy_helper.from_array(np.zeros(16, np.float32), "b")],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    def fused(m: onnx.ModelProto) -> int:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "SkipLayerNormalization" for n in onnx.load(tmp_path / "optimised.onnx").graph.node)

    result = graphprune.prune(model, lossless=True)
    shape = next(v for v in result.model.graph.value_info if v.name == "r").type.tensor_type.shape
    assert [d.dim_param or d.dim_value for d in shape.dim] == dims
    assert fused(model) == fused(result.model) == 1


def test_flips_on_most_inputs_pass_where_the_values_the_selection_reads_agree() -> None:
    """Scores saturated at 1.0 tie: rounding reorders NonMaxSuppression's choice on most
    inputs (1 of 3 further inputs agree here). Then every value computed before the choice and
    read after it (boxes and scores) is compared; they agree to rounding, and no layer after the
    choice was pruned, so the rewrite is shown exact up to the choice. A wrong model differs
    there too. Where a layer after the choice was pruned, nothing is accepted that way."""
    model = _detector(selection="NonMaxSuppression")
    result = graphprune.prune(model, ratio=0.5)
    session = Session(model)
    assert selections.selected_outputs(session) == {0}
    flipped = {"ok": False, "samples": 1, "tolerance": 1e-4, "max_abs_diff": 5.0, "max_rel_diff": 0.5,
               "per_output": [{"max_abs_diff": 5.0, "scale": 10.0}]}
    accepted = selections.within_selection_flips(session, result.model, zeroed_original(model, result.plan),
                                                 flipped, 1e-4)
    assert accepted["ok"] is True and accepted["selection_agreement"] != "3/3", accepted
    assert "every value computed before the choices and read after them agrees" in accepted["scale"]
    assert accepted["max_rel_diff_read"] <= 1e-4
    wrong = selections.within_selection_flips(session, result.model, model, flipped, 1e-4)
    assert wrong["ok"] is False

    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=0),
             helper.make_node("TopK", ["s", "k"], ["top", "rows"]),
             helper.make_node("Gather", ["r", "rows"], ["picked"], axis=0),
             helper.make_node("MatMul", ["picked", "w_mid"], ["m"]), helper.make_node("Relu", ["m"], ["h"]),
             helper.make_node("MatMul", ["h", "w_out"], ["y"])]
    later = make_model(nodes, {"x": [6, 8]}, {"y": None},
                       {"w_in": [8, 4], "w_mid": [4, 16], "w_out": [16, 2], "axes": np.array([1], np.int64),
                        "k": np.array([3], np.int64)})
    result = graphprune.prune(later, ratio=0.5)
    assert any(t.dims[1] == 8 for t in result.model.graph.initializer if t.name == "w_mid")  # (after the TopK)
    session = Session(later)
    _, after = selections._selections(session)
    assert selections._read_values_agree(session, result.model, zeroed_original(later, result.plan), after,
                                         session.feeds(count=2), 1e-4) is None
