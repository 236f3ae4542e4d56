"""Calibration memory does not grow with the number of samples: samples of a batch-separable
model are stacked into batches only while a batch's computed tensors stay under
``runner.STACK_BYTES`` (every ONNX Runtime run holds one batch's activations), and the
statistics streamed through such bounded batches equal those of the stacked ones (real
ONNX Runtime sessions throughout)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from test_calibration_passes import cnn, images

import graphprune
from graphprune.calibration import runner, stats
from graphprune.calibration.linear import linear_view


def _inferred() -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(cnn())


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    return [{"x": x} for x in images(count)]


def test_sample_bytes_counts_every_computed_tensor_at_the_samples_sizes():
    model = _inferred()
    # c1, r1, c2, r2: 16 x 8 x 8; c3, r3: 8 x 8 x 8; p, f: 8; logits: 5 (float32, batch 1)
    expected = 4 * (4 * 16 * 64 + 2 * 8 * 64 + 8 + 8 + 5)
    assert runner.sample_bytes(model, _feeds(1)[0]) == expected
    # a symbolic batch axis counts the feed's own size, not a guess
    stacked = {"x": np.concatenate(images(3))}
    assert runner.sample_bytes(model, stacked) == 3 * expected


def test_sample_bytes_counts_tensors_whose_sizes_inference_leaves_open():
    """Behind a size that no input names (a convolution over open height and width: the
    inferred output has unknown sizes; paddle2onnx's detectors are all such), a tensor counts
    its size at the feed's sizes, not 1 per unknown size."""
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
         onnx.helper.make_node("Relu", ["c"], ["y"])],
        "open", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    model = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    feed = {"x": rng.standard_normal((2, 3, 64, 48)).astype(np.float32)}
    assert runner.sample_bytes(model, feed) == 2 * 4 * (2 * 8 * 32 * 24)  # c and y
    bare = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert runner.sample_bytes(bare, feed) == 2 * 4 * (2 * 8 * 32 * 24)  # no value_info at all


def test_a_stacked_batch_holds_at_most_stack_bytes(monkeypatch):
    model = _inferred()
    feeds = _feeds(12)
    per = runner.sample_bytes(model, feeds[0])
    assert runner.batches(model, feeds, 16).sizes == [6, 6]  # small activations: stacked as before
    monkeypatch.setattr(runner, "STACK_BYTES", 4 * per + 1, raising=False)
    bounded = runner.batches(model, feeds, 16)
    assert bounded.stacked and bounded.sizes == [4, 4, 4]
    assert all(len(f["x"]) <= 4 for f in bounded.feeds)
    monkeypatch.setattr(runner, "STACK_BYTES", per // 2, raising=False)
    single = runner.batches(model, feeds, 16)  # one sample is over the budget: one at a time
    assert not single.stacked and single.sizes == [1] * 12


def test_statistics_stream_bounded_batches_and_equal_the_stacked_ones(monkeypatch):
    model = _inferred()
    feeds = _feeds(12)
    graph = gs.import_onnx(model)
    views = [v for n in graph.nodes if (v := linear_view(n, 17)) is not None]
    assert {v.node.name for v in views} == {"conv1", "conv2", "conv3", "fc"}
    together = stats.collect(model, views, runner.batches(model, feeds, 16), gram=False)

    per = runner.sample_bytes(model, feeds[0])
    monkeypatch.setattr(runner, "STACK_BYTES", 2 * per + 1, raising=False)
    bounded = runner.batches(model, feeds, 16)
    assert bounded.sizes == [2] * 6
    seen: list[int] = []  # samples in each ONNX Runtime run
    make = runner.session

    class Spy:
        def __init__(self, sess):
            self.sess = sess

        def get_inputs(self):
            return self.sess.get_inputs()

        def run(self, names, feed):
            seen.append(max(len(v) for v in feed.values()))
            return self.sess.run(names, feed)

    monkeypatch.setattr(runner, "session", lambda *a, **k: Spy(make(*a, **k)))
    streamed = stats.collect(model, views, bounded, gram=False)
    assert seen and max(seen) <= 2 and sum(seen) % 12 == 0  # every sample, in runs of 2 at most
    for name in ("conv1", "conv2", "conv3", "fc"):
        a, b = together.get(name), streamed.get(name)
        assert a.count == b.count
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b.second_moment, a.second_moment, rtol=1e-6, atol=1e-9)


def test_a_calibrated_prune_runs_large_samples_one_at_a_time(monkeypatch):
    """The pipeline's batches (statistics, refit, fidelity, final refit) follow the bound."""
    calib = {"x": images(20)}
    options = dict(ratio=0.5, round_to=1, calibration=calib)
    stacked = graphprune.prune(cnn(), **options)
    assert stacked.report["calibration"]["batches"] == 2
    monkeypatch.setattr(runner, "STACK_BYTES", 1, raising=False)
    single = graphprune.prune(cnn(), **options)
    info = single.report["calibration"]
    assert single.report["verification"]["ok"]
    assert info["batches"] == info["used"] == 16
    assert single.report["fidelity"]["cosine"] > 0.9
