"""Inputs fed the values a model was made for, and checks that say when they compared little.

An ORT statically quantized model (QDQ) quantizes its float input with a scale calibrated on
the data it was made for. An ESRGAN quantized for 0-255 pixels maps standard normal values to
one level: its output was 0 for every random feed, so the structural check and the held-out
fidelity of ``--calibration random`` compared zeros with zeros ("max abs diff 0", "cosine 1"),
and the refit on those activations wrote a model that outputs 0 on real images. Verification,
the size probes and synthetic calibration now feed such an input values uniform across its
quantizer's range (``OpRule.value_range``); an output of one value throughout is reported
(``constant_outputs``, the fidelity's ``constant`` and ``note``); a one-element output has no
cosine (its cosine is its sign's agreement); a recurrent state fed back is never class scores.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.calibration import fidelity, output_kinds
from graphprune.pipeline.session import Session
from graphprune.rules.registry import lookup
from graphprune.verify import validate

SCALE = 16.0  # 0-4080 in 256 levels: standard normal values all quantize to 0


def qdq_conv_model() -> onnx.ModelProto:
    """``x [1, 3, 8, 8]`` quantized (uint8, scale 16), dequantized, two 3x3 convs with a ReLU."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp"),
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.01).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.1).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("Conv", ["xd", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _quantizer(zp: np.ndarray | None, **attrs) -> gs.Node:
    inputs = [gs.Variable("x", np.float32), gs.Constant("s", np.array(0.5, np.float32))]
    if zp is not None:
        inputs.append(gs.Constant("zp", zp))
    return gs.Node("QuantizeLinear", inputs=inputs, outputs=[gs.Variable("q")], attrs=attrs)


@pytest.mark.parametrize(("zp", "attrs", "expected"), [
    (np.array(0, np.uint8), {}, (0.0, 127.5)),
    (np.array(128, np.uint8), {}, (-64.0, 63.5)),
    (np.array(-3, np.int8), {}, (-62.5, 65.0)),
    (None, {}, (0.0, 127.5)),  # no zero point: uint8
    (None, {"output_dtype": TensorProto.INT8}, (-64.0, 63.5)),
])
def test_an_input_quantizer_says_the_range_it_represents(zp, attrs, expected):
    node = _quantizer(zp, **attrs)
    rule = lookup("", "QuantizeLinear", 21)
    assert rule.value_range(node, 0) == pytest.approx(expected)
    assert rule.value_range(node, 1) is None  # (the scale is no value the model reads)
    assert lookup("", "Relu", 17).value_range(node, 0) is None  # (no range known: the default)


def test_verification_and_random_calibration_feed_the_quantizers_range():
    model = qdq_conv_model()
    session = Session(model)
    assert session.value_ranges() == {"x": pytest.approx((0.0, 255 * SCALE))}
    x = np.concatenate([f["x"].ravel() for f in session.feeds(count=2)])
    assert x.min() >= 0 and x.max() > 100 * SCALE  # across the range, not standard normal
    result = graphprune.prune(model, ratio=0.5, calibration="random:8")
    verification = result.report["verification"]
    assert verification["ok"] and "constant_outputs" not in verification
    held_out = result.report["fidelity"]
    assert "same on all" not in held_out.get("note", "") and not held_out["outputs"]["y"].get("constant")
    assert "uniform [0, 4080] (its quantizer's range)" in result.report["calibration"]["source"]
    # the model as written computes on real-range inputs: not the constant it was on noise
    feed = {"x": np.random.default_rng(5).uniform(0, 255 * SCALE, (1, 3, 8, 8)).astype(np.float32)}
    (out,) = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert np.ptp(out) > 0


def test_an_output_of_one_value_throughout_is_reported():
    """Compared on standard normal values (a range given otherwise), the quantized model's
    output is its bias alone: the check says little was compared."""
    model = qdq_conv_model()
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)} for i in range(2)]
    outs = [[np.full((1, 4, 8, 8), 0.25, np.float32)] for _ in feeds]
    result = validate.compare(model, model, feeds, what="the original", tolerance=1e-5,
                              candidate_outputs=outs, reference_outputs=outs, check=False)
    assert result["ok"] and result["constant_outputs"] == [0]
    varied = [[np.arange(256, dtype=np.float32).reshape(1, 4, 8, 8)] for _ in feeds]
    assert "constant_outputs" not in validate.compare(model, model, feeds, what="the original", tolerance=1e-5,
                                                      candidate_outputs=varied, reference_outputs=varied, check=False)


def test_fidelity_figures_that_cannot_say_anything_are_not_given():
    rng = np.random.default_rng(0)
    names = ["prob", "logits"]
    original = [[np.array([[0.3 + 0.1 * i]], np.float32), rng.standard_normal((1, 5)).astype(np.float32)]
                for i in range(3)]
    pruned = [[np.array([[0.9]], np.float32), o[1] * 1.01] for o in original]
    result = fidelity.compare_outputs(names, original, pruned)
    # a one-element output: no cosine (it would be 1), its relative L2 still
    assert result["outputs"]["prob"]["cosine"] is None and result["outputs"]["prob"]["rel_l2"] > 0.5
    assert result["cosine"] == pytest.approx(1.0) and result["rel_l2"] > 0.5
    assert result["note"].startswith("the figures rest on 3 held-out sample(s)")  # (too few to say much)
    zeros = [[np.zeros((1, 4), np.float32)] for _ in range(3)]
    constant = fidelity.compare_outputs(["y"], zeros, zeros)
    assert constant["outputs"]["y"]["constant"] and "same on all 3 held-out samples" in constant["note"]


def test_a_recurrent_state_fed_back_is_not_class_scores():
    state = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, 16])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["hn"]), helper.make_node("Identity", ["x"], ["scores"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5]), state],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 5]),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert output_kinds.fed_back(model) == {"hn"}  # (scores shaped like a 2-D input stay scores)
    outputs = [[np.eye(1, 5, i, dtype=np.float32), np.eye(1, 16, i, dtype=np.float32).reshape(1, 1, 16)]
               for i in range(3)]
    pruned = [[o[0], np.roll(o[1], 1)] for o in outputs]
    result = fidelity.compare_outputs(["scores", "hn"], outputs, pruned, not_scores=output_kinds.fed_back(model))
    assert result["outputs"]["scores"]["top1_agreement"] == 1.0 and "top1_agreement" not in result["outputs"]["hn"]


def gnn_model() -> onnx.ModelProto:
    """Atoms ``x [num_atoms, 4]``, the rows ``targets [num_targets, 6]`` gathered and run
    through two layers: every open size is on axis 0, so verification runs one atom, and a
    random id 1 indexes past it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 2)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gather", ["x", "targets"], ["g"], axis=0),
             helper.make_node("MatMul", ["g", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "gnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["num_atoms", 4]),
                       helper.make_tensor_value_info("targets", TensorProto.INT64, ["num_targets", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["num_targets", 6, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_ids_into_an_open_count_of_rows_are_fed_zeros_where_0s_and_1s_do_not_run():
    """caustic-nmr's GNN was refused (exit 2, "the input model does not run") in every mode."""
    model = gnn_model()
    result = graphprune.prune(model, ratio=0.5)
    verification = result.report["verification"]
    assert verification["ok"] and "every integer input 0 (targets)" in verification["feeds"]
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    feed = {"x": x, "targets": np.array([[4, 0, 2, 1, 3, 3]], np.int64)}
    (out,) = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert out.shape == (1, 6, 2)


def test_every_mode_falls_back_to_integer_zeros():
    """minimol's GNN (a ScatterElements readout by the atoms' graph ids): ``--ratio`` fell back
    to integer inputs 0 where random 0s and 1s index past one graph, but ``--lossless`` (two
    feeds given to the check) and ``--calibration random`` (the ids held at verification's
    random values) exited 2 "the input model does not run"."""
    model = gnn_model()
    lossless = graphprune.prune(model, lossless=True).report["verification"]
    assert lossless["ok"] and "every integer input 0 (targets)" in lossless["feeds"]
    calibrated = graphprune.prune(model, ratio=0.5, calibration="random:8").report
    assert calibrated["verification"]["ok"]
    source = calibrated["calibration"]["source"]
    assert "targets [1, 6] = 0" in source and "targets held at " in source, source


def test_random_calibration_holds_graph_ids_at_zero_where_random_ones_index_past_the_graphs():
    """The scout's minimal readout: ``ScatterElements(add)`` of node features into as many rows
    as ``graph_slots`` has (one), by the node -> graph ids ``batch``: random ids 1 index past it.
    Random calibration holds them at 0 (an index every table has)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 16)), ("b1", (16,)), ("w2", (16, 4)), ("b2", (4,)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("one", [1]), ("c16", [16]), ("z1", [0]))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("Unsqueeze", ["batch", "one"], ["b2d"]), helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Slice", ["xs", "z1", "one"], ["n"]), helper.make_node("Concat", ["n", "c16"], ["es"], axis=0),
             helper.make_node("Expand", ["b2d", "es"], ["idx"]), helper.make_node("Shape", ["graph_slots"], ["g"]),
             helper.make_node("Concat", ["g", "c16"], ["os"], axis=0),
             helper.make_node("ConstantOfShape", ["os"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
             helper.make_node("ScatterElements", ["zeros", "idx", "h"], ["pooled"], axis=0, reduction="add"),
             helper.make_node("Gemm", ["pooled", "w2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "readout", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["num_nodes", 8]),
        helper.make_tensor_value_info("batch", TensorProto.INT64, ["num_nodes"]),
        helper.make_tensor_value_info("graph_slots", TensorProto.FLOAT, ["num_graphs"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["num_graphs", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    shapes = {"x": (20, 8), "batch": (20,), "graph_slots": (1,)}
    for kwargs in ({"lossless": True}, {"ratio": 0.3, "calibration": "random:8"}):
        report = graphprune.prune(model, input_shapes=shapes, **kwargs).report
        assert report["verification"]["ok"], kwargs
    assert "batch held at 0 (random values of them do not run)" in report["calibration"]["source"]


def test_erasing_blocks_falls_back_to_integer_zeros_too():
    """pocketnet's GNN: ``--erase-blocks 1`` gave its verification two generated feeds, which
    skip the fallback, and exited 3 "the original does not run" where every other mode ran."""
    model = gnn_model()
    rng = np.random.default_rng(2)
    model.graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n)
                                    for n in ("wa", "wb")])
    y = model.graph.node[-1]
    y.input[0] = "s"
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("MatMul", ["r", "wa"], ["ba"]))
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Relu", ["ba"], ["br"]))
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("MatMul", ["br", "wb"], ["bb"]))
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Add", ["r", "bb"], ["s"]))
    onnx.checker.check_model(model)
    report = graphprune.prune(model, erase_blocks=1).report
    assert len(report["depth"]["blocks_erased"]) == 1
    verification = report["verification"]
    assert verification["ok"] and "every integer input 0 (targets)" in verification["feeds"]
    assert report["depth"]["max_rel_diff_vs_original"] > 0


def test_timing_and_a_sweep_fall_back_to_integer_zeros(tmp_path):
    """pocketnet's GNN: ``bench`` exited 2 ("ONNX Runtime failed to run ... invalid index"), and
    ``sweep`` pruned every point, then failed them all at their comparison with the original."""
    from graphprune.sweep import fidelity, run_sweep
    from graphprune.verify.timing import time_models

    model = gnn_model()
    (timing,) = time_models([model], warmup=0, runs=2)
    assert timing.median_ms > 0 and timing.input_shapes["targets"][0] >= 1
    pruned = graphprune.prune(model, ratio=0.5).model
    figures = fidelity(model, pruned)
    assert figures["inputs"].endswith("integers 0") and figures["cosine_mean"] > 0
    result = run_sweep(model, tmp_path / "sweep", [{"ratio": 0.5, "criterion": "l1"}], runs=2)
    (point,) = result["points"]
    assert point["ok"] and point["latency_ratio"] > 0, point


def test_calibration_ids_past_the_rows_are_the_data_s_fault_on_a_model_that_needs_integer_zeros():
    """pocketnet with atom ids past its atoms in the calibration file: "the input model does not
    run in ONNX Runtime" (the random feeds the blame tried do not run either), not naming the
    data; the model runs where verification feeds it (integer inputs 0)."""
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((5, 4)).astype(np.float32), "targets": np.full((2, 6), 9, np.int64)}
            for _ in range(8)]
    with pytest.raises(graphprune.errors.UsageError, match="the calibration data does not fit the model"):
        graphprune.prune(gnn_model(), ratio=0.5, calibration=data)


def test_a_reconstruction_of_the_input_is_not_class_scores():
    """An autoencoder's ``y [N, 30]`` for its ``x [N, 30]`` was read as 30 class scores: the report
    gave "top-1 agreement 0.25" and "18 of 30 classes seen" where the anomaly scores kept their order.
    An output shaped like a float input whose values follow it is a reconstruction; scores of as
    many classes as the input has features, which do not follow it, stay scores."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((30, 27)))[0]
    inits = [numpy_helper.from_array((basis @ basis.T).astype(np.float32), "P"),
             numpy_helper.from_array(rng.standard_normal((30, 30)).astype(np.float32), "W")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "P"], ["y"]), helper.make_node("MatMul", ["x", "W"], ["scores"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 30])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 30]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 30])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": rng.standard_normal((1, 30)).astype(np.float32)} for _ in range(6)]
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    pruned.graph.initializer[0].CopyFrom(numpy_helper.from_array((basis[:, :20] @ basis[:, :20].T).astype(np.float32),
                                                                 "P"))
    result = fidelity.fidelity(model, pruned, feeds)
    assert "top1_agreement" not in result["outputs"]["y"] and result["outputs"]["y"]["cosine"] < 0.99
    assert result["outputs"]["scores"]["top1_agreement"] == 1.0
