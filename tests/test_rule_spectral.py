"""``STFT`` of a signal whose length is open (every export with a dynamic length): ONNX shape
inference gives its output no shape at all, so before the rule every tensor computed from it
had no rank and the layers after it froze. The rule gives ``[B, frames, bins, 2]`` (the
preparation writes it for ONNX inference to go on from), passes the batch and freezes the
signal, frame, frequency and complex axes."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_prunes_exactly, make_model
from onnx import helper

from graphprune.analysis import analyze_graph
from graphprune.io import ir
from graphprune.io.ir import import_graph

OPS_UNDER_TEST = ("STFT",)


def _spectrogram_cnn(signal: list) -> onnx.ModelProto:
    """``signal -> STFT (window 16, step 4: 9 bins) -> [B, 18, frames] -> Conv1d (16) -> Relu ->
    Conv1d (4)``."""
    nodes = [helper.make_node("STFT", ["x", "step", "window", "length"], ["spec"], onesided=1),
             helper.make_node("Transpose", ["spec"], ["bins"], perm=[0, 2, 3, 1]),  # [B, 9, 2, F]
             helper.make_node("Reshape", ["bins", "flat"], ["feat"]),  # [B, 18, F]
             helper.make_node("Conv", ["feat", "w1", "b1"], ["h"], pads=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    return make_model(nodes, {"x": signal}, {"y": None},
                      {"step": np.array(4, np.int64), "window": np.hanning(16).astype(np.float32),
                       "length": np.array(16, np.int64), "flat": np.array([0, 18, -1], np.int64),
                       "w1": [16, 18, 3], "b1": [16], "w2": [4, 16, 1]}, opset=20)


def test_stft_of_an_open_length_gets_a_shape_and_the_layers_after_it_prune() -> None:
    model = _spectrogram_cnn([1, "samples"])
    prepared = ir.prepare(model)
    spec = {v.name: v for v in prepared.graph.value_info}["spec"].type.tensor_type.shape.dim
    assert [d.dim_value or None for d in spec] == [1, None, 9, 2]
    analysis = analyze_graph(import_graph(prepared), opset=20)
    assert not analysis.unsupported, analysis.unsupported
    (reading,) = [g for g in analysis.groups if ("w1", 1) in g.params]
    assert not reading.prunable  # the spectrogram's bins
    result = assert_prunes_exactly(model, feeds={"x": np.random.default_rng(0).standard_normal((1, 80)).astype(np.float32)})
    assert {t.name: list(t.dims) for t in result.model.graph.initializer}["w1"] == [8, 18, 3]


def test_stft_of_a_fixed_length_with_or_without_its_trailing_axis() -> None:
    """(ONNX inference sizes these itself; the rule couples as above.)"""
    for signal in ([2, 80], [2, 80, 1]):
        result = assert_prunes_exactly(_spectrogram_cnn(signal))
        assert {t.name: list(t.dims) for t in result.model.graph.initializer}["w2"] == [4, 8, 1]
