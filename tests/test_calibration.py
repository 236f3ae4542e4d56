"""Calibration pieces on small real graphs: data, exposure, linear rows, statistics, fidelity."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.calibration import fidelity, output_kinds, runner, stats
from graphprune.calibration.data import holdout_indices, load_calibration
from graphprune.calibration.linear import linear_view, select
from graphprune.errors import UsageError
from graphprune.verify.validate import session


def conv_model(*, group: int = 1, stride: int = 1, dilation: int = 1, pads=(1, 1, 1, 1),
               auto_pad: str | None = None, cin: int = 4, cout: int = 6, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    attrs = {"group": group, "strides": [stride, stride], "dilations": [dilation, dilation]}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w", "b"], ["y"], name="conv", **attrs)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="up_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------------- data
def test_npz_is_validated_and_split(tmp_path):
    model = mlp_model()
    x = np.random.default_rng(0).standard_normal((10, 1, 3, 8))
    np.savez(tmp_path / "c.npz", x=x)  # float64: cast to float32 (same kind)
    calib = load_calibration(str(tmp_path / "c.npz"), model)
    assert calib.total == 10 and len(calib.holdout) == 2 and len(calib.samples) == 8
    assert calib.samples[0]["x"].dtype == np.float32 and calib.samples[0]["x"].shape == (1, 3, 8)
    again = load_calibration(str(tmp_path / "c.npz"), model)
    assert again.holdout_indices == calib.holdout_indices  # deterministic


def test_calibration_with_no_finite_value_is_refused() -> None:
    """All NaN (a file written from failed preprocessing) measured nothing and the fidelity read
    perfect, NaN before and after; some NaN (missing values a tabular model imputes) is data."""
    model = mlp_model()
    nan = np.full((6, 1, 3, 8), np.nan, np.float32)
    with pytest.raises(UsageError, match="'x' has no finite value in any of its 6 samples"):
        load_calibration({"x": nan}, model)
    with pytest.raises(UsageError, match="no finite value"):
        load_calibration({"x": np.full((6, 1, 3, 8), np.inf, np.float32)}, model)
    some = np.random.default_rng(0).standard_normal((6, 1, 3, 8)).astype(np.float32)
    some[::2, 0, 0, 0] = np.nan
    assert load_calibration({"x": some}, model).total == 6


def test_samples_the_original_answers_with_nan_are_dropped() -> None:
    """One NaN pixel in one of four images made every statistic NaN: the prune wrote 51 NaN biases and
    a model that outputs NaN for every input, exit 0. A sample whose NaN inputs the original answers
    with NaN is dropped (said in the note); one it answers with finite values (a model that imputes
    its missing values) is data; every sample dropped is a usage error."""
    import graphprune

    model = mlp_model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 3, 8)).astype(np.float32)
    x[3, 0, 0, 0] = np.nan
    result = graphprune.prune(model, ratio=0.5, calibration={"x": x})
    note = result.report["calibration"]["note"]
    assert note.startswith("1 of 8 samples dropped: their inputs hold NaN") and result.report["calibration"]["samples"] == 7
    weights = [numpy_helper.to_array(t) for t in result.model.graph.initializer]
    assert all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f")
    out = session(result.model).run(None, {"x": x[0]})[0]
    assert np.isfinite(out).all()
    imputed = helper.make_model(helper.make_graph(  # NaN read as 0 before the layers: finite outputs
        [helper.make_node("IsNaN", ["x"], ["missing"]), helper.make_node("Where", ["missing", "zero", "x"], ["x0"]),
         *[n for n in model.graph.node]], "imputed", list(model.graph.input), list(model.graph.output),
        [*model.graph.initializer, numpy_helper.from_array(np.zeros((), np.float32), "zero")]),
        opset_imports=[helper.make_opsetid("", 17)])
    for node in imputed.graph.node[2:]:
        node.input[:] = ["x0" if name == "x" else name for name in node.input]
    from graphprune.verify.validate import run_many

    kept = load_calibration({"x": x}, imputed, run=lambda feeds: run_many(imputed, feeds, "the original model"))
    assert kept.total == 8 and kept.note is None
    x[:, 0, 0, 0] = np.nan
    with pytest.raises(UsageError, match="every one of the 8 calibration samples holds NaN"):
        load_calibration({"x": x}, model, run=lambda feeds: run_many(model, feeds, "the original model"))


def test_calibration_samples_all_the_same_are_said_so() -> None:
    """Eight all-zero images ran to exit 0 without a word on the data itself."""
    from graphprune.tables import calibration_lines

    model = mlp_model()
    same = load_calibration({"x": np.zeros((8, 1, 3, 8), np.float32)}, model)
    assert "all 8 calibration samples are the same" in same.summary()["note"]
    assert any(line.startswith("  note: all 8 calibration samples") for line in calibration_lines(
        {**same.summary(), "criterion": "auto"}))
    varied = np.random.default_rng(0).standard_normal((8, 1, 3, 8)).astype(np.float32)
    assert "note" not in load_calibration({"x": varied}, model).summary()


def test_calibration_data_the_model_does_not_run_on_is_bad_input() -> None:
    """Token ids past an embedding table's rows: the model runs (on the tool's own feeds), the
    data does not fit it. Bad input, exit 2, saying which (it was exit 3, "the original model
    does not run"); the same ids within the table prune."""
    import graphprune

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="emb"), helper.make_node("MatMul", ["e", "W"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]), helper.make_node("MatMul", ["a", "W2"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("E", (50, 16)), ("W", (16, 32)), ("W2", (32, 4)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    with pytest.raises(UsageError, match="the calibration data does not fit the model: .*Gather.*idx=999"):
        graphprune.prune(model, ratio=0.3, calibration={"ids": np.full((6, 1, 8), 999, np.int64)})
    fits = graphprune.prune(model, ratio=0.3, calibration={"ids": rng.integers(0, 50, (6, 1, 8))})
    assert fits.report["verification"]["ok"]


def test_folder_and_feed_iterables(tmp_path):
    model = mlp_model()
    rng = np.random.default_rng(1)
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", x=rng.standard_normal((1, 3, 8)).astype(np.float32))
    calib = load_calibration(str(tmp_path), model)
    assert calib.total == 3 and len(calib.holdout) == 1
    feeds = [{"x": rng.standard_normal((1, 3, 8)).astype(np.float32)} for _ in range(5)]
    assert load_calibration(iter(feeds), model, holdout=0.0).total == 5
    assert load_calibration({"x": np.zeros((4, 1, 3, 8), np.float32)}, model).total == 4


def test_one_input_takes_an_unnamed_array(tmp_path):
    """``np.savez(path, a)`` names the array ``arr_0`` and ``np.save`` names none: for a model
    with one input there is only one place for it."""
    model = mlp_model()
    stacked = np.random.default_rng(2).standard_normal((5, 1, 3, 8)).astype(np.float32)
    np.savez(tmp_path / "positional.npz", stacked)
    np.save(tmp_path / "stacked.npy", stacked)
    for name in ("positional.npz", "stacked.npy"):
        calib = load_calibration(str(tmp_path / name), model)
        assert calib.total == 5
        feeds = calib.samples + calib.holdout
        assert all(set(f) == {"x"} for f in feeds)
        assert sorted(float(f["x"].sum()) for f in feeds) == sorted(float(a.sum()) for a in stacked)
    # a model with two inputs: an unnamed array names no input
    two = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])]))
    np.save(tmp_path / "two.npy", np.zeros((3, 1, 4), np.float32))
    with pytest.raises(UsageError, match="'arr_0' is not a graph input"):
        load_calibration(str(tmp_path / "two.npy"), two)
    # rows of a batch without the sample axis: refused, with the fix in the message
    np.savez(tmp_path / "rows.npz", x=stacked[:, 0])
    with pytest.raises(UsageError, match=r"has rank 3; expected 4 .*add that axis: array\[:, None\]$"):
        load_calibration(str(tmp_path / "rows.npz"), model)
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(UsageError, match="cannot read calibration file"):
        load_calibration(str(tmp_path / "broken.npy"), model)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros((2, 1, 3, 8), np.float32)}, "'y' is not a graph input"),
        ({"x": np.zeros((2, 1, 3, 8), np.int64)}, "'x' has dtype int64"),
        ({"x": np.zeros((2, 3, 8), np.float32)}, "'x' has rank 3; expected 4"),
        ({"x": np.zeros((2, 1, 4, 8), np.float32)}, "'x' (sample 0) has size 4 on axis 1"),
    ],
)
def test_bad_arrays_give_one_line_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UsageError) as info:
        load_calibration(str(tmp_path / "bad.npz"), mlp_model())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_sources(tmp_path):
    model = mlp_model()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "empty").mkdir()
    # damaged archives: a zip header then junk, cut in half, a compressed member's bytes flipped
    (tmp_path / "header.npz").write_bytes(b"PK\x03\x04garbage")
    (tmp_path / "text.npz").write_bytes(b"hi")  # (numpy took it for a pickle: "allow_pickle=False")
    np.savez_compressed(tmp_path / "good.npz", x=np.random.default_rng(0).random((64, 1, 3, 8), np.float32))
    whole = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(whole[: len(whole) // 2])
    flipped = bytearray(whole)
    for k in (200, 300, 400):
        flipped[k] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    for source, message in [
        (str(tmp_path / "missing.npz"), "no such calibration file"),
        (str(tmp_path / "junk.npz"), "cannot read calibration file"),
        (str(tmp_path / "text.npz"), "'.*text.npz': not a .npz \\(zip archive of arrays\\) nor a .npy array file$"),
        (str(tmp_path / "header.npz"), "cannot read calibration file '.*header.npz': File is not a zip file"),
        (str(tmp_path / "half.npz"), "cannot read calibration file"),
        (str(tmp_path / "flipped.npz"), "cannot read calibration file"),
        (str(tmp_path / "empty"), "holds no .npz files"),
        ([], "has no samples"),
        ([{"x": np.zeros((1, 3, 8), np.float32)}, 3], "sample 1 is a int"),
    ]:
        with pytest.raises(UsageError, match=message):
            load_calibration(source, model)
    with pytest.raises(UsageError, match="no array for graph input 'x'"):
        load_calibration([{}], model)


def test_symbolic_sizes_must_agree():
    x = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4])
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "g", [x, y], [out]))
    with pytest.raises(UsageError, match="has n=2 but 'a' has n=1"):
        load_calibration([{"a": np.zeros((1, 4), np.float32), "b": np.zeros((2, 4), np.float32)}], model)


def test_question_mark_sizes_are_unknown_not_equal():
    """paddle2onnx writes ``?`` for every open axis: an OCR input ``[-1, 3, ?, ?]`` with
    height 48 and width 192 was refused ("has ?=192 but 'x' has ?=48")."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "?", "?"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [out]))
    calib = load_calibration([{"x": np.zeros((1, 3, 48, 192), np.float32)}] * 3, model)
    assert len(calib.samples) + len(calib.holdout) == 3


def test_holdout_indices_spread_and_bounded():
    assert holdout_indices(1, 0.2) == []
    assert len(holdout_indices(2, 0.2)) == 1
    idx = holdout_indices(100, 0.2)
    assert len(idx) == 20 and idx[0] < 10 and idx[-1] > 90


# ---------------------------------------------------------------------- runner
def test_exposed_model_keeps_the_proto_and_trims_nodes():
    model = mlp_model()
    before = model.SerializeToString()
    data = runner.exposed_model(model, ["hb"])
    assert model.SerializeToString() == before  # restored, nothing copied into it
    exposed = onnx.load_from_string(data)
    assert [o.name for o in exposed.graph.output] == ["hb"]
    assert [n.name for n in exposed.graph.node] == ["up", "up_bias"]


def test_stream_chunks_and_batches():
    model = mlp_model()
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 3, 8)).astype(np.float32)} for _ in range(5)]
    seen: dict[str, list[np.ndarray]] = {"h": [], "a": []}
    runner.stream(model, ["h", "a"], feeds, lambda i, n, v: seen[n].append(v), chunk_bytes=1)
    assert len(seen["h"]) == len(seen["a"]) == 5
    ref = session(model).run(None, feeds[3])[0]
    out = runner.outputs(model, feeds)[3][0]
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    # a static batch of 1 cannot be stacked: every sample stays a batch
    assert not runner.batches(model, feeds, 4).stacked


def test_batches_stack_a_batch_separable_model():
    model = conv_model()
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 4, 9, 9)).astype(np.float32)} for _ in range(5)]
    b = runner.batches(model, feeds, 2)
    assert b.stacked and b.sizes == [2, 2, 1] and b.feeds[0]["x"].shape == (2, 4, 9, 9)
    # never one batch: the refit's ridge is cross-validated on even against odd batches
    assert runner.batches(model, feeds, 16).sizes == [3, 2]


# ---------------------------------------------------------------------- linear rows
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stride": 2}, {"dilation": 2, "pads": (2, 1, 2, 0)}, {"group": 2},
     {"group": 4, "cout": 4}, {"auto_pad": "SAME_UPPER", "stride": 2}],
)
def test_conv_rows_reproduce_the_conv(kwargs):
    model = conv_model(**kwargs)
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.name == "conv")
    view = linear_view(conv, 17)
    assert view is not None
    x = np.maximum(np.random.default_rng(4).standard_normal((2, 4, 9, 9)).astype(np.float32), 0)
    y = session(model).run(None, {"x": x})[0]
    rows = select(view.positions(x.shape), 40, seed=1)
    inputs = view.input_rows(x, rows)  # [R, g, K]
    mats = view.matrices()  # [g, og, K]
    predicted = np.einsum("rgk,gok->rgo", inputs.astype(np.float64), mats) + view.bias_values().reshape(view.group, -1)
    np.testing.assert_allclose(predicted.reshape(len(rows), -1),
                               view.output_rows(y, rows).reshape(len(rows), -1), rtol=1e-4, atol=1e-4)
    assert view.output_positions(y.shape) == view.positions(x.shape)


def conv_transpose_model(kernel=(3, 3), **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 5, *kernel)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    spatial = [7, 6][: len(kernel)]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("ConvTranspose", ["r", "w", "b"], ["y"], name="up", **attrs)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "kernel,attrs",
    [((3, 3), {}), ((2, 2), {"strides": [2, 2]}),  # the up-sampling head of a text detector
     ((3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
     ((3, 2), {"strides": [3, 2], "dilations": [2, 1], "pads": [2, 0, 1, 1]}),
     ((4,), {"strides": [2], "pads": [1, 2], "auto_pad": "NOTSET"}),
     ((3, 3), {"auto_pad": "VALID", "strides": [2, 1]})],
)
def test_conv_transpose_rows_reproduce_the_conv_transpose(kernel, attrs):
    model = conv_transpose_model(kernel, **attrs)
    up = next(n for n in gs.import_onnx(model).nodes if n.name == "up")
    view = linear_view(up, 17)
    assert view is not None and view.is_conv and view.in_channels() == 4 and view.out_channels() == 5
    shape = (2, 4, *[7, 6][: len(kernel)])
    x = np.maximum(np.random.default_rng(4).standard_normal(shape).astype(np.float32), 0)
    y = session(model).run(None, {"x": x})[0]
    assert view.output_positions(y.shape) == view.positions(x.shape)
    rows = select(view.positions(x.shape), 60, seed=1)
    predicted = view.input_rows(x, rows)[:, 0].astype(np.float64) @ view.matrices()[0].T + view.bias_values()
    np.testing.assert_allclose(predicted, view.output_rows(y, rows), rtol=1e-4, atol=1e-4)
    # the matrix form is the weight: writing it back gives the same tensor
    np.testing.assert_array_equal(view.set_matrices(view.matrices()), np.asarray(view.weight.values))


@pytest.mark.parametrize("attrs", [{"output_shape": [15, 13], "strides": [2, 2]},
                                   {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {"group": 2}])
def test_conv_transpose_with_derived_padding_or_groups_has_no_view(attrs):
    model = conv_transpose_model((3, 3), **attrs) if "group" not in attrs else None
    if model is None:  # a grouped one: weight [in, out / group, k...]
        model = conv_transpose_model((3, 3))
        model.graph.node[1].attribute.append(helper.make_attribute("group", 2))
    up = next(n for n in gs.import_onnx(model).nodes if n.name == "up")
    assert linear_view(up, 17) is None


def test_dense_rows_reproduce_the_matmul():
    model = mlp_model()
    graph = gs.import_onnx(model)
    down = next(n for n in graph.nodes if n.name == "down")
    view = linear_view(down, 17)
    a = np.random.default_rng(5).standard_normal((1, 3, 16)).astype(np.float32)
    rows = np.arange(3)
    expected = a.reshape(3, 16) @ np.asarray(view.weight.values)
    np.testing.assert_allclose(view.input_rows(a, rows)[:, 0] @ view.matrices()[0].T, expected, rtol=1e-5)
    assert view.bias_values() is None
    assert linear_view(next(n for n in graph.nodes if n.name == "act"), 17) is None


def test_channel_statistics_match_numpy():
    model = conv_model()
    graph = gs.import_onnx(model)
    view = linear_view(next(n for n in graph.nodes if n.name == "conv"), 17)
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.standard_normal((1, 4, 9, 9)).astype(np.float32)} for _ in range(4)]
    collected = stats.collect(model, [view], runner.Batches(feeds, [1] * 4, False))
    layer = collected.get("conv")
    relu = np.maximum(np.concatenate([f["x"] for f in feeds]), 0)
    per_channel = np.moveaxis(relu, 1, -1).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(layer.mean, per_channel.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.variance, per_channel.var(0), rtol=1e-4)
    np.testing.assert_allclose(layer.gram / layer.gram_rows, per_channel.T @ per_channel / len(per_channel), rtol=1e-4)


def test_buffered_gram_accumulation_equals_the_direct_sums():
    """Small batches (a sentence each) are buffered and folded into the Grams in blocks of
    rows; the statistics are the sums over every row, whatever the blocks."""
    from graphprune.calibration.ridge import FLUSH_ROWS, Accumulator

    rng = np.random.default_rng(9)
    parts = [rng.standard_normal((int(n), 2, 5)).astype(np.float32) for n in rng.integers(1, 40, 150)]
    assert sum(len(p) for p in parts) > 2 * FLUSH_ROWS
    acc = Accumulator.empty(2, 4, 3)
    channel = stats.ChannelStats()
    for i, x in enumerate(parts):
        acc.add(i % 2, x, x[:, :, :3] * 2.0)
        channel.add(x[:, 0, :4], x[:, 0, :4])
    acc.flush()
    channel.flush()
    for fold in (0, 1):
        x = np.concatenate(parts[fold::2]).astype(np.float64)
        np.testing.assert_allclose(acc.gram[fold], np.einsum("rgk,rgl->gkl", x, x), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(acc.cross[fold], np.einsum("rgk,rgo->gko", x, 2.0 * x[:, :, :3]), rtol=1e-5, atol=1e-3)
    rows = np.concatenate(parts)[:, 0, :4].astype(np.float64)
    np.testing.assert_allclose(channel.gram, rows.T @ rows, rtol=1e-5, atol=1e-3)
    assert channel.gram_rows == len(rows) and acc.rows == len(rows)


# ---------------------------------------------------------------------- fidelity
def test_fidelity_figures():
    model = conv_model()
    rng = np.random.default_rng(7)
    feeds = [{"x": rng.standard_normal((1, 4, 9, 9)).astype(np.float32)} for _ in range(3)]
    same = fidelity.fidelity(model, model, feeds)
    assert same["cosine"] == pytest.approx(1.0) and same["rel_l2"] == pytest.approx(0.0, abs=1e-7)
    assert same["top1_agreement"] is None  # a feature map is not class scores
    scores = [[np.array([[0.1, 0.9, 0.0]])], [np.array([[0.8, 0.1, 0.1]])]]
    other = [[np.array([[0.1, 0.8, 0.2]])], [np.array([[0.1, 0.8, 0.1]])]]
    result = fidelity.compare_outputs(["logits"], scores, other)
    assert result["top1_agreement"] == 0.5
    assert 0 < result["cosine"] < 1 and result["rel_l2"] > 0
    # a score-shaped output that is the same for every sample (a constant) is no classifier:
    # it reported a top-1 agreement of 1.0
    const = np.array([[0.0, 1.0]])
    both = fidelity.compare_outputs(["logits", "prior"], [[s[0], const] for s in scores],
                                    [[o[0], const] for o in other])
    assert "top1_agreement" not in both["outputs"]["prior"] and both["top1_agreement"] == 0.5
    alone = fidelity.compare_outputs(["prior"], [[const], [const]], [[const], [const]])
    assert alone["top1_agreement"] is None


def test_audio_is_not_class_scores():
    """A waveform of one row (Kokoro's ``audio``, declared ``[audio_length]``) reported a top-1
    agreement, the arg-max sample of two sounds: an output whose length changes with the input,
    or whose last axis is declared with a named size, is not class scores."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    waves = [[rng.standard_normal((1, n))] for n in (300, 420)]
    noisy = [[w[0] + 0.1 * rng.standard_normal(w[0].shape)] for w in waves]
    assert fidelity.compare_outputs(["audio"], waves, noisy)["top1_agreement"] is None
    fixed = [[rng.standard_normal((1, 300))] for _ in range(2)]
    assert fidelity.compare_outputs(["audio"], fixed, fixed)["top1_agreement"] == 1.0
    assert fidelity.compare_outputs(["audio"], fixed, fixed, not_scores={"audio"})["top1_agreement"] is None
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["audio"]), helper.make_node("Identity", ["x"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300])],
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, "audio_length"]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 300])])
    assert output_kinds.open_length(helper.make_model(graph)) == {"audio"}


def test_an_output_that_is_a_constant_is_compared_as_one():
    """An exporter's ``Identity`` of a weight as a graph output folds into an initializer that
    is the output: no run computes it, and the calibrated prune stopped with "the original
    model does not run in ONNX Runtime: tensor 'cout' is not computed by the model"."""
    from conftest import make_model

    import graphprune

    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"]),
             helper.make_node("Identity", ["C"], ["cout"])]
    model = make_model(nodes, {"x": (1, 3, 8, 8)}, {"y": None, "cout": None},
                       {"W1": (16, 3, 3, 3), "B1": (16,), "W2": (4, 16, 1, 1), "C": (5,)})
    calibration = {"x": np.random.default_rng(0).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)}
    result = graphprune.prune(model, ratio=0.5, calibration=calibration)
    assert result.report["verification"]["ok"]
    outputs = result.report["fidelity"]["outputs"]
    assert outputs["cout"]["rel_l2"] == 0.0 and outputs["y"]["rel_l2"] > 0.0
    assert [o.name for o in result.model.graph.output] == ["y", "cout"]


def test_an_output_listed_twice():
    """ONNX lets a graph list one tensor as two outputs (ONNX Runtime returns it twice): the
    calibrated prune stopped with an internal error ("'NoneType' object has no attribute
    'shape'"): the runner kept one slot per name."""
    import graphprune
    from graphprune.examples import example_cnn

    model = example_cnn()
    model.graph.output.append(copy.deepcopy(model.graph.output[0]))
    for kwargs in ({"ratio": 0.5}, {"target_macs": 0.6}):
        result = graphprune.prune(model, calibration="random:8", **kwargs)
        assert result.report["verification"]["ok"]
        assert [o.name for o in result.model.graph.output] == ["logits", "logits"]
        assert result.report["fidelity"]["cosine"] > 0.9


def data_dependent_length_model() -> onnx.ModelProto:
    """An MLP whose output keeps the top ``k`` of each row, ``k`` computed from the whole
    batch's values: a sample's output length depends on the data and on what it is batched
    with (a decoder loop that stops at a data-dependent step)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32) * 0.3, "w2"),
             numpy_helper.from_array(np.array([8.0], np.float32), "eight"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"]),
             helper.make_node("Sigmoid", ["y"], ["s"]),
             helper.make_node("ReduceMean", ["s"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "eight"], ["m8"]),
             helper.make_node("Ceil", ["m8"], ["c"]),
             helper.make_node("Cast", ["c"], ["k"], to=TensorProto.INT64),
             helper.make_node("TopK", ["y", "k"], ["top", "idx"], axis=1)]
    graph = helper.make_graph(nodes, "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("top", TensorProto.FLOAT, ["n", "k"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_outputs_of_data_dependent_length():
    """SLANet (a table-structure decoder in a ``Loop``): two samples' outputs of different
    lengths stopped the calibrated prune ("all the input array dimensions except for the
    concatenation axis must match exactly") while testing whether samples can be batched; a
    pruned model that answers with another length is reported, counted as cosine 0."""
    import graphprune

    model = data_dependent_length_model()
    rng = np.random.default_rng(1)
    feeds = [{"x": (rng.standard_normal((1, 8)) * (1 + 3 * i)).astype(np.float32)} for i in range(6)]
    lengths = {runner.outputs(model, [f])[0][0].shape[1] for f in feeds}
    assert len(lengths) > 1  # the premise: samples differ in output length
    assert not runner.batch_separable(model, feeds)
    assert not runner.batches(model, feeds, 4).stacked

    short = [[np.zeros((1, 2), np.float32)], [np.ones((1, 3), np.float32)]]
    long = [[np.zeros((1, 3), np.float32)], [np.ones((1, 3), np.float32)]]
    result = fidelity.compare_outputs(["top"], long, short)
    assert result["outputs"]["top"]["other_shape"] == 1
    assert result["outputs"]["top"]["min_cosine"] == 0.0 and result["rel_l2"] == 0.5
    assert "other_shape" not in fidelity.compare_outputs(["top"], long, long)["outputs"]["top"]

    calibration = {"x": np.concatenate([(rng.standard_normal((1, 1, 8)) * (1 + i % 4)) for i in range(40)]
                                       ).astype(np.float32)}
    pruned = graphprune.prune(model, ratio=0.5, calibration=calibration)
    assert pruned.report["verification"]["ok"]
    assert pruned.report["fidelity"]["samples"] > 0
    from graphprune.tables import prune_summary

    report = {**pruned.report, "fidelity": result}
    assert "1 of 2 held-out samples got an output of another shape" in prune_summary(report)


def test_budget_sensitivity_with_outputs_of_data_dependent_length():
    """The calibrated budget's sensitivity sweep compared outputs of different lengths
    element by element ("operands could not be broadcast together"): another length is a
    deviation of 1, as in the fidelity report; the sweep's random-input fidelity counts it."""
    import graphprune
    from graphprune import sweep
    from graphprune.planning.sensitivity import _deviation

    ref = np.ones((1, 3), np.float32)
    assert _deviation([ref], [np.ones((1, 2), np.float32)]) == 1.0
    assert _deviation([ref], [ref]) == 0.0
    model = data_dependent_length_model()
    rng = np.random.default_rng(2)
    calibration = {"x": np.concatenate([(rng.standard_normal((1, 1, 8)) * (1 + i % 4)) for i in range(40)]
                                       ).astype(np.float32)}
    pruned = graphprune.prune(model, target_macs=0.6, calibration=calibration)
    assert pruned.report["verification"]["ok"] and abs(pruned.report["budget"]["achieved"] - 0.6) < 0.05
    figures = sweep.fidelity(model, pruned.model, count=8)
    assert figures["cosine_mean"] is not None and -1.0 <= figures["cosine_min"] <= 1.0
