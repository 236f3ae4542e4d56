"""The frontier cache of the sequential refit: cached runs give the same tensors and the same
refit as re-running the graph prefix, and memory spills to temporary files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphprune.passes.prune_channels import removed_elements
from graphprune.passes.refit import sliced_parameters
from onnx import TensorProto, helper, numpy_helper

from graphprune.calibration import refit_targets, runner, sequential
from graphprune.calibration.data import load_calibration
from graphprune.io import ir
from graphprune.pipeline.session import Session
from graphprune.planning.planner import plan_ratio


def chain() -> onnx.ModelProto:
    """x -> MatMul(w1) -> h -> Relu -> a -> MatMul(w2) -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tensor_cache_spills_to_files():
    cache = runner.TensorCache(limit=0)
    values = [np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(3)]
    for i, v in enumerate(values):
        cache.put("t", i, v)
    assert cache.held == 0 and cache.types() == {"t": TensorProto.FLOAT}
    folder = cache._folder.name
    assert all(np.array_equal(cache.get("t", i), v) for i, v in enumerate(values))
    cache.close()
    import os

    assert not os.path.exists(folder)


def test_cached_run_skips_the_prefix_and_agrees():
    model = chain()
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 4)).astype(np.float32)} for i in range(3)]
    plain: list[np.ndarray] = []
    runner.stream(model, ["y"], feeds, lambda _i, _n, v: plain.append(v))
    first: list[np.ndarray] = []
    cache = runner.stream(model, ["h"], feeds, lambda _i, _n, v: first.append(v), keep=["a"], cache_bytes=1)
    assert cache is not None and set(cache.types()) == {"a"}
    # the cached run feeds `a` and computes only mm2
    data = runner.exposed_model(model, ["y"], cache.types())
    sub = onnx.load_from_string(data)
    assert [n.name for n in sub.graph.node] == ["mm2"] and "a" in [i.name for i in sub.graph.input]
    assert len(model.graph.node) == 3 and len(model.graph.input) == 1  # proto restored
    again: list[np.ndarray] = []
    runner.stream(model, ["y"], feeds, lambda _i, _n, v: again.append(v), cache=cache)
    cache.close()
    for a, b in zip(plain, again, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_frontier_is_the_cut_before_changing_nodes():
    graph = chain().graph
    unstable = runner.downstream(graph, ["y"])  # mm2 will change
    assert runner.frontier(graph, ["y"], unstable) == ["a"]
    assert runner.frontier(graph, ["y"], runner.downstream(graph, ["h"])) == []  # nothing stable computed


def _refit_weights(model: onnx.ModelProto, use_cache: bool, cache_bytes: int) -> dict[str, np.ndarray]:
    from test_calibration_passes import images

    rank = len(model.graph.input[0].type.tensor_type.shape.dim)
    data = images() if rank == 4 else np.random.default_rng(2).standard_normal((40, 1, 6, 8)).astype(np.float32)

    s = Session(model)
    analysis = s.analyze()
    plan = plan_ratio(analysis, ratio=0.5, round_to=1, criterion="l1")
    from graphprune.pipeline.ratio import channel_passes

    s.apply(channel_passes(analysis, plan))
    s.export()
    removed = removed_elements(analysis, plan)
    calib = load_calibration({"x": data}, s.prepared)
    batches = runner.batches(s.prepared, calib.samples, 8)
    targets = refit_targets.find_targets(s.graph, s.opset, changed=sliced_parameters(removed, s.graph),
                                      removed=removed)
    engine = sequential.Reconstructor(s.prepared, batches, store=s.store)
    engine.use_cache, engine.cache_bytes = use_cache, cache_bytes
    stats = engine.run(s.graph, s.prepared, targets)
    assert stats["waves"] >= 3
    out = ir.export_graph(s.graph, s.prepared, s.store)
    return {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}


@pytest.mark.parametrize("name", ["cnn", "residual_mlp"])
def test_refit_with_cache_equals_refit_without(name):
    """Also with tensors carried over several waves (the residual stream)."""
    from test_calibration_passes import cnn

    build = cnn if name == "cnn" else residual_mlp
    plain = _refit_weights(build(), False, 0)
    for limit in (runner.CACHE_BYTES, 1):  # in memory, and spilled to files
        cached = _refit_weights(build(), True, limit)
        assert plain.keys() == cached.keys()
        for name, value in plain.items():
            np.testing.assert_allclose(cached[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------- residual targets
def residual_mlp() -> onnx.ModelProto:
    """Two blocks ``h = h + W2 relu(W1 h + b1) + b2`` over ``[1, 6, 8]`` tokens, 16 and 64
    hidden units: the wide second block can absorb part of the first one's drift."""
    rng = np.random.default_rng(3)
    inits, nodes, h = [], [], "x"
    for k, hidden in ((1, 16), (2, 64)):
        for name, shape, scale in ((f"w{k}a", (8, hidden), 0.5), (f"b{k}a", (hidden,), 0.3),
                                   (f"w{k}b", (hidden, 8), 0.5 * (16 / hidden) ** 0.5), (f"b{k}b", (8,), 0.3)):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        nodes += [helper.make_node("MatMul", [h, f"w{k}a"], [f"u{k}"], name=f"up{k}"),
                  helper.make_node("Add", [f"u{k}", f"b{k}a"], [f"ub{k}"], name=f"up{k}_bias"),
                  helper.make_node("Relu", [f"ub{k}"], [f"a{k}"], name=f"act{k}"),
                  helper.make_node("MatMul", [f"a{k}", f"w{k}b"], [f"d{k}"], name=f"down{k}"),
                  helper.make_node("Add", [f"d{k}", f"b{k}b"], [f"db{k}"], name=f"down{k}_bias"),
                  helper.make_node("Add", [f"db{k}", h], [f"h{k}"], name=f"residual{k}")]
        h = f"h{k}"
    graph = helper.make_graph(nodes, "resmlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, 6, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_residual_chain_is_found_through_the_registry():
    from graphprune.calibration.linear import linear_view
    from graphprune.calibration.residual import residual_of

    s = Session(residual_mlp())
    s.analyze()
    nodes = {n.name: n for n in s.graph.nodes}
    down = residual_of(linear_view(nodes["down1"], s.opset), s.opset)
    assert down is not None and down.stream == "x" and down.total == "h1"
    np.testing.assert_allclose(down.offset, numpy_helper.to_array(
        next(i for i in residual_mlp().graph.initializer if i.name == "b1b")), rtol=1e-6)
    assert residual_of(linear_view(nodes["up1"], s.opset), s.opset) is None  # Relu after the bias


def prune_and_refit(model: onnx.ModelProto, data: np.ndarray, **options) -> tuple[onnx.ModelProto, dict]:
    """``model`` pruned at ratio 0.5 (l1), then refit on ``data`` (``[samples, *input]`` for
    input ``x``) by the sequential reconstructor; ``options``: ``find_targets`` keywords and
    ``ridge``. Returns the checked model and the refit's figures."""
    from graphprune.pipeline.ratio import channel_passes

    s = Session(model)
    analysis = s.analyze()
    plan = plan_ratio(analysis, ratio=0.5, round_to=1, criterion="l1")
    s.apply(channel_passes(analysis, plan))
    s.export()
    removed = removed_elements(analysis, plan)
    calib = load_calibration({"x": data}, s.prepared, holdout=0.0625)
    batches = runner.batches(s.prepared, calib.samples, 8)
    ridge = options.pop("ridge", None)
    targets = refit_targets.find_targets(s.graph, s.opset, changed=sliced_parameters(removed, s.graph),
                                      removed=removed, **options)
    stats = sequential.Reconstructor(s.prepared, batches, store=s.store, ridge=ridge).run(s.graph, s.prepared, targets)
    out = ir.export_graph(s.graph, s.prepared, s.store)
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def _residual_error(residual_targets: bool) -> tuple[float, dict]:
    model = residual_mlp()
    data = (np.random.default_rng(5).standard_normal((48, 1, 6, 8))).astype(np.float32)
    out, stats = prune_and_refit(model, data[:32], residual_targets=residual_targets)
    feeds = [{"x": d} for d in data[:32]]  # the calibration samples
    ref = np.concatenate([v[0] for v in runner.outputs(model, feeds)]).reshape(-1, 8)
    got = np.concatenate([v[0] for v in runner.outputs(out, feeds)]).reshape(-1, 8)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), stats


def test_residual_targets_compensate_upstream_drift():
    """Refit towards the stream after each block, the second block's output layer also
    corrects what the pruned first block left on the stream (error on the calibration data)."""
    plain, plain_stats = _residual_error(False)
    stream, stream_stats = _residual_error(True)
    assert plain_stats["residual_targets"] == 0 and stream_stats["residual_targets"] == 2
    assert stream < 0.95 * plain, (stream, plain)


@pytest.mark.parametrize("name", ["cnn", "residual_mlp"])
def test_targets_recorded_by_the_statistics_run_equal_a_second_run(name, monkeypatch):
    """The statistics run also records the refit targets (layer outputs and residual sums at
    the selected rows): the refit then runs the original fewer times and fits the same
    weights as when it runs the original itself."""
    from test_calibration_passes import cnn, images

    import graphprune
    from graphprune.pipeline.calibrated import CalibratedRun

    build, data = (cnn, images()) if name == "cnn" else (residual_mlp, np.random.default_rng(2).standard_normal(
        (40, 1, 6, 8)).astype(np.float32))
    original_runs: list[int] = []
    stream = runner.stream

    def counting(model, names, feeds, callback, **kwargs):
        if kwargs.get("what") == "the original model":
            original_runs[-1] += 1
        return stream(model, names, feeds, callback, **kwargs)

    monkeypatch.setattr(runner, "stream", counting)
    weights = []
    for record in (True, False):
        monkeypatch.setattr(CalibratedRun, "record_targets", record)
        original_runs.append(0)
        result = graphprune.prune(build(), ratio=0.5, round_to=1, calibration={"x": data})
        assert result.report["calibration"]["passes"]["RefitPass"]["layers"] >= 2
        weights.append({t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer})
    assert original_runs[0] < original_runs[1]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[1].items():
        np.testing.assert_allclose(weights[0][key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_cached_resize_size_is_fed_with_its_length():
    """A PyTorch export's ``interpolate(size=skip.shape[2:])`` computes Resize's ``sizes``; fed
    from the cache, it was declared without a shape and ONNX Runtime refused the model
    ("Number of elements of input 'sizes' (0)": CRAFT's final refit failed so). The cache
    keeps each tensor's sizes and the fed input declares them."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Slice", ["shape", "two", "four"], ["hw"], name="hw"),
             helper.make_node("Mul", ["hw", "twice"], ["hw2"], name="double"),
             helper.make_node("Concat", ["nc", "hw2"], ["sizes"], name="sizes", axis=0),
             helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Resize", ["r", "roi", "scales", "sizes"], ["y"], name="resize", mode="linear")]
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("two", 2), ("four", 4), ("twice", 2))]
    inits += [numpy_helper.from_array(np.array([1, 2], np.int64), "nc"),
              numpy_helper.from_array(np.zeros(0, np.float32), "roi"), numpy_helper.from_array(np.zeros(0, np.float32), "scales")]
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 2, 3 + i, 4)).astype(np.float32)} for i in range(2)]
    plain: list[np.ndarray] = []
    runner.stream(model, ["y"], feeds, lambda _i, _n, v: plain.append(v))
    cache = runner.stream(model, ["r"], feeds, lambda *_: None, keep=["sizes", "r"])
    assert cache is not None
    again: list[np.ndarray] = []
    runner.stream(model, ["y"], feeds, lambda _i, _n, v: again.append(v), cache=cache)
    assert cache.shapes() == {"sizes": [4], "r": [1, 2, None, 4]}
    cache.close()
    for a, b in zip(plain, again, strict=True):
        np.testing.assert_array_equal(a, b)
