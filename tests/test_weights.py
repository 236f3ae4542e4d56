"""Weights held once (graphprune.io.weights, graphprune.io.wire) and the zeroed reference
built from the store's files (graphprune.verify.zeroed.zeroed_reference)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphprune.passes.prune_channels import removed_elements
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.errors import InvalidModelError
from graphprune.io import model_io, segments, wire
from graphprune.io.weights import MAP_THRESHOLD, WeightStore
from graphprune.pipeline.ratio import RatioOptions, make_plan
from graphprune.pipeline.session import Session
from graphprune.verify import validate, zeroed


def cnn(seed: int = 0, constant: bool = False) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(16) -> Relu -> Conv(32) -> Relu -> Flatten -> Gemm(10); the two
    last weights are over the store's threshold, the first is not. ``constant``: a large
    Constant node (a tensor attribute) is added to the output."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "B2"),
        numpy_helper.from_array(rng.standard_normal((10, 32 * 8 * 8)).astype(np.float32), "G"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "C"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "G", "C"], ["g" if constant else "y"], name="fc", transB=1),
    ]
    if constant:
        table = rng.standard_normal((2048, 10)).astype(np.float32)
        nodes += [
            helper.make_node("Constant", [], ["k"], name="table",
                             value=numpy_helper.from_array(table, "table")),
            helper.make_node("Constant", [], ["axes"], name="axes",
                             value=numpy_helper.from_array(np.array([0], np.int64), "axes")),
            helper.make_node("ReduceSum", ["k", "axes"], ["ks"], name="sum", keepdims=1),
            helper.make_node("Add", ["g", "ks"], ["y"], name="add"),
        ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def outputs(model: onnx.ModelProto | str | os.PathLike[str], x: np.ndarray) -> np.ndarray:
    source = os.fspath(model) if isinstance(model, str | os.PathLike) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = np.random.default_rng(7).standard_normal((1, 3, 8, 8)).astype(np.float32)


def test_load_refers_to_the_weights_inside_the_model_file(tmp_path: Path) -> None:
    model = cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    store = WeightStore()
    loaded = store.load(path)
    by_name = {t.name: t for t in loaded.graph.initializer}
    data = path.read_bytes()
    for tensor in model.graph.initializer:
        stub = by_name[tensor.name]
        if len(tensor.raw_data) < MAP_THRESHOLD:
            assert stub.raw_data == tensor.raw_data  # small ones stay in the proto
            continue
        info = onnx.external_data_helper.ExternalDataInfo(stub)
        assert info.location == "_gp_source.onnx"
        assert data[info.offset:info.offset + info.length] == tensor.raw_data
        np.testing.assert_array_equal(store.mapped(stub).load(), numpy_helper.to_array(tensor))
    # the skeleton holds no weight bytes: it is the small part of the file
    assert loaded.ByteSize() < len(data) - 80_000


def test_scan_declines_what_it_does_not_understand(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(5000))
    assert wire.scan_model(junk, MAP_THRESHOLD) is None
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(path.read_bytes()[:-3000])
    assert wire.scan_model(truncated, MAP_THRESHOLD) is None
    with pytest.raises(InvalidModelError):
        Session(truncated)
    with pytest.raises(InvalidModelError):
        Session(junk)


def test_in_proto_model_is_saved_as_one_protobuf_with_the_same_weights(tmp_path: Path) -> None:
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(cnn(constant=True), path)
    result = graphprune.prune(os.fspath(path), ratio=0.5)
    assert result.report["verification"]["ok"]
    result.save(out, input_path=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "p.onnx"]  # no data file
    onnx.checker.check_model(os.fspath(out), full_check=True)
    written = onnx.load(out)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)
    expected = result.model  # the same model, built in memory
    assert [t.name for t in written.graph.initializer] == [t.name for t in expected.graph.initializer]
    for a, b in zip(written.graph.initializer, expected.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    np.testing.assert_array_equal(outputs(out, X), outputs(expected, X))


def test_nested_tensors_are_saved_inline_too(tmp_path: Path) -> None:
    path, out = tmp_path / "m.onnx", tmp_path / "same.onnx"
    onnx.save(cnn(constant=True), path)
    session = Session(path)
    # the large Constant table goes to the store on load; constant folding reads it from
    # there (it used to fail on the stub and skip folding) and folds it away
    assert not [n for n in session.prepared.graph.node if n.op_type == "Constant"]
    model_io.save_model(session.prepared, out, store=session.store)
    np.testing.assert_allclose(outputs(out, X), outputs(path, X), rtol=1e-6, atol=1e-6)


def test_copy_bytes_into_a_stream_without_a_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    store = WeightStore()
    stub = next(t for t in store.load(path).graph.initializer if t.name == "G")
    sink = io.BytesIO()
    assert store.copy_bytes(stub, sink) == 10 * 32 * 8 * 8 * 4
    assert sink.getvalue() == numpy_helper.to_array(cnn().graph.initializer[4]).tobytes()


def test_input_data_files_of_in_proto_and_external_models(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(cnn(), inside)
    onnx.save(cnn(), outside, save_as_external_data=True, location="out.bin", size_threshold=0)
    assert model_io._input_data_files(inside) == []
    assert set(model_io._input_data_files(outside)) == {tmp_path / "out.bin"}


def _zeroed_pair(path: Path) -> tuple[Session, onnx.ModelProto, onnx.ModelProto, dict]:
    session = Session(path)
    analysis = session.analyze()
    plan = make_plan(session, analysis, RatioOptions(ratio=0.5))
    removed = removed_elements(analysis, plan)
    masked = zeroed.zeroed_reference(session.prepared, analysis, removed)
    stored = zeroed.zeroed_reference(session.prepared, analysis, removed, store=session.store)
    return session, masked, stored, removed


def test_zeroed_reference_from_the_store_equals_the_masked_one(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    session, masked, stored, removed = _zeroed_pair(path)
    assert any(n.op_type == "Where" and n.name.endswith("__gp_zero") for n in masked.graph.node)
    # every weight in the store's files is a zeroed copy; only the small ones are masked
    assert {n.name for n in stored.graph.node if "__gp_" in n.name} == {
        "W1__gp_zero", "B1__gp_zero", "B2__gp_zero"}
    w2 = next(t for t in stored.graph.initializer if t.name == "W2")
    assert onnx.external_data_helper.ExternalDataInfo(w2).location.startswith("zeroed-")
    expected = numpy_helper.to_array(cnn().graph.initializer[2]).copy()
    cut_axes = {axis for (name, axis) in removed if name == "W2"}
    assert cut_axes == {0, 1}  # a weight cut on two axes
    for (name, axis), idx in removed.items():
        if name == "W2":
            index = [slice(None)] * 4
            index[axis] = idx
            expected[tuple(index)] = 0
    np.testing.assert_array_equal(session.store.mapped(w2).load(), expected)
    runs = [validate.run_many(session.path_of(m), [{"x": X}], "ref", optimize=False)[0][0]
            for m in (masked, stored)]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(runs[1], outputs(path, X), atol=1e-3)  # it is zeroed


def test_zeroed_copies_are_written_a_block_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    store = WeightStore()
    stub = next(t for t in store.load(path).graph.initializer if t.name == "G")
    cuts = [(0, np.array([0, 3, 9])), (1, np.arange(0, 2048, 5))]
    small_blocks = store.write_zeroed({"G": (stub, cuts)}, chunk_bytes=3 * 2048 * 4)["G"]
    one_block = store.write_zeroed({"G": (stub, cuts)})["G"]
    a, b = store.mapped(small_blocks).load(), store.mapped(one_block).load()
    np.testing.assert_array_equal(a, b)
    assert not a[[0, 3, 9]].any() and not a[:, ::5].any()
    assert a[1, 1] == numpy_helper.to_array(cnn().graph.initializer[4])[1, 1]


# ----------------------------------------------------------------------------- segments
def _store_file(model: onnx.ModelProto, tmp_path: Path) -> tuple[Session, Path]:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    session = Session(path)
    return session, session.path_of(session.prepared)


def test_segments_compute_what_the_whole_model_computes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(segments, "MIN_WEIGHTS", 0)
    monkeypatch.setattr(segments, "SHARE", 0.01)  # every weight its own segment
    session, path = _store_file(cnn(constant=True), tmp_path)
    skeleton = onnx.load(path, load_external_data=False)
    ranges = segments.plan(skeleton)
    assert ranges is not None and len(ranges) >= 2
    assert ranges[0][0] == 0 and ranges[-1][1] == len(skeleton.graph.node)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    feeds = [{"x": X}, {"x": -X}]
    for optimize in (False, True):
        whole = validate.session(path, optimize=optimize)
        parts = segments.run_in_segments(path, skeleton, ranges, feeds,
                                         lambda f, o=optimize: validate.session(f, optimize=o))
        for part, feed in zip(parts, feeds, strict=True):
            np.testing.assert_allclose(part[0], whole.run(None, feed)[0], rtol=1e-6, atol=1e-6)
    assert not [f for f in os.listdir(path.parent) if f.startswith("segment-")]  # none left


def test_run_many_uses_segments_and_verification_still_holds(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(segments, "MIN_WEIGHTS", 0)
    monkeypatch.setattr(segments, "SHARE", 0.01)
    used = []
    original = segments.run_in_segments
    monkeypatch.setattr(segments, "run_in_segments",
                        lambda *a, **k: used.append(original(*a, **k)) or used[-1])
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    result = graphprune.prune(os.fspath(path), ratio=0.5)
    assert len(used) == 1  # the zeroed original in segments; the pruned model whole
    assert result.report["verification"]["ok"]
    assert result.report["verification"]["max_rel_diff"] < 1e-5


def test_a_reference_that_differs_in_segments_runs_whole_again(tmp_path: Path, monkeypatch) -> None:
    """Fusions ORT makes across a cut in the whole model are made apart in the segments: an
    unchanged LightGlue read 2.7e-4 against its segmented reference and ``--lossless`` exited 3.
    Where the segmented reference differs, it runs whole (as the candidate does) and the nearer
    comparison decides; a candidate that is wrong still fails."""
    monkeypatch.setattr(segments, "MIN_WEIGHTS", 0)
    monkeypatch.setattr(segments, "SHARE", 0.01)
    original = segments.run_in_segments

    def fused_apart(*args, **kwargs):  # (rounding of the segments' own kernels, amplified)
        return [[o * np.float32(1 + 1e-3) for o in outs] for outs in original(*args, **kwargs)]

    monkeypatch.setattr(segments, "run_in_segments", fused_apart)
    session, path = _store_file(cnn(), tmp_path)
    feeds = [{"x": X}]
    same = validate.compare(path, path, feeds, what="the original", tolerance=1e-4, check=False)
    assert same["ok"] and same["max_rel_diff"] == 0 and "segment by segment" in same["reference_run"]
    other = tmp_path / "other.onnx"
    onnx.save(cnn(seed=1), other)
    wrong = validate.compare(other, path, feeds, what="the original", tolerance=1e-4, check=False)
    assert not wrong["ok"]
    lossless = graphprune.prune(os.fspath(tmp_path / "m.onnx"), lossless=True)
    assert lossless.report["verification"]["ok"]


def test_outer_scope_reads_of_subgraphs_cross_cuts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(segments, "MIN_WEIGHTS", 0)
    monkeypatch.setattr(segments, "SHARE", 0.01)
    rng = np.random.default_rng(3)
    big = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"M{k}")
           for k in range(3)]
    branch = helper.make_graph([helper.make_node("MatMul", ["h1", "M2"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h1"], ["o2"])], "c", [],
                              [helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "M0"], ["h0"]),
         helper.make_node("MatMul", ["h0", "M1"], ["h1"]),
         helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [*big, numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session, path = _store_file(model, tmp_path)
    skeleton = onnx.load(path, load_external_data=False)
    ranges = segments.plan(skeleton)
    assert ranges is not None and len(ranges) == 3  # M0 | M1 ... | the If reading M2
    x = rng.standard_normal((1, 64)).astype(np.float32)
    for feed in ({"x": np.abs(x)}, {"x": -np.abs(x)}):
        got = segments.run_in_segments(path, skeleton, ranges, [feed], validate.session)[0][0]
        np.testing.assert_allclose(got, validate.session(path).run(None, feed)[0], rtol=1e-6)


def test_small_models_and_weights_inside_are_run_whole(tmp_path: Path) -> None:
    session, path = _store_file(cnn(), tmp_path)
    assert segments.plan(onnx.load(path, load_external_data=False)) is None  # under MIN_WEIGHTS
    inside = tmp_path / "inside.onnx"
    onnx.save(cnn(), inside)
    assert validate._run_segmented(inside, [{"x": X}], True) is None


def test_weight_only_nodes_move_next_to_their_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    session, masked, _, _ = _zeroed_pair(path)
    assert masked.graph.node[0].name.endswith("__gp_zero")  # masks come first in the model
    ordered = segments.ordered_nodes(masked.graph)
    assert sorted(n.name for n in ordered) == sorted(n.name for n in masked.graph.node)
    position = {n.name: k for k, n in enumerate(ordered)}
    for k, node in enumerate(ordered):
        if node.name.endswith("__gp_zero"):
            reader = ordered[k + 1]
            assert node.output[0] in reader.input or ordered[k + 1].name.endswith("__gp_zero")
    assert position["W1__gp_zero"] < position["conv1"] and position["W1__gp_zero"] > 0
