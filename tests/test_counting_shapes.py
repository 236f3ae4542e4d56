"""MACs are counted at input sizes the model runs with.

PaddleOCR's PP-OCRv4 recogniser (paddle2onnx) leaves its image size open but runs only at
some sizes; the default guess (224x224) is not one of them, ONNX inference stops inside its
sequence neck there, and the MACs budget was allocated by a cost model with every open size
as 1: ``--target-macs 0.5`` reported "achieved 0.500" while an independent count at the
model's real size said 0.657. The count now uses the sizes verification runs with where the
model does not run at the guess (``Session.cost_shapes``).

A layer whose tensors have no shape at all (ONNX inference stopped before it: ddddocr's CRNN
reads its LSTM from a computed ``Reshape``) was not counted: the report said 0.601 of
444 M MACs where an independent count said 0.4995 of 797 M. Those shapes are folded at the
counting sizes too.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.pipeline.session import Session


def _model() -> onnx.ModelProto:
    """Conv -> Reshape to ``[1, 256, 72]`` -> MatMul: it runs only where 8 * H * W = 256 * 72
    (48x48), and ONNX inference cannot size the Reshape at the default guess (224x224)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), name)
             for name, s in (("w0", (8, 3, 3, 3)), ("b0", (8,)), ("w1", (8, 8, 1, 1)), ("b1", (8,)), ("wm", (72, 16)))]
    inits.append(numpy_helper.from_array(np.array([1, 256, 72], np.int64), "target"))
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"]),
        helper.make_node("Reshape", ["c1", "target"], ["seq"]),
        helper.make_node("MatMul", ["seq", "wm"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _independent_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int:
    """MACs of the Conv and MatMul nodes from the shapes ONNX Runtime computes (every
    intermediate exposed): not graphprune's counter."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [o for n in probe.graph.node for o in n.output if o not in {v.name for v in probe.graph.output}]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    weights = {i.name: numpy_helper.to_array(i).shape for i in probe.graph.initializer}
    total = 0
    for node in probe.graph.node:
        if node.op_type == "Conv":
            total += int(np.prod(values[node.output[0]].shape)) * int(np.prod(weights[node.input[1]][1:]))
        elif node.op_type == "MatMul":
            total += int(np.prod(values[node.output[0]].shape)) * int(values[node.input[0]].shape[-1])
    return total


def test_macs_are_counted_at_sizes_the_model_runs_with() -> None:
    model = _model()
    session = Session(model)
    session.analyze()
    shapes = session.cost_shapes()
    assert shapes is not None and shapes["x"] != (1, 3, 224, 224)
    feed = {"x": np.random.default_rng(1).standard_normal(shapes["x"]).astype(np.float32)}
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)

    result = graphprune.prune(model, target_macs=0.5)
    budget = result.report["budget"]
    assert budget["met"], budget
    assert result.report["macs_input_shapes"] == {"x": list(shapes["x"])}
    fraction = _independent_macs(result.model, feed) / _independent_macs(model, feed)
    assert abs(fraction - 0.5) <= 0.03 and abs(budget["achieved"] - fraction) <= 0.01, (fraction, budget)


def test_a_model_that_runs_at_the_default_guess_is_counted_there() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "H", "W"])
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    model = helper.make_model(helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    session = Session(model)
    session.analyze()
    assert session.cost_shapes() == {"x": (1, 3, 224, 224)}


def _behind_an_uninferred_reshape() -> onnx.ModelProto:
    """Conv -> Transpose -> Reshape to ``[W, 1, 64]`` (its target computed with ``Div``, which
    ONNX data propagation does not fold) -> LSTM."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), name)
             for name, s in (("w0", (8, 1, 3, 3)), ("b0", (8,)), ("wr", (1, 32, 64)), ("rr", (1, 32, 8)))]
    inits += [numpy_helper.from_array(np.array([v], np.int64), name) for name, v in (("i3", 3), ("c64", 64), ("one", 1))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c0"], ["s"]), helper.make_node("Gather", ["s", "i3"], ["w"], axis=0),
             helper.make_node("Div", ["w", "one"], ["w1"]),
             helper.make_node("Concat", ["w1", "one", "c64"], ["target"], axis=0),
             helper.make_node("Transpose", ["c0"], ["t"], perm=[3, 0, 1, 2]),
             helper.make_node("Reshape", ["t", "target"], ["seq"]),
             helper.make_node("LSTM", ["seq", "wr", "rr"], ["h"], hidden_size=8)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, "W"])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


#: the MACs of :func:`_behind_an_uninferred_reshape` at width 20: Conv outputs x (inputs x
#: kernel), LSTM steps x gates x hidden x (input + hidden)
_BEHIND_MACS = 8 * 9 * 8 * 20 + 20 * 4 * 8 * (64 + 8)


def test_a_layer_behind_an_uninferred_reshape_is_counted() -> None:
    """Every MAC of both layers is counted (the shape computation is folded at the sizes)."""
    from graphprune.verify.metrics import count_macs

    assert count_macs(_behind_an_uninferred_reshape(), None, {"x": (1, 1, 8, 20)}) == _BEHIND_MACS


def test_sizes_nothing_infers_are_taken_from_a_run(monkeypatch) -> None:
    """An SVTR recogniser quantized to int4 (``MatMulNBits``): five decoder tensors that
    neither ONNX inference nor the folded shape computations reach stayed open, and then no
    layer was sized: every one counted at one token, 18.5 M MACs where it computes 3.5 G,
    under a label "at image=1x3x32x128". The open tensors are sized by running the nodes they
    need at those sizes; here both other sources are made to fail."""
    from graphprune.analysis import shape_probe
    from graphprune.io import model_io
    from graphprune.verify.metrics import count_macs

    monkeypatch.setattr(model_io, "concrete_shapes", lambda *a, **k: {})
    monkeypatch.setattr(shape_probe, "probe_concrete_shapes", lambda *a, **k: {})
    assert count_macs(_behind_an_uninferred_reshape(), None, {"x": (1, 1, 8, 20)}) == _BEHIND_MACS


def _loop_model() -> onnx.ModelProto:
    """x [1, 4] -> MatMul -> Relu -> MatMul -> Loop (3 steps of s = Relu(s @ wb)) -> MatMul -> y."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "wb"], ["m"]), helper.make_node("Relu", ["m"], ["s_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "step", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 8])])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["s0"]),
             helper.make_node("Loop", ["trips", "go", "s0"], ["s"], body=body),
             helper.make_node("MatMul", ["s", "w2"], ["y"])]
    inits = [numpy_helper.from_array(np.array(3, dtype=np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go")]
    inits += [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
              for name, shape in (("w0", (4, 16)), ("w1", (16, 8)), ("wb", (8, 8)), ("w2", (8, 2)))]
    graph = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_layers_inside_a_loop_are_said_to_be_left_out(capsys) -> None:
    """A decoder run step by step (a ``Loop`` whose body holds a MatMul) runs its body as many
    times as the data decides: the count leaves it out and the report and CLI say so."""
    from graphprune.cli import main

    model = _loop_model()
    result = graphprune.prune(model, ratio=0.5)
    report = result.report
    assert report["verification"]["ok"] and report["macs_uncounted"] == {"Loop": 1}
    assert 4 * 16 + 16 * 8 <= report["macs_before"] <= 4 * 16 + 16 * 8 + 8 * 2  # not the body's 8 x 8
    assert "macs_uncounted" not in graphprune.prune(_model(), ratio=0.5).report
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, Path(tmp) / "m.onnx")
        assert main(["prune", str(Path(tmp) / "m.onnx"), "-o", str(Path(tmp) / "p.onnx"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "MACs leave out the layers inside 1 Loop" in out and "count the rest of the graph only" in out


def test_budget_sweep_runs_fewer_samples_through_a_stepped_body() -> None:
    """A model that repeats a body with layers (a decoder in a Loop) runs the sensitivity
    sweep on at most SENSITIVITY_STEPPED_SAMPLES held-out samples: each (group, ratio) runs
    every sample through every step. Other models keep all of theirs."""
    from graphprune.pipeline.choose import SENSITIVITY_STEPPED_SAMPLES

    model = _loop_model()
    x = np.random.default_rng(1).standard_normal((60, 1, 4)).astype(np.float32)
    report = graphprune.prune(model, target_macs=0.6, calibration={"x": x}, search=0).report
    assert report["verification"]["ok"]
    assert report["budget"]["sensitivity"]["samples"] == SENSITIVITY_STEPPED_SAMPLES < 12  # of 12 held out
    plain = graphprune.prune(_model(), target_macs=0.6, calibration="random", search=0).report
    assert plain["budget"]["sensitivity"]["samples"] == plain["calibration"]["held_out"]


def _shapeless_cnn() -> onnx.ModelProto:
    """NHWC input with a symbolic batch, Transpose -> Conv -> Relu -> Conv, and no
    ``value_info`` (what keras2onnx wrote for MTCNN's networks)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), name)
             for name, s in (("w0", (8, 3, 3, 3)), ("w1", (4, 8, 3, 3)))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w0"], ["c0"]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 12, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_without_inferred_shapes_is_counted_and_left_as_it_was() -> None:
    """Counting read the layers' shapes from ``value_info`` only: a file as its exporter wrote
    it counted 0 MACs, and a lossless prune of it (which keeps the file's own ``value_info``)
    reported "MACs 12.91M -> 0" on MTCNN's O-Net."""
    from graphprune.verify.metrics import count_macs

    model = _shapeless_cnn()
    before = model.SerializeToString()
    feed = {"x": np.random.default_rng(0).standard_normal((1, 12, 12, 3)).astype(np.float32)}
    expected = _independent_macs(model, feed)  # 8*10*10*27 + 4*8*8*72
    assert count_macs(model) == expected == 21600 + 18432
    assert model.SerializeToString() == before  # counting annotated a copy of the shapes only

    result = graphprune.prune(model, lossless=True)
    assert result.report["macs_before"] == result.report["macs_after"] == expected


def test_layers_on_a_flattened_batch_are_counted_per_sample() -> None:
    """tf2onnx writes a Keras ``Dense`` on a sequence as ``Reshape([-1, 8]) -> MatMul``:
    ONNX inference gives the flattened rows a size no input names, which the count took as
    1 (a Keras attention block counted 37 k of its 72 k MACs, and ``--target-macs 0.6``
    landed at 0.744 by an independent count). With only the batch open, the rows are sized
    at batch 1, and the report still says plain "MACs" (no sizes were chosen)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), name)
             for name, s in (("w1", (8, 32)), ("b1", (32,)), ("w2", (32, 16)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), name)
              for name, v in (("rows", [-1, 8]), ("tail", [8, 16]), ("first", [0]), ("one", [1]))]
    nodes = [helper.make_node("Reshape", ["x", "rows"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "first", "one"], ["n"]),
             helper.make_node("Concat", ["n", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["o", "target"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": rng.standard_normal((1, 8, 8)).astype(np.float32)}
    full = _independent_macs(model, feed)
    assert full == 8 * (8 * 32 + 32 * 16)
    from graphprune.verify.metrics import count_macs

    # the count sizes such layers itself (the report counts the exported files, whose own
    # shapes can lack sizes the analysis derived: a Keras ViT counted 2.71 M of its 3.29 M)
    assert count_macs(model) == full

    result = graphprune.prune(model, target_macs=0.5)
    report, budget = result.report, result.report["budget"]
    assert report["macs_before"] == full and "macs_input_shapes" not in report
    assert budget["met"], budget
    fraction = _independent_macs(result.model, feed) / full
    assert abs(fraction - 0.5) <= 0.03 and abs(budget["achieved"] - fraction) <= 0.01, (fraction, budget)


def test_einsum_layers_and_fused_convs_count() -> None:
    """A grouped linear layer written as an Einsum (livekit-plugins-hush: 12-14 % of its MACs)
    and ONNX Runtime's FusedConv in a file it saved (MarbleNet: six, counted before their
    lowering by the benchmark's counter) counted 0."""
    from graphprune.verify.metrics import count_macs

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Einsum", ["x", "w"], ["h"], equation="btgi,gih->btgh"),
             helper.make_node("Reshape", ["h", "shape"], ["flat"]),
             helper.make_node("Unsqueeze", ["flat", "axes"], ["image"]),
             helper.make_node("FusedConv", ["image", "k", "b"], ["y"], domain="com.microsoft", activation="Relu",
                              pads=[1, 1], kernel_shape=[3])]
    params = [numpy_helper.from_array(rng.standard_normal((4, 8, 6)).astype(np.float32), "w"),
              numpy_helper.from_array(np.array([5, 24], np.int64), "shape"),
              numpy_helper.from_array(np.array([0], np.int64), "axes"),
              numpy_helper.from_array(rng.standard_normal((3, 5, 3)).astype(np.float32), "k"),
              numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 24])], params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    einsum = 1 * 5 * 4 * 8 * 6  # b t g i h
    conv = 3 * 24 * 5 * 3  # every output element: Cin x kernel
    assert count_macs(model) == einsum + conv
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": rng.standard_normal((1, 5, 4, 8)).astype(np.float32)})[0].shape == (1, 3, 24)


def test_ort_fused_int8_kernels_in_a_file_without_shapes_are_counted(tmp_path) -> None:
    """ONNX Runtime's fused dynamic-int8 kernels (``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``)
    in a file without ``value_info`` (as another tool writes it): what follows them through a
    computed Reshape stayed unsized and was counted as nothing (a T5 encoder: 37.7 M MACs for
    1.23 G); those sizes are now taken from a run, as behind an int4 ``MatMulNBits``."""
    from onnxruntime.quantization import quantize_dynamic

    from graphprune.verify.metrics import count_macs

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((32, 32)) * 0.2).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([4, 8], np.int64), "heads")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Shape", ["h"], ["s"], start=0, end=2), helper.make_node("Div", ["s", "one"], ["s1"]),
             helper.make_node("Concat", ["s1", "heads"], ["target"], axis=0),
             helper.make_node("Reshape", ["h", "target"], ["r"]),
             helper.make_node("Transpose", ["r"], ["q"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["r"], ["k"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["q", "k"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    expected = 16 * 32 * 32 + 4 * 16 * 8 * 16
    onnx.save(float_model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    fused = onnx.load(tmp_path / "fused.onnx")
    assert {n.op_type for n in fused.graph.node} & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    del fused.graph.value_info[:]
    assert count_macs(fused) == expected


def test_a_calibrated_budget_counts_an_open_leading_axis_at_the_data_size(tmp_path) -> None:
    """A graph network reads ``x [atoms, 16]``: layers per atom, a mean over the atoms, layers
    per graph. Its open axis 0 was taken for the batch and counted at one atom even where the
    calibration samples hold 200, so a ``--target-macs 0.5`` budget cut the per-graph layers
    (cheap on the data) and kept the per-atom ones: 0.83 of the MACs on the data, reported
    "0.50". With calibration data that sizes that axis other than 1, MACs count at the data's
    sizes (pocketnet's GNN, round 70)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "W2"], ["c"]),
             helper.make_node("ReduceMean", ["c"], ["p"], axes=[0], keepdims=1),
             helper.make_node("MatMul", ["p", "W3"], ["d"]), helper.make_node("Relu", ["d"], ["e"]),
             helper.make_node("MatMul", ["e", "W4"], ["y"])]
    shapes = {"W1": (16, 64), "W2": (64, 32), "W3": (32, 256), "W4": (256, 10)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["atoms", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((48, 200, 16)).astype(np.float32))
    result = graphprune.prune(model, target_macs=0.5, calibration=str(tmp_path / "cal.npz"))
    assert result.report["macs_input_shapes"] == {"x": [200, 16]}

    def macs(m: onnx.ModelProto, atoms: int) -> int:  # counted here, at the data's 200 atoms
        w = {i.name: i.dims for i in m.graph.initializer}
        return atoms * (w["W1"][0] * w["W1"][1] + w["W2"][0] * w["W2"][1]) + w["W3"][0] * w["W3"][1] + \
            w["W4"][0] * w["W4"][1]
    assert abs(macs(result.model, 200) / macs(model, 200) - 0.5) <= 0.03
    assert result.report["budget"]["achieved"] == pytest.approx(macs(result.model, 200) / macs(model, 200), abs=0.01)
