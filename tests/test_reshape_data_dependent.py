"""A Reshape after a data-dependent length (a TTS length regulator picks frames with
``NonZero``; even the shape probes leave that axis open): a repeat-interleave written as
``Unsqueeze -> Tile -> Reshape``, merging the repeats into the channels (the target computed
as ``Concat(Slice(Shape(t), 0, 2), [-1])``) or into the open time axis (``[1, C, -1]``).
Both froze their channel group as "Reshape not understood" (hibari-tts)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.rules.reshape_blocks import end_blocks


def _const(name: str, values, dtype=np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, dtype), name + "_v"))


def _frames(source: str, picked: str, axis: int, channels: int) -> list[onnx.NodeProto]:
    """``picked``: the frames of ``source`` (along ``axis``) where input channel 0 (of the
    input's axis ``channels``) is positive."""
    return [_const("zero", 0), helper.make_node("Gather", ["x", "zero"], ["x0"], axis=channels),
            _const("zf", 0.0, np.float32), helper.make_node("Greater", ["x0", "zf"], ["pos"]),
            helper.make_node("NonZero", ["pos"], ["nz"]), _const("one", 1),
            helper.make_node("Gather", ["nz", "one"], ["idx"], axis=0),
            helper.make_node("Gather", [source, "idx"], [picked], axis=axis)]


def channels_interleaved() -> onnx.ModelProto:
    """x[1, T, 16] -> MatMul 16x32 -> Relu -> frames -> [1, T', 32, 2] -> [1, T', 64] -> MatMul 64x8."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["h"]),
             *_frames("h", "hp", 1, 2),
             _const("ax", [3]), helper.make_node("Unsqueeze", ["hp", "ax"], ["u"]),
             _const("rep", [1, 1, 1, 2]), helper.make_node("Tile", ["u", "rep"], ["t"]),
             helper.make_node("Shape", ["t"], ["st"]), _const("s0", [0]), _const("s2", [2]),
             helper.make_node("Slice", ["st", "s0", "s2"], ["lead"]), _const("m1", [-1]),
             helper.make_node("Concat", ["lead", "m1"], ["target"], axis=0),
             helper.make_node("Reshape", ["t", "target"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "interleaved", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def frames_interleaved() -> onnx.ModelProto:
    """x[1, 4, T] -> Conv1d 16 -> Relu -> frames -> [1, 16, T', 2] -> [1, 16, 2T'] -> Conv1d 3."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1]), helper.make_node("Relu", ["a"], ["h"]),
             *_frames("h", "hp", 2, 1),
             _const("ax", [3]), helper.make_node("Unsqueeze", ["hp", "ax"], ["u"]),
             _const("rep", [1, 1, 1, 2]), helper.make_node("Tile", ["u", "rep"], ["t"]),
             _const("target", [1, 16, -1]), helper.make_node("Reshape", ["t", "target"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 4, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((3, 16, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")]
    graph = helper.make_graph(nodes, "frames", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _check(model: onnx.ModelProto, shape: dict, x: np.ndarray, width: tuple[str, int, int]) -> None:
    result = graphprune.prune(model, ratio=0.5, input_shapes=shape)
    assert result.report["verification"]["ok"]
    name, axis, kept = width
    assert next(t for t in result.model.graph.initializer if t.name == name).dims[axis] == kept
    onnx.checker.check_model(result.model, full_check=True)
    out, before = _run(result.model, x), _run(model, x)
    assert out.shape == before.shape and np.isfinite(out).all()


def test_repeats_merged_into_the_channels_after_picked_frames():
    x = np.random.default_rng(2).standard_normal((1, 12, 16)).astype(np.float32)
    _check(channels_interleaved(), {"x": [1, 10, 16]}, x, ("w1", 1, 16))  # was: frozen, 32 kept


def test_repeats_merged_into_the_open_time_axis():
    x = np.random.default_rng(3).standard_normal((1, 4, 15)).astype(np.float32)
    _check(frames_interleaved(), {"x": [1, 4, 10]}, x, ("w1", 0, 8))


def test_blocks_read_from_both_ends_around_the_open_sizes():
    assert end_blocks([1, 128, None, 2], [1, 128, None]) == [([0], [0]), ([1], [1]), ([2, 3], [2])]
    assert end_blocks([6, None, 4], [2, 3, None, 2, 2]) == [([0], [0, 1]), ([1], [2]), ([2], [3, 4])]
    assert end_blocks([None, 4], [4]) is None  # nothing left for the open size on one side
